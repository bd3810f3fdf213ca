"""Local infra: one machine, no cloud identities, no registry, no DNS of its own."""

from __future__ import annotations

from cmbcluster.interfaces import CloudIdentity, DnsInfo, InfraProvider, RegistryInfo, UserRef


class LocalInfra(InfraProvider):
    def __init__(self, host: str) -> None:
        self.host = host

    def ensure_user_identity(self, user: UserRef, *, namespace: str) -> CloudIdentity | None:
        return None  # environments run as the control plane's own operating-system user

    def delete_user_identity(self, user: UserRef, *, namespace: str) -> None:
        return None

    def registry(self) -> RegistryInfo:
        return RegistryInfo(host="localhost", repository_prefix="cmbcluster")

    def dns(self) -> DnsInfo:
        return DnsInfo(domain=self.host, environments_domain=self.host)
