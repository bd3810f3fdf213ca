"""The data of the plugin contract: what plugins hand to core, and what core hands back.

- The typed, frozen **registrations** plugins return from the registration hooks: each names an
  implementation, says how to build it (``factory``) and which pydantic-settings model holds
  its configuration (``settings_model``). Core chooses the active implementation of each
  concern by configured name (``CLOUD_PROVIDER`` and the per-concern overrides), never by
  install order.
- :class:`ProviderContext`, what a registration's factory receives.
- :class:`ResolvedConfig`, the validated configuration: what ``cmbcluster_deploy_values``
  receives, and what the control plane and the CLI run on (:func:`cmbcluster.config.resolve`
  makes it).
- :class:`PluginInfo`, one installed plugin as ``cmbcluster plugins`` shows it.

This module, :mod:`cmbcluster.hookspecs` and :mod:`cmbcluster.interfaces` are the whole
contract; none of them imports the plugin manager.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar, cast
from urllib.parse import urlsplit

from pydantic_settings import BaseSettings

from cmbcluster.errors import PluginError
from cmbcluster.interfaces import (
    ActiveSettings,
    AuthProvider,
    ComputeBackend,
    InfraProvider,
    PodContext,
    PodDraft,
    Provisioner,
    StorageBackend,
)

if TYPE_CHECKING:
    from cmbcluster.settings import CoreSettings

T = TypeVar("T")
S = TypeVar("S")

#: The concerns a registration serves (``ResolvedConfig.serves(name, concern)``).
Concern = Literal["storage", "auth", "infra", "compute"]

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


@dataclass(frozen=True, kw_only=True)
class ProviderContext(ActiveSettings):
    """What a registration's factory receives.

    ``core`` is the validated core configuration; ``ctx.require_settings(AwsSettings)`` gives the
    validated instance of the registration's own settings model (``ctx.settings(...)`` answers
    None for a model no active provider uses, as everywhere).
    """

    core: CoreSettings
    provider_settings: BaseSettings | None = None
    #: Runs every ``cmbcluster_decorate_pod`` implementation on a pod draft (for compute backends).
    decorate_pod: Callable[[PodDraft, PodContext], None] | None = None
    #: The validated settings of every active provider, by model (compute backends hand them to
    #: pod decorators through :attr:`PodContext.active_settings`).
    active_settings: Mapping[type[BaseSettings], BaseSettings] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.core.data_dir

    @property
    def public_host(self) -> str:
        """The deployment's host name: that of CMBCLUSTER_PUBLIC_URL, else the address it serves on
        (what an infra provider without a domain setting of its own names the deployment by)."""
        url = self.core.public_url
        return (urlsplit(url).hostname if url else None) or self.core.host

    def _active_settings(self) -> Mapping[type[Any], Any]:
        if self.provider_settings is None:
            return self.active_settings
        return {**self.active_settings, type(self.provider_settings): self.provider_settings}

    def require_settings(self, model: type[S]) -> S:
        """The validated settings of ``model``. A model that is neither the registration's
        ``settings_model`` nor any other active provider's was never read or validated: that is
        the plugin's mistake (PluginError, which ``config check`` reports as one), not the machine's."""
        found = self.settings(model)
        if found is None:
            declared = type(self.provider_settings).__name__ if self.provider_settings is not None else "none"
            raise PluginError(
                f"its factory asks for the settings model {model.__name__}, which its registration does not declare "
                f"(settings_model: {declared}) and no active provider uses: declare it as the registration's "
                "settings_model, which core validates and hands to the factory"
            )
        return found


@dataclass(frozen=True, kw_only=True)
class Registration(Generic[T]):
    """Common shape of every registration. Use the concern's subclass, not this one."""

    kind: ClassVar[str] = ""
    #: What the factory must return (core checks it when it builds the provider).
    interface: ClassVar[type[Any]] = object

    name: str
    factory: Callable[[ProviderContext], T]
    settings_model: type[BaseSettings] | None = None
    description: str = ""
    #: Fields of ``settings_model`` this concern needs set (not None or empty) when it is selected.
    #: One model can serve several concerns while a variable is required by one only: make the
    #: field optional in the model and list it here on the registrations that need it (an OIDC
    #: issuer for sign-in, not for ``cmbcluster infra plan``, which runs before the cluster exists).
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"invalid {self.kind} name {self.name!r}: use lower-case letters, digits, '-' or '_' (max 40)"
            )
        if not callable(self.factory):
            raise ValueError(f"{self.kind} {self.name!r}: factory must be a callable taking a ProviderContext")
        declared = self.settings_model
        if declared is not None and not (isinstance(declared, type) and issubclass(declared, BaseSettings)):
            # a plain pydantic BaseModel reads no environment variable: every field would keep its default
            raise ValueError(
                f"{self.kind} {self.name!r}: settings_model {getattr(declared, '__name__', repr(declared))} is not a "
                "pydantic_settings.BaseSettings subclass (a plain pydantic BaseModel reads no environment variables)"
            )
        if isinstance(self.requires, str):  # type: ignore[unreachable]  # a common slip: requires="field"
            raise ValueError(f"{self.kind} {self.name!r}: requires must be a tuple of field names, not a string")
        fields = self.settings_model.model_fields if self.settings_model is not None else {}
        unknown = [name for name in self.requires if name not in fields]
        if unknown:
            model = self.settings_model.__name__ if self.settings_model is not None else "no settings model"
            raise ValueError(f"{self.kind} {self.name!r} requires {', '.join(unknown)}, not fields of {model}")

    def create(self, ctx: ProviderContext) -> T:
        """Call the factory; PluginError when it answers with something other than the concern's
        interface (a factory that forgets ``return`` answers None)."""
        return cast(T, _checked(self.factory(ctx), self.interface, "its factory"))


