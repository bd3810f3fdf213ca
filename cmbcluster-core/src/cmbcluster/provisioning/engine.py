"""Core's provisioning engine: ``up``, ``down`` and ``status`` of any :class:`Provisioner`.

The engine runs the planned steps in order, reports progress, keeps the deployment's record
current after every resource (so a rerun resumes where a failure stopped), and deletes what the
record lists, in the provisioner's order. Provisioners only say what the steps are and how to
create, find and delete one resource.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Sequence
from typing import Literal

from cmbcluster.errors import CmbclusterError, ConfigurationError
from cmbcluster.interfaces.provisioning import (
    DNS_RECORD_KIND,
    DnsRecord,
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
from cmbcluster.provisioning.dns import fqdn
from cmbcluster.provisioning.helm import RELEASE_KIND
from cmbcluster.provisioning.record import ProvisioningRecord
from cmbcluster.provisioning.runner import run_tool

__all__ = ["StepRun", "check_tools", "dns", "down", "retained", "status", "up"]


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
        # Everything that can be known before the first create: tools, account, permissions.
        check_tools(provisioner, options)
        provisioner.preflight()
        problems = provisioner.check_up(StepRun("preflight", record, options, report).note)
        if problems:
            raise ConfigurationError([*problems, "nothing was created: fix the above, then rerun `up`"])
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
    """Delete every recorded resource, in the provisioner's ``deletion_order`` (the DNS records
    ``infra dns`` wrote first); each leaves the record as it goes, so a rerun after a failure
    resumes where it stopped. What the provisioner keeps on purpose (:meth:`Provisioner.retained`)
    is reported, and deleted too, in the provisioner's order, with ``delete_retained``."""
    options = options or ProvisioningOptions()
    report = progress if progress is not None else _ignore
    with record.locked():
        if record.find(RELEASE_KIND):  # the tools that uninstall add-ons
            check_tools(provisioner, options)
        provisioner.preflight()
        provisioner.check_down(record, options)
        kept = provisioner.retained(record)
        extra = kept if options.delete_retained else []
        names = {(r.kind, r.id) for r in extra}
        records = [r for r in record.resources if r.kind == DNS_RECORD_KIND]
        ordered = records + provisioner.deletion_order([r for r in record.resources if r not in records] + extra)
        for index, resource in enumerate(ordered, start=1):
            run = StepRun(resource.step, record, options, report, index=index, total=len(ordered))
            run.emit("deleting", resource.label)
            try:
                if resource.kind == DNS_RECORD_KIND:
                    if not provisioner.delete_dns(_dns_record(resource)):
                        run.emit("gone", f"{resource.label} was gone or points elsewhere now; left as it is")
                elif (resource.kind, resource.id) in names:
                    provisioner.delete_retained(resource, run)
                else:
                    provisioner.delete_resource(resource, run)
            except CmbclusterError as exc:
                run.emit("failed", exc.message)
                raise
            if (resource.kind, resource.id) not in names:
                record.remove(resource)
            run.emit("deleted", resource.label)
        record.completed_steps = []
        record.save()
        if not options.delete_retained:
            for resource in kept:
                StepRun("retained", record, options, report).emit(
                    "note", f"kept on purpose: {resource.label}{_why(resource)} (--delete-retained deletes it)"
                )


def _why(resource: ResourceRecord) -> str:
    why = resource.attributes.get("why", "")
    return f": {why}" if why else ""


def retained(provisioner: Provisioner, record: ProvisioningRecord) -> list[ResourceRecord]:
    """What ``down`` would keep (users' buckets, per-user identities, disks), for the operator to see first."""
    provisioner.preflight()
    return provisioner.retained(record)


def check_tools(provisioner: Provisioner, options: ProvisioningOptions) -> None:
    """Every executable the run needs is on PATH, or one ConfigurationError naming all that are missing."""
    missing = [t for t in provisioner.required_tools(options) if shutil.which(t.name) is None]
    if missing:
        raise ConfigurationError(
            [f"`{t.name}` is not installed or not on PATH: {t.why}" for t in missing]
            + [
                "nothing was changed: install what is missing, or rerun with --addons print to get the commands "
                "to run elsewhere"
            ]
        )


def _dns_record(resource: ResourceRecord) -> DnsRecord:
    kind = resource.attributes.get("type", "A")
    values = tuple(v for v in resource.attributes.get("values", "").split(",") if v)
    return DnsRecord(name=resource.name, type="CNAME" if kind == "CNAME" else "A", values=values,
                     ttl=int(resource.attributes.get("ttl", "300")))  # fmt: skip


def dns(
    provisioner: Provisioner, record: ProvisioningRecord, records: Sequence[DnsRecord], *, dry_run: bool = False
) -> list[str]:
    """Upsert the deployment's DNS records and keep them in its record, so that ``down`` removes them
    (a record of another type the upsert replaced under the same name is forgotten)."""
    with record.locked():
        lines = provisioner.upsert_dns(records, dry_run=dry_run)
        if dry_run:
            return lines
        for item in records:
            name = fqdn(item.name)
            for old in record.find(DNS_RECORD_KIND, name=name):
                if old.attributes.get("type") != item.type:
                    record.remove(old)
            record.add(
                ResourceRecord(
                    step="dns", kind=DNS_RECORD_KIND, id=f"{item.type} {name}", name=name,
                    attributes={"type": item.type, "values": ",".join(item.values), "ttl": str(item.ttl)},
                )
            )  # fmt: skip
        return lines


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
