"""``cmbcluster infra``: provision, inspect and tear down the cloud infrastructure of a deployment.

The active infra provider (``CLOUD_PROVIDER`` / ``CMBCLUSTER_INFRA_PROVIDER``) supplies a
:class:`~cmbcluster.interfaces.Provisioner` through its registration's ``provisioner``
factory; this module only drives it and shows its progress. The record of what ``up``
created is a JSON file under ``--state-dir`` (default ``<data dir>/infra``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import typer

from cmbcluster import provisioning
from cmbcluster.commands.common import out, resolve_config
from cmbcluster.errors import ConfigurationError, InvalidRequest
from cmbcluster.interfaces.provisioning import DnsRecord, ProgressEvent, Provisioner, ProvisioningOptions
from cmbcluster.provisioning import ProvisioningRecord

app = typer.Typer(
    help="Provision the cloud infrastructure of a deployment: plan, up, status, down, dns.", no_args_is_help=True
)

StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar="CMBCLUSTER_INFRA_STATE_DIR",
        help="Where the record of created resources is kept (default: <data dir>/infra).",
        show_default=False,
    ),
]
Addons = Literal["install", "print", "skip"]

_STYLE = {
    "created": "green",
    "adopted": "cyan",
    "deleted": "green",
    "gone": "cyan",
    "failed": "red",
    "command": "magenta",
    "note": "dim",
}


@contextlib.contextmanager
def _provisioner(state_dir: Path | None) -> Iterator[tuple[Provisioner, ProvisioningRecord]]:
    config = resolve_config(concerns=("infra",))  # before the cluster exists: no sign-in settings needed yet
    registration = config.infra
    if registration.provisioner is None:
        raise ConfigurationError(
            [
                f"the infra provider {registration.name!r} cannot provision infrastructure: set CLOUD_PROVIDER "
                "(or CMBCLUSTER_INFRA_PROVIDER) to aws, gcp, or a plugin whose infra registration has a provisioner"
            ]
        )
    provisioner = registration.provisioner(config.context_for(registration))
    try:
        directory = state_dir or config.core.data_dir / "infra"
        record = ProvisioningRecord.for_deployment(
            directory, provider=registration.name, deployment=provisioner.deployment
        )
        yield provisioner, record
    finally:
        provisioner.close()


def _show(event: ProgressEvent) -> None:
    position = f"[{event.index}/{event.total}] " if event.total else ""
    if event.action == "start":
        out(f"[bold]{position}{event.step}[/bold]: {event.message}", highlight=False, soft_wrap=True)
        return
    if event.action == "done":
        return
    style = _STYLE.get(event.action, "")
    label = f"[{style}]{event.action}[/{style}]" if style else event.action
    if event.action == "command":
        out(f"    {label} {event.message}", highlight=False, soft_wrap=True, markup=True)
        return
    out(f"    {label} {event.message}", highlight=False, soft_wrap=True)


@app.command()
def plan(
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show what `up` would create, in order, with names. Changes nothing."""
    with _provisioner(state_dir) as (provisioner, record):
        steps = provisioner.plan()
        if as_json:
            out(json.dumps([asdict(s) for s in steps], indent=2), highlight=False, soft_wrap=True, markup=False)
            return
        out(f"Plan for {record.provider} deployment [bold]{record.deployment}[/bold] ({len(steps)} steps):")
        for index, step in enumerate(steps, start=1):
            done = " (done)" if step.name in record.completed_steps else ""
            helm = " [dim](helm)[/dim]" if step.external else ""
            out(f"{index:>3}. [bold]{step.name}[/bold]{helm}{done}: {step.description}", highlight=False)
            for item in step.creates:
                out(f"       + {item}", highlight=False, soft_wrap=True, markup=False)
        out(f"Record: {record.path}", highlight=False, soft_wrap=True)


@app.command()
def up(
    state_dir: StateDir = None,
    addons: Annotated[
        Addons, typer.Option(help="install: run the helm add-on steps; print: print their commands; skip: leave out.")
    ] = "install",
) -> None:
    """Create everything in the plan. Safe to rerun: it resumes after a failure and creates nothing twice."""
    with _provisioner(state_dir) as (provisioner, record):
        out(f"Provisioning {record.provider} deployment [bold]{record.deployment}[/bold]; record: {record.path}",
            highlight=False, soft_wrap=True)  # fmt: skip
        started = time.perf_counter()
        provisioning.up(provisioner, record, ProvisioningOptions(addons=addons), progress=_show)
        out(f"[green]up: done[/green] in {time.perf_counter() - started:.1f} s; "
            f"{len(record.resources)} resources recorded", highlight=False)  # fmt: skip


