"""Cluster add-ons installed with helm: the command lines, the planned step of a release, and
installing or uninstalling one with its record (what every cloud's provisioner does the same way).

Besides the charts of others (cert-manager, ingress-nginx, the clouds' CSI drivers), core ships one
small chart of its own, ``cluster-config`` (:data:`CLUSTER_CONFIG_CHART`): the cluster-wide objects
the CMBCluster chart relies on and no add-on makes, a StorageClass for the control plane's disk and
the ClusterIssuer that signs its certificates (DNS-01 through the cloud's DNS, with the identity the
provisioner made for cert-manager). Each cloud fills in its part (:func:`cluster_config_release`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cmbcluster.interfaces.provisioning import HelmRelease, PlannedStep, ResourceRecord, StepContext
from cmbcluster.security import ORIGIN_WIDE_HEADERS

__all__ = [
    "CERT_MANAGER",
    "CLUSTER_CONFIG_CHART",
    "CLUSTER_ISSUER",
    "INGRESS_NGINX",
    "RELEASE_KIND",
    "cluster_config_release",
    "install_argv",
    "install_release",
    "release_step",
    "uninstall_argv",
    "uninstall_release",
]

#: The record kind of an installed release; its id is ``<namespace>/<name>``.
RELEASE_KIND = "helm/release"

# Pinned so that two `up` runs months apart install the same add-on; raise it deliberately. The one
# cert-manager of every cloud (each adds the values of its DNS-01 identity).
CERT_MANAGER = HelmRelease(
    name="cert-manager", chart="cert-manager", repo="https://charts.jetstack.io", version="v1.18.2",
    namespace="cert-manager", values={"crds.enabled": "true"},
)  # fmt: skip
# The ingress controller the chart's Ingresses name (class nginx, the auth-url annotation), in the
# namespace its NetworkPolicies admit (ingress.controllerNamespace, CMBCLUSTER_INGRESS_NAMESPACE).
INGRESS_NGINX = HelmRelease(
    name="ingress-nginx", chart="ingress-nginx", repo="https://kubernetes.github.io/ingress-nginx",
    version="4.13.3", namespace="ingress-nginx",
    values={"controller.ingressClassResource.name": "nginx", "controller.ingressClassResource.default": "false",
            "controller.allowSnippetAnnotations": "false"},
    # Never from an environment served on the control plane's host (path routing): see ORIGIN_WIDE_HEADERS
    json_values={"controller.config.hide-headers": json.dumps(",".join(ORIGIN_WIDE_HEADERS))},
)  # fmt: skip
#: The ClusterIssuer the CMBCluster chart names by default (``ingress.certManager.issuer``).
CLUSTER_ISSUER = "letsencrypt"
#: Core's own chart of cluster-wide objects (a folder of the installed package: no repository to reach).
CLUSTER_CONFIG_CHART = Path(__file__).resolve().parent / "charts" / "cluster-config"
LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


def cluster_config_release(
    *,
    deployment: str,
    storage_class: Mapping[str, Any] | None = None,
    dns01: Mapping[str, Any] | None = None,
    email: str | None = None,
    acme_server: str = LETSENCRYPT,
) -> HelmRelease:
    """The release of :data:`CLUSTER_CONFIG_CHART` for one deployment.

    ``storage_class``: ``name``, ``provisioner``, ``parameters`` (a mapping), ``reclaimPolicy``,
    ``default`` (whether it becomes the cluster's default class); None: no StorageClass (the
    cluster has a suitable default). ``dns01``: cert-manager's DNS-01 solver (``{"route53": {...}}``,
    ``{"cloudDNS": {...}}``); None: no ClusterIssuer (no domain to issue for)."""
    values = {"deployment": deployment, "issuer.name": CLUSTER_ISSUER, "issuer.server": acme_server}
    json_values: dict[str, str] = {}
    if email:
        values["issuer.email"] = email
    if storage_class is not None:
        json_values["storageClass"] = json.dumps(dict(storage_class), sort_keys=True)
    if dns01 is not None:
        json_values["issuer.dns01"] = json.dumps(dict(dns01), sort_keys=True)
    return HelmRelease(
        name="cmbcluster-cluster-config", chart=str(CLUSTER_CONFIG_CHART), repo="", version="",
        namespace="cert-manager", values=values, json_values=json_values,
    )  # fmt: skip


def install_argv(release: HelmRelease, kubeconfig: Path) -> list[str]:
    """``helm upgrade --install`` of ``release``, waiting until it is ready."""
    argv = ["helm", "upgrade", "--install", release.name, release.chart]
    if release.repo:
        argv += ["--repo", release.repo, "--version", release.version]
    argv += ["--namespace", release.namespace, "--create-namespace", "--kubeconfig", str(kubeconfig), "--wait"]
    for key, value in release.values.items():
        argv += ["--set", f"{key}={value}"]
    for key, text in release.json_values.items():
        argv += ["--set-json", f"{key}={text}"]
    return argv


def uninstall_argv(name: str, namespace: str, kubeconfig: Path) -> list[str]:
    """``helm uninstall`` of the release ``name`` (already gone is fine)."""
    return ["helm", "uninstall", name, "--namespace", namespace, "--kubeconfig", str(kubeconfig),
            "--ignore-not-found", "--wait"]  # fmt: skip


def release_step(key: str, release: HelmRelease, what: str = "") -> PlannedStep:
    """The planned step ``addon-<key>`` that installs ``release`` (external: governed by ``--addons``)."""
    chart = f"{release.chart} {release.version}" if release.repo else f"{release.name} (CMBCluster's own chart)"
    return PlannedStep(
        name=f"addon-{key}", description=f"helm: {chart} in {release.namespace}" + (f": {what}" if what else ""),
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
