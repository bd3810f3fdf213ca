"""Value types shared by several interfaces."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cmbcluster.errors import ConfigurationError

S = TypeVar("S")


@dataclass(frozen=True, kw_only=True)
class UserRef:
    """Who a cloud resource belongs to, as providers see it.

    ``id`` is CMBCluster's opaque, stable user id (never an e-mail address): providers build
    resource names from it, so names stay DNS-safe and leak nothing about the person.
    """

    id: str
    email: str = field(default="", repr=False)


@dataclass(frozen=True, kw_only=True)
class CloudIdentity:
    """The per-user cloud identity that a user's pods run as (see :class:`InfraProvider`).

    ``service_account`` is the Kubernetes ServiceAccount name the pod must use;
    ``principal`` is what bucket permissions are granted to (an IAM role ARN, a Workload
    Identity principal, or the local user id); ``annotations`` go on the ServiceAccount.
    """

    user: UserRef
    principal: str
    service_account: str | None = None
    namespace: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)


class ActiveSettings:
    """``settings(model)``, answered the same way by everything that carries the active providers'
    validated settings (:class:`PodContext`, ``ProviderContext``, ``ResolvedConfig``).

    :meth:`settings` gives the settings of ``model`` or None when no active provider uses that
    model: a hook that runs for every plugin returns at once when its cloud is not active.
    :meth:`require_settings` is for code that cannot run without them (a registration's factory,
    whose own settings model core always validated): it raises ConfigurationError instead.
    """

    def _active_settings(self) -> Mapping[type[Any], Any]:
        raise NotImplementedError

    def settings(self, model: type[S]) -> S | None:
        """The validated settings of ``model`` (``context.settings(AwsSettings)``), or None when no active
        provider uses that model."""
        found = self._active_settings().get(model)
        return found if isinstance(found, model) else None

    def require_settings(self, model: type[S]) -> S:
        """The validated settings of ``model``; ConfigurationError when no active provider uses it."""
        found = self.settings(model)
        if found is None:
            raise ConfigurationError([f"no active provider uses the settings model {model.__name__}"])
        return found
