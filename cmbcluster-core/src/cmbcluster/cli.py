"""The ``cmbcluster`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cmbcluster import __version__
from cmbcluster.commands import budgets as budgets_command
from cmbcluster.commands import deploy as deploy_command
from cmbcluster.commands import images as images_command
from cmbcluster.commands import infra as infra_command
from cmbcluster.commands import migrate as migrate_command
from cmbcluster.commands import plugin as plugin_command
from cmbcluster.commands import usage as usage_command
from cmbcluster.commands import users as users_command
from cmbcluster.commands.common import err, error, out, print_json, resolve_config, warning
from cmbcluster.config import load_core_settings
from cmbcluster.errors import CmbclusterError
from cmbcluster.plugins import PluginManager

if TYPE_CHECKING:
    from cmbcluster.interfaces import StorageBackend
    from cmbcluster.registrations import ResolvedConfig

app = typer.Typer(
    name="cmbcluster",
    help="CMBCluster: personal research environments on Kubernetes, with your bucket mounted as a folder.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check the configuration, or print an example of it.", no_args_is_help=True)
db_app = typer.Typer(help="Database migrations, backups and restore.", no_args_is_help=True)
secrets_app = typer.Typer(help="The control plane's secret key: rotation.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(secrets_app, name="secrets")
app.add_typer(deploy_command.app, name="deploy")
app.add_typer(infra_command.app, name="infra")
app.add_typer(images_command.app, name="images")
app.add_typer(users_command.app, name="users")
app.add_typer(usage_command.app, name="usage")
app.add_typer(budgets_command.budgets_app, name="budgets")
app.add_typer(budgets_command.groups_app, name="groups")
app.add_typer(migrate_command.app, name="migrate")
app.add_typer(plugin_command.app, name="plugin")


SHUTDOWN_GRACE_SECONDS = 5


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 8000).", min=1, max=65535)] = None,
    reload: Annotated[bool, typer.Option(help="Restart when the source changes (development).")] = False,
) -> None:
    """Run the control plane: the API, and the web UI when it is built."""
    import os

    import uvicorn

    from cmbcluster.app import create_app
    from cmbcluster.observability import configure_logging_for

    overrides: dict[str, Any] = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    config = resolve_config(**overrides)  # refuse an invalid configuration before anything starts
    core = config.core
    configure_logging_for(core)
    if reload:
        # uvicorn's reloader imports the app by name in a child process: pass choices by environment.
        os.environ["CMBCLUSTER_HOST"], os.environ["CMBCLUSTER_PORT"] = core.host, str(core.port)
        uvicorn.run(
            "cmbcluster.app:create_app_from_environment", factory=True, host=core.host, port=core.port,
            reload=True, reload_dirs=[str(Path(__file__).parent)], log_config=None, loop="asyncio",
        )  # fmt: skip
        return
    application = create_app(config=config)
    # Here too, not only in the app's start-up, so that a backup that cannot be read is one clear
    # error line instead of a failed start-up's traceback (the app's own call then has nothing to do).
    from cmbcluster.db.backup import restore_at_start, serving_lock

    application.state.serving_lock = serving_lock(application.state.context)  # the app's lifespan releases it
    restore_at_start(application.state.context)
    from cmbcluster.api.server import run

    try:
        run(application, core, graceful_shutdown_seconds=SHUTDOWN_GRACE_SECONDS)
    finally:
        # The app's shutdown stops the embedded default's environments; a second Ctrl-C skips it
        # (uvicorn's forced exit), so make sure here: none may outlive the server (idempotent).
        from cmbcluster.services.environments import stop_with_control_plane

        stop_with_control_plane(application.state.context)


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List installed plugins, the hooks each implements, and load errors."""
    from cmbcluster.errors import PluginError
    from cmbcluster.plugins import PluginsFailed

    settings = load_core_settings()
    manager = PluginManager.from_settings(settings)
    conflict: PluginError | None = None
    try:
        manager.load()
    except PluginsFailed:
        raise  # strict mode: nothing is listed, as nothing would start
    except PluginError as exc:  # two plugins registering one name: list them all, then say so
        conflict = exc
    infos = manager.plugins()
    if as_json:
        print_json(json.dumps([info.as_dict() for info in infos]))
    else:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="CMBCluster plugins")
        for column in ("name", "distribution", "version"):
            table.add_column(column, overflow="fold")
        # hook names are what an author greps for: whole, one a line; the other columns wrap instead
        longest = max((len(hook) for info in infos for hook in info.hooks), default=0)
        table.add_column("hooks", no_wrap=True, min_width=longest)
        table.add_column("status", overflow="fold")
        for info in infos:
            status = "[green]loaded[/green]" if info.loaded else f"[red]{escape(str(info.error))}[/red]"
            table.add_row(info.name, info.distribution, info.version, "\n".join(info.hooks) or "-", status)
        out(table)
    if conflict is not None:
        raise conflict


