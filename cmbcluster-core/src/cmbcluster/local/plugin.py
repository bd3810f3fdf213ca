"""The built-in ``local`` provider's hook implementations: the embedded default."""

from __future__ import annotations

from collections.abc import Iterator

from cmbcluster.hookspecs import hookimpl
from cmbcluster.interfaces import AuthProvider, ComputeBackend, InfraProvider, StorageBackend
from cmbcluster.registrations import (
    AuthProviderRegistration,
    ComputeBackendRegistration,
    InfraProviderRegistration,
    ProviderContext,
    StorageBackendRegistration,
)


def _storage(ctx: ProviderContext) -> StorageBackend:
    from cmbcluster.local.storage import LocalStorage

    return LocalStorage(ctx.data_dir / "buckets")


def _compute(ctx: ProviderContext) -> ComputeBackend:
    from cmbcluster.local.compute import LocalProcessCompute

    return LocalProcessCompute(
        ctx.data_dir / "compute", homes_dir=ctx.data_dir / "homes", public_url=ctx.core.public_url
    )


def _auth(ctx: ProviderContext) -> AuthProvider:
    from cmbcluster.local.auth import DevLoginProvider
    from cmbcluster.security import secret_key

    # the only sign-in (the embedded default): its addresses count; beside real providers they do not
    return DevLoginProvider(secret_key(ctx.core), vouches_for_addresses=ctx.core.selected_auth == ["local"])


def _infra(ctx: ProviderContext) -> InfraProvider:
    from cmbcluster.local.infra import LocalInfra

    return LocalInfra(ctx.core.host)


@hookimpl
def cmbcluster_storage_backends() -> Iterator[StorageBackendRegistration]:
    yield StorageBackendRegistration(name="local", factory=_storage, description="Folders under the data directory")


@hookimpl
def cmbcluster_compute_backends() -> Iterator[ComputeBackendRegistration]:
    yield ComputeBackendRegistration(name="local", factory=_compute, description="Processes on this machine")


@hookimpl
def cmbcluster_auth_providers() -> Iterator[AuthProviderRegistration]:
    yield AuthProviderRegistration(name="local", factory=_auth, description="Development sign-in (loopback only)")


@hookimpl
def cmbcluster_infra_providers() -> Iterator[InfraProviderRegistration]:
    yield InfraProviderRegistration(name="local", factory=_infra, description="This machine")
