"""``cmbcluster infra``: provision, inspect and tear down the cloud infrastructure of a deployment.

The active infra provider (``CLOUD_PROVIDER`` / ``CMBCLUSTER_INFRA_PROVIDER``) supplies a
:class:`~cmbcluster.interfaces.Provisioner` through its registration's ``provisioner``
factory; this module only drives it and shows its progress. The record of what ``up``
created is a JSON file under ``--state-dir`` (default ``<data dir>/infra``), with the kubeconfig
of the new cluster beside it (``cmbcluster infra kubeconfig`` prints its path).
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
from cmbcluster.config import ResolvedConfig
from cmbcluster.errors import ConfigurationError, InvalidRequest, NotFound, PluginError, ProviderUnavailable
from cmbcluster.interfaces.provisioning import DnsRecord, ProgressEvent, Provisioner, ProvisioningOptions
from cmbcluster.kubernetes.plugin import KubernetesSettings
from cmbcluster.provisioning import ProvisioningRecord, kubeconfig_path

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
Kubeconfig = Annotated[
    Path | None,
    typer.Option(
        "--kubeconfig",
        envvar="CMBCLUSTER_INFRA_KUBECONFIG",
        help="A kubeconfig for the cluster's add-ons instead of the one `up` writes (another way to reach it).",
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
    with _configured(state_dir) as (_config, provisioner, record):
        yield provisioner, record


@contextlib.contextmanager
def _configured(state_dir: Path | None) -> Iterator[tuple[ResolvedConfig, Provisioner, ProvisioningRecord]]:
    config = resolve_config(concerns=("infra",))  # before the cluster exists: no sign-in settings needed yet
    registration = config.infra
    if registration.provisioner is None:
        raise ConfigurationError(
            [
                f"the infra provider {registration.name!r} cannot provision infrastructure: set CLOUD_PROVIDER "
                "(or CMBCLUSTER_INFRA_PROVIDER) to aws, gcp, or a plugin whose infra registration has a provisioner"
            ]
        )
    try:
        provisioner = registration.create_provisioner(config.context_for(registration))
    except PluginError as exc:
        raise PluginError(f"{config.describe(registration)}: {exc}") from exc
    try:
        directory = state_dir or config.core.data_dir / "infra"
        record = ProvisioningRecord.for_deployment(
            directory, provider=registration.name, deployment=provisioner.deployment
        )
        yield config, provisioner, record
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
    kubeconfig: Kubeconfig = None,
) -> None:
    """Create everything in the plan. Safe to rerun: it resumes after a failure and creates nothing twice.

    Before creating anything it checks the tools it needs (helm, the cloud's CLI the kubeconfig calls),
    the account and the permissions, and names every problem at once."""
    with _provisioner(state_dir) as (provisioner, record):
        out(f"Provisioning {record.provider} deployment [bold]{record.deployment}[/bold]; record: {record.path}",
            highlight=False, soft_wrap=True)  # fmt: skip
        started = time.perf_counter()
        options = ProvisioningOptions(addons=addons, kubeconfig=kubeconfig)
        provisioning.up(provisioner, record, options, progress=_show)
        out(f"[green]up: done[/green] in {time.perf_counter() - started:.1f} s; "
            f"{len(record.resources)} resources recorded", highlight=False)  # fmt: skip


@app.command()
def down(
    state_dir: StateDir = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    delete_data: Annotated[
        bool, typer.Option("--delete-data", help="Also delete data buckets that still hold objects (backups).")
    ] = False,
    delete_retained: Annotated[
        bool,
        typer.Option(
            "--delete-retained",
            help="Also delete what the deployment made and `down` keeps on purpose: users' buckets with all their "
            "data, per-user cloud identities, the disks of the cluster's volumes.",
        ),
    ] = False,
    addons: Annotated[Addons, typer.Option(help="install: run `helm uninstall`; print: print it only.")] = "install",
    kubeconfig: Kubeconfig = None,
) -> None:
    """Delete exactly what `up` recorded (and the DNS records `infra dns` wrote), dependents first. Safe to
    rerun after a failure. What the deployment made besides (users' buckets and identities, disks) is
    listed and kept, unless --delete-retained."""
    with _provisioner(state_dir) as (provisioner, record):
        kept = provisioning.retained(provisioner, record)
        for resource in kept:
            why = resource.attributes.get("why", "")
            verb = "[red]deleting[/red]" if delete_retained else "keeping"
            out(f"{verb} {resource.label}" + (f": {why}" if why else ""), highlight=False, soft_wrap=True)
        if not record.resources and not (kept and delete_retained):
            out(f"nothing to delete: the record {record.path} lists no resources", highlight=False, soft_wrap=True)
            if kept:
                out(f"{len(kept)} resources above are kept; `down --delete-retained` deletes them", highlight=False)
            return
        count = len(record.resources) + (len(kept) if delete_retained else 0)
        if not yes and not typer.confirm(
            f"Delete {count} resources of {record.provider} deployment {record.deployment}?"
        ):
            raise typer.Exit(1)
        started = time.perf_counter()
        options = ProvisioningOptions(
            addons=addons, delete_data=delete_data, delete_retained=delete_retained, kubeconfig=kubeconfig
        )
        provisioning.down(provisioner, record, options, progress=_show)
        out(f"[green]down: done[/green] in {time.perf_counter() - started:.1f} s; the record is empty",
            highlight=False)  # fmt: skip
        if kept and not delete_retained:
            out(f"kept on purpose: {len(kept)} resources (listed above); `cmbcluster infra down --delete-retained` "
                "deletes them", highlight=False, soft_wrap=True)  # fmt: skip


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
def documents(
    directory: Annotated[Path, typer.Argument(help="Where to write them (created if missing).")],
    state_dir: StateDir = None,
) -> None:
    """Write the documents an operator needs to build by hand what `up` builds (IAM policies, trust policies)."""
    with _provisioner(state_dir) as (provisioner, _record):
        files = provisioner.documents()
        if not files:
            out(f"the {provisioner.provider} infra provider has no documents to write", highlight=False)
            return
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in sorted(files.items()):
            (directory / name).write_text(text, encoding="utf-8")
            out(f"wrote {directory / name}", highlight=False, soft_wrap=True, markup=False)


@app.command()
def kubeconfig(
    state_dir: StateDir = None,
    kubeconfig: Kubeconfig = None,
) -> None:
    """Print the path of the kubeconfig `up` wrote for the cluster (for helm, kubectl, `cmbcluster deploy`)."""
    with _provisioner(state_dir) as (_unused, record):
        path = kubeconfig or kubeconfig_path(record)
        if not path.exists():
            raise NotFound(f"no kubeconfig at {path}: run `cmbcluster infra up` first (it writes it with the cluster)")
        out(str(path), highlight=False, soft_wrap=True, markup=False)


@app.command()
def dns(
    target: Annotated[
        str | None,
        typer.Option(
            help="IP address (A records) or host name (CNAME) the names point to; default: the address of the "
            "ingress controller's load balancer (its Service in the cluster `up` made)."
        ),
    ] = None,
    domain: Annotated[
        str | None, typer.Option(help="The web UI's host name (default: the host of CMBCLUSTER_PUBLIC_URL).")
    ] = None,
    environments_domain: Annotated[
        str | None,
        typer.Option(help="The environments' domain: *.<it> is pointed too (default: CMBCLUSTER_ENVIRONMENTS_DOMAIN)."),
    ] = None,
    wildcard: Annotated[bool, typer.Option(help="Point *.<environments domain> (user environments) too.")] = True,
    ttl: Annotated[int, typer.Option(min=30, max=86400, help="Record TTL in seconds.")] = 300,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the changes without making them.")] = False,
    state_dir: StateDir = None,
    kubeconfig: Kubeconfig = None,
) -> None:
    """Create or update the deployment's DNS records (Route53, Cloud DNS): the web UI's host and
    *.<environments domain>. `down` deletes them again."""
    with _configured(state_dir) as (config, provisioner, record):
        name = domain
        if name is None:
            public_url = config.core.public_url
            name = urlsplit(public_url).hostname if public_url else None
        if not name:
            raise InvalidRequest("no domain: pass --domain or set CMBCLUSTER_PUBLIC_URL")
        kubernetes = config.settings(KubernetesSettings)
        if environments_domain is None and kubernetes is not None:
            environments_domain = kubernetes.environments_domain or None
        if target is None:
            namespace = kubernetes.ingress_namespace if kubernetes is not None else "ingress-nginx"
            target = ingress_address(kubeconfig or kubeconfig_path(record), namespace)
            out(f"the ingress controller's load balancer: {target}", highlight=False, soft_wrap=True, markup=False)
        records = dns_records(name, target, environments_domain=environments_domain if wildcard else None, ttl=ttl)
        for line in provisioning.dns(provisioner, record, records, dry_run=dry_run):
            out(("would " if dry_run else "") + line, highlight=False, soft_wrap=True, markup=False)


#: The Service ingress-nginx's chart makes for its controller (release ingress-nginx).
INGRESS_SERVICE = "ingress-nginx-controller"


def ingress_address(kubeconfig: Path, namespace: str, service: str = INGRESS_SERVICE) -> str:
    """The host name or IP of the ingress controller's load balancer, read from its Service."""
    if not kubeconfig.exists():
        raise ConfigurationError(
            [f"no kubeconfig at {kubeconfig} to find the ingress controller's address: pass --target, or "
             "--kubeconfig (CMBCLUSTER_INFRA_KUBECONFIG)"]
        )  # fmt: skip
    try:
        from kubernetes import client
        from kubernetes import config as kube_config
    except ImportError:
        raise ConfigurationError(
            ["the kubernetes package is missing (pip install 'cmbcluster-core[kubernetes]')"]
        ) from None
    try:
        api = kube_config.new_client_from_config(config_file=str(kubeconfig))
        try:
            found = client.CoreV1Api(api).read_namespaced_service(service, namespace, _request_timeout=30)
        finally:
            api.close()
    except client.ApiException as exc:
        if exc.status == 404:
            raise NotFound(
                f"Service {namespace}/{service} not found: is the ingress-nginx add-on installed (`cmbcluster infra "
                "up`)? Or pass --target"
            ) from None
        raise ProviderUnavailable(f"the cluster refused reading Service {namespace}/{service}: {exc.reason}") from None
    except Exception as exc:  # noqa: BLE001 - kubeconfig errors, connection errors, an exec plugin that fails
        raise ProviderUnavailable(f"cannot read Service {namespace}/{service} from the cluster: {exc}") from None
    for entry in (found.status.load_balancer.ingress or []) if found.status and found.status.load_balancer else []:
        address = entry.hostname or entry.ip
        if address:
            return str(address)
    raise ProviderUnavailable(
        f"Service {namespace}/{service} has no load balancer address yet (the cloud is still making it): "
        "wait a minute and rerun, or pass --target"
    )


def dns_records(host: str, target: str, *, environments_domain: str | None = None, ttl: int = 300) -> list[DnsRecord]:
    """The deployment's records: the web UI's host and, for user environments, ``*.<environments domain>``."""
    names = [_domain_name(host, "domain")]
    if environments_domain:
        names.append("*." + _domain_name(environments_domain, "environments domain"))
    target = target.strip().rstrip(".")
    try:
        ipaddress.IPv4Address(target)
        kind: Literal["A", "CNAME"] = "A"
    except ValueError:
        if not target or not all(part and part.replace("-", "").isalnum() for part in target.split(".")):
            raise InvalidRequest(f"--target {target!r} is neither an IPv4 address nor a host name") from None
        kind = "CNAME"
    return [DnsRecord(name=name, type=kind, values=(target,), ttl=ttl) for name in dict.fromkeys(names)]


def _domain_name(value: str, what: str) -> str:
    domain = value.strip().rstrip(".").lower()
    labels = domain.split(".")
    if len(labels) < 2 or not all(label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels):
        raise InvalidRequest(f"{value!r} is not a {what} name")
    return domain
