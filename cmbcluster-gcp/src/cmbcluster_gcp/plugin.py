"""The GCP plugin's hook implementations. Kept light: google-cloud-* is imported only by factories."""

from __future__ import annotations

from collections.abc import Iterator

from cmbcluster import ProviderContext, StorageBackendRegistration, hookimpl
from cmbcluster.interfaces import StorageBackend
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
