"""The GCP plugin's hook implementations. Kept light: google-cloud-* is imported only by factories."""

from __future__ import annotations

from collections.abc import Iterator

from cmbcluster import AuthProviderRegistration, ProviderContext, StorageBackendRegistration, hookimpl
from cmbcluster.errors import ConfigurationError
from cmbcluster.interfaces import AuthProvider, StorageBackend
from cmbcluster_gcp.settings import GcpSettings

CMBCLUSTER_PLUGIN_API = ">=1.0,<2"


def _gcs_storage(ctx: ProviderContext) -> StorageBackend:
    from cmbcluster_gcp.storage import GcsStorage

    return GcsStorage(ctx.settings(GcpSettings))


@hookimpl
def cmbcluster_storage_backends() -> Iterator[StorageBackendRegistration]:
    yield StorageBackendRegistration(
        name="gcp", factory=_gcs_storage, settings_model=GcpSettings, description="Google Cloud Storage buckets"
    )


def _google_auth(ctx: ProviderContext) -> AuthProvider:
    settings = ctx.settings(GcpSettings)
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
