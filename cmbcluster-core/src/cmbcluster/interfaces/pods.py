"""The pod draft that pod decorators act on (see the ``cmbcluster_decorate_pod`` hook)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cmbcluster.interfaces.common import ActiveSettings, CloudIdentity, UserRef


@dataclass(frozen=True, kw_only=True)
class PodContext(ActiveSettings):
    """What a decorator may read: whose pod, which environment, which providers are active."""

    user: UserRef
    environment_id: str
    namespace: str
    #: the user's cloud identity the pod runs as (its ServiceAccount), None when the infra provider
    #: gives users none; the same every ``MountRequest.identity`` of the pod's volumes had
    identity: CloudIdentity | None
    storage_backend: str
    infra_provider: str | None
    #: the buckets the pod mounts, by their names on the storage backend (``BucketInfo.name``)
    buckets: tuple[str, ...] = ()
    #: the validated settings of every active provider, by model: ``context.settings(AwsSettings)``
    #: gives the control plane's (None when no active provider uses that model: nothing to do)
    active_settings: Mapping[type[Any], Any] = field(default_factory=dict)

    def _active_settings(self) -> Mapping[type[Any], Any]:
        return self.active_settings

    def serves(self, provider: str) -> bool:
        """Whether ``provider`` (a registered name: ``aws``, ``gcp``) is this pod's storage backend or
        infra provider: a decorator acts only on the pods its cloud serves."""
        return provider in (self.storage_backend, self.infra_provider)


@dataclass(kw_only=True)
class PodDraft:
    """A user pod before it is sent to Kubernetes; decorators change it in place.

    Sub-objects are plain dicts in the Kubernetes API's JSON shape (``volumes`` entries,
    ``tolerations``...), so any field the API knows can be expressed. ``extra_objects`` are
    manifests created before the pod and owned by the environment (ServiceAccount, PV, PVC).
    """

    name: str
    namespace: str
    image: str
    command: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 8080
    working_dir: str = ""
    resources: dict[str, dict[str, str]] = field(default_factory=dict)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = field(default_factory=list)
    service_account_name: str | None = None
    automount_service_account_token: bool = False
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    termination_grace_period_seconds: int = 30
    extra_objects: list[dict[str, Any]] = field(default_factory=list)
