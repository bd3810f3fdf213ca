"""Loading plugins and choosing implementations: a typed facade over pluggy.

Plugins are found through the ``cmbcluster`` entry point group when the app or CLI is created
(``PluginManager.load()``), never at import. A plugin that fails to import, or needs a plugin
API this core does not provide, is recorded and shown (``cmbcluster plugins``) and skipped,
unless strict mode is on. Each registration hook is called once per plugin, when it loads, inside
isolation: a hook that raises, or answers with something that is not a valid registration (a
wrong type, an invalid name), marks that plugin as failed (its error on its :class:`PluginInfo`)
and removes it, so none of its hooks runs; the registrations of the others are kept, and
selection reads them from that record. Implementations are chosen by name; two registrations
of one name are an error naming both distributions.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Collection, Iterable
from importlib.metadata import entry_points
from typing import Any, TypeVar, cast

import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version
from pydantic_settings import BaseSettings

from cmbcluster import PLUGIN_API_VERSION, __version__, hookspecs
from cmbcluster.errors import CmbclusterError, PluginError
from cmbcluster.interfaces import ManagedTransfer, PodContext, PodDraft, TransferEnd
from cmbcluster.registrations import (
    AuthProviderRegistration,
    ComputeBackendRegistration,
    Concern,
    InfraProviderRegistration,
    PluginInfo,
    Registration,
    ResolvedConfig,
    StorageBackendRegistration,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "cmbcluster"
BUILTIN_PLUGINS = {
    "local": "cmbcluster.local.plugin",
    "oidc": "cmbcluster.oidc.plugin",
    "kubernetes": "cmbcluster.kubernetes.plugin",
}

R = TypeVar("R", bound=Registration[Any])

#: Each concern: its hook and its registration type.
CONCERNS: dict[Concern, tuple[str, type[Registration[Any]]]] = {
    "storage": ("cmbcluster_storage_backends", StorageBackendRegistration),
    "auth": ("cmbcluster_auth_providers", AuthProviderRegistration),
    "infra": ("cmbcluster_infra_providers", InfraProviderRegistration),
    "compute": ("cmbcluster_compute_backends", ComputeBackendRegistration),
}


_STRICT = "; strict mode (CMBCLUSTER_PLUGINS_STRICT=1) makes this fatal"


class PluginsFailed(PluginError):
    """Strict mode: plugins that failed to load, every one of them (``failures``, one line each)."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__("\n".join(failures))
        self.failures = failures


