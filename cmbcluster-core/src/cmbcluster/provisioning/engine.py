"""Core's provisioning engine: ``up``, ``down`` and ``status`` of any :class:`Provisioner`.

The engine runs the planned steps in order, reports progress, keeps the deployment's record
current after every resource (so a rerun resumes where a failure stopped), and deletes what the
record lists, in the provisioner's order. Provisioners only say what the steps are and how to
create, find and delete one resource.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Literal

from cmbcluster.errors import CmbclusterError
from cmbcluster.interfaces.provisioning import (
    PlannedStep,
    ProgressAction,
    ProgressCallback,
    ProgressEvent,
    Provisioner,
    ProvisioningOptions,
    ResourceRecord,
    StepContext,
    StepStatus,
)
from cmbcluster.provisioning.record import ProvisioningRecord
from cmbcluster.provisioning.runner import run_tool

__all__ = ["StepRun", "down", "status", "up"]


def _ignore(_event: ProgressEvent) -> None:
    return None


class StepRun(StepContext):
    """Core's :class:`StepContext`: records resources in the deployment's record as they are
    reported, and runs external commands as ``--addons`` says."""

    def __init__(
        self,
        step: PlannedStep | str,
        record: ProvisioningRecord,
        options: ProvisioningOptions,
        progress: ProgressCallback,
        *,
        index: int = 0,
        total: int = 0,
    ) -> None:
        self.step = step.name if isinstance(step, PlannedStep) else step
        self.record: ProvisioningRecord = record
        self.options = options
        self._progress = progress
        self._index = index
        self._total = total

    def emit(self, action: ProgressAction, message: str) -> None:
        self._progress(ProgressEvent(step=self.step, action=action, message=message, index=self._index,
                                     total=self._total))  # fmt: skip

    def created(self, resource: ResourceRecord) -> ResourceRecord:
        self.record.add(resource)
        self.emit("created", resource.label)
        return resource

    def adopted(self, resource: ResourceRecord) -> ResourceRecord:
        self.record.add(resource)
        self.emit("adopted", f"{resource.label} exists")
        return resource

    def run(self, argv: Sequence[str], *, input_text: str | None = None, timeout: float = 1800) -> bool:
        self.emit("command", shlex.join(argv))
        if self.options.addons != "install":
            return False
        run_tool(argv, input_text=input_text, timeout=timeout)
        return True


def up(
    provisioner: Provisioner,
    record: ProvisioningRecord,
    options: ProvisioningOptions | None = None,
    progress: ProgressCallback | None = None,
) -> None:
    """Run every planned step in order. Every step runs again on a rerun: each is idempotent,
    which is how a rerun resumes after a failure and repairs what was deleted by hand."""
    options = options or ProvisioningOptions()
    report = progress if progress is not None else _ignore
    steps = provisioner.plan()
    with record.locked():
        provisioner.preflight()
        for index, step in enumerate(steps, start=1):
            run = StepRun(step, record, options, report, index=index, total=len(steps))
            if step.external and options.addons == "skip":
                run.note("skipped (--addons skip)")
                continue
            run.emit("start", step.description)
            try:
                provisioner.apply_step(step, run)
            except CmbclusterError as exc:
                run.emit("failed", exc.message)  # the record keeps what was made; a rerun resumes
                raise
            if not (step.external and options.addons == "print"):
                record.mark_done(step.name)
            run.emit("done", step.name)


def down(
    provisioner: Provisioner,
    record: ProvisioningRecord,
    options: ProvisioningOptions | None = None,
    progress: ProgressCallback | None = None,
) -> None:
    """Delete every recorded resource, in the provisioner's ``deletion_order``; each leaves the
    record as it goes, so a rerun after a failure resumes where it stopped."""
    options = options or ProvisioningOptions()
    report = progress if progress is not None else _ignore
    with record.locked():
        provisioner.preflight()
        provisioner.check_down(record, options)
        ordered = provisioner.deletion_order(record.resources)
        for index, resource in enumerate(ordered, start=1):
            run = StepRun(resource.step, record, options, report, index=index, total=len(ordered))
            run.emit("deleting", resource.label)
            try:
                provisioner.delete_resource(resource, run)
            except CmbclusterError as exc:
                run.emit("failed", exc.message)
                raise
            record.remove(resource)
            run.emit("deleted", resource.label)
        record.completed_steps = []
        record.save()


def status(provisioner: Provisioner, record: ProvisioningRecord) -> list[StepStatus]:
    """Each planned step: done, partial (some recorded resources are gone), missing, or pending."""
    result = []
    for step in provisioner.plan():
        resources = tuple((r, provisioner.resource_exists(r)) for r in record.resources if r.step == step.name)
        if step.name not in record.completed_steps and not resources:
            state: Literal["done", "partial", "missing", "pending"] = "pending"
        elif resources and not any(alive for _, alive in resources):
            state = "missing"
        elif all(alive for _, alive in resources) and step.name in record.completed_steps:
            state = "done"
        else:
            state = "partial"
        result.append(StepStatus(step=step.name, description=step.description, state=state, resources=resources))
    return result
