"""What the AWS plugin adds to the Helm values of ``cmbcluster deploy`` (the chart's ``global.aws.*``).

The control plane's ServiceAccount (``cmbcluster-controlplane``) is annotated with the IAM role it
assumes through IRSA, the one ``cmbcluster infra up`` creates (:func:`control_plane_role_arn`;
docs/DEPLOYMENT_AWS.md lists its permissions); buckets are mounted
with Mountpoint for S3 (static PersistentVolumes, hence the chart's ClusterRole).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cmbcluster import hookimpl
from cmbcluster_aws.settings import AwsSettings

if TYPE_CHECKING:
    from cmbcluster.config import ResolvedConfig

STORAGE_DRIVER = "mountpoint-s3"


def control_plane_role_arn(settings: AwsSettings) -> str:
    """The control plane's IRSA role, as ``cmbcluster infra up`` names it (one definition, there)."""
    from cmbcluster_aws.provisioning import control_plane_role_arn as arn  # boto3: only when deploying

    return arn(settings)


@hookimpl
def cmbcluster_deploy_values(config: ResolvedConfig) -> dict[str, Any] | None:
    settings = config.settings(AwsSettings)
    if settings is None:  # aws is not active in this deployment
        return None
    core = config.core
    aws: dict[str, Any] = {
        "region": settings.aws_region,
        "accountId": settings.aws_account_id,
        "eksClusterName": settings.eks_cluster_name,
        "controlPlaneRoleArn": control_plane_role_arn(settings),
    }
    values: dict[str, Any] = {"global": {"aws": aws}}
    if settings.ecr_registry_url:
        aws["ecrRegistryUrl"] = settings.ecr_registry_url
    if core.selected_storage == "aws":
        values["storage"] = {"driver": STORAGE_DRIVER}
    return values