class PluginManager:
    """One per app or CLI invocation. ``load()`` is lazy and idempotent."""

    def __init__(
        self,
        *,
        strict: bool = False,
        allow: Iterable[str] | None = None,
        block: Iterable[str] = (),
        entry_points_enabled: bool = True,
    ) -> None:
        self.strict = strict
        self.allow = set(allow) if allow is not None else None
        self.block = set(block)
        self.entry_points_enabled = entry_points_enabled
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}
        #: Each loaded plugin's registrations, by concern: collected once, when it loads.
        self._registered: dict[str, dict[Concern, list[Registration[Any]]]] = {}
        #: The plugin each registration came from, by the registration's id (kept alive by _registered).
        self._owners: dict[int, str] = {}
        self._loaded = False

    @classmethod
    def from_settings(cls, settings: Any) -> PluginManager:
        return cls(strict=settings.plugins_strict, allow=settings.plugins_allow, block=settings.plugins_block)

    # -- loading -------------------------------------------------------------------------------
    def load(self) -> PluginManager:
        if self._loaded:
            return self
        self._loaded = True
        failures: list[str] = []
        for name, module in BUILTIN_PLUGINS.items():
            failures += self._load_one(
                name, functools.partial(importlib.import_module, module), "cmbcluster-core", __version__, module, True
            )
        if self.entry_points_enabled:
            for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                dist = ep.dist.name if ep.dist else "unknown"
                version = ep.dist.version if ep.dist else "unknown"
                failures += self._load_one(ep.name, ep.load, dist, version, ep.value, False)
        if failures:  # strict mode: every plugin's failure at once, not the first one
            raise PluginsFailed(failures)
        self._pm.check_pending()
        self.check_conflicts()
        return self

    def _load_one(
        self, name: str, load: Callable[[], Any], dist: str, version: str, module: str, builtin: bool
    ) -> list[str]:
        """Load one plugin, recording any failure on its PluginInfo; in strict mode, the failure's
        message (for the caller to raise, once every plugin was tried)."""
        info = PluginInfo(name=name, distribution=dist, version=version, module=module, builtin=builtin)
        previous = self._infos.get(name)
        if previous is not None:
            info.error = f"plugin name {name!r} is already used by {previous.distribution} {previous.version}"
            self._infos[f"{name} ({dist})"] = info
            return [f"plugin {name!r} from {dist} {version}: {info.error}{_STRICT}"] if self.strict else []
        self._infos[name] = info
        if name in self.block:
            info.error = "blocked by CMBCLUSTER_PLUGINS_BLOCK"
            return []
        if self.allow is not None and not builtin and name not in self.allow:
            info.error = "not in CMBCLUSTER_PLUGINS_ALLOW"
            return []
        plugin: object = None
        try:
            plugin = load()
            _check_api_version(plugin)
            self._pm.register(plugin, name=name)
            callers = self._pm.get_hookcallers(plugin) or []
            info.hooks = sorted(caller.name for caller in callers)
            unknown = [caller.name for caller in callers if not caller.has_spec()]
            if unknown:  # most often a misspelt hook name, which would otherwise never be called
                raise PluginError(f"implements unknown hook {', '.join(unknown)}: see docs/plugins/hooks.md")
            self._registered[name] = self._collect(name)
            self._owners.update((id(reg), name) for regs in self._registered[name].values() for reg in regs)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the control plane down
            if plugin is not None and self._pm.is_registered(plugin):
                self._pm.unregister(plugin)  # none of its hooks runs: it is not half-used
            info.error = _describe(exc)
            log.warning("plugin %s (%s %s) failed to load: %s", name, dist, version, info.error)
            if self.strict:
                return [f"plugin {name!r} from {dist} {version} failed to load ({info.error}){_STRICT}"]
        return []

    def _collect(self, plugin_name: str) -> dict[Concern, list[Registration[Any]]]:
        """Call the plugin's registration hooks, once each; raise on any answer that is not valid."""
        found: dict[Concern, list[Registration[Any]]] = {}
        for concern, (hook_name, expected) in CONCERNS.items():
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                if impl.plugin_name != plugin_name:
                    continue
                try:
                    regs = list(_as_iterable(impl.function(), plugin_name, hook_name))
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(f"{hook_name} raised {_describe(exc)}") from exc
                for reg in regs:
                    if not isinstance(reg, expected):
                        raise PluginError(
                            f"plugin {plugin_name!r} returned {type(reg).__name__} from {hook_name}; "
                            f"expected {expected.__name__}"
                        )
                found.setdefault(concern, []).extend(regs)
        return found

    def register(self, plugin: object, name: str, *, distribution: str = "(in-process)", version: str = "") -> None:
        """Register an in-process plugin (tests, embedding applications)."""
        self.load()
        failures = self._load_one(name, lambda: plugin, distribution, version, repr(plugin), False)
        if failures:
            raise PluginsFailed(failures)
        self._pm.check_pending()
        self.check_conflicts()

    # -- inspection ----------------------------------------------------------------------------
    def plugins(self) -> list[PluginInfo]:
        self.load()
        return sorted(self._infos.values(), key=lambda i: (not i.builtin, i.name))

    def failed(self) -> list[PluginInfo]:
        return [info for info in self.plugins() if info.error is not None]

    def owner(self, registration: Registration[Any]) -> PluginInfo | None:
        """The plugin that registered ``registration`` (None for one it did not collect)."""
        name = self._owners.get(id(registration))
        return self._infos.get(name) if name is not None else None

    def _call_each(
        self, hook_name: str, *, only: Collection[str] | None = None, **kwargs: Any
    ) -> list[tuple[str, Any]]:
        """Call every implementation of a hook (of the plugins named ``only``, when given) ourselves,
        so results are attributed to plugins and the order is ours (tryfirst, then by plugin name,
        then trylast) not pluggy's LIFO."""
        caller = getattr(self._pm.hook, hook_name)
        impls = sorted(
            (i for i in caller.get_hookimpls() if only is None or i.plugin_name in only),
            key=lambda i: (0 if i.tryfirst else 2 if i.trylast else 1, i.plugin_name),
        )
        results = []
        for impl in impls:
            try:
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
            except CmbclusterError:
                raise
            except Exception as exc:  # name the plugin at fault, in one line
                raise PluginError(f"plugin {impl.plugin_name!r}: {hook_name} raised {_describe(exc)}") from exc
            results.append((impl.plugin_name, result))
        return results

    def _order(self, plugin_name: str, hook_name: str) -> tuple[int, str]:
        """The documented order of a plugin's implementation of a hook: tryfirst, by name, trylast."""
        impl = next(i for i in getattr(self._pm.hook, hook_name).get_hookimpls() if i.plugin_name == plugin_name)
        return (0 if impl.tryfirst else 2 if impl.trylast else 1, plugin_name)

    # -- registrations -------------------------------------------------------------------------
    def registrations(self, concern: Concern) -> dict[str, Registration[Any]]:
        """Every registration of a concern by name (collected when each plugin loaded); conflicting
        names raise PluginError."""
        self.load()
        hook_name, expected = CONCERNS[concern]
        contributors = sorted(
            (self._order(plugin_name, hook_name), plugin_name, regs[concern])
            for plugin_name, regs in self._registered.items()
            if concern in regs
        )
        found: dict[str, tuple[str, Registration[Any]]] = {}
        for _, plugin_name, regs in contributors:
            for reg in regs:
                if reg.name in found:
                    other = found[reg.name][0]
                    raise PluginError(
                        f"{expected.kind} {reg.name!r} is registered twice: by plugin {other!r} "
                        f"({self._dist(other)}) and by plugin {plugin_name!r} ({self._dist(plugin_name)}); "
                        "uninstall one of them or block it with CMBCLUSTER_PLUGINS_BLOCK"
                    )
                found[reg.name] = (plugin_name, reg)
        return {name: reg for name, (_, reg) in found.items()}

    def registered(self) -> list[tuple[str, Concern, Registration[Any]]]:
        """(plugin name, concern, registration) of every loaded plugin's registrations, by plugin name."""
        self.load()
        return [
            (plugin_name, concern, reg)
            for plugin_name, by_concern in sorted(self._registered.items())
            for concern in CONCERNS
            for reg in by_concern.get(concern, [])
        ]

    def settings_models(self) -> list[type[BaseSettings]]:
        """The settings model of every loaded plugin's registrations, once each, by plugin name."""
        return list(dict.fromkeys(r.settings_model for _, _, r in self.registered() if r.settings_model is not None))

    def check_conflicts(self) -> None:
        for concern in CONCERNS:
            self.registrations(concern)

    def select(self, concern: Concern, name: str) -> Registration[Any]:
        """The registration called ``name``, or an error saying which package to install."""
        available = self.registrations(concern)
        if name in available:
            return available[name]
        kind = CONCERNS[concern][1].kind
        installed = ", ".join(sorted(available)) or "none"
        hint = f"pip install cmbcluster-{name}"
        same_name = self._infos.get(name)
        if same_name is not None and same_name.error:
            raise PluginError(
                f"no {kind} named {name!r} is available: plugin {name!r} is installed but failed to load "
                f"({same_name.error})"
            )
        if same_name is not None:
            raise PluginError(
                f"no {kind} named {name!r}: plugin {name!r} ({self._dist(name)}) is installed but does not "
                f"provide one (installed {kind}s: {installed})"
            )
        raise PluginError(
            f"no {kind} named {name!r} is installed (installed: {installed}); "
            f"install the plugin that provides it, for example `{hint}`"
        )

    # Typed facade: one method per registration hook, so call sites are type-checked.
    def storage_backend(self, name: str) -> StorageBackendRegistration:
        return cast(StorageBackendRegistration, self.select("storage", name))

    def auth_provider(self, name: str) -> AuthProviderRegistration:
        return cast(AuthProviderRegistration, self.select("auth", name))

    def infra_provider(self, name: str) -> InfraProviderRegistration:
        return cast(InfraProviderRegistration, self.select("infra", name))

    def compute_backend(self, name: str) -> ComputeBackendRegistration:
        return cast(ComputeBackendRegistration, self.select("compute", name))

    def decorate_pod(self, draft: PodDraft, context: PodContext, *, plugins: Collection[str] | None = None) -> None:
        """Run every ``cmbcluster_decorate_pod`` implementation in the documented order (only those
        of ``plugins``, when given: a contract suite testing one plugin's)."""
        self.load()
        self._call_each("cmbcluster_decorate_pod", only=plugins, draft=draft, context=context)

    def deploy_values(self, config: ResolvedConfig) -> list[tuple[str, object]]:
        """Every plugin's ``cmbcluster_deploy_values`` answer, by plugin name, in the documented order."""
        self.load()
        return self._call_each("cmbcluster_deploy_values", config=config)

    def price_tables(self, config: ResolvedConfig) -> list[tuple[str, object]]:
        """Every plugin's ``cmbcluster_price_table`` answer, by plugin name."""
        self.load()
        return self._call_each("cmbcluster_price_table", config=config)

    def managed_transfer(self, source: TransferEnd, target: TransferEnd) -> ManagedTransfer | None:
        """The first ``cmbcluster_managed_transfer`` offer for this pair, in the documented order."""
        self.load()
        for plugin_name, offer in self._call_each("cmbcluster_managed_transfer", source=source, target=target):
            if offer is None:
                continue
            if not isinstance(offer, ManagedTransfer):
                raise PluginError(
                    f"plugin {plugin_name!r} returned {type(offer).__name__} from cmbcluster_managed_transfer; "
                    "expected a ManagedTransfer or None"
                )
            return offer
        return None

    def _dist(self, plugin_name: str) -> str:
        info = self._infos.get(plugin_name)
        return f"{info.distribution} {info.version}".strip() if info else "unknown distribution"


def _as_iterable(result: Any, plugin_name: str, hook_name: str) -> Iterable[Any]:
    if result is None:
        return ()
    if isinstance(result, Registration):
        return (result,)
    if not isinstance(result, Iterable):
        raise PluginError(f"plugin {plugin_name!r}: {hook_name} must return an iterable of registrations")
    return list(result)


def _describe(exc: BaseException) -> str:
    """One line for an error: a typed error's own message, else the exception's type and message."""
    return str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"


def _check_api_version(plugin: object) -> None:
    required = getattr(plugin, "CMBCLUSTER_PLUGIN_API", None)
    if required is None:
        return
    try:
        spec = SpecifierSet(str(required))
    except InvalidSpecifier as exc:
        raise PluginError(f"CMBCLUSTER_PLUGIN_API {required!r} is not a version specifier") from exc
    if Version(PLUGIN_API_VERSION) not in spec:
        raise PluginError(
            f"needs plugin API {required}, this cmbcluster-core {__version__} provides {PLUGIN_API_VERSION}"
        )
