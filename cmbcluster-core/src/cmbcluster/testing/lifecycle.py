"""The order in which core calls a cloud's providers over a user's life, and a suite that checks it
on your infra provider through the real control plane (environments run as local processes, on
local folders, so the suite needs no cluster).

The order, which ``docs/plugins/hooks.md`` documents (:data:`LIFECYCLE`):

1. A bucket is created: ``storage.create_bucket``, then ``infra.update_user_buckets`` with every
   active bucket of the user.
2. An environment starts: ``infra.ensure_user_identity``; if it returned an identity,
   ``infra.update_user_buckets`` (every active bucket of the user), then for each bucket mounted
   ``storage.ensure_bucket_access`` and ``storage.volume_spec`` (its ``MountRequest.identity`` is
   that identity, or None); then the compute backend starts it (on Kubernetes it builds the pod and
   runs every ``cmbcluster_decorate_pod`` on it, whose ``PodContext`` has the identity and the
   mounted buckets).
3. A bucket is deleted: ``storage.delete_bucket``, then ``infra.update_user_buckets`` with the rest.
4. A user is deleted (by an administrator, once their buckets are gone): their environments are
   stopped and removed, then ``infra.delete_user_identity``.

Subclass :class:`LifecycleContract` and provide ``infra_provider``::

    class TestAzureLifecycle(LifecycleContract):
        @pytest.fixture
        def infra_provider(self, azure):
            return AzureInfra(...)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cmbcluster.hookspecs import hookimpl
from cmbcluster.interfaces import (
    BucketInfo,
    BucketOptions,
    CloudIdentity,
    DnsInfo,
    InfraProvider,
    MountRequest,
    RegistryInfo,
    StorageBackend,
    UserRef,
    VolumeSpec,
)
from cmbcluster.local.storage import LocalStorage
from cmbcluster.registrations import InfraProviderRegistration, StorageBackendRegistration

#: (event, the calls core makes, in order); ``*`` marks a call made for each bucket mounted.
LIFECYCLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bucket created", ("storage.create_bucket", "infra.update_user_buckets")),
    (
        "environment started",
        ("infra.ensure_user_identity", "infra.update_user_buckets", "*storage.ensure_bucket_access",
         "*storage.volume_spec"),
    ),
    ("bucket deleted", ("storage.delete_bucket", "infra.update_user_buckets")),
    ("user deleted", ("infra.delete_user_identity",)),
)  # fmt: skip
#: The calls :class:`LifecycleContract` records (the others are not part of the order).
RECORDED = frozenset(call.lstrip("*") for _, calls in LIFECYCLE for call in calls)


class Calls(list[str]):
    """The recorded calls, in order; beside them, what ``ensure_user_identity`` returned and what
    ``volume_spec`` was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.identities: list[CloudIdentity | None] = []
        self.mounts: list[MountRequest] = []

    def since(self, mark: int) -> list[str]:
        return [c for c in self[mark:] if c in RECORDED]


class RecordingInfra(InfraProvider):
    """Your infra provider, with every call core makes recorded in ``calls``."""

    def __init__(self, inner: InfraProvider, calls: Calls) -> None:
        self.inner, self.calls = inner, calls

    def ensure_user_identity(self, user: UserRef, *, namespace: str) -> CloudIdentity | None:
        self.calls.append("infra.ensure_user_identity")
        identity = self.inner.ensure_user_identity(user, namespace=namespace)
        self.calls.identities.append(identity)
        return identity

    def delete_user_identity(self, user: UserRef, *, namespace: str) -> None:
        self.calls.append("infra.delete_user_identity")
        self.inner.delete_user_identity(user, namespace=namespace)

    def update_user_buckets(self, user: UserRef, buckets: Sequence[str]) -> None:
        self.calls.append("infra.update_user_buckets")
        self.inner.update_user_buckets(user, buckets)

    def registry(self) -> RegistryInfo:
        return self.inner.registry()

    def dns(self) -> DnsInfo:
        return self.inner.dns()

    def close(self) -> None:
        self.inner.close()


class RecordingStorage(LocalStorage):
    """Local folders, with the calls of :data:`LIFECYCLE` recorded in ``calls``."""

    def __init__(self, root: Path, calls: Calls) -> None:
        super().__init__(root)
        self.calls = calls

    def create_bucket(self, owner: UserRef, options: BucketOptions) -> BucketInfo:
        self.calls.append("storage.create_bucket")
        return super().create_bucket(owner, options)

    def delete_bucket(self, bucket: str, *, force: bool = False) -> None:
        self.calls.append("storage.delete_bucket")
        super().delete_bucket(bucket, force=force)

    def ensure_bucket_access(self, bucket: str, identity: CloudIdentity) -> None:
        self.calls.append("storage.ensure_bucket_access")
        super().ensure_bucket_access(bucket, identity)

    def volume_spec(self, request: MountRequest) -> VolumeSpec:
        self.calls.append("storage.volume_spec")
        self.calls.mounts.append(request)
        return super().volume_spec(request)


