"""The pod-decoration contract: what every ``cmbcluster_decorate_pod`` implementation must leave.

Core builds a user pod's draft from the environment (its buckets' volumes from the storage
backend's ``volume_spec``, the user's cloud identity), runs every plugin's decorator on it, then
checks the result before anything reaches Kubernetes. The helpers here do exactly that, with
core's own code, so a plugin's tests see what the control plane would:

- :func:`environment_spec` mounts buckets through a storage backend as a start does;
- :func:`pod_draft` and :func:`pod_context` are core's draft and the context decorators get;
- :func:`check_pod` is core's check of a decorated draft (unique volumes that every mount refers
  to, only PersistentVolumes, PersistentVolumeClaims and Secrets as extra objects, no node folders
  (``hostPath``), no ServiceAccount but the user's own): it raises InvalidRequest.

Subclass :class:`PodDecorationContract`, name your provider and provide ``storage_backend`` (and
``identity`` and ``active_settings`` when your decorator needs them)::

    from cmbcluster.testing.pods import PodDecorationContract

    class TestAksPods(PodDecorationContract):
        provider_name = "azure"

        @pytest.fixture
        def storage_backend(self, azurite):
            return BlobStorage(...)

        @pytest.fixture
        def active_settings(self):
            return {AzureSettings: AzureSettings(...)}

The decorator run is your installed plugin's (``plugin_name``, by default ``provider_name``: its
entry point's name), so another installed plugin's decorator cannot fail your suite; override the
``decorate`` fixture with ``installed_decorators()`` to run every installed plugin's, in core's
order, as the control plane does.
"""

from __future__ import annotations

import copy
import functools
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from cmbcluster.compute.mounts import mount_bucket
from cmbcluster.errors import NotFound
from cmbcluster.interfaces import (
    BucketOptions,
    CloudIdentity,
    EnvironmentSpec,
    MountRequest,
    PodContext,
    PodDraft,
    StorageBackend,
    UserRef,
    VolumeSpec,
)
from cmbcluster.kubernetes.manifests import build_draft, check_decorated
from cmbcluster.kubernetes.manifests import pod_context as _pod_context
from cmbcluster.kubernetes.routing import Exposure

NAMESPACE = "cmbcluster-users"
Decorate = Callable[[PodDraft, PodContext], None]


def environment_spec(
    storage: StorageBackend,
    user: UserRef,
    mounts: Sequence[tuple[str, str, bool]] = (),
    *,
    identity: CloudIdentity | None = None,
    namespace: str = NAMESPACE,
    image: str = "quay.io/jupyter/base-notebook",
) -> EnvironmentSpec:
    """An environment of ``user`` mounting ``mounts`` (bucket, mount path, read-only), its volumes
    made by ``storage.volume_spec`` as a start makes them."""
    environment_id = uuid.uuid4().hex
    volumes = tuple(
        mount_bucket(
            storage, bucket=bucket, mount_path=path, user=user, environment_id=environment_id, identity=identity,
            namespace=namespace, read_only=read_only,
        )
        for bucket, path, read_only in mounts
    )  # fmt: skip
    return EnvironmentSpec(environment_id=environment_id, user=user, image=image, volumes=volumes, identity=identity)


def pod_draft(spec: EnvironmentSpec, *, namespace: str = NAMESPACE) -> PodDraft:
    """The draft core hands decorators for ``spec`` (before any decoration)."""
    return build_draft(spec, namespace=namespace, exposure=Exposure())


def pod_context(
    spec: EnvironmentSpec,
    *,
    storage_backend: str,
    infra_provider: str | None,
    active_settings: Mapping[type[Any], Any] | None = None,
    namespace: str = NAMESPACE,
) -> PodContext:
    """The context core hands decorators for ``spec``."""
    return _pod_context(
        spec, namespace=namespace, storage_backend=storage_backend, infra_provider=infra_provider,
        active_settings=dict(active_settings or {}),
    )  # fmt: skip


def check_pod(draft: PodDraft, spec: EnvironmentSpec, *, namespace: str = NAMESPACE) -> None:
    """Core's check of a decorated draft: raises InvalidRequest where the control plane would refuse it."""
    check_decorated(draft, spec, namespace=namespace)


def installed_decorators(plugin: str | None = None) -> Decorate:
    """Every installed plugin's ``cmbcluster_decorate_pod``, in core's order (as the control plane runs
    them); only the installed plugin called ``plugin`` when given (its entry point's name)."""
    from cmbcluster.plugins import PluginManager

    manager = PluginManager().load()
    if plugin is None:
        return manager.decorate_pod
    info = next((i for i in manager.plugins() if i.name == plugin), None)
    if info is None:
        raise LookupError(
            f"no plugin {plugin!r} is installed (an entry point of the group cmbcluster): install your package "
            "(pip install -e .), or name it in plugin_name"
        )
    if info.error is not None:
        raise LookupError(f"plugin {plugin!r} ({info.distribution} {info.version}) failed to load: {info.error}")
    return functools.partial(manager.decorate_pod, plugins=(plugin,))