def _checked(result: object, interface: type[Any], what: str) -> Any:
    """``result`` when it is an ``interface`` (an abstract class: a TypeVar cannot say so to mypy)."""
    if isinstance(result, interface):
        return result
    hint = " (does it forget to `return`?)" if result is None else ""
    raise PluginError(
        f"{what} returned {type(result).__name__}, not a {interface.__module__.rsplit('.', 1)[0]}."
        f"{interface.__qualname__}{hint}"
    )


@dataclass(frozen=True, kw_only=True)
class StorageBackendRegistration(Registration[StorageBackend]):
    """A storage backend: buckets, objects and the volumes that mount them."""

    kind: ClassVar[str] = "storage backend"
    interface: ClassVar[type[Any]] = StorageBackend


@dataclass(frozen=True, kw_only=True)
class AuthProviderRegistration(Registration[AuthProvider]):
    """An identity provider users sign in with."""

    kind: ClassVar[str] = "auth provider"
    interface: ClassVar[type[Any]] = AuthProvider


@dataclass(frozen=True, kw_only=True)
class InfraProviderRegistration(Registration[InfraProvider]):
    """The cloud around the cluster: per-user identity, registry, DNS.

    ``provisioner`` (optional) builds the :class:`~cmbcluster.interfaces.Provisioner` that
    ``cmbcluster infra plan | up | down | status | dns`` drive for this provider.
    """

    kind: ClassVar[str] = "infra provider"
    interface: ClassVar[type[Any]] = InfraProvider

    provisioner: Callable[[ProviderContext], Provisioner] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.provisioner is not None and not callable(self.provisioner):
            raise ValueError(f"{self.kind} {self.name!r}: provisioner must be a callable taking a ProviderContext")

    def create_provisioner(self, ctx: ProviderContext) -> Provisioner:
        """Call the ``provisioner`` factory (PluginError when it answers with something other than a
        Provisioner, or when the registration has none)."""
        if self.provisioner is None:
            raise PluginError(f"{self.kind} {self.name!r} has no provisioner")
        return cast(Provisioner, _checked(self.provisioner(ctx), Provisioner, "its provisioner factory"))


@dataclass(frozen=True, kw_only=True)
class ComputeBackendRegistration(Registration[ComputeBackend]):
    """Where environments run: Kubernetes, or local processes for the embedded default."""

    kind: ClassVar[str] = "compute backend"
    interface: ClassVar[type[Any]] = ComputeBackend


