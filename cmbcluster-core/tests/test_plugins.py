"""The plugin manager: selection by name, conflicts, API fence, allow/block, decoration order."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from cmbcluster import PLUGIN_API_VERSION, hookimpl
from cmbcluster.errors import PluginError
from cmbcluster.interfaces import PodContext, PodDraft, UserRef
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


def test_registration_of_the_wrong_type_is_refused(manager: PluginManager) -> None:
    @hookimpl
    def cmbcluster_storage_backends() -> list[ComputeBackendRegistration]:
        return [ComputeBackendRegistration(name="oops", factory=lambda ctx: None)]  # type: ignore[arg-type,return-value]

    with pytest.raises(PluginError, match="expected StorageBackendRegistration"):
        manager.register(SimpleNamespace(cmbcluster_storage_backends=cmbcluster_storage_backends), name="wrong")


def test_invalid_registration_names_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid storage backend name"):
        StorageBackendRegistration(name="Bad Name", factory=lambda ctx: None)  # type: ignore[arg-type,return-value]


def test_misspelled_hook_is_caught(manager: PluginManager) -> None:
    @hookimpl
    def cmbcluster_storage_backend() -> None:  # missing the final "s"
        return None

    with pytest.raises(Exception, match="unknown hook"):
        manager.register(SimpleNamespace(cmbcluster_storage_backend=cmbcluster_storage_backend), name="typo")


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
