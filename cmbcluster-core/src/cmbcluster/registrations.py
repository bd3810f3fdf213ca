"""Typed, frozen registrations that plugins return from the registration hooks.

A registration names an implementation, says how to build it (``factory``) and which
pydantic-settings model holds its configuration (``settings_model``). Core chooses the active
implementation of each concern by configured name (``CLOUD_PROVIDER`` and the per-concern
overrides), never by install order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from pydantic_settings import BaseSettings

from cmbcluster.interfaces import (
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
S = TypeVar("S", bound=BaseSettings)

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


@dataclass(frozen=True, kw_only=True)
class ProviderContext:
    """What a registration's factory receives.

    ``core`` is the validated core configuration; :meth:`settings` returns the validated
    instance of the registration's own settings model.
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

    def settings(self, model: type[S]) -> S:
        """The provider's settings, typed: ``ctx.settings(AwsSettings)``."""
        if not isinstance(self.provider_settings, model):
            raise TypeError(f"expected settings of type {model.__name__}, got {type(self.provider_settings).__name__}")
        return self.provider_settings


@dataclass(frozen=True, kw_only=True)
class Registration(Generic[T]):
    """Common shape of every registration. Use the concern's subclass, not this one."""

    kind: ClassVar[str] = ""

    name: str
    factory: Callable[[ProviderContext], T]
    settings_model: type[BaseSettings] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"invalid {self.kind} name {self.name!r}: use lower-case letters, digits, '-' or '_' (max 40)"
            )


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
