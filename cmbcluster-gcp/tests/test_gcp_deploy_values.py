"""The GCP plugin's ``cmbcluster_deploy_values``: the chart's global.gcp.* values, the control
plane's Workload Identity service account and the gcsfuse storage driver, only when GCP is in use."""

from __future__ import annotations

import pytest

from cmbcluster.config import ResolvedConfig, load_core_settings, resolve
from cmbcluster.testing.deploy import DeployValues, DeployValuesContract
from cmbcluster_gcp.deploy import cmbcluster_deploy_values


def configured(monkeypatch: pytest.MonkeyPatch, **env: str) -> ResolvedConfig:
    for name in ("ARTIFACT_REGISTRY", "REGISTRY_URL", "PROJECT_NUMBER", "CLUSTER_NAME", "REGION"):
        monkeypatch.delenv(name, raising=False)
    for key, value in {"CLOUD_PROVIDER": "gcp", "PROJECT_ID": "cmb-research", **env}.items():
        monkeypatch.setenv(key, value)
    return resolve(load_core_settings())


class TestGcpDeployValuesContract(DeployValuesContract):
    @pytest.fixture
    def deploy_values(self) -> DeployValues:
        return cmbcluster_deploy_values

    @pytest.fixture
    def active_config(self, monkeypatch: pytest.MonkeyPatch) -> ResolvedConfig:
        return configured(monkeypatch, PROJECT_NUMBER="42", REGION="europe-west1")


def test_gcp_values_for_the_chart(monkeypatch: pytest.MonkeyPatch) -> None:
    config = configured(
        monkeypatch, PROJECT_NUMBER="42", REGION="europe-west1",
        ARTIFACT_REGISTRY="europe-west1-docker.pkg.dev/cmb-research/cmbcluster/",
    )  # fmt: skip
    assert cmbcluster_deploy_values(config) == {
        "global": {
            "gcp": {
                "projectId": "cmb-research",
                "projectNumber": "42",
                "region": "europe-west1",
                "clusterName": "cmbcluster",
                "serviceAccountEmail": "cmbcluster-controlplane@cmb-research.iam.gserviceaccount.com",
                "artifactRegistry": "europe-west1-docker.pkg.dev/cmb-research/cmbcluster/",
            }
        },
        "storage": {"driver": "gcsfuse"},
    }


def test_nothing_when_gcp_is_not_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    config = configured(monkeypatch, CLOUD_PROVIDER="local")
    assert cmbcluster_deploy_values(config) is None
