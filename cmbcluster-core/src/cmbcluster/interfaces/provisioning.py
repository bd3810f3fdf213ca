"""The provisioning interface: what ``cmbcluster infra plan | up | down | status`` drive.

A :class:`Provisioner` describes a deployment's infrastructure as ordered, named steps
(:meth:`~Provisioner.plan`) and knows how to carry out one step and how to delete one resource.
Core owns everything around that (:mod:`cmbcluster.provisioning`): the order, progress
reporting, and the record of a deployment, a JSON file listing every resource ``up`` created or
adopted, so ``down`` removes exactly that and nothing else.

Rules for implementations (AWS, GCP, or a third party's cloud):

- ``apply_step`` is idempotent: it looks the step's resources up (by deterministic name, or by
  the tags/labels it puts on them at creation) before creating anything, and reports each with
  :meth:`StepContext.created` or :meth:`StepContext.adopted`. A rerun after a failure, even one
  between a create call and the record being written, therefore resumes without duplicates.
- ``delete_resource`` treats "already gone" as success, so ``down`` can be rerun.
- Cloud errors become :mod:`cmbcluster.errors` types; the CLI shows them as one clear line.

This module is the contract only: value types and abstract classes. The engine, the record
file, helm and kubeconfig helpers live in :mod:`cmbcluster.provisioning`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cmbcluster.errors import InvalidRequest

__all__ = [
    "DNS_RECORD_KIND",
    "AddonMode",
    "DeploymentRecord",
    "DnsRecord",
    "HelmRelease",
    "PlannedStep",
    "ProgressAction",
    "ProgressCallback",
    "ProgressEvent",
    "Provisioner",
    "ProvisioningOptions",
    "ResourceRecord",
    "StepContext",
    "StepStatus",
    "Tool",
]

#: What ``up`` does with steps that run an external tool (helm) against the new cluster:
#: ``install`` runs them, ``print`` prints the exact commands instead, ``skip`` leaves them out.
AddonMode = Literal["install", "print", "skip"]
#: The record kind of the DNS records ``cmbcluster infra dns`` wrote; ``down`` deletes them first.
DNS_RECORD_KIND = "dns/record"
ProgressAction = Literal[
    "start", "created", "adopted", "deleting", "deleted", "gone", "command", "note", "done", "failed"
]


@dataclass(frozen=True, kw_only=True)
class PlannedStep:
    """One step of a deployment, in order. ``creates`` lists ``"<kind> <name>"`` of what it makes."""

    name: str
    description: str
    creates: tuple[str, ...] = ()
    #: Runs an external tool against the cluster (helm), governed by :data:`AddonMode`.
    external: bool = False


@dataclass(frozen=True, kw_only=True)
class ResourceRecord:
    """A resource ``up`` created or adopted: enough to find and delete it again."""

    step: str
    kind: str
    id: str
    name: str = ""
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}" + (f" ({self.id})" if self.id != self.name else "")


@dataclass(frozen=True, kw_only=True)
class ProgressEvent:
    step: str
    action: ProgressAction
    message: str
    index: int = 0
    total: int = 0


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True, kw_only=True)
class ProvisioningOptions:
    addons: AddonMode = "install"
    #: ``down`` deletes data buckets that still hold objects (database backups) only when set.
    delete_data: bool = False
    #: ``down`` also deletes what the deployment made that ``up`` did not, and that it keeps on
    #: purpose otherwise (:meth:`Provisioner.retained`: users' buckets, per-user cloud identities, disks).
    delete_retained: bool = False
    #: A kubeconfig for the add-on steps instead of the one ``up`` writes for the new cluster
    #: (a cluster reached through a bastion, another authentication, a test cluster).
    kubeconfig: Path | None = None


@dataclass(frozen=True, kw_only=True)
class Tool:
    """An executable a run needs on ``PATH`` (checked before anything is created), and why."""

    name: str
    why: str


@dataclass(frozen=True, kw_only=True)
class StepStatus:
    step: str
    description: str
    state: Literal["done", "partial", "missing", "pending"]
    resources: tuple[tuple[ResourceRecord, bool], ...] = ()


@dataclass(frozen=True, kw_only=True)
class DnsRecord:
    """A DNS record to upsert: ``type`` A (addresses) or CNAME (one host name)."""

    name: str
    type: Literal["A", "CNAME"]
    values: tuple[str, ...]
    ttl: int = 300


@dataclass(frozen=True, kw_only=True)
class HelmRelease:
    """A helm chart installed as a cluster add-on; ``values`` become ``--set key=value``,
    ``json_values`` ``--set-json key=<JSON>`` (:mod:`cmbcluster.provisioning.helm` installs and
    uninstalls it). ``repo`` empty: ``chart`` is a chart folder on this machine (one a package ships)."""

    name: str
    chart: str
    repo: str
    version: str
    namespace: str
    values: dict[str, str] = field(default_factory=dict)
    json_values: dict[str, str] = field(default_factory=dict)


class DeploymentRecord:
    """What a provisioner reads of its deployment's record: every resource ``up`` created or adopted,
    the steps done, and where the record lives (files that belong to the deployment, such as its
    kubeconfig, live beside it). Core's :class:`cmbcluster.provisioning.ProvisioningRecord` keeps it
    in a JSON file."""

    def __init__(self, path: Path, *, provider: str, deployment: str) -> None:
        self.path = path
        self.provider = provider
        self.deployment = deployment
        self.resources: list[ResourceRecord] = []
        self.completed_steps: list[str] = []

    def find(self, kind: str, *, step: str | None = None, name: str | None = None) -> list[ResourceRecord]:
        return [
            r
            for r in self.resources
            if r.kind == kind and (step is None or r.step == step) and (name is None or r.name == name)
        ]


class StepContext(abc.ABC):
    """What :meth:`Provisioner.apply_step` and :meth:`Provisioner.delete_resource` report to
    (core's engine implements it): the step, the deployment's record and the run's options."""

    #: the name of the step being applied (or, in ``down``, of the step that made the resource)
    step: str
    record: DeploymentRecord
    options: ProvisioningOptions

    @abc.abstractmethod
    def emit(self, action: ProgressAction, message: str) -> None:
        """Report progress (shown by the CLI)."""

    @abc.abstractmethod
    def created(self, resource: ResourceRecord) -> ResourceRecord:
        """Record a resource this run created (call it as soon as the cloud returns its id)."""

    @abc.abstractmethod
    def adopted(self, resource: ResourceRecord) -> ResourceRecord:
        """Record a resource that already existed (an earlier, interrupted run made it)."""

    def note(self, message: str) -> None:
        self.emit("note", message)

    @abc.abstractmethod
    def run(self, argv: Sequence[str], *, input_text: str | None = None, timeout: float = 1800) -> bool:
        """Run an external command (helm) as :data:`AddonMode` says; True if it was run.

        ``print`` mode only prints the command; a missing executable or a failing command is a
        clear :class:`~cmbcluster.errors.ProviderUnavailable`, never a traceback.
        """


class Provisioner(abc.ABC):
    """The infrastructure of one deployment on one cloud.

    Implement :meth:`plan`, :meth:`apply_step`, :meth:`delete_resource` and
    :meth:`resource_exists`; core's engine (:func:`cmbcluster.provisioning.up`, ``down``,
    ``status``) does the rest.
    """

    #: The infra provider's registered name (``aws``, ``gcp``); names the record file.
    provider: str = ""

    @property
    @abc.abstractmethod
    def deployment(self) -> str:
        """A stable name for this deployment (the cluster's name); names the record file."""

    @abc.abstractmethod
    def plan(self) -> list[PlannedStep]:
        """Every step ``up`` takes, in order, with the names of what it creates. No cloud call changes anything."""

    @abc.abstractmethod
    def apply_step(self, step: PlannedStep, job: StepContext) -> None:
        """Make ``step``'s resources exist (idempotently), reporting each through ``job``."""

    @abc.abstractmethod
    def delete_resource(self, resource: ResourceRecord, job: StepContext) -> None:
        """Delete one recorded resource and wait until it is gone; already gone is success."""

    @abc.abstractmethod
    def resource_exists(self, resource: ResourceRecord) -> bool:
        """Whether a recorded resource still exists (for ``status``)."""

    def deletion_order(self, resources: Sequence[ResourceRecord]) -> list[ResourceRecord]:
        """The order ``down`` deletes in: the reverse of creation, which respects dependencies."""
        return list(reversed(resources))

    def preflight(self) -> None:  # noqa: B027 - optional check with a sensible default
        """Check before ``up`` or ``down`` changes anything (for example: the credentials' account)."""

    def required_tools(self, options: ProvisioningOptions) -> list[Tool]:
        """Executables ``up`` and ``down`` need with these options (helm, the CLI a kubeconfig calls);
        core checks them all before anything is created or deleted."""
        return []

    def check_up(self, note: Callable[[str], None]) -> list[str]:
        """Before ``up`` creates anything, after :meth:`preflight`: every problem that would stop it
        later (permissions the credentials lack, a DNS zone that does not exist...), one line each;
        core refuses the run with all of them. What cannot be checked is said with ``note``."""
        return []

    def retained(self, record: DeploymentRecord) -> list[ResourceRecord]:
        """What the deployment made that ``up`` did not create and ``down`` keeps on purpose (users'
        buckets, per-user cloud identities, disks of the cluster's volumes): ``down`` lists them, and
        deletes them with :meth:`delete_retained` only when told (``--delete-retained``)."""
        return []

    def delete_retained(self, resource: ResourceRecord, job: StepContext) -> None:
        """Delete one resource :meth:`retained` listed; already gone is success."""
        raise InvalidRequest(f"the {self.provider or 'configured'} infra provider cannot delete {resource.label}")

    def check_down(self, record: DeploymentRecord, options: ProvisioningOptions) -> None:  # noqa: B027
        """Refuse ``down`` before anything is deleted (for example: a data bucket that still holds
        backups without ``--delete-data``, :func:`cmbcluster.provisioning.refuse_to_delete_data`),
        so a refusal never leaves a half-deleted deployment."""

    def upsert_dns(self, records: Sequence[DnsRecord], *, dry_run: bool = False) -> list[str]:
        """Create or replace DNS records in the deployment's zone; returns what was (or would be) done.

        A name that holds records of another type the new one cannot live beside (a CNAME beside A
        records, A records beside a CNAME) has them replaced in the same atomic change. Core records
        what was written (kind :data:`DNS_RECORD_KIND`), and ``down`` deletes it through
        :meth:`delete_dns` (after checking it still points where it was pointed)."""
        raise InvalidRequest(f"the {self.provider or 'configured'} infra provider does not manage DNS records")

    def delete_dns(self, record: DnsRecord) -> bool:
        """Delete ``record`` if it still holds exactly its values; False when it is gone or was changed
        since (then it is left alone)."""
        raise InvalidRequest(f"the {self.provider or 'configured'} infra provider does not manage DNS records")

    def documents(self) -> dict[str, str]:
        """Files an operator needs to build by hand what ``up`` builds (an existing cluster, another tool):
        policy documents and the like, by file name (``cmbcluster infra documents`` writes them)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional: release clients
        """Release clients and sessions."""
