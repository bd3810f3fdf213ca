"""The AWS plugin's hook implementations. Kept light: boto3 is imported only by factories."""

from __future__ import annotations

from collections.abc import Iterator

from cmbcluster import (
    AuthProviderRegistration,
    InfraProviderRegistration,
    ProviderContext,
    StorageBackendRegistration,
    hookimpl,
)
from cmbcluster.errors import ConfigurationError
from cmbcluster.interfaces import (
    AuthProvider,
    InfraProvider,
    ManagedTransfer,
    PodContext,
    PodDraft,
    Provisioner,
    StorageBackend,
    TransferEnd,
)
from cmbcluster_aws.deploy import cmbcluster_deploy_values  # noqa: F401 - registers the hook
from cmbcluster_aws.prices import cmbcluster_price_table  # noqa: F401 - registers the hook
from cmbcluster_aws.settings import AwsSettings

CMBCLUSTER_PLUGIN_API = ">=1.0,<2"


def _s3_storage(ctx: ProviderContext) -> StorageBackend:
    from cmbcluster_aws.storage import S3Storage

    return S3Storage(ctx.require_settings(AwsSettings))


@hookimpl
def cmbcluster_storage_backends() -> Iterator[StorageBackendRegistration]:
    yield StorageBackendRegistration(
        name="aws", factory=_s3_storage, settings_model=AwsSettings, description="Amazon S3 buckets"
    )


def _cognito_auth(ctx: ProviderContext) -> AuthProvider:
    settings = ctx.require_settings(AwsSettings)
    missing = [
        f"{variable} is required for Cognito sign-in but not set (AwsSettings)"
        for variable, value in (
            ("COGNITO_USER_POOL_ID", settings.cognito_user_pool_id),
            ("COGNITO_CLIENT_ID", settings.cognito_client_id),
        )
        if not value
    ]
    if missing:
        raise ConfigurationError(missing)
    from cmbcluster_aws.auth import CognitoProvider

    return CognitoProvider.from_settings(settings)


@hookimpl
def cmbcluster_auth_providers() -> Iterator[AuthProviderRegistration]:
    yield AuthProviderRegistration(
        name="aws", factory=_cognito_auth, settings_model=AwsSettings, description="Amazon Cognito user pools"
    )


def _aws_infra(ctx: ProviderContext) -> InfraProvider:
    from cmbcluster_aws.identity import AwsInfra

    # AwsSettings has no domain setting: the deployment's public host stands in.
    return AwsInfra(ctx.require_settings(AwsSettings), domain=ctx.public_host)


def _aws_provisioner(ctx: ProviderContext) -> Provisioner:
    from cmbcluster.kubernetes.plugin import KubernetesSettings
    from cmbcluster.provisioning import deployment_domains
    from cmbcluster_aws.provisioning import AwsProvisioner

    kubernetes = ctx.settings(KubernetesSettings)
    domains = deployment_domains(ctx.core.public_url, kubernetes.environments_domain if kubernetes else None)
    # the database bucket is core's one setting (CMBCLUSTER_DATABASE_BUCKET, alias S3_DATABASE_BUCKET)
    return AwsProvisioner(
        ctx.require_settings(AwsSettings), namespace=ctx.core.namespace, database_bucket=ctx.core.database_bucket,
        domains=domains,
        ingress_namespace=kubernetes.ingress_namespace if kubernetes is not None else "ingress-nginx",
    )  # fmt: skip


@hookimpl
def cmbcluster_infra_providers() -> Iterator[InfraProviderRegistration]:
    yield InfraProviderRegistration(
        name="aws",
        factory=_aws_infra,
        settings_model=AwsSettings,
        description="EKS (IRSA roles), ECR",
        provisioner=_aws_provisioner,
    )


@hookimpl
def cmbcluster_decorate_pod(draft: PodDraft, context: PodContext) -> None:
    """IRSA and Mountpoint on EKS pods (cmbcluster_aws.pods); nothing for other clouds."""
    settings = context.settings(AwsSettings)  # the control plane's validated aws settings
    if settings is not None and context.serves("aws"):
        from cmbcluster_aws.pods import decorate_eks_pod

        decorate_eks_pod(draft, context, settings)


@hookimpl
def cmbcluster_managed_transfer(source: TransferEnd, target: TransferEnd) -> ManagedTransfer | None:
    """AWS DataSync for buckets moving from Cloud Storage to S3 (it reads GCS's S3-compatible API)."""
    if source.backend != "gcp" or target.backend != "aws" or not isinstance(target.settings, AwsSettings):
        return None
    from cmbcluster_aws.transfer import DataSyncTransfer

    return DataSyncTransfer(target.settings, source.bucket, target.bucket, target_storage=target.storage)
