"""What the AWS plugin adds to the Helm values of ``cmbcluster deploy`` (the chart's ``global.aws.*``).

The control plane's ServiceAccount (``cmbcluster-controlplane``) is annotated with the IAM role it
assumes through IRSA, the one ``cmbcluster infra up`` creates (:func:`control_plane_role_arn`,
``/cmbcluster-infra/<deployment>/<deployment>-controlplane``; docs/DEPLOYMENT_AWS.md lists its
permissions); buckets are mounted with Mountpoint for S3 (static PersistentVolumes, hence the
chart's ClusterRole). The control plane's disk takes the cluster's default StorageClass, which
``infra up`` makes (gp3, EBS CSI).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cmbcluster import hookimpl
from cmbcluster_aws.names import control_plane_role_arn
from cmbcluster_aws.settings import AwsSettings

if TYPE_CHECKING:
    from cmbcluster.config import ResolvedConfig

STORAGE_DRIVER = "mountpoint-s3"


__all__ = ["STORAGE_DRIVER", "cmbcluster_deploy_values", "control_plane_role_arn"]


@hookimpl
def cmbcluster_deploy_values(config: ResolvedConfig) -> dict[str, Any] | None:
    # the chart's cloud identity and storage driver are the storage's and the infra's: aws sign-in
    # alone (its settings are active then too) adds nothing; core renders the settings themselves
    settings = config.settings(AwsSettings)
    if settings is None or not config.serves("aws", "storage", "infra"):
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
    if config.serves("aws", "storage"):
        values["storage"] = {"driver": STORAGE_DRIVER}
    return values
