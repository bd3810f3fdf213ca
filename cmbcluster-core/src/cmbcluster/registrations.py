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
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from pydantic_settings import BaseSettings

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


@dataclass(frozen=True, kw_only=True)
class Registration(Generic[T]):
    """Common shape of every registration. Use the concern's subclass, not this one."""

    kind: ClassVar[str] = ""

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
        if isinstance(self.requires, str):  # type: ignore[unreachable]  # a common slip: requires="field"
            raise ValueError(f"{self.kind} {self.name!r}: requires must be a tuple of field names, not a string")
        fields = self.settings_model.model_fields if self.settings_model is not None else {}
        unknown = [name for name in self.requires if name not in fields]
        if unknown:
            model = self.settings_model.__name__ if self.settings_model is not None else "no settings model"
            raise ValueError(f"{self.kind} {self.name!r} requires {', '.join(unknown)}, not fields of {model}")


@dataclass(frozen=True, kw_only=True)
class StorageBackendRegistration(Registration[StorageBackend]):
    """A storage backend: buckets, objects and the volumes that mount them."""

    kind: ClassVar[str] = "storage backend"


@dataclass(frozen=True, kw_only=True)
class AuthProviderRegistration(Registration[AuthProvider]):
    """An identity provider users sign in with."""

    kind: ClassVar[str] = "auth provider"


@dataclass(frozen=True, kw_only=True)
class InfraProviderRegistration(Registration[InfraProvider]):
    """The cloud around the cluster: per-user identity, registry, DNS.

    ``provisioner`` (optional) builds the :class:`~cmbcluster.interfaces.Provisioner` that
    ``cmbcluster infra plan | up | down | status | dns`` drive for this provider.
    """

    kind: ClassVar[str] = "infra provider"

    provisioner: Callable[[ProviderContext], Provisioner] | None = None


@dataclass(frozen=True, kw_only=True)
class ComputeBackendRegistration(Registration[ComputeBackend]):
    """Where environments run: Kubernetes, or local processes for the embedded default."""

    kind: ClassVar[str] = "compute backend"


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
