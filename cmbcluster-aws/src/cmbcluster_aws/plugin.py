"""The AWS plugin's hook implementations. Kept light: boto3 is imported only by factories."""

from __future__ import annotations

from collections.abc import Iterator

from cmbcluster import ProviderContext, StorageBackendRegistration, hookimpl
from cmbcluster.interfaces import StorageBackend
from cmbcluster_aws.settings import AwsSettings

CMBCLUSTER_PLUGIN_API = ">=1.0,<2"


def _s3_storage(ctx: ProviderContext) -> StorageBackend:
    from cmbcluster_aws.storage import S3Storage

    return S3Storage(ctx.settings(AwsSettings))


@hookimpl
def cmbcluster_storage_backends() -> Iterator[StorageBackendRegistration]:
    yield StorageBackendRegistration(
        name="aws", factory=_s3_storage, settings_model=AwsSettings, description="Amazon S3 buckets"
    )
