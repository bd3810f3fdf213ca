"""The plugin manager: selection by name, conflicts, API fence, allow/block, decoration order."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cmbcluster import PLUGIN_API_VERSION, hookimpl
from cmbcluster.errors import InvalidRequest, PluginError
from cmbcluster.interfaces import ManagedTransfer, PodContext, PodDraft, TransferEnd, UserRef
from cmbcluster.local.storage import LocalStorage
from cmbcluster.plugins import PluginManager
from cmbcluster.registrations import (
    ComputeBackendRegistration,
    ProviderContext,
    StorageBackendRegistration,
)


def _storage_plugin(name: str, **attrs: object) -> SimpleNamespace:
    def factory(ctx: ProviderContext) -> LocalStorage:
        return LocalStorage(ctx.data_dir / name)

    @hookimpl
    def cmbcluster_storage_backends() -> Iterator[StorageBackendRegistration]:
        yield StorageBackendRegistration(name=name, factory=factory)

    return SimpleNamespace(cmbcluster_storage_backends=cmbcluster_storage_backends, **attrs)


@pytest.fixture
def manager() -> PluginManager:
    return PluginManager(entry_points_enabled=False).load()


def test_builtin_local_provider_registers_every_concern(manager: PluginManager) -> None:
    assert manager.storage_backend("local").name == "local"
    assert manager.compute_backend("local").name == "local"
    assert manager.auth_provider("local").name == "local"
    assert manager.infra_provider("local").name == "local"
    local = next(p for p in manager.plugins() if p.name == "local")
    assert local.builtin and local.loaded
    assert local.hooks == [
        "cmbcluster_auth_providers",
        "cmbcluster_compute_backends",
        "cmbcluster_infra_providers",
        "cmbcluster_storage_backends",
    ]


def test_entry_point_plugins_are_discovered() -> None:
    names = {p.name: p for p in PluginManager().plugins()}
    assert {"local", "aws", "gcp"} <= set(names)
    assert names["aws"].distribution == "cmbcluster-aws"
    assert "cmbcluster_storage_backends" in names["gcp"].hooks


def test_selection_is_by_name_not_registration_order(manager: PluginManager) -> None:
    alpha = _storage_plugin("alpha")
    manager.register(alpha, name="alpha-plugin")
    manager.register(_storage_plugin("beta"), name="beta-plugin")
    assert manager.storage_backend("alpha").name == "alpha"
    assert manager.storage_backend("beta").name == "beta"
    assert manager.storage_backend("alpha") == next(iter(alpha.cmbcluster_storage_backends()))  # alpha-plugin's own


def test_same_name_from_two_plugins_is_an_error_naming_both(manager: PluginManager) -> None:
    manager.register(_storage_plugin("shared"), name="first", distribution="cmbcluster-first", version="1.0")
    with pytest.raises(PluginError) as exc_info:
        manager.register(_storage_plugin("shared"), name="second", distribution="cmbcluster-second", version="2.0")
    message = str(exc_info.value)
    assert "cmbcluster-first 1.0" in message and "cmbcluster-second 2.0" in message and "'shared'" in message


def test_unknown_name_says_what_to_install(manager: PluginManager) -> None:
    with pytest.raises(PluginError, match=r"pip install cmbcluster-azure"):
        manager.storage_backend("azure")


def test_plugin_needing_a_newer_api_is_recorded_not_used(manager: PluginManager) -> None:
    manager.register(_storage_plugin("future", CMBCLUSTER_PLUGIN_API=">=99"), name="future")
    info = next(p for p in manager.plugins() if p.name == "future")
    assert not info.loaded
    assert f"provides {PLUGIN_API_VERSION}" in (info.error or "")
    with pytest.raises(PluginError, match="failed to load"):
        manager.storage_backend("future")


def test_plugin_meeting_the_api_requirement_loads(manager: PluginManager) -> None:
    manager.register(_storage_plugin("fine", CMBCLUSTER_PLUGIN_API=">=1.0,<2"), name="fine")
    assert manager.storage_backend("fine").name == "fine"


def test_strict_mode_makes_a_broken_plugin_fatal() -> None:
    strict = PluginManager(entry_points_enabled=False, strict=True).load()
    with pytest.raises(PluginError, match="strict mode"):
        strict.register(_storage_plugin("bad", CMBCLUSTER_PLUGIN_API="not a specifier"), name="bad")


def test_block_and_allow_lists() -> None:
    blocked = PluginManager(block=["aws"])
    info = {p.name: p for p in blocked.plugins()}
    assert info["aws"].error == "blocked by CMBCLUSTER_PLUGINS_BLOCK"
    assert info["gcp"].loaded
    allowed = PluginManager(allow=["gcp"])
    info = {p.name: p for p in allowed.plugins()}
    assert info["aws"].error == "not in CMBCLUSTER_PLUGINS_ALLOW"
    assert info["gcp"].loaded and info["local"].loaded  # built-ins are always allowed


def _failure(manager: PluginManager, name: str) -> str:
    info = next(p for p in manager.plugins() if p.name == name)
    assert not info.loaded
    return info.error or ""


def test_registration_of_the_wrong_type_is_recorded_and_skipped(manager: PluginManager) -> None:
    @hookimpl
    def cmbcluster_storage_backends() -> list[ComputeBackendRegistration]:
        return [ComputeBackendRegistration(name="oops", factory=lambda ctx: None)]  # type: ignore[arg-type,return-value]

    manager.register(SimpleNamespace(cmbcluster_storage_backends=cmbcluster_storage_backends), name="wrong")
    assert "expected StorageBackendRegistration" in _failure(manager, "wrong")
    assert "oops" not in manager.registrations("storage") and "oops" not in manager.registrations("compute")


def test_invalid_registration_names_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid storage backend name"):
        StorageBackendRegistration(name="Bad Name", factory=lambda ctx: None)  # type: ignore[arg-type,return-value]


def test_a_broken_registration_hook_is_recorded_and_the_plugin_skipped(manager: PluginManager) -> None:
    """An exception in a hook, or a registration with an invalid name, marks that plugin failed: its other
    registrations and hooks are not used, every other plugin keeps working, and selection names the cause."""
    decorated: list[str] = []

    @hookimpl
    def cmbcluster_storage_backends() -> Iterator[StorageBackendRegistration]:
        yield StorageBackendRegistration(name="bad", factory=lambda ctx: LocalStorage(ctx.data_dir))

    @hookimpl
    def cmbcluster_compute_backends() -> Iterator[ComputeBackendRegistration]:
        yield ComputeBackendRegistration(name="Bad Name", factory=lambda ctx: None)  # type: ignore[arg-type,return-value]

    @hookimpl
    def cmbcluster_decorate_pod(draft: PodDraft, context: PodContext) -> None:
        decorated.append(draft.name)

    @hookimpl
    def cmbcluster_auth_providers() -> list[Any]:
        raise RuntimeError("the SDK is missing")

    manager.register(
        SimpleNamespace(
            cmbcluster_storage_backends=cmbcluster_storage_backends,
            cmbcluster_compute_backends=cmbcluster_compute_backends,
            cmbcluster_decorate_pod=cmbcluster_decorate_pod,
        ),
        name="bad",
    )
    assert "invalid compute backend name 'Bad Name'" in _failure(manager, "bad")
    manager.register(SimpleNamespace(cmbcluster_auth_providers=cmbcluster_auth_providers), name="raises")
    assert _failure(manager, "raises") == "cmbcluster_auth_providers raised RuntimeError: the SDK is missing"

    assert "bad" not in manager.registrations("storage")  # its valid registration is skipped too
    assert manager.storage_backend("local").name == "local"  # the others are untouched
    with pytest.raises(PluginError, match=r"plugin 'bad' is installed but failed to load .*Bad Name"):
        manager.storage_backend("bad")
    manager.decorate_pod(PodDraft(name="env-1", namespace="users", image="jupyter"), _context())
    assert decorated == []  # none of a failed plugin's hooks runs
    assert [p.name for p in manager.failed()] == ["bad", "raises"]


def test_strict_mode_refuses_a_broken_registration_hook() -> None:
    @hookimpl
    def cmbcluster_storage_backends() -> list[Any]:
        raise RuntimeError("boom")

    strict = PluginManager(entry_points_enabled=False, strict=True).load()
    with pytest.raises(PluginError, match=r"plugin 'boom' .* failed to load .*RuntimeError: boom.*strict mode"):
        strict.register(SimpleNamespace(cmbcluster_storage_backends=cmbcluster_storage_backends), name="boom")


def test_registration_hooks_are_called_once_per_load(manager: PluginManager) -> None:
    calls: list[str] = []

    @hookimpl
    def cmbcluster_storage_backends() -> Iterator[StorageBackendRegistration]:
        calls.append("storage")
        yield StorageBackendRegistration(name="counted", factory=lambda ctx: LocalStorage(ctx.data_dir))

    manager.register(SimpleNamespace(cmbcluster_storage_backends=cmbcluster_storage_backends), name="counted")
    for _ in range(3):
        manager.storage_backend("counted")
        manager.check_conflicts()
    assert calls == ["storage"]


def test_misspelled_hook_is_recorded(manager: PluginManager) -> None:
    @hookimpl
    def cmbcluster_storage_backend() -> None:  # missing the final "s"
        return None

    manager.register(SimpleNamespace(cmbcluster_storage_backend=cmbcluster_storage_backend), name="typo")
    assert "unknown hook cmbcluster_storage_backend" in _failure(manager, "typo")


def test_a_failing_deploy_values_hook_names_its_plugin(manager: PluginManager) -> None:
    @hookimpl
    def cmbcluster_deploy_values(config: Any) -> dict[str, Any]:
        raise KeyError("azure")

    manager.register(SimpleNamespace(cmbcluster_deploy_values=cmbcluster_deploy_values), name="careless")
    with pytest.raises(PluginError, match="plugin 'careless': cmbcluster_deploy_values raised KeyError: 'azure'"):
        manager.deploy_values(None)  # type: ignore[arg-type]  # never read: the hook fails first


def _context() -> PodContext:
    return PodContext(
        user=UserRef(id="u1"), environment_id="e1", namespace="users", identity=None,
        storage_backend="local", infra_provider=None,
    )  # fmt: skip


def test_cmbcluster_decorate_pod_runs_every_plugin_in_documented_order(manager: PluginManager) -> None:
    calls: list[str] = []

    def decorator(tag: str, **marks: bool) -> SimpleNamespace:
        marker: Any = hookimpl  # its overloads take the marks by name

        def cmbcluster_decorate_pod(draft: PodDraft, context: PodContext) -> None:
            calls.append(tag)
            draft.annotations[f"example.org/{tag}"] = context.environment_id

        return SimpleNamespace(cmbcluster_decorate_pod=marker(**marks)(cmbcluster_decorate_pod))

    # registered in an order that differs from the documented one
    manager.register(decorator("zeta"), name="zeta")
    manager.register(decorator("last", trylast=True), name="aaa-last")
    manager.register(decorator("alpha"), name="alpha")
    manager.register(decorator("first", tryfirst=True), name="zzz-first")
    draft = PodDraft(name="env-1", namespace="users", image="jupyter")
    context = PodContext(
        user=UserRef(id="u1"), environment_id="e1", namespace="users", identity=None,
        storage_backend="local", infra_provider=None,
    )  # fmt: skip
    manager.decorate_pod(draft, context)
    assert calls == ["first", "alpha", "zeta", "last"]
    assert draft.annotations["example.org/alpha"] == "e1"


def test_registration_hooks_return_typed_frozen_registrations(manager: PluginManager) -> None:
    """Each of the four registration hooks, through the builtin plugin."""
    for concern in ("storage", "auth", "infra", "compute"):
        registrations = manager.registrations(concern)
        reg = registrations["local"]
        with pytest.raises(AttributeError):
            reg.name = "changed"  # type: ignore[misc]


def test_a_pod_context_says_which_providers_serve_the_pod() -> None:
    context = PodContext(
        user=UserRef(id="u1"), environment_id="e1", namespace="users", identity=None,
        storage_backend="aws", infra_provider="gcp",
    )  # fmt: skip
    assert context.serves("aws") and context.serves("gcp") and not context.serves("azure")
    assert not PodContext(
        user=UserRef(id="u1"), environment_id="e1", namespace="users", identity=None,
        storage_backend="local", infra_provider=None,
    ).serves("aws")  # fmt: skip


# -- what a plugin author may return, and what each mistake gives ------------------------------------------
def test_a_second_plugin_of_a_used_name_is_recorded_and_skipped(manager: PluginManager) -> None:
    """Two distributions with one entry-point name: the first keeps it, the second is shown as failed (the
    operator sees both in `cmbcluster plugins`), and none of its registrations is used."""
    manager.register(_storage_plugin("one"), name="dup", distribution="cmbcluster-first", version="1.0")
    manager.register(_storage_plugin("two"), name="dup", distribution="cmbcluster-second", version="2.0")
    shown = [(p.distribution, p.error) for p in manager.plugins() if p.name == "dup"]
    assert shown == [
        ("cmbcluster-first", None),
        ("cmbcluster-second", "plugin name 'dup' is already used by cmbcluster-first 1.0"),
    ]
    assert manager.storage_backend("one").name == "one"
    assert "two" not in manager.registrations("storage")
    strict = PluginManager(entry_points_enabled=False, strict=True)
    strict.register(_storage_plugin("one"), name="dup", distribution="cmbcluster-first", version="1.0")
    with pytest.raises(PluginError, match=r"plugin name 'dup' is already used by cmbcluster-first 1\.0"):
        strict.register(_storage_plugin("two"), name="dup", distribution="cmbcluster-second", version="2.0")


def test_a_registration_hook_may_return_none_or_one_registration(manager: PluginManager) -> None:
    @hookimpl
    def cmbcluster_storage_backends() -> None:
        return None  # nothing to register in this configuration

    @hookimpl
    def cmbcluster_compute_backends() -> ComputeBackendRegistration:
        return ComputeBackendRegistration(name="single", factory=lambda ctx: None)  # type: ignore[arg-type,return-value]

    manager.register(
        SimpleNamespace(
            cmbcluster_storage_backends=cmbcluster_storage_backends,
            cmbcluster_compute_backends=cmbcluster_compute_backends,
        ),
        name="lenient",
    )
    assert not manager.failed()
    assert manager.compute_backend("single").name == "single"
    assert [(plugin, concern) for plugin, concern, _ in manager.registered() if plugin == "lenient"] == [
        ("lenient", "compute")
    ]


def test_a_registration_hook_returning_no_iterable_fails_its_plugin(manager: PluginManager) -> None:
    @hookimpl
    def cmbcluster_storage_backends() -> int:
        return 42

    manager.register(SimpleNamespace(cmbcluster_storage_backends=cmbcluster_storage_backends), name="number")
    assert _failure(manager, "number") == (
        "plugin 'number': cmbcluster_storage_backends must return an iterable of registrations"
    )


def test_a_plugin_named_like_a_provider_it_does_not_provide(manager: PluginManager) -> None:
    """CLOUD_PROVIDER=tenant with a storage-only plugin called tenant: the error says the plugin is there
    but provides no compute backend, and which ones are installed (not "pip install" what is installed)."""
    manager.register(_storage_plugin("tenant"), name="tenant", distribution="cmbcluster-tenant", version="0.1")
    with pytest.raises(PluginError) as exc_info:
        manager.compute_backend("tenant")
    assert str(exc_info.value) == (
        "no compute backend named 'tenant': plugin 'tenant' (cmbcluster-tenant 0.1) is installed but does not "
        "provide one (installed compute backends: kubernetes, local)"
    )


def test_a_hook_raising_a_typed_error_keeps_it(manager: PluginManager) -> None:
    """A decorator refusing a pod with core's typed error (a 4xx for the user) is not turned into a plugin
    failure: the error reaches the caller as raised."""

    @hookimpl
    def cmbcluster_decorate_pod(draft: PodDraft, context: PodContext) -> None:
        raise InvalidRequest("this cloud mounts at most 10 buckets")

    manager.register(SimpleNamespace(cmbcluster_decorate_pod=cmbcluster_decorate_pod), name="limits")
    with pytest.raises(InvalidRequest, match=r"^this cloud mounts at most 10 buckets$"):
        manager.decorate_pod(PodDraft(name="env-1", namespace="users", image="jupyter"), _context())


class _Copy(ManagedTransfer):
    def __init__(self, by: str) -> None:
        self.by = by

    def run(self, progress: Callable[[int], None] | None = None) -> None:
        raise AssertionError("not run here")


def test_the_first_managed_transfer_offer_wins_after_those_declining(manager: PluginManager) -> None:
    def offering(by: str | None) -> SimpleNamespace:
        @hookimpl
        def cmbcluster_managed_transfer(source: TransferEnd, target: TransferEnd) -> ManagedTransfer | None:
            return _Copy(by) if by is not None else None

        return SimpleNamespace(cmbcluster_managed_transfer=cmbcluster_managed_transfer)

    end = TransferEnd(backend="local", bucket="b", storage=LocalStorage(Path("unused")))
    assert manager.managed_transfer(end, end) is None  # nobody offers: core copies the bucket itself
    manager.register(offering(None), name="aaa-declines")
    manager.register(offering("ccc"), name="ccc")
    manager.register(offering("bbb"), name="bbb")
    offer = manager.managed_transfer(end, end)
    assert isinstance(offer, _Copy) and offer.by == "bbb"  # plugin-name order, not registration order
