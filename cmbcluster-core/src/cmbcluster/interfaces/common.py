"""Value types shared by several interfaces."""

from __future__ import annotations

from dataclasses import dataclass, field


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
