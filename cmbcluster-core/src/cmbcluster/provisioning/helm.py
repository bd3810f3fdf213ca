"""Cluster add-ons installed with helm: the command lines, the planned step of a release, and
installing or uninstalling one with its record (what every cloud's provisioner does the same way)."""

from __future__ import annotations

from pathlib import Path

from cmbcluster.interfaces.provisioning import HelmRelease, PlannedStep, ResourceRecord, StepContext

__all__ = [
    "CERT_MANAGER",
    "RELEASE_KIND",
    "install_argv",
    "install_release",
    "release_step",
    "uninstall_argv",
    "uninstall_release",
]

#: The record kind of an installed release; its id is ``<namespace>/<name>``.
RELEASE_KIND = "helm/release"

# Pinned so that two `up` runs months apart install the same add-on; raise it deliberately.
CERT_MANAGER = HelmRelease(
    name="cert-manager", chart="cert-manager", repo="https://charts.jetstack.io", version="v1.18.2",
    namespace="cert-manager", values={"crds.enabled": "true"},
)  # fmt: skip


def install_argv(release: HelmRelease, kubeconfig: Path) -> list[str]:
    """``helm upgrade --install`` of ``release``, waiting until it is ready."""
    argv = [
        "helm", "upgrade", "--install", release.name, release.chart, "--repo", release.repo,
        "--version", release.version, "--namespace", release.namespace, "--create-namespace",
        "--kubeconfig", str(kubeconfig), "--wait",
    ]  # fmt: skip
    for key, value in release.values.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def uninstall_argv(name: str, namespace: str, kubeconfig: Path) -> list[str]:
    """``helm uninstall`` of the release ``name`` (already gone is fine)."""
    return ["helm", "uninstall", name, "--namespace", namespace, "--kubeconfig", str(kubeconfig),
            "--ignore-not-found", "--wait"]  # fmt: skip


def release_step(key: str, release: HelmRelease) -> PlannedStep:
    """The planned step ``addon-<key>`` that installs ``release`` (external: governed by ``--addons``)."""
    return PlannedStep(
        name=f"addon-{key}", description=f"helm: {release.chart} {release.version} in {release.namespace}",
        creates=(f"{RELEASE_KIND} {release.namespace}/{release.name}",), external=True,
    )  # fmt: skip


def install_release(job: StepContext, release: HelmRelease, kubeconfig: Path) -> None:
    """Install ``release`` as ``--addons`` says, and record it once it is installed."""
    if job.run(install_argv(release, kubeconfig)):
        job.created(
            ResourceRecord(
                step=job.step, kind=RELEASE_KIND, id=f"{release.namespace}/{release.name}", name=release.name,
                attributes={"namespace": release.namespace},
            )
        )  # fmt: skip


def uninstall_release(job: StepContext, resource: ResourceRecord, kubeconfig: Path) -> None:
    """Uninstall the recorded release ``resource`` (as ``--addons`` says)."""
    job.run(uninstall_argv(resource.name, resource.attributes.get("namespace", "default"), kubeconfig))