class PodDecorationContract:
    """Subclass it; set ``provider_name``; provide ``storage_backend`` (and ``identity``, ``active_settings``)."""

    #: The registered name your decorator serves (``context.serves(provider_name)``).
    provider_name: str = ""
    #: Your plugin's name (its entry point's), whose decorator the suite runs; default provider_name.
    plugin_name: str | None = None
    #: Whether your infra provider is deployed beside your storage (both names in the context).
    serves_infra: bool = True

    @pytest.fixture
    def storage_backend(self) -> StorageBackend:
        raise NotImplementedError("provide a storage_backend fixture in your subclass")

    @pytest.fixture
    def user(self) -> UserRef:
        return UserRef(id=uuid.uuid4().hex, email="ada.lovelace@example.org")

    @pytest.fixture
    def identity(self, user: UserRef) -> CloudIdentity | None:
        """The user's cloud identity as your infra provider makes it (None: none)."""
        return None

    @pytest.fixture
    def active_settings(self) -> Mapping[type[Any], Any]:
        """The validated settings of the active providers, by model (what ``context.settings`` answers)."""
        return {}

    @pytest.fixture
    def decorate(self) -> Decorate:
        """Your installed plugin's decorator alone (another plugin's cannot fail your suite)."""
        return installed_decorators(self.plugin_name or self.provider_name)

    @pytest.fixture
    def mounted(self, storage_backend: StorageBackend, user: UserRef) -> Iterator[list[tuple[str, str, bool]]]:
        """Two buckets of the user: one mounted read-write, one read-only."""
        names = [storage_backend.create_bucket(user, BucketOptions(display_name=f"pods {i}")).name for i in (1, 2)]
        yield [(names[0], "/home/user/data", False), (names[1], "/mnt/archive", True)]
        for name in names:
            try:
                storage_backend.delete_bucket(name, force=True)
            except NotFound:
                pass

    def _context(self, spec: EnvironmentSpec, active_settings: Mapping[type[Any], Any]) -> PodContext:
        return pod_context(
            spec, storage_backend=self.provider_name, infra_provider=self.provider_name if self.serves_infra else None,
            active_settings=active_settings,
        )  # fmt: skip

    def test_a_pod_mounting_buckets_passes_cores_checks_once_decorated(
        self,
        storage_backend: StorageBackend,
        user: UserRef,
        identity: CloudIdentity | None,
        active_settings: Mapping[type[Any], Any],
        decorate: Decorate,
        mounted: list[tuple[str, str, bool]],
    ) -> None:
        spec = environment_spec(storage_backend, user, mounted, identity=identity)
        draft = pod_draft(spec)
        context = self._context(spec, active_settings)
        assert context.buckets == tuple(bucket for bucket, _, _ in mounted)
        decorate(draft, context)
        check_pod(draft, spec)
        # every mount core asked for is still where the user expects it
        paths = {m["mountPath"]: m for m in draft.volume_mounts}
        for mounted_volume in spec.volumes:
            if mounted_volume.spec.mount is not None:
                assert mounted_volume.mount_path in paths
        if identity is not None and identity.service_account:
            assert draft.service_account_name == identity.service_account

    def test_volumes_are_made_for_the_users_identity(
        self,
        storage_backend: StorageBackend,
        user: UserRef,
        identity: CloudIdentity | None,
        active_settings: Mapping[type[Any], Any],
        mounted: list[tuple[str, str, bool]],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """``volume_spec`` is asked as core asks at a start: each bucket with the user's identity (a
        volume that mounts with the pod's credentials names it), and decorators see the same."""
        asked: list[MountRequest] = []
        volume_spec = storage_backend.volume_spec

        def recording(request: MountRequest) -> VolumeSpec:
            asked.append(request)
            return volume_spec(request)

        monkeypatch.setattr(storage_backend, "volume_spec", recording)
        spec = environment_spec(storage_backend, user, mounted, identity=identity)
        assert [(r.bucket, r.mount_path, r.read_only) for r in asked] == mounted
        assert all(r.identity == identity and r.user == user and r.namespace == NAMESPACE for r in asked)
        context = self._context(spec, active_settings)
        assert context.identity == identity and context.buckets == tuple(bucket for bucket, _, _ in mounted)

    def test_a_pod_without_buckets_passes_cores_checks_once_decorated(
        self,
        storage_backend: StorageBackend,
        user: UserRef,
        identity: CloudIdentity | None,
        active_settings: Mapping[type[Any], Any],
        decorate: Decorate,
    ) -> None:
        spec = environment_spec(storage_backend, user, identity=identity)
        draft = pod_draft(spec)
        decorate(draft, self._context(spec, active_settings))
        check_pod(draft, spec)

    def test_pods_of_other_clouds_are_left_alone(
        self, storage_backend: StorageBackend, user: UserRef, active_settings: Mapping[type[Any], Any],
        decorate: Decorate,
    ) -> None:  # fmt: skip
        spec = environment_spec(storage_backend, user)
        draft = pod_draft(spec)
        before = copy.deepcopy(draft)
        decorate(draft, pod_context(spec, storage_backend="elsewhere", infra_provider="elsewhere",
                                    active_settings=active_settings))  # fmt: skip
        assert draft == before
