"""The record of a deployment: a JSON file listing what ``up`` created or adopted, under a lock."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from cmbcluster.errors import ConfigurationError, Conflict
from cmbcluster.interfaces.provisioning import DeploymentRecord, ResourceRecord

__all__ = ["RECORD_VERSION", "ProvisioningRecord"]

RECORD_VERSION = 1


class ProvisioningRecord(DeploymentRecord):
    """The stored record of a deployment: a JSON file, written atomically after every change.

    Why a file and not only cloud tags: ``down`` must remove exactly what ``up`` made, across
    services that tag differently (IAM OIDC providers and helm releases have no tags, GCP
    routers have no labels), and an operator can read, back up or hand the file to a colleague.
    Tags/labels are still put on every resource that takes them, so ``up`` can adopt what it
    created just before an interruption that kept the file from being written.
    """

    def __init__(self, path: Path, *, provider: str, deployment: str) -> None:
        super().__init__(path, provider=provider, deployment=deployment)
        self.updated_at = ""

    @classmethod
    def for_deployment(cls, state_dir: Path, *, provider: str, deployment: str) -> ProvisioningRecord:
        """Load ``<state_dir>/<provider>-<deployment>.json`` (an empty record if it does not exist)."""
        record = cls(state_dir / f"{provider}-{deployment}.json", provider=provider, deployment=deployment)
        record.load()
        return record

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> None:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        try:
            data = json.loads(raw)
            if data.get("version") != RECORD_VERSION:
                raise ValueError(f"unknown record version {data.get('version')!r}")
            if data.get("provider") != self.provider or data.get("deployment") != self.deployment:
                raise ValueError(
                    f"it belongs to {data.get('provider')}/{data.get('deployment')}, "
                    f"not {self.provider}/{self.deployment}"
                )
            self.resources = [
                ResourceRecord(
                    step=str(r["step"]),
                    kind=str(r["kind"]),
                    id=str(r["id"]),
                    name=str(r.get("name", "")),
                    attributes={str(k): str(v) for k, v in dict(r.get("attributes", {})).items()},
                )
                for r in data.get("resources", [])
            ]
            self.completed_steps = [str(s) for s in data.get("completed_steps", [])]
            self.updated_at = str(data.get("updated_at", ""))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigurationError(
                [f"the provisioning record {self.path} is unreadable ({exc}); fix or move it before going on"]
            ) from None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.updated_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        data = {
            "version": RECORD_VERSION,
            "provider": self.provider,
            "deployment": self.deployment,
            "updated_at": self.updated_at,
            "completed_steps": self.completed_steps,
            "resources": [asdict(r) for r in self.resources],
        }
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, self.path)  # atomic: a crash leaves the old or the new record, never half

    def add(self, resource: ResourceRecord) -> bool:
        """Record ``resource`` (replacing one of the same kind and id); False if it was recorded already."""
        for index, known in enumerate(self.resources):
            if (known.kind, known.id) == (resource.kind, resource.id):
                if known != resource:
                    self.resources[index] = resource
                    self.save()
                return False
        self.resources.append(resource)
        self.save()
        return True

    def remove(self, resource: ResourceRecord) -> None:
        self.resources = [r for r in self.resources if (r.kind, r.id) != (resource.kind, resource.id)]
        self.completed_steps = [s for s in self.completed_steps if s != resource.step]
        self.save()

    def mark_done(self, step: str) -> None:
        if step not in self.completed_steps:
            self.completed_steps.append(step)
            self.save()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the deployment: two ``up``/``down`` runs must not interleave."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock_path.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Conflict(f"another `cmbcluster infra` run holds {lock_path}; wait for it to finish") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