# -- installed plugins and the validated configuration ---------------------------------------------
@dataclass
class PluginInfo:
    """One plugin as ``cmbcluster plugins`` shows it."""

    name: str
    distribution: str
    version: str
    module: str
    hooks: list[str] = field(default_factory=list)
    error: str | None = None
    builtin: bool = False

    @property
    def loaded(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "hooks": self.hooks,
            "error": self.error,
            "builtin": self.builtin,
            "loaded": self.loaded,
        }


class InstalledPlugins(Protocol):
    """What a resolved configuration keeps of the plugin manager that resolved it
    (:class:`cmbcluster.plugins.PluginManager`)."""

    def plugins(self) -> list[PluginInfo]: ...

    def failed(self) -> list[PluginInfo]: ...

    def owner(self, registration: Registration[Any]) -> PluginInfo | None: ...

    def decorate_pod(self, draft: PodDraft, context: PodContext) -> None: ...

    def deploy_values(self, config: ResolvedConfig) -> list[tuple[str, object]]: ...

    def price_tables(self, config: ResolvedConfig) -> list[tuple[str, object]]: ...


@dataclass
class ResolvedConfig(ActiveSettings):
    """A validated configuration: core settings, the chosen registrations and their settings."""

    core: CoreSettings
    plugins: InstalledPlugins
    storage: StorageBackendRegistration
    compute: ComputeBackendRegistration
    infra: InfraProviderRegistration
    auth: list[AuthProviderRegistration]
    provider_settings: dict[type[BaseSettings], BaseSettings] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def context_for(self, registration: Registration[Any]) -> ProviderContext:
        model = registration.settings_model
        return ProviderContext(
            core=self.core,
            provider_settings=self.provider_settings.get(model) if model else None,
            decorate_pod=self.plugins.decorate_pod,
            active_settings=dict(self.provider_settings),
        )

    def _active_settings(self) -> Mapping[type[Any], Any]:
        return self.provider_settings

    def serves(self, provider: str, *concerns: Concern) -> bool:
        """Whether the registration called ``provider`` is active for any of ``concerns``
        (``storage``, ``auth``, ``infra``, ``compute``), or for any concern when none is given.

        One settings model often serves all of a plugin's concerns, so ``settings(Model)`` is not
        None as soon as any of them is active (its sign-in alone, say): a deploy hook that adds a
        storage driver asks ``config.serves("azure", "storage")``, one that sets the control
        plane's cloud identity ``config.serves("azure", "storage", "infra")``."""
        chosen: dict[str, list[Registration[Any]]] = {
            "storage": [self.storage], "compute": [self.compute], "infra": [self.infra], "auth": list(self.auth),
        }  # fmt: skip
        unknown = [c for c in concerns if c not in chosen]
        if unknown:
            raise ValueError(f"unknown concern {unknown[0]!r}: one of {', '.join(chosen)}")
        return any(registration.name == provider for c in concerns or chosen for registration in chosen[c])

    def describe(self, registration: Registration[Any]) -> str:
        """``storage backend 'azure' of plugin 'azure' (cmbcluster-azure 0.1.0)``: who to blame."""
        info = self.plugins.owner(registration)
        where = f" of plugin {info.name!r} ({info.distribution} {info.version})" if info is not None else ""
        return f"{registration.kind} {registration.name!r}{where}"

    def create(self, registration: Registration[T]) -> T:
        """Build the provider of an active ``registration`` as ``serve`` does: its factory, with this
        configuration's context, its answer checked against the concern's interface. A PluginError
        names the plugin and the registration."""
        try:
            return registration.create(self.context_for(registration))
        except PluginError as exc:
            raise PluginError(f"{self.describe(registration)}: {exc}") from exc

    def notes(self) -> list[str]:
        """What the active settings say about themselves for `config check` (a settings model's optional
        ``config_notes()``: which credentials a plugin will use, for example)."""
        found: list[str] = []
        for settings in self.provider_settings.values():
            describe = getattr(settings, "config_notes", None)
            if callable(describe):
                found.extend(str(note) for note in describe())
        return found

    def summary(self) -> dict[str, str]:
        return {
            "storage": self.storage.name,
            "compute": self.compute.name,
            "infra": self.infra.name,
            "auth": ",".join(a.name for a in self.auth),
        }