def expected(event: str, *, identity: bool, mounts: int = 0) -> list[str]:
    """The calls :data:`LIFECYCLE` promises for ``event``."""
    calls: list[str] = []
    for name, steps in LIFECYCLE:
        if name != event:
            continue
        if event == "environment started":
            calls.append("infra.ensure_user_identity")
            if identity:
                calls.append("infra.update_user_buckets")
            for _ in range(mounts):
                calls += (["storage.ensure_bucket_access"] if identity else []) + ["storage.volume_spec"]
        else:
            calls += list(steps)
    return calls


class LifecycleContract:
    """Subclass it; provide ``infra_provider``. Set ``gives_identities = False`` if it gives none."""

    gives_identities: bool = True

    @pytest.fixture
    def infra_provider(self) -> InfraProvider:
        raise NotImplementedError("provide an infra_provider fixture in your subclass")

    @pytest.fixture
    def lifecycle_client(self, infra_provider: InfraProvider, tmp_path: Path) -> Iterator[tuple[Any, Calls]]:
        """The control plane (FastAPI's TestClient) with your infra provider, local folders and processes."""
        from fastapi.testclient import TestClient

        from cmbcluster.app import create_app
        from cmbcluster.plugins import PluginManager
        from cmbcluster.settings import CoreSettings
        from cmbcluster.testing.api import LOCAL

        calls = Calls()
        infra = RecordingInfra(infra_provider, calls)

        def storage(ctx: Any) -> StorageBackend:
            return RecordingStorage(tmp_path / "buckets", calls)

        @hookimpl
        def cmbcluster_infra_providers() -> Iterator[InfraProviderRegistration]:
            yield InfraProviderRegistration(name="lifecycle", factory=lambda ctx: infra)

        @hookimpl
        def cmbcluster_storage_backends() -> Iterator[StorageBackendRegistration]:
            yield StorageBackendRegistration(name="lifecycle", factory=storage)

        manager = PluginManager(entry_points_enabled=False)
        manager.register(
            SimpleNamespace(cmbcluster_infra_providers=cmbcluster_infra_providers,
                            cmbcluster_storage_backends=cmbcluster_storage_backends),
            name="lifecycle",
        )  # fmt: skip
        settings = CoreSettings(
            _env_file=None, data_dir=tmp_path / "data", infra_provider="lifecycle", storage_backend="lifecycle"
        )  # type: ignore[call-arg]
        with TestClient(create_app(settings, manager), base_url=LOCAL) as client:
            yield client, calls

    def test_core_calls_your_provider_in_the_documented_order(self, lifecycle_client: tuple[Any, Calls]) -> None:
        from cmbcluster.testing.api import dev_sign_in

        client, calls = lifecycle_client
        admin = dev_sign_in(client, "pi@example.org")
        ada = dev_sign_in(client, "ada@example.org")
        ada_id = client.get("/api/v1/auth/me", headers=ada).json()["id"]

        mark = len(calls)
        bucket = client.post("/api/v1/storages", json={"display_name": "maps"}, headers=ada)
        assert bucket.status_code == 201, bucket.text
        assert calls.since(mark) == expected("bucket created", identity=self.gives_identities)

        mark = len(calls)
        env = client.post(
            "/api/v1/environments",
            json={"application": "files", "start": True,
                  "mounts": [{"storage_id": bucket.json()["id"], "mount_path": "/home/user/data"}]},
            headers=ada,
        )  # fmt: skip
        assert env.status_code == 201, env.text
        _wait(lambda: client.get(f"/api/v1/environments/{env.json()['id']}", headers=ada).json()["status"]
              in ("running", "failed"))  # fmt: skip
        status = client.get(f"/api/v1/environments/{env.json()['id']}", headers=ada).json()
        assert status["status"] == "running", status
        assert calls.since(mark) == expected("environment started", identity=self.gives_identities, mounts=1)
        # the bucket is mounted as the identity the user's environment runs as (a CSI volume that
        # mounts with the pod's credentials names it: a role, a managed identity's client id)
        assert [m.identity for m in calls.mounts] == calls.identities[-1:]
        assert calls.mounts[-1].user.id == ada_id and calls.mounts[-1].mount_path == "/home/user/data"

        assert client.delete(f"/api/v1/environments/{env.json()['id']}", headers=ada).status_code in (200, 202, 204)
        mark = len(calls)
        assert client.delete(f"/api/v1/storages/{bucket.json()['id']}", headers=ada).status_code == 204
        assert calls.since(mark) == expected("bucket deleted", identity=self.gives_identities)

        mark = len(calls)
        assert client.delete(f"/api/v1/admin/users/{ada_id}", headers=admin).status_code == 204
        assert calls.since(mark) == expected("user deleted", identity=self.gives_identities)


def _wait(done: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
