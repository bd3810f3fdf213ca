"""A provisioner whose cloud is a folder: what ``cmbcluster plugin new`` starts a plugin from."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from cmbcluster.interfaces import PlannedStep, Provisioner, ResourceRecord, StepContext


class FolderProvisioner(Provisioner):
    """A deployment made of files: each resource a JSON file under ``root``, named by kind and name.

    It does what a cloud's provisioner does (look up by name before creating, report created or
    adopted, treat "already gone" as deleted), so it passes :class:`ProvisionerContract`; a plugin
    starts from it and replaces each step with its cloud's calls.
    """

    provider = "folder"

    def __init__(self, root: Path, *, deployment: str = "cmbcluster", steps: Mapping[str, Sequence[str]] | None = None):
        self.root = root
        self._deployment = deployment
        #: step name -> the "kind/name" of what it creates
        self.steps = dict(steps or {"network": ["network/main"], "cluster": ["cluster/main"],
                                    "registry": ["registry/images"]})  # fmt: skip

    @property
    def deployment(self) -> str:
        return self._deployment

    def _path(self, kind: str, name: str) -> Path:
        return self.root / self._deployment / f"{kind}--{name}.json"

    def plan(self) -> list[PlannedStep]:
        return [
            PlannedStep(name=step, description=f"the {step}", creates=tuple(c.replace("/", " ", 1) for c in made))
            for step, made in self.steps.items()
        ]

    def apply_step(self, step: PlannedStep, job: StepContext) -> None:
        for made in self.steps[step.name]:
            kind, name = made.split("/", 1)
            path = self._path(kind, name)
            resource = ResourceRecord(step=step.name, kind=kind, id=str(path), name=name)
            if path.exists():  # an earlier, interrupted run made it
                job.adopted(resource)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"kind": kind, "name": name, "deployment": self._deployment}))
            job.created(resource)

    def delete_resource(self, resource: ResourceRecord, job: StepContext) -> None:
        Path(resource.id).unlink(missing_ok=True)

    def resource_exists(self, resource: ResourceRecord) -> bool:
        return Path(resource.id).exists()

    def inventory(self) -> dict[str, int]:
        """How many resources of each kind the folder holds."""
        counts = {made.split("/", 1)[0]: 0 for made in (m for ms in self.steps.values() for m in ms)}
        folder = self.root / self._deployment
        for path in folder.glob("*.json") if folder.exists() else ():
            kind = path.name.split("--", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        return counts
