"""What `cmbcluster deploy` checks on the cluster around `helm upgrade --install --wait`.

helm waits the whole timeout (10 minutes) for a control plane that can never start, then says
only "context deadline exceeded". Before helm runs, :func:`preflight` refuses what cannot work
(a SQLite claim with no StorageClass to bind it); while it waits, :class:`Rollout` looks at the
release's claim and pods and names the reason as soon as one has held for a while: a claim no
StorageClass binds, a pod no node takes, an image that cannot be pulled, a container that keeps
crashing. The deploy then stops helm and says how to roll back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Why a container does not run, as the kubelet says it, for which waiting will not help.
_HOPELESS_WAITING = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                     "CrashLoopBackOff")  # fmt: skip


def uses_sqlite_claim(values: Mapping[str, Any]) -> bool:
    database = values.get("database") or {}
    return not (database.get("url") or database.get("existingSecret"))


def claim_storage_class(values: Mapping[str, Any]) -> str:
    return str(((values.get("database") or {}).get("persistence") or {}).get("storageClass") or "")


def preflight(api: Any, values: Mapping[str, Any], *, namespace: str, claim: str) -> list[str]:
    """Problems helm would only time out on, found before anything is installed."""
    from kubernetes import client

    if not uses_sqlite_claim(values):
        return []
    core = client.CoreV1Api(api)
    try:
        existing = core.read_namespaced_persistent_volume_claim(claim, namespace)
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        existing = None
    if existing is not None and existing.status.phase == "Bound":
        return []  # an upgrade: the claim is already bound
    wanted = claim_storage_class(values)
    classes = client.StorageV1Api(api).list_storage_class().items
    names = {c.metadata.name for c in classes}
    if wanted:
        if wanted in names or _available_volumes(core, wanted):  # a class, or volumes made by hand for it
            return []
        known = ", ".join(sorted(names)) or "none"
        return [f"StorageClass {wanted!r} (database.persistence.storageClass) does not exist in the cluster and "
                f"no available PersistentVolume has that class; the cluster's classes: {known}"]  # fmt: skip
    default = [
        c.metadata.name for c in classes
        if (c.metadata.annotations or {}).get("storageclass.kubernetes.io/is-default-class") == "true"
    ]  # fmt: skip
    if default:
        return []
    return [
        "the cluster has no default StorageClass, so the control plane's database claim would never bind: "
        "set database.persistence.storageClass (--values) to one of "
        f"{', '.join(sorted(names)) or '(none: create one)'}, or make one the default"
    ]


def _available_volumes(core: Any, storage_class: str) -> list[str]:
    return [
        v.metadata.name for v in core.list_persistent_volume().items
        if v.spec.storage_class_name == storage_class and v.status.phase == "Available"
    ]  # fmt: skip


@dataclass
class Rollout:
    """Polls the release's claim and pods; :meth:`stuck` names a problem that held ``patience`` s."""

    api: Any
    namespace: str
    release: str
    claim: str
    patience: float = 60.0
    _since: dict[str, float] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What stands in the way right now (empty while things progress)."""
        from kubernetes import client

        core = client.CoreV1Api(self.api)
        found: list[str] = []
        try:
            claim = core.read_namespaced_persistent_volume_claim(self.claim, self.namespace)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            claim = None
        if claim is not None and claim.status.phase == "Pending":
            reason = self._event_message(
                core, "PersistentVolumeClaim", self.claim, ("ProvisioningFailed", "FailedBinding")
            )
            if reason:
                found.append(f"the database claim {self.claim} does not bind: {reason}")
        selector = f"app.kubernetes.io/instance={self.release}"
        for pod in core.list_namespaced_pod(self.namespace, label_selector=selector).items:
            name = pod.metadata.name
            for condition in pod.status.conditions or []:
                if (
                    condition.type == "PodScheduled"
                    and condition.status == "False"
                    and condition.reason == "Unschedulable"
                ):
                    found.append(f"pod {name} cannot be scheduled: {condition.message}")
            for status in pod.status.container_statuses or []:
                waiting = status.state.waiting if status.state else None
                if waiting is not None and waiting.reason in _HOPELESS_WAITING:
                    found.append(f"pod {name}: {waiting.reason}: {waiting.message or status.image}")
        return found

    def stuck(self, now: float | None = None) -> str | None:
        """A problem seen on every poll for ``patience`` seconds, or None."""
        now = time.monotonic() if now is None else now
        current = self.problems()
        self._since = {problem: self._since.get(problem, now) for problem in current}
        held = [p for p, since in self._since.items() if now - since >= self.patience]
        return "; ".join(held) if held else None

    def _event_message(self, core: Any, kind: str, name: str, reasons: tuple[str, ...]) -> str | None:
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        events = core.list_namespaced_event(self.namespace, field_selector=selector).items
        relevant = [e for e in events if e.reason in reasons or e.type == "Warning"]
        if not relevant:
            return None
        newest = max(relevant, key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)
        return f"{newest.reason}: {newest.message}"
