"""The application factory: ``create_app()`` builds a complete control plane, no globals."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from cmbcluster import __version__
from cmbcluster.api.deps import CloseRequestSession, SessionReleasingRoute, document_security
from cmbcluster.api.docs import mount_api_docs
from cmbcluster.api.errors import document_errors, install_error_handlers
from cmbcluster.api.guard import RequestGuard
from cmbcluster.api.routes import (
    admin,
    applications,
    auth,
    budgets,
    environment_proxy,
    environments,
    health,
    migration,
    plugins,
    storages,
    usage,
    user_settings,
)
from cmbcluster.config import ResolvedConfig, load_core_settings, resolve
from cmbcluster.context import AppContext, build_context
from cmbcluster.db import upgrade
from cmbcluster.db.backup import (
    restore_at_start,
    run_periodic_backups,
    serving_lock,
    sweep_backup_leftovers,
)
from cmbcluster.db.engine import sqlite_path
from cmbcluster.images import DEFAULT_REGISTRY, ENVIRONMENT, image_ref
from cmbcluster.observability import MetricsMiddleware
from cmbcluster.plugins import PluginManager
from cmbcluster.services import instances
from cmbcluster.services.catalog import seed_catalog
from cmbcluster.services.environments import stop_with_control_plane
from cmbcluster.services.reconcile import Reconciler, run_background
from cmbcluster.settings import CoreSettings
from cmbcluster.webui import mount_ui

log = logging.getLogger("cmbcluster")

WORKER_THREADS = 8
OPENAPI_URL = "/api/v1/openapi.json"


def create_app(
    settings: CoreSettings | None = None,
    plugin_manager: PluginManager | None = None,
    *,
    config: ResolvedConfig | None = None,
) -> FastAPI:
    """Validate the configuration, create providers and return the ASGI app.

    Raises :class:`~cmbcluster.errors.ConfigurationError` listing every problem. Migrations
    run in the app's lifespan, before the first request is served.
    """
    if config is None:
        config = resolve(settings or load_core_settings(), plugin_manager)
    context = build_context(config)
    _log_start(context)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Fewer worker threads than anyio's 40: blocking calls are short, and forty threads
        # contending for the GIL serve fewer requests than a handful.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = WORKER_THREADS
        context.metrics.worker_threads.set_function(lambda: limiter.borrowed_tokens)
        # One server per SQLite database; `db restore` refused meanwhile. `cmbcluster serve` takes it
        # before uvicorn starts (a clear error line, not a failed start-up's traceback) and hands it over.
        lock = getattr(app.state, "serving_lock", None) or serving_lock(context)
        try:
            await run_in_threadpool(prepare, context)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        stop = asyncio.Event()
        background = asyncio.create_task(run_background(context, stop), name="cmbcluster-reconcile")
        backups = asyncio.create_task(run_periodic_backups(context, stop), name="cmbcluster-database-backup")
        progress = asyncio.create_task(context.progress.run(stop), name="cmbcluster-progress")
        revocations = asyncio.create_task(context.revocations.run(stop), name="cmbcluster-revocations")
        heartbeat = asyncio.create_task(instances.run_heartbeat(context, stop), name="cmbcluster-heartbeat")
        try:
            yield
        finally:
            stop.set()
            await background
            await backups
            await progress
            await revocations
            await heartbeat
            await run_in_threadpool(stop_with_control_plane, context)
            await run_in_threadpool(_unregister, context)
            proxy = getattr(app.state, "environment_proxy", None)
            if proxy is not None:
                await proxy.aclose()
            await run_in_threadpool(context.close)
            if lock is not None:
                lock.release()

    app = FastAPI(
        title="CMBCluster",
        version=__version__,
        summary="Personal research environments on Kubernetes, with your bucket mounted as a folder.",
        lifespan=lifespan,
        openapi_url=OPENAPI_URL,
        docs_url=None,  # mount_api_docs serves Swagger UI from the package, not from a CDN
        redoc_url=None,
    )
    app.router.route_class = SessionReleasingRoute  # the app's own routes too (the routers set theirs)
    app.state.context = context
    install_error_handlers(app)
    app.add_middleware(CloseRequestSession)  # inside the others; error handlers run before it closes
    app.add_middleware(RequestGuard)  # inside the metrics: refused requests are counted too
    app.add_middleware(MetricsMiddleware, metrics=context.metrics)
    # Routes are matched in order and no two routers share a path: the ones the web UI polls
    # come first (the environment list matched past the others' routes cost a fifth of its calls).
    for module in (
        environments,
        storages,
        health,
        plugins,
        auth,
        applications,
        user_settings,
        admin,
        migration,
        usage,
        budgets,
    ):
        app.include_router(module.router)
    app.include_router(environment_proxy.router)  # /environments/<id>/: the environments' own traffic
    document_security(app)  # first: document_errors reads which operations need a caller
    document_errors(app)
    mount_api_docs(app, OPENAPI_URL)

    mount_ui(app)  # last: the UI answers only what no API route does
    return app


def prepare(context: AppContext) -> None:
    """Before the first request: delete what killed backups left, restore a missing database from
    its newest good backup, migrate, seed the catalog, and reconcile after any crash."""
    database = sqlite_path(context.config.core.effective_database_url)
    if database is not None:
        sweep_backup_leftovers(database)
    restore_at_start(context)
    upgrade(context.engine, secret_key=context.secret_key)
    with context.sessions() as db:
        seed_catalog(db, context.config.compute.name, environment_image(context))
    instances.register(context)
    if context.compute.elects_leader:
        return  # other replicas may be starting environments: the elected leader reconciles, with care
    report = Reconciler(context).reconcile(startup=True)
    if report.orphans_removed or report.marked_stopped or report.storage_deletes or report.uploads_aborted:
        log.warning(
            "start-up reconcile: removed %d orphaned environments, marked %d vanished ones stopped, "
            "recovered %d interrupted bucket deletes, aborted %d unfinished uploads",
            len(report.orphans_removed), len(report.marked_stopped), len(report.storage_deletes),
            report.uploads_aborted, extra={"report": report.__dict__},
        )  # fmt: skip


def _unregister(context: AppContext) -> None:
    try:
        instances.unregister(context)
    except Exception as exc:  # noqa: BLE001 - the heartbeat then runs out by itself
        log.warning("could not record this server's stop in the database: %s", exc)


def environment_image(context: AppContext) -> str:
    """The image the default catalog runs in a cluster: the environment image, as `cmbcluster
    images push` pushed it to this deployment's registry (the project's releases without a cloud)."""
    registry = DEFAULT_REGISTRY if context.config.infra.name == "local" else context.infra.registry()
    return image_ref(registry, ENVIRONMENT)


def _log_start(context: AppContext) -> None:
    core = context.config.core
    summary = context.config.summary()
    log.info(
        "CMBCluster %s serving on http://%s:%s", __version__, core.host, core.port,
        extra={"host": core.host, "port": core.port},
    )  # fmt: skip
    log.info(
        "providers: storage=%s compute=%s auth=%s infra=%s",
        summary["storage"], summary["compute"], summary["auth"], summary["infra"], extra={"providers": summary},
    )  # fmt: skip
    log.info("data directory: %s", core.data_dir, extra={"data_dir": str(core.data_dir)})
    for warning in context.config.warnings:
        log.warning(warning)


def create_app_from_environment() -> FastAPI:
    """Factory for ``uvicorn --factory`` (used by ``cmbcluster serve --reload``): the reloader's
    child process configures its logging here, as ``serve`` does its own."""
    from cmbcluster.observability import configure_logging_for

    core = load_core_settings()
    configure_logging_for(core)
    return create_app(core)
