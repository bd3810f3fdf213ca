"""The provisioning interface: what ``cmbcluster infra plan | up | down | status`` drive.

A :class:`Provisioner` describes a deployment's infrastructure as ordered, named steps
(:meth:`~Provisioner.plan`) and knows how to carry out one step and how to delete one resource.
Core owns everything around that: the order, progress reporting, and the
:class:`ProvisioningRecord`, a JSON file listing every resource ``up`` created or adopted, so
``down`` removes exactly that and nothing else.

Rules for implementations (AWS, GCP, or a third party's cloud):

- ``apply_step`` is idempotent: it looks the step's resources up (by deterministic name, or by
  the tags/labels it puts on them at creation) before creating anything, and reports each with
  :meth:`StepContext.created` or :meth:`StepContext.adopted`. A rerun after a failure, even one
  between a create call and the record being written, therefore resumes without duplicates.
- ``delete_resource`` treats "already gone" as success, so ``down`` can be rerun.
- Cloud errors become :mod:`cmbcluster.errors` types; the CLI shows them as one clear line.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
import fcntl
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cmbcluster.errors import CmbclusterError, ConfigurationError, Conflict, InvalidRequest, ProviderUnavailable

__all__ = [
    "IMAGE_NAMES",
    "AddonMode",
    "DnsRecord",
    "HelmRelease",
    "PlannedStep",
    "ProgressCallback",
    "ProgressEvent",
    "Provisioner",
    "ProvisioningOptions",
    "ProvisioningRecord",
    "ResourceRecord",
    "StepContext",
    "StepStatus",
    "kubeconfig_document",
    "write_kubeconfig",
]

RECORD_VERSION = 1
#: The images every deployment builds and pushes (``cmbcluster images``): ``helm/images/<name>/Dockerfile``.
IMAGE_NAMES = ("controlplane", "environment")

#: What ``up`` does with steps that run an external tool (helm) against the new cluster:
#: ``install`` runs them, ``print`` prints the exact commands instead, ``skip`` leaves them out.
AddonMode = Literal["install", "print", "skip"]
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


class ProvisioningRecord:
    """The stored record of a deployment: a JSON file, written atomically after every change.

    Why a file and not only cloud tags: ``down`` must remove exactly what ``up`` made, across
    services that tag differently (IAM OIDC providers and helm releases have no tags, GCP
    routers have no labels), and an operator can read, back up or hand the file to a colleague.
    Tags/labels are still put on every resource that takes them, so ``up`` can adopt what it
    created just before an interruption that kept the file from being written.
    """

    def __init__(self, path: Path, *, provider: str, deployment: str) -> None:
        self.path = path
        self.provider = provider
        self.deployment = deployment
        self.resources: list[ResourceRecord] = []
        self.completed_steps: list[str] = []
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

    def find(self, kind: str, *, step: str | None = None, name: str | None = None) -> list[ResourceRecord]:
        return [
            r
            for r in self.resources
            if r.kind == kind and (step is None or r.step == step) and (name is None or r.name == name)
        ]

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


class StepContext:
    """What :meth:`Provisioner.apply_step` and :meth:`Provisioner.delete_resource` report to."""

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
        self.record = record
        self.options = options
        self._progress = progress
        self._index = index
        self._total = total

    def emit(self, action: ProgressAction, message: str) -> None:
        self._progress(ProgressEvent(step=self.step, action=action, message=message, index=self._index,
                                     total=self._total))  # fmt: skip

    def created(self, resource: ResourceRecord) -> ResourceRecord:
        """Record a resource this run created (call it as soon as the cloud returns its id)."""
        self.record.add(resource)
        self.emit("created", resource.label)
        return resource

    def adopted(self, resource: ResourceRecord) -> ResourceRecord:
        """Record a resource that already existed (an earlier, interrupted run made it)."""
        self.record.add(resource)
        self.emit("adopted", f"{resource.label} exists")
        return resource

    def note(self, message: str) -> None:
        self.emit("note", message)

    def run(self, argv: Sequence[str], *, input_text: str | None = None, timeout: float = 1800) -> bool:
        """Run an external command (helm) as :data:`AddonMode` says; True if it was run.

        ``print`` mode only prints the command; a missing executable or a failing command is a
        clear :class:`ProviderUnavailable`, never a traceback.
        """
        command = shlex.join(argv)
        self.emit("command", command)
        if self.options.addons != "install":
            return False
        executable = shutil.which(argv[0])
        if executable is None:
            raise ProviderUnavailable(
                f"`{argv[0]}` is not installed or not on PATH; install it, or rerun with --addons print "
                "to get the commands to run elsewhere"
            )
        try:
            completed = subprocess.run(
                [executable, *argv[1:]], input=input_text, capture_output=True, text=True, timeout=timeout,
                check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ProviderUnavailable(f"`{command}` did not finish within {timeout:.0f} s") from None
        if completed.returncode != 0:
            output = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
            raise ProviderUnavailable(f"`{command}` failed (exit {completed.returncode}): " + " | ".join(output))
        return True


@dataclass(frozen=True, kw_only=True)
class HelmRelease:
    """A helm chart installed as a cluster add-on; ``values`` become ``--set key=value``."""

    name: str
    chart: str
    repo: str
    version: str
    namespace: str
    values: dict[str, str] = field(default_factory=dict)

    def install_argv(self, kubeconfig: Path) -> list[str]:
        argv = [
            "helm", "upgrade", "--install", self.name, self.chart, "--repo", self.repo, "--version", self.version,
            "--namespace", self.namespace, "--create-namespace", "--kubeconfig", str(kubeconfig), "--wait",
        ]  # fmt: skip
        for key, value in self.values.items():
            argv += ["--set", f"{key}={value}"]
        return argv

    def uninstall_argv(self, kubeconfig: Path) -> list[str]:
        return ["helm", "uninstall", self.name, "--namespace", self.namespace, "--kubeconfig", str(kubeconfig),
                "--ignore-not-found", "--wait"]  # fmt: skip


def kubeconfig_document(
    *, name: str, server: str, certificate_authority_data: str, command: str, args: Sequence[str]
) -> dict[str, Any]:
    """A kubeconfig whose credentials come from an exec plugin (``aws eks get-token``,
    ``gke-gcloud-auth-plugin``), so no long-lived secret is written to disk."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server, "certificate-authority-data": certificate_authority_data}}
        ],
        "users": [
            {
                "name": name,
                "user": {
                    "exec": {
                        "apiVersion": "client.authentication.k8s.io/v1beta1",
                        "command": command,
                        "args": list(args),
                        "interactiveMode": "Never",
                    }
                },
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }


def write_kubeconfig(path: Path, **document: Any) -> Path:
    """Write :func:`kubeconfig_document` (JSON, which is YAML) readable by the operator only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(kubeconfig_document(**document), handle, indent=2)
    return path


def _ignore(_event: ProgressEvent) -> None:
    return None


class Provisioner(abc.ABC):
    """The infrastructure of one deployment on one cloud.

    Implement :meth:`plan`, :meth:`apply_step`, :meth:`delete_resource` and
    :meth:`resource_exists`; core's :meth:`up`, :meth:`down` and :meth:`status` do the rest.
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
    def apply_step(self, step: PlannedStep, ctx: StepContext) -> None:
        """Make ``step``'s resources exist (idempotently), reporting each through ``ctx``."""

    @abc.abstractmethod
    def delete_resource(self, resource: ResourceRecord, ctx: StepContext) -> None:
        """Delete one recorded resource and wait until it is gone; already gone is success."""

    @abc.abstractmethod
    def resource_exists(self, resource: ResourceRecord) -> bool:
        """Whether a recorded resource still exists (for ``status``)."""

    def deletion_order(self, resources: Sequence[ResourceRecord]) -> list[ResourceRecord]:
        """The order ``down`` deletes in: the reverse of creation, which respects dependencies."""
        return list(reversed(resources))

    def preflight(self) -> None:  # noqa: B027 - optional check with a sensible default
        """Check before ``up`` or ``down`` changes anything (for example: the credentials' account)."""

    def check_down(self, record: ProvisioningRecord, options: ProvisioningOptions) -> None:  # noqa: B027
        """Refuse ``down`` before anything is deleted (for example: a data bucket that still holds
        backups without ``--delete-data``), so a refusal never leaves a half-deleted deployment."""

    def upsert_dns(self, records: Sequence[DnsRecord], *, dry_run: bool = False) -> list[str]:
        """Create or replace DNS records in the deployment's zone; returns what was (or would be) done."""
        raise InvalidRequest(f"the {self.provider or 'configured'} infra provider does not manage DNS records")

    def close(self) -> None:  # noqa: B027 - optional: release clients
        """Release clients and sessions."""

    # -- driven by core ----------------------------------------------------------------------
    def up(
        self,
        record: ProvisioningRecord,
        options: ProvisioningOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Run every planned step in order. Every step runs again on a rerun: each is idempotent,
        which is how a rerun resumes after a failure and repairs what was deleted by hand."""
        options = options or ProvisioningOptions()
        report = progress if progress is not None else _ignore
        steps = self.plan()
        with record.locked():
            self.preflight()
            for index, step in enumerate(steps, start=1):
                ctx = StepContext(step, record, options, report, index=index, total=len(steps))
                if step.external and options.addons == "skip":
                    ctx.note("skipped (--addons skip)")
                    continue
                ctx.emit("start", step.description)
                try:
                    self.apply_step(step, ctx)
                except CmbclusterError as exc:
                    ctx.emit("failed", exc.message)  # the record keeps what was made; a rerun resumes
                    raise
                if not (step.external and options.addons == "print"):
                    record.mark_done(step.name)
                ctx.emit("done", step.name)

    def down(
        self,
        record: ProvisioningRecord,
        options: ProvisioningOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Delete every recorded resource, in :meth:`deletion_order`; each leaves the record as it goes,
        so a rerun after a failure resumes where it stopped."""
        options = options or ProvisioningOptions()
        report = progress if progress is not None else _ignore
        with record.locked():
            self.preflight()
            self.check_down(record, options)
            ordered = self.deletion_order(record.resources)
            for index, resource in enumerate(ordered, start=1):
                ctx = StepContext(resource.step, record, options, report, index=index, total=len(ordered))
                ctx.emit("deleting", resource.label)
                try:
                    self.delete_resource(resource, ctx)
                except CmbclusterError as exc:
                    ctx.emit("failed", exc.message)
                    raise
                record.remove(resource)
                ctx.emit("deleted", resource.label)
            record.completed_steps = []
            record.save()

    def status(self, record: ProvisioningRecord) -> list[StepStatus]:
        """Each planned step: done, partial (some recorded resources are gone), missing, or pending."""
        result = []
        for step in self.plan():
            resources = tuple((r, self.resource_exists(r)) for r in record.resources if r.step == step.name)
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
