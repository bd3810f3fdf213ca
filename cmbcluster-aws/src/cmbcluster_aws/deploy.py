"""What the AWS plugin adds to the Helm values of ``cmbcluster deploy`` (the chart's ``global.aws.*``).

The control plane's ServiceAccount is annotated with the IAM role it assumes through IRSA, by
convention ``<EKS_CLUSTER_NAME>-controlplane`` under the ``/cmbcluster/`` path
(:func:`control_plane_role_arn`; docs/DEPLOYMENT_AWS.md lists its permissions); buckets are mounted
with Mountpoint for S3 (static PersistentVolumes, hence the chart's ClusterRole).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cmbcluster import hookimpl
from cmbcluster_aws.settings import AwsSettings

if TYPE_CHECKING:
    from cmbcluster.config import ResolvedConfig

STORAGE_DRIVER = "mountpoint-s3"
CONTROL_PLANE_ROLE_SUFFIX = "-controlplane"


def control_plane_role_arn(settings: AwsSettings) -> str:
    """The IAM role of the control plane: ``arn:<partition>:iam::<account>:role/cmbcluster/<cluster>-controlplane``."""
    from cmbcluster_aws.identity import ROLE_PATH, _partition  # boto3 comes with it: only when deploying

    return (
        f"arn:{_partition(settings.aws_region)}:iam::{settings.aws_account_id}:role"
        f"{ROLE_PATH}{settings.eks_cluster_name}{CONTROL_PLANE_ROLE_SUFFIX}"
    )


@hookimpl
def cmbcluster_deploy_values(config: ResolvedConfig) -> dict[str, Any] | None:
    core = config.core
    if "aws" not in {core.cloud_provider, core.selected_storage, core.selected_infra, *core.selected_auth}:
        return None
    settings = config.provider_settings.get(AwsSettings)
    if not isinstance(settings, AwsSettings):
        return None
    aws: dict[str, Any] = {
        "region": settings.aws_region,
        "accountId": settings.aws_account_id,
        "eksClusterName": settings.eks_cluster_name,
        "controlPlaneRoleArn": control_plane_role_arn(settings),
    }
    values: dict[str, Any] = {"global": {"aws": aws}}
    if settings.ecr_registry_url:
        aws["ecrRegistryUrl"] = settings.ecr_registry_url
        values["image"] = {"registry": settings.ecr_registry_url.removeprefix("https://").rstrip("/")}
    if core.selected_storage == "aws":
        values["storage"] = {"driver": STORAGE_DRIVER}
    return values
