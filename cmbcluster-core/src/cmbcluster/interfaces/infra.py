"""The infra interface: per-user cloud identity, the image registry and DNS of a deployment."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from cmbcluster.interfaces.common import CloudIdentity, UserRef


@dataclass(frozen=True, kw_only=True)
class RegistryInfo:
    """Where images are pushed and pulled. ``host`` is what ``docker login`` takes."""

    host: str
    repository_prefix: str


@dataclass(frozen=True, kw_only=True)
class RegistryLogin:
    username: str
    password: str = ""


@dataclass(frozen=True, kw_only=True)
class DnsInfo:
    """The deployment's domain; user environments live under ``*.{environments_domain}``."""

    domain: str
    environments_domain: str
    zone: str = ""


class InfraProvider(abc.ABC):
    """The cloud around the cluster."""

    @abc.abstractmethod
    def ensure_user_identity(self, user: UserRef, *, namespace: str) -> CloudIdentity | None:
        """Create or update the cloud identity ``user``'s pods run as; ``None`` if this cloud
        gives users no identity of their own. Idempotent."""

    @abc.abstractmethod
    def delete_user_identity(self, user: UserRef, *, namespace: str) -> None:
        """Remove what :meth:`ensure_user_identity` created. Idempotent."""

    def update_user_buckets(self, user: UserRef, buckets: Sequence[str]) -> None:  # noqa: B027 - optional
        """``user``'s buckets are now exactly ``buckets``: give their cloud identity access to
        these and no others. Core calls it after a bucket is created or deleted and before every
        start. Default: nothing (clouds that grant per bucket do it in
        ``StorageBackend.ensure_bucket_access``). Idempotent."""

    @abc.abstractmethod
    def registry(self) -> RegistryInfo:
        """The image registry of this deployment."""

    def registry_login(self) -> RegistryLogin:
        """Short-lived credentials for the registry (ECR token, Artifact Registry token)."""
        return RegistryLogin(username="")

    @abc.abstractmethod
    def dns(self) -> DnsInfo:
        """The deployment's DNS names."""

    def check_ready(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Raise ProviderUnavailable if the cloud cannot be reached."""

    def close(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Release clients and connections. Called once when the control plane (or a CLI command) stops."""