@config_app.command("check")
def config_check(
    connect: Annotated[
        bool,
        typer.Option(
            "--connect", help="Check here as the server: build and reach each active service, say what answered."
        ),
    ] = False,
) -> None:
    """Validate the whole configuration as `serve` does and list every problem once (exit 1 if any).

    Every active provider is also built by its factory, as at start-up, without network calls. Where
    a factory fails for want of what only the server's machine has (cloud credentials, a kubeconfig)
    that is a warning, since this may run on another machine before `cmbcluster deploy`; with
    --connect it is an error, and each service is reached besides. A plugin's own mistake (a factory
    answering with something else than its interface, a settings model it does not declare, a missing
    dependency) is an error wherever this runs, naming the plugin and the registration.
    """
    from rich.markup import escape

    from cmbcluster.context import ProviderBuildError, bucket_name_problems, build_providers
    from cmbcluster.errors import ConfigurationError

    config = resolve_config()
    for said in config.warnings:
        warning(said)
    try:
        providers = build_providers(config)  # the same factories, and their checks, that serve runs
    except ProviderBuildError as exc:
        if connect or exc.faults:
            for problem in exc.unmet if not connect else ():
                warning(f"serve would refuse on this machine: {problem}")
            raise ConfigurationError(exc.faults if not connect else exc.problems) from None
        for problem in exc.unmet:
            warning(f"serve would refuse on this machine: {problem}")
        providers = None
    unreachable = []
    try:
        problems = bucket_name_problems(config, providers.storage) if providers else []
        if problems:  # wrong on every machine: an error, as serve's
            raise ConfigurationError(problems)
        for concern, name, provider in providers.active if connect and providers else ():
            try:
                provider.check_ready()
            except Exception as exc:  # noqa: BLE001 - any failure means it did not answer; reported, one line each
                unreachable.append(f"{concern} {name}")
                err(f"[red]{concern} {name}: did not answer[/red]: {escape(str(exc))}", soft_wrap=True)
            else:
                out(f"[green]{concern} {name}: answered[/green]", soft_wrap=True)
        if connect:  # the database too: a URL can be valid and still name no server, or a wrong password
            _check_database(config.core.effective_database_url, unreachable)
        if connect and providers is not None and config.core.database_bucket:
            _check_database_bucket(config, providers.storage, unreachable)
    finally:
        if providers is not None:
            providers.close()
    if unreachable:
        raise CmbclusterError(f"the configuration is valid, but {', '.join(unreachable)} did not answer")
    summary = ", ".join(f"{k}={v}" for k, v in config.summary().items())
    out(
        f"[green]configuration OK[/green]: {summary}; database {_safe_url(config.core.effective_database_url)}",
        soft_wrap=True,
    )
    for note in config.notes():
        out(f"  {note}", soft_wrap=True, markup=False)


def _check_database(url: str, unreachable: list[str]) -> None:
    """`config check --connect`'s line for the database; appended to ``unreachable`` if it did not answer."""
    from rich.markup import escape

    from cmbcluster.db.engine import reach_database

    shown = escape(_safe_url(url))
    try:
        answer = reach_database(url)
    except CmbclusterError as exc:
        unreachable.append("the database")
        err(f"[red]database {shown}: did not answer[/red]: {escape(str(exc))}", soft_wrap=True)
    else:
        out(f"[green]database {shown}: {escape(answer)}[/green]", soft_wrap=True)


def _check_database_bucket(config: ResolvedConfig, storage: StorageBackend, unreachable: list[str]) -> None:
    """`config check --connect`'s line for the database bucket: backups to a bucket that is not
    there failed only at the first backup, an hour after start, or at the stop."""
    from rich.markup import escape

    from cmbcluster.db.backup import BackupUnavailable, DatabaseBackups

    bucket = config.core.database_bucket
    try:
        found = DatabaseBackups.from_settings(config.core, storage).list()
    except BackupUnavailable:  # PostgreSQL, backed up with its own tools: the bucket is not used
        return
    except Exception as exc:  # noqa: BLE001 - any failure means it did not answer; reported in one line
        unreachable.append(f"the database bucket {bucket}")
        err(f"[red]database bucket {escape(str(bucket))}: did not answer[/red]: {escape(str(exc))}", soft_wrap=True)
    else:
        out(f"[green]database bucket {escape(str(bucket))}: answered ({len(found)} backups)[/green]", soft_wrap=True)


@config_app.command("example")
def config_example(
    cloud: Annotated[
        str | None, typer.Option("--cloud", help="Only core's and this plugin's or provider's settings.")
    ] = None,
) -> None:
    """Print a commented .env: every setting of core and of the installed plugins."""
    from cmbcluster.config import example_env
    from cmbcluster.errors import ConfigurationError

    try:  # the plugins the configuration allows
        plugins = PluginManager.from_settings(load_core_settings())
    except ConfigurationError:
        # The example is how an operator mends a configuration: a broken one must not withhold it.
        err("note: the configuration is invalid (`cmbcluster config check` says why); the example covers "
            "every installed plugin", markup=False, soft_wrap=True)  # fmt: skip
        plugins = PluginManager()
    sys.stdout.write(example_env(plugins.load(), cloud))


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply database migrations (also done automatically by `serve`)."""
    from cmbcluster.db import create_db_engine, current_revision, upgrade
    from cmbcluster.db.engine import opening
    from cmbcluster.security import secret_key

    settings = load_core_settings()
    url = settings.effective_database_url
    engine = create_db_engine(url)
    with opening(url):
        upgrade(engine, revision, secret_key=secret_key(settings))
        out(f"database at revision {current_revision(engine)}")


@db_app.command("current")
def db_current() -> None:
    """Show the database's migration revision and the newest one this version knows."""
    from cmbcluster.db import create_db_engine, current_revision
    from cmbcluster.db.engine import head_revision, opening

    settings = load_core_settings()
    url = settings.effective_database_url
    engine = create_db_engine(url, create=False)  # only reads: a missing SQLite file is said, not made
    with opening(url):
        current, head = current_revision(engine), head_revision(engine)
    state = "up to date" if current == head else "needs `cmbcluster db upgrade`"
    out(f"current: {current or '(empty database)'}  head: {head}  ({state})")