@app.command()
def down(
    state_dir: StateDir = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    delete_data: Annotated[
        bool, typer.Option("--delete-data", help="Also delete data buckets that still hold objects (backups).")
    ] = False,
    addons: Annotated[Addons, typer.Option(help="install: run `helm uninstall`; print: print it only.")] = "install",
) -> None:
    """Delete exactly what `up` recorded, dependents first. Safe to rerun after a failure."""
    with _provisioner(state_dir) as (provisioner, record):
        if not record.resources:
            out(f"nothing to delete: the record {record.path} lists no resources", highlight=False, soft_wrap=True)
            return
        if not yes and not typer.confirm(
            f"Delete {len(record.resources)} resources of {record.provider} deployment {record.deployment}?"
        ):
            raise typer.Exit(1)
        started = time.perf_counter()
        provisioning.down(
            provisioner, record, ProvisioningOptions(addons=addons, delete_data=delete_data), progress=_show
        )
        out(f"[green]down: done[/green] in {time.perf_counter() - started:.1f} s; the record is empty",
            highlight=False)  # fmt: skip


@app.command()
def status(
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Each planned step and whether its recorded resources still exist."""
    with _provisioner(state_dir) as (provisioner, record):
        steps = provisioning.status(provisioner, record)
        if as_json:
            data = [
                {"step": s.step, "state": s.state,
                 "resources": [{**asdict(r), "exists": alive} for r, alive in s.resources]}
                for s in steps
            ]  # fmt: skip
            out(json.dumps(data, indent=2), highlight=False, soft_wrap=True, markup=False)
            return
        colours = {"done": "green", "partial": "yellow", "missing": "red", "pending": "dim"}
        out(f"{record.provider} deployment [bold]{record.deployment}[/bold]; record: {record.path}", soft_wrap=True)
        for s in steps:
            out(f"  [{colours[s.state]}]{s.state:<8}[/{colours[s.state]}] {s.step}", highlight=False)
            for resource, alive in s.resources:
                mark = "" if alive else "  [red](gone)[/red]"
                out(f"             {resource.label}{mark}", highlight=False, soft_wrap=True)


@app.command()
def dns(
    target: Annotated[str, typer.Option(help="IP address (A record) or host name (CNAME) the names point to.")],
    domain: Annotated[
        str | None, typer.Option(help="The deployment's domain (default: the host of CMBCLUSTER_PUBLIC_URL).")
    ] = None,
    wildcard: Annotated[bool, typer.Option(help="Also point *.<domain> (user environments) there.")] = True,
    ttl: Annotated[int, typer.Option(min=30, max=86400, help="Record TTL in seconds.")] = 300,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the changes without making them.")] = False,
    state_dir: StateDir = None,
) -> None:
    """Create or update the deployment's DNS records (Route53, Cloud DNS)."""
    with _provisioner(state_dir) as (provisioner, _record):
        name = domain
        if name is None:
            public_url = resolve_config().core.public_url
            name = urlsplit(public_url).hostname if public_url else None
        if not name:
            raise InvalidRequest("no domain: pass --domain or set CMBCLUSTER_PUBLIC_URL")
        records = dns_records(name, target, wildcard=wildcard, ttl=ttl)
        for line in provisioner.upsert_dns(records, dry_run=dry_run):
            out(("would " if dry_run else "") + line, highlight=False, soft_wrap=True, markup=False)


def dns_records(domain: str, target: str, *, wildcard: bool = True, ttl: int = 300) -> list[DnsRecord]:
    """The deployment's records: the domain and, for user environments, ``*.domain``."""
    domain = domain.strip().rstrip(".").lower()
    labels = domain.split(".")
    if len(labels) < 2 or not all(label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels):
        raise InvalidRequest(f"{domain!r} is not a domain name")
    target = target.strip().rstrip(".")
    try:
        ipaddress.IPv4Address(target)
        kind: Literal["A", "CNAME"] = "A"
    except ValueError:
        if not target or not all(part and part.replace("-", "").isalnum() for part in target.split(".")):
            raise InvalidRequest(f"--target {target!r} is neither an IPv4 address nor a host name") from None
        kind = "CNAME"
    names = [domain, f"*.{domain}"] if wildcard else [domain]
    return [DnsRecord(name=name, type=kind, values=(target,), ttl=ttl) for name in names]
