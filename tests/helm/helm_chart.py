"""Helpers for the Helm chart's tests (tests/helm, static; tests/k8s/test_helm_chart.py, on a real API server).

helm 3.18.0 comes from the Kubernetes test harness's cache (tests/k8s/cluster.sh install puts it
there, and builds the cluster binaries the first time), from ``$CMBCLUSTER_HELM`` or from PATH.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cmbcluster"
CLUSTER_SH = ROOT / "tests" / "k8s" / "cluster.sh"
# A current Kubernetes release (GKE and EKS regular channels, 2026) for offline validation.
CURRENT_KUBERNETES = "1.34.0"
HELM_VERSION = "v3.18"

GCP_VALUES: dict[str, Any] = {
    "global": {
        "cloudProvider": "gcp",
        "gcp": {
            "projectId": "cmb-research",
            "serviceAccountEmail": "cmbcluster-controlplane@cmb-research.iam.gserviceaccount.com",
        },
    },
    "environments": {"domain": "envs.example.org"},
    "ingress": {"host": "cmb.example.org"},
}
AWS_VALUES: dict[str, Any] = {
    "global": {
        "cloudProvider": "aws",
        "aws": {
            "region": "eu-west-1",
            "accountId": "123456789012",
            "controlPlaneRoleArn": "arn:aws:iam::123456789012:role/cmbcluster-infra/cmbcluster-eks/cmbcluster-eks-controlplane",
        },
    },
    "database": {"url": "postgresql://cmb:a-password@db.example.org/cmb"},
    "controlPlane": {"replicas": 2},
}
# A third party's cloud the chart knows nothing about: only generic values.
PLUGIN_VALUES: dict[str, Any] = {
    "global": {"cloudProvider": "azure"},
    "serviceAccount": {"annotations": {"azure.workload.identity/client-id": "00000000-0000-0000-0000-000000000000"}},
    "storage": {"driver": "blob-csi"},
}
CLOUDS = {"gcp": GCP_VALUES, "aws": AWS_VALUES, "azure": PLUGIN_VALUES}

# An operator's configuration for `cmbcluster deploy`, per cloud (secrets included, to check they stay hidden).
GCP_ENV = {
    "CLOUD_PROVIDER": "gcp",
    "PROJECT_ID": "cmb-research",
    "PROJECT_NUMBER": "123456789",
    "REGION": "europe-west1",
    "ARTIFACT_REGISTRY": "europe-west1-docker.pkg.dev/cmb-research/cmbcluster",
    "GOOGLE_CLIENT_ID": "1234.apps.googleusercontent.com",
    "GOOGLE_CLIENT_SECRET": "google-client-secret-value",
    "CMBCLUSTER_ADMIN_EMAILS": "pi@example.org",
    "CMBCLUSTER_PUBLIC_URL": "https://cmb.example.org",
    "CMBCLUSTER_ENVIRONMENTS_DOMAIN": "envs.example.org",
}
AWS_ENV = {
    "CLOUD_PROVIDER": "aws",
    "AWS_REGION": "eu-west-1",
    "AWS_ACCOUNT_ID": "123456789012",
    "EKS_CLUSTER_NAME": "cmb-eks",
    "ECR_REGISTRY_URL": "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
    "COGNITO_USER_POOL_ID": "eu-west-1_AbCdEf",
    "COGNITO_CLIENT_ID": "cognito-client",
    "COGNITO_CLIENT_SECRET": "cognito-client-secret-value",
    "CMBCLUSTER_DATABASE_URL": "postgresql://cmb:db-password-value@db.example.org/cmb",
    "CMBCLUSTER_SECRET_KEY": "k" * 40,
}


def _harness_helm() -> Path:
    home = os.environ.get("K8S_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cmbcluster-k8s"
    )
    return Path(home) / "bin" / "helm"


@functools.cache
def helm_binary() -> str:
    """helm 3: $CMBCLUSTER_HELM, the harness's cached one, PATH; else install it with the harness."""
    explicit = os.environ.get("CMBCLUSTER_HELM")
    if explicit:
        return explicit
    cached = _harness_helm()
    if not cached.exists():
        on_path = shutil.which("helm")
        if (
            on_path
            and HELM_VERSION in subprocess.run([on_path, "version", "--short"], capture_output=True, text=True).stdout
        ):
            return on_path
        # The project's own installer (minutes, once): the same helm the Kubernetes tests use.
        subprocess.run(["bash", str(CLUSTER_SH), "install"], check=True, timeout=2400, stdin=subprocess.DEVNULL)
    return str(cached)


def helm(*args: str, input_values: dict[str, Any] | None = None, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run helm; ``input_values`` go on standard input (pass ``--values -``)."""
    return subprocess.run(
        [helm_binary(), *args],
        input=json.dumps(input_values) if input_values is not None else None,
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip


def template(
    values: dict[str, Any],
    *,
    release: str = "cmb",
    namespace: str = "research",
    kube_version: str | None = CURRENT_KUBERNETES,
    api_versions: tuple[str, ...] = ("policy/v1",),
) -> subprocess.CompletedProcess[str]:
    args = ["template", release, str(CHART), "--namespace", namespace, "--values", "-"]
    if kube_version:
        args += ["--kube-version", kube_version]
    for api in api_versions:
        args += ["--api-versions", api]
    return helm(*args, input_values=values)


def manifests(values: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    """The rendered objects; AssertionError with helm's message when rendering fails."""
    result = template(values, **kwargs)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
