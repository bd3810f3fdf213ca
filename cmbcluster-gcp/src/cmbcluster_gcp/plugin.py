"""The GCP plugin's hook implementations. Kept light: google-cloud-* is imported only by factories."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

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
from cmbcluster_gcp.deploy import cmbcluster_deploy_values  # noqa: F401 - registers the hook
from cmbcluster_gcp.prices import cmbcluster_price_table  # noqa: F401 - registers the hook
from cmbcluster_gcp.settings import GcpSettings

if TYPE_CHECKING:
    from cmbcluster_gcp.identity import IamClient

CMBCLUSTER_PLUGIN_API = ">=1.0,<2"


def _gcs_storage(ctx: ProviderContext) -> StorageBackend:
    from cmbcluster_gcp.storage import GcsStorage

    return GcsStorage(ctx.require_settings(GcpSettings))


@hookimpl
def cmbcluster_storage_backends() -> Iterator[StorageBackendRegistration]:
    yield StorageBackendRegistration(
        name="gcp", factory=_gcs_storage, settings_model=GcpSettings, description="Google Cloud Storage buckets"
    )


def _google_auth(ctx: ProviderContext) -> AuthProvider:
    settings = ctx.require_settings(GcpSettings)
    if not settings.google_client_id:
        raise ConfigurationError(
            ["GOOGLE_CLIENT_ID is required for the 'gcp' auth provider (Sign in with Google): set it to the "
             "OAuth client id of a Google Cloud web application, and GOOGLE_CLIENT_SECRET to its secret"]
        )  # fmt: skip
    from cmbcluster_gcp.auth import google_provider

    return google_provider(settings)


@hookimpl
def cmbcluster_auth_providers() -> Iterator[AuthProviderRegistration]:
    yield AuthProviderRegistration(
        name="gcp", factory=_google_auth, settings_model=GcpSettings, description="Sign in with Google"
    )


def _gcp_infra(ctx: ProviderContext, iam: IamClient | None = None) -> InfraProvider:
    """``iam`` replaces the IAM client (tests pass an InMemoryIamClient)."""
    from cmbcluster_gcp.identity import GcpInfra

    # Without DOMAIN, the deployment's public host stands in.
    return GcpInfra(ctx.require_settings(GcpSettings), iam=iam, domain=ctx.public_host)


def _gcp_provisioner(ctx: ProviderContext) -> Provisioner:
    from cmbcluster.kubernetes.plugin import KubernetesSettings
    from cmbcluster.provisioning import deployment_domains
    from cmbcluster_gcp.provisioning import GcpProvisioner

    settings = ctx.require_settings(GcpSettings)
    kubernetes = ctx.settings(KubernetesSettings)
    domains = deployment_domains(
        ctx.core.public_url, kubernetes.environments_domain if kubernetes else None, domain=settings.domain
    )
    # the database bucket is core's one setting (CMBCLUSTER_DATABASE_BUCKET, alias GCS_DATABASE_BUCKET)
    return GcpProvisioner(
        settings, database_bucket=ctx.core.database_bucket, namespace=ctx.core.namespace,
        domains=domains,
        ingress_namespace=kubernetes.ingress_namespace if kubernetes is not None else "ingress-nginx",
    )  # fmt: skip


@hookimpl
def cmbcluster_infra_providers() -> Iterator[InfraProviderRegistration]:
    yield InfraProviderRegistration(
        name="gcp",
        factory=_gcp_infra,
        settings_model=GcpSettings,
        description="GKE (per-user Workload Identity), Artifact Registry, Cloud DNS",
        provisioner=_gcp_provisioner,
    )


@hookimpl
def cmbcluster_decorate_pod(draft: PodDraft, context: PodContext) -> None:
    """gcsfuse and Workload Identity on GKE pods (cmbcluster_gcp.pods); nothing for other clouds."""
    settings = context.settings(GcpSettings)  # the control plane's validated gcp settings
    if settings is not None and context.serves("gcp"):
        from cmbcluster_gcp.pods import decorate_gke_pod

        decorate_gke_pod(draft, context, settings)


@hookimpl
def cmbcluster_managed_transfer(source: TransferEnd, target: TransferEnd) -> ManagedTransfer | None:
    """Storage Transfer Service for buckets moving from S3 to Cloud Storage (it pulls from S3)."""
    if source.backend != "aws" or target.backend != "gcp" or not isinstance(target.settings, GcpSettings):
        return None
    from cmbcluster_gcp.transfer import StorageTransferJob

    return StorageTransferJob(target.settings, source.bucket, target.bucket)
