"""``cmbcluster migrate plan|run|finish``: move every user's buckets and the database to another
storage backend (another cloud), verified and resumable (see :mod:`cmbcluster.migration`).

The source is the server's current configuration; the target is named by ``--to`` and
configured from the same environment (both clouds' settings set at once, as for ``serve``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from cmbcluster.commands.common import err, error, out, print_json, resolve_config
from cmbcluster.errors import CmbclusterError, ConfigurationError, PluginError
from cmbcluster.registrations import ProviderContext, ResolvedConfig

app = typer.Typer(help="Move every user's buckets and the database to another cloud.", no_args_is_help=True)

To = Annotated[str, typer.Option("--to", help="The target storage backend (its name, e.g. aws, gcp, local).")]


def _sessions(config: ResolvedConfig) -> Any:
    from cmbcluster.db import create_db_engine, session_factory, upgrade
    from cmbcluster.db.engine import opening
    from cmbcluster.security import secret_key

    engine = create_db_engine(config.core.effective_database_url)
    with opening(config.core.effective_database_url):
        upgrade(engine, secret_key=secret_key(config.core))
    return engine, session_factory(engine)


def _context(config: ResolvedConfig, model: Any) -> ProviderContext:
    """The context of a provider of the target, its settings read from the environment."""
    from pydantic import ValidationError

    from cmbcluster.config import format_validation_error

    settings = config.provider_settings.get(model) if model is not None else None
    if model is not None and settings is None:
        env_file = config.core.model_config.get("env_file")
        try:
            settings = model(_env_file=env_file if isinstance(env_file, str) else None)
        except ValidationError as exc:
            raise ConfigurationError(format_validation_error(model, exc)) from None
    active = dict(config.provider_settings)
    if settings is not None:
        active[type(settings)] = settings
    return ProviderContext(
        core=config.core, provider_settings=settings, decorate_pod=config.plugins.decorate_pod, active_settings=active
    )


@contextlib.contextmanager
def _sides(config: ResolvedConfig, to: str, *, with_infra: bool) -> Iterator[tuple[Any, Any]]:
    """The source (the configured storage backend) and the target named ``to``, closed afterwards."""
    from cmbcluster.migration.engine import Side

    plugins = _plugins(config)
    try:
        registration = plugins.storage_backend(to)
    except PluginError as exc:
        raise ConfigurationError([f"--to {to}: {exc}"]) from None
    opened: list[Any] = []
    try:
        source_context = config.context_for(config.storage)
        source = Side(
            name=config.storage.name, storage=config.storage.create(source_context),
            settings=source_context.provider_settings,
        )  # fmt: skip
        opened.append(source.storage)
        target_context = _context(config, registration.settings_model)
        target = Side(name=to, storage=registration.create(target_context), settings=target_context.provider_settings)
        opened.append(target.storage)
        if with_infra:
            try:
                infra = plugins.infra_provider(to)
            except PluginError:
                infra = None  # a storage-only plugin: its users get no identity of their own there
            if infra is not None:
                target.infra = infra.create(_context(config, infra.settings_model))
                opened.append(target.infra)
        yield source, target
    finally:
        for provider in reversed(opened):
            with contextlib.suppress(Exception):
                provider.close()


def _plugins(config: ResolvedConfig) -> Any:
    from cmbcluster.plugins import PluginManager

    return config.plugins if isinstance(config.plugins, PluginManager) else PluginManager.from_settings(config.core)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@app.command("plan")
def plan_command(
    to: To,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """What a run would move (read-only): users, buckets, objects, bytes, identities, egress cost."""
    from cmbcluster.migration import engine as migration

    config = resolve_config()
    db_engine, sessions = _sessions(config)
    try:
        with _sides(config, to, with_infra=True) as (source, target), sessions() as db:
            plan = migration.plan(db, source, target)
    finally:
        db_engine.dispose()
    if as_json:
        print_json(json.dumps({
            "source": plan.source, "target": plan.target, "users": plan.users, "objects": plan.objects,
            "bytes": plan.bytes, "identities": plan.identities, "egress_usd": plan.egress_usd,
            "egress_source": migration.EGRESS_SOURCE, "usd_per_gb": plan.usd_per_gb,
            "buckets": [b.__dict__ for b in plan.buckets],
        }))  # fmt: skip
        return
    from rich.table import Table

    table = Table(title=f"migrate {plan.source} → {plan.target}")
    for column in ("owner", "bucket", "objects", "size", "already verified"):
        table.add_column(column)
    for b in plan.buckets:
        table.add_row(
            b.owner, f"{b.display_name} ({b.bucket})", str(b.objects), _size(b.bytes), _size(b.already_verified)
        )
    out(table)
    out(f"{plan.users} users, {len(plan.buckets)} buckets, {plan.objects} objects, {_size(plan.bytes)}", soft_wrap=True)
    if plan.identities:
        out(f"cloud identities to create or update on {plan.target}: {', '.join(plan.identities)}", soft_wrap=True)
    if plan.egress_usd is None:
        out(f"egress cost: no published price for {plan.source!r} in the table; see your provider's pricing")
    else:
        out(
            f"egress from {plan.source}: about ${plan.egress_usd:.2f} at ${plan.usd_per_gb}/GB "
            f"(first-tier internet egress list price; {migration.EGRESS_SOURCE})",
            soft_wrap=True,
        )


class _Display:
    """Rich progress: one bar per bucket (bytes, rate, time left) and a line for the whole run (bytes
    copied, rate). That line has no total: the buckets' sizes are known one at a time, and rich resets
    a task's rate whenever its total changes (it then showed the last bucket's rate for the run's)."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.total = progress.add_task("all buckets, copied by this run", total=None)
        self.current: Any = None

    def bucket_started(self, label: str, objects: int, size: int, done: int) -> None:
        self.current = self.progress.add_task(f"{label} ({objects} objects)", total=size, completed=done)

    def bytes_copied(self, n: int) -> None:
        if self.current is not None:
            self.progress.advance(self.current, n)
        self.progress.advance(self.total, n)

    def bucket_done(self, outcome: Any) -> None:
        colour = {"switched": "green", "copied": "green", "waiting": "yellow"}.get(outcome.state, "red")
        self.progress.console.print(
            f"[{colour}]{outcome.state}[/{colour}] {outcome.owner} / {outcome.display_name}: "
            f"{outcome.copied} copied, {outcome.skipped} already verified. {outcome.message}",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
        if self.current is not None:
            self.progress.update(self.current, visible=False)
        self.current = None  # a managed transfer reports bytes before its bucket's bar starts

    def note(self, text: str) -> None:
        self.progress.console.print(f"[yellow]note:[/yellow] {text}", highlight=False, soft_wrap=True)


@app.command("run")
def run_command(
    to: To,
    parallel: Annotated[int, typer.Option(help="Objects copied at once.", min=1, max=64)] = 8,
    database_bucket: Annotated[
        str | None,
        typer.Option(help="The target's database bucket (default: CMBCLUSTER_DATABASE_BUCKET, the same name)."),
    ] = None,
    managed_transfer: Annotated[
        bool,
        typer.Option(
            "--managed-transfer",
            help="Let the cloud's transfer service copy each bucket where a plugin offers one (verified here "
            "afterwards); streamed otherwise.",
        ),
    ] = False,
    copy_only: Annotated[
        bool,
        typer.Option(
            "--copy-only",
            help="Copy and verify, switch nothing: users keep working on their buckets meanwhile; a later run "
            "without it copies what changed since and switches.",
        ),
    ] = False,
) -> None:
    """Create each bucket on the target, copy, verify, switch; then back the database up to the target.

    Safe to stop and run again: what was verified is not copied again. Buckets mounted by a running
    environment are switched by a later run, once their environments stop. A switched bucket is used
    from a server configured for the target only: copy ahead with --copy-only while users work.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from cmbcluster.db.engine import sqlite_path
    from cmbcluster.migration.engine import Events, Migration, move_database

    config = resolve_config()
    database = sqlite_path(config.core.effective_database_url)
    target_bucket = database_bucket or config.core.database_bucket
    db_engine, sessions = _sessions(config)
    try:
        with _sides(config, to, with_infra=True) as (source, target):
            problem = target.storage.bucket_names.problem(target_bucket) if database and target_bucket else None
            if problem is not None:  # refused before any copy, not once every bucket has moved
                setting = "--database-bucket" if database_bucket else "CMBCLUSTER_DATABASE_BUCKET"
                raise ConfigurationError([f"{setting} on {to}: {problem}"])
            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn())  # fmt: skip
            with Progress(*columns, console=None, transient=False) as progress:
                display = _Display(progress)
                events: Events = display  # type: ignore[assignment]
                result = Migration(
                    sessions,
                    source,
                    target,
                    namespace=config.core.namespace,
                    parallel=parallel,
                    events=events,
                    transfers=_plugins(config).managed_transfer if managed_transfer else None,
                    copy_only=copy_only,
                ).run()
            if not result.buckets:
                out(f"no bucket on {source.name} to move")
            if copy_only:
                failed = [b for b in result.buckets if b.state != "copied"]
                if failed:
                    raise CmbclusterError(f"{len(failed)} of {len(result.buckets)} buckets not copied (listed above)")
                out(
                    f"{len(result.buckets)} buckets copied to {to} and verified; nothing switched, users go on "
                    f"working. To switch: `cmbcluster migrate run --to {to}` (it copies only what changed since)",
                    soft_wrap=True,
                )
                return
            if not result.complete:
                pending = [b for b in result.buckets if b.state != "switched"]
                raise CmbclusterError(
                    f"{len(pending)} of {len(result.buckets)} buckets not switched yet (listed above); the database "
                    "moves once every bucket is switched: fix what is listed and run `cmbcluster migrate run` again"
                )
            out(
                move_database(
                    database, target.storage, target_bucket, prefix=config.core.database_backup_prefix, target_name=to
                ),
                soft_wrap=True,
            )
    finally:
        db_engine.dispose()
    out(
        f"[green]every bucket now lives on {to}[/green]. Configure the server for {to} (CLOUD_PROVIDER={to}) "
        f"and restart it; delete the sources with `cmbcluster migrate finish --delete-source` once satisfied.",
        soft_wrap=True,
    )


@app.command("finish")
def finish_command(
    delete_source: Annotated[
        bool, typer.Option("--delete-source", help="Delete the source buckets whose copy was verified.")
    ] = False,
) -> None:
    """Delete the source buckets of switched storages, only where the source still matches the verified copy."""
    from sqlalchemy import select

    from cmbcluster.db.models import MigrationBucket
    from cmbcluster.migration.engine import finish

    if not delete_source:
        error("nothing done: `cmbcluster migrate finish --delete-source` deletes the verified source buckets")
        raise typer.Exit(2)
    config = resolve_config()
    db_engine, sessions = _sessions(config)
    try:
        with sessions() as db:
            names = set(
                db.execute(select(MigrationBucket.source_backend).where(MigrationBucket.state == "switched")).scalars()
            )
            db.rollback()
        backends: dict[str, Any] = {}
        stack = contextlib.ExitStack()
        with stack:
            for name in names:
                if name == config.storage.name:
                    backends[name] = stack.enter_context(_closing(config.create(config.storage)))
                else:
                    _, target = stack.enter_context(_sides(config, name, with_infra=False))
                    backends[name] = target.storage
            with sessions() as db:
                outcomes = finish(db, backends.__getitem__)
    finally:
        db_engine.dispose()
    if not outcomes:
        out("no switched bucket waits for its source to be deleted")
    for outcome in outcomes:
        if outcome.deleted:
            out(f"[green]deleted[/green] {outcome.source}", soft_wrap=True)
        else:
            err(f"[yellow]kept[/yellow] {outcome.source}: {outcome.message}", soft_wrap=True)
    if any(not o.deleted for o in outcomes):
        raise typer.Exit(1)


@contextlib.contextmanager
def _closing(provider: Any) -> Iterator[Any]:
    try:
        yield provider
    finally:
        provider.close()