@db_app.command("backup")
def db_backup(
    list_backups: Annotated[bool, typer.Option("--list", help="List the backups instead of making one.")] = False,
) -> None:
    """Back up the SQLite database to the database bucket now (the server also does it periodically)."""
    from cmbcluster.db.backup import open_backups

    with open_backups(resolve_config()) as backups:
        if not list_backups:
            backup = backups.backup()
            out(f"database backed up to {backups.bucket}/{backup.key} ({backup.size} bytes)", soft_wrap=True)
            return
        found = backups.list()
    if not found:
        out(f"no database backup in {backups.bucket}/{backups.prefix}", soft_wrap=True)
        return
    from rich.table import Table

    table = Table(title=f"database backups in {backups.bucket}/{backups.prefix}, oldest first")
    for column in ("version", "created (UTC)", "bytes", "object"):
        table.add_column(column)
    for backup in found:
        table.add_row(backup.version, f"{backup.created_at:%Y-%m-%d %H:%M:%S}", str(backup.size), backup.key)
    out(table)


@db_app.command("restore")
def db_restore(
    backup_version: Annotated[
        str | None, typer.Option("--version", help="The backup to restore (its version or name); default: newest.")
    ] = None,
) -> None:
    """Replace the SQLite database with a backup, checked first; the current one is kept aside.

    Without --version: the newest backup that verifies (newer, damaged ones are skipped, and named).

    Stop the server first. A server that starts without its database restores the newest backup itself.
    """
    from cmbcluster.db.backup import open_backups

    with open_backups(resolve_config()) as backups:
        result = backups.restore(backup_version)
    for skipped in result.skipped:
        out(f"skipped {backups.bucket}/{skipped.backup.key}, which does not verify: {skipped.reason}", soft_wrap=True)
    out(f"restored {result.database} from {backups.bucket}/{result.backup.key}", soft_wrap=True)
    if result.kept_aside:
        out(f"the previous database is kept as {result.kept_aside}", soft_wrap=True)
    for line in result.access_kept_away:
        out(line, soft_wrap=True)


@secrets_app.command("reencrypt")
def secrets_reencrypt() -> None:
    """Re-encrypt stored secret files and environment variables with CMBCLUSTER_SECRET_KEY.

    Rotation: set the new key as CMBCLUSTER_SECRET_KEY and the old one as
    CMBCLUSTER_SECRET_KEY_PREVIOUS (servers keep working with both), run this once, then remove
    CMBCLUSTER_SECRET_KEY_PREVIOUS.
    """
    from cmbcluster.db import create_db_engine, session_factory, upgrade
    from cmbcluster.db.engine import opening
    from cmbcluster.security import Sealer, previous_secret_keys, secret_key
    from cmbcluster.services import user_settings

    settings = load_core_settings()
    key, previous = secret_key(settings), previous_secret_keys(settings)
    engine = create_db_engine(settings.effective_database_url)
    with opening(settings.effective_database_url), session_factory(engine)() as db:
        upgrade(engine, secret_key=key)
        report = user_settings.reencrypt_all(
            db,
            env_var_sealer=Sealer(key, user_settings.ENV_VAR_PURPOSE, previous=previous),
            secret_file_sealer=Sealer(key, user_settings.SECRET_FILE_PURPOSE, previous=previous),
        )
    engine.dispose()
    out(f"re-encrypted {report.resealed} stored secrets; {report.current} already used the current key")
    if report.unreadable:
        raise CmbclusterError(
            f"{len(report.unreadable)} stored secrets match no configured key (left as they are; their owners must "
            f"set them again): {', '.join(report.unreadable[:20])}"
        )
    if previous:
        out("every readable secret now uses CMBCLUSTER_SECRET_KEY: remove CMBCLUSTER_SECRET_KEY_PREVIOUS")


@app.command()
def version() -> None:
    """Print the version of core and of every installed plugin."""
    out(f"cmbcluster-core {__version__}")
    for info in PluginManager(entry_points_enabled=True).plugins():
        if not info.builtin:
            out(f"{info.distribution} {info.version} (plugin {info.name})")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    """Entry point: typed errors become one clear message and exit status 1, never a traceback."""
    try:
        app()
    except (CmbclusterError, OSError) as exc:
        error(exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
