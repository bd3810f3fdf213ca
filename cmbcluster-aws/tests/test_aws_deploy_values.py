"""The AWS plugin's ``cmbcluster_deploy_values``: the chart's global.aws.* values, the control
plane's IRSA role annotation and the Mountpoint storage driver, only when AWS is in use."""

from __future__ import annotations

import pytest

from cmbcluster.config import ResolvedConfig, load_core_settings, resolve
from cmbcluster.testing.deploy import DeployValues, DeployValuesContract
from cmbcluster_aws.deploy import cmbcluster_deploy_values, control_plane_role_arn
from cmbcluster_aws.settings import AwsSettings


def configured(monkeypatch: pytest.MonkeyPatch, **env: str) -> ResolvedConfig:
    for name in ("AWS_ENDPOINT_URL", "ECR_REGISTRY_URL", "EKS_CLUSTER_NAME", "CMBCLUSTER_AUTH_PROVIDERS"):
        monkeypatch.delenv(name, raising=False)
    for key, value in {
        "CLOUD_PROVIDER": "aws",
        "AWS_REGION": "eu-west-1",
        "AWS_ACCOUNT_ID": "123456789012",
        **env,
    }.items():
        monkeypatch.setenv(key, value)
    return resolve(load_core_settings())


class TestAwsDeployValuesContract(DeployValuesContract):
    @pytest.fixture
    def deploy_values(self) -> DeployValues:
        return cmbcluster_deploy_values

    @pytest.fixture
    def active_config(self, monkeypatch: pytest.MonkeyPatch) -> ResolvedConfig:
        return configured(monkeypatch, ECR_REGISTRY_URL="https://123456789012.dkr.ecr.eu-west-1.amazonaws.com/")


def test_aws_values_for_the_chart(monkeypatch: pytest.MonkeyPatch) -> None:
    config = configured(monkeypatch, ECR_REGISTRY_URL="https://123456789012.dkr.ecr.eu-west-1.amazonaws.com/")
    assert cmbcluster_deploy_values(config) == {
        "global": {
            "aws": {
                "region": "eu-west-1",
                "accountId": "123456789012",
                "eksClusterName": "cmbcluster-eks",
                # the deployment's path (its name is the cluster's by default)
                "controlPlaneRoleArn": (
                    "arn:aws:iam::123456789012:role/cmbcluster-infra/cmbcluster-eks/cmbcluster-eks-controlplane"
                ),
                "ecrRegistryUrl": "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com/",
            }
        },
        "storage": {"driver": "mountpoint-s3"},
    }


def test_role_arn_follows_the_partition() -> None:
    china = AwsSettings.model_validate(
        {"AWS_REGION": "cn-north-1", "AWS_ACCOUNT_ID": "123456789012", "EKS_CLUSTER_NAME": "cmb"}
    )
    assert control_plane_role_arn(china) == "arn:aws-cn:iam::123456789012:role/cmbcluster-infra/cmb/cmb-controlplane"


def test_only_the_aws_concerns_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # Cognito sign-in on another storage: the identity values, not the Mountpoint driver
    config = configured(monkeypatch, CMBCLUSTER_STORAGE_BACKEND="local")
    values = cmbcluster_deploy_values(config)
    assert values is not None and "storage" not in values
    # no AWS concern at all: nothing
    monkeypatch.setenv("CLOUD_PROVIDER", "local")
    monkeypatch.delenv("CMBCLUSTER_STORAGE_BACKEND")
    assert cmbcluster_deploy_values(resolve(load_core_settings())) is None
