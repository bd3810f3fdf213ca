"""Everything a running control plane holds: configuration, database, providers, metrics."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.config import ResolvedConfig
from cmbcluster.db import create_db_engine, session_factory
from cmbcluster.errors import CmbclusterError, ConfigurationError, PluginError
from cmbcluster.interfaces import AuthProvider, ComputeBackend, InfraProvider, StorageBackend
from cmbcluster.observability import Metrics, UsageCollector
from cmbcluster.registrations import Registration
from cmbcluster.security import Sealer, previous_secret_keys, secret_key

if TYPE_CHECKING:
    from cmbcluster.db.engine import DeferredWrites, GroupCommit
    from cmbcluster.pricing import PriceTable
    from cmbcluster.services.progress import ProgressHub
    from cmbcluster.services.revocation import RevocationWatch
    from cmbcluster.services.usage import StorageRuntime

log = logging.getLogger(__name__)

#: See AppContext.cluster_workers. As many as the direct kubernetes client's threads in
#: tests/benchmarks/bench_k8s_environments.py; 8 (the general workers') let a burst of 200 starts
#: end later (ratio 1.40-1.76 against 1.18-1.41 in three runs each).
CLUSTER_WORKER_THREADS = 16


@dataclass
class AppContext:
    config: ResolvedConfig
    engine: Engine
    sessions: sessionmaker[Session]
    storage: StorageBackend
    compute: ComputeBackend
    infra: InfraProvider
    auth: dict[str, AuthProvider]
    metrics: Metrics
    secret_key: bytes
    previous_secret_keys: tuple[bytes, ...] = ()
    _sealers: dict[str, Sealer] = field(default_factory=dict, init=False, repr=False)
    _cluster_workers: anyio.CapacityLimiter | None = field(default=None, init=False, repr=False)

    def sealer(self, purpose: str) -> Sealer:
        """Encryption at rest for one purpose (``secret-files``, ``env-vars``, ``login-state``);
        made once per purpose, since deriving its keys costs more than using them (every start)."""
        sealer = self._sealers.get(purpose)
        if sealer is None:
            sealer = self._sealers[purpose] = Sealer(self.secret_key, purpose, previous=self.previous_secret_keys)
        return sealer

    @property
    def cluster_workers(self) -> anyio.CapacityLimiter:
        """The worker threads of blocking calls that wait on the compute backend (starts, stops,
        status, logs): their own, so that a burst of starts, each waiting on the cluster's API for
        most of its time, neither waits for the few general workers nor keeps other requests from
        them. Created on first use, in async code on the server's loop."""
        if self._cluster_workers is None:
            self._cluster_workers = anyio.CapacityLimiter(CLUSTER_WORKER_THREADS)
        return self._cluster_workers

    @functools.cached_property
    def progress(self) -> ProgressHub:
        """The progress of starting environments, for this process's progress streams."""
        from cmbcluster.services.progress import ProgressHub

        hub = ProgressHub(self.sessions, self.compute)
        self.metrics.progress_streams.set_function(lambda: hub.followed)
        return hub

    @functools.cached_property
    def start_reservations(self) -> GroupCommit[Any]:
        """Writes the reservations of concurrent starts together (services/environments.py)."""
        from cmbcluster.db.engine import GroupCommit

        return GroupCommit()

    @functools.cached_property
    def revocations(self) -> RevocationWatch:
        """Ends this process's long-lived responses (progress streams, proxied WebSockets) once their
        caller's session or API token stops working."""
        from cmbcluster.services.revocation import RevocationWatch

        return RevocationWatch(self.sessions)

    @functools.cached_property
    def instance_id(self) -> str:
        """This process's id among the control plane's replicas (:mod:`cmbcluster.services.instances`)."""
        from cmbcluster.db.models import new_id

        return new_id()

    @functools.cached_property
    def deferred_writes(self) -> DeferredWrites:
        """Writes that failed when they should have happened, made at this process's next heartbeat."""
        from cmbcluster.db.engine import DeferredWrites

        return DeferredWrites(self.sessions)

    @functools.cached_property
    def storage_runtime(self) -> StorageRuntime:
        """The storage API's per-server state (usage refresher, upload limiter), made on first use."""
        from cmbcluster.services.usage import StorageRuntime

        return StorageRuntime(self.storage, self.sessions)

    @functools.cached_property
    def prices(self) -> PriceTable:
        """The infra provider's price table with the operator's overrides (zero when none)."""
        from cmbcluster.pricing import PriceOverrides, resolve_price_table

        overrides = PriceOverrides.parse(self.config.core.prices)
        try:
            offered = self.config.plugins.price_tables(self.config)
        except Exception:  # a plugin's broken hook costs its prices, never the reports
            log.exception("a plugin's cmbcluster_price_table failed: usage is reported without its prices")
            offered = []
        return resolve_price_table(self.config.infra.name, offered, overrides)

    @property
    def namespace(self) -> str:
        return self.config.core.namespace

    @property
    def session_ttl(self) -> dt.timedelta:
        return dt.timedelta(hours=self.config.core.session_ttl_hours)

    @property
    def refresh_ttl(self) -> dt.timedelta:
        return dt.timedelta(days=self.config.core.refresh_ttl_days)

    def providers(self) -> Iterator[tuple[str, str, Any]]:
        """(concern, name, instance) of every active provider."""
        yield "storage", self.config.storage.name, self.storage
        yield "compute", self.config.compute.name, self.compute
        yield "infra", self.config.infra.name, self.infra
        for name, provider in self.auth.items():
            yield "auth", name, provider

    def close(self) -> None:
        """At shutdown: the storage API's runtime, then every active provider (each instance once,
        should one serve several concerns), then the database engine. One failing closer does not
        keep the others from running."""
        closers: list[Callable[[], None]] = []
        if "storage_runtime" in self.__dict__:
            closers.append(self.storage_runtime.close)
        closed: set[int] = set()
        for _concern, _name, provider in self.providers():
            if id(provider) not in closed:
                closed.add(id(provider))
                closers.append(provider.close)
        for closer in closers:
            try:
                closer()
            except Exception:
                log.exception("error while closing a provider")
        self.engine.dispose()


@dataclass(frozen=True)
class Providers:
    """Every active provider, built from the validated configuration."""

    storage: StorageBackend
    compute: ComputeBackend
    infra: InfraProvider
    auth: dict[str, AuthProvider]
    #: (concern, name, instance) of each, in the order built.
    active: tuple[tuple[str, str, Any], ...] = ()

    def close(self) -> None:
        """Close each instance once (one may serve several concerns); one failing does not stop the rest."""
        closed: set[int] = set()
        for _concern, _name, provider in self.active:
            if id(provider) not in closed:
                closed.add(id(provider))
                _close_quietly(provider)


class ProviderBuildError(ConfigurationError):
    """Factories that refused, in two kinds. ``faults`` are the plugins' own mistakes, wrong on any
    machine: an answer that is not the concern's interface (a forgotten ``return``), a settings
    model the registration does not declare, a missing dependency, any exception that is not one of
    core's errors. ``unmet`` is what this machine lacks, as the factory said with core's errors
    (ConfigurationError, ProviderUnavailable...): credentials, a kubeconfig."""

    def __init__(self, faults: list[str], unmet: list[str]) -> None:
        super().__init__([*faults, *unmet])
        self.faults, self.unmet = faults, unmet


def build_providers(config: ResolvedConfig) -> Providers:
    """Call every selected registration's factory, as ``serve`` does and ``config check`` repeats: a
    factory's own checks (no network calls: factories are cheap) refuse a configuration before
    anything starts, and each answer is checked against its concern's interface. ProviderBuildError
    lists every factory that refused, naming its plugin; those built are closed."""
    built: dict[int, Any] = {}
    faults: list[str] = []
    unmet: list[str] = []
    registrations: list[Registration[Any]] = [config.storage, config.compute, config.infra, *config.auth]
    for index, registration in enumerate(registrations):
        try:
            built[index] = config.create(registration)
        except PluginError as exc:  # named already
            faults.append(str(exc))
        except ConfigurationError as exc:
            unmet.extend(exc.problems)
        except CmbclusterError as exc:
            unmet.append(f"{config.describe(registration)} could not be created: {exc}")
        except Exception as exc:  # noqa: BLE001 - a plugin's factory may raise anything: one line each
            faults.append(f"{config.describe(registration)} could not be created: {type(exc).__name__}: {exc}")
    if (faults or unmet) and 0 in built:
        # a bucket name the storage refuses is wrong on every machine: said even where another provider
        # (a kubeconfig, before the cluster exists) is what this machine lacks, as config check runs there
        faults.extend(bucket_name_problems(config, built[0]))
    if faults or unmet:
        for provider in built.values():
            _close_quietly(provider)
        raise ProviderBuildError(list(dict.fromkeys(faults)), list(dict.fromkeys(unmet)))
    concerns = ["storage", "compute", "infra", *(["auth"] * len(config.auth))]
    return Providers(
        storage=built[0], compute=built[1], infra=built[2],
        auth={registration.name: built[3 + i] for i, registration in enumerate(config.auth)},
        active=tuple((c, r.name, built[i]) for i, (c, r) in enumerate(zip(concerns, registrations, strict=True))),
    )  # fmt: skip


def bucket_name_problems(config: ResolvedConfig, storage: StorageBackend) -> list[str]:
    """The configured bucket names the active storage's service would refuse (under its
    ``bucket_names``): the database bucket's. ``serve`` refuses to start on them and ``config
    check`` lists them, rather than the first backup failing."""
    return storage.bucket_names.database_bucket_problems(config.core.database_bucket)


def _close_quietly(provider: Any) -> None:
    try:
        provider.close()
    except Exception:
        log.exception("error while closing a provider")


def _private_folder(path: Path) -> None:
    """The data directory holds the database, users' buckets and the secret key: this user's only."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
        log.warning("data directory %s was readable by other users: now 0700", path)
        path.chmod(0o700)


def build_context(config: ResolvedConfig) -> AppContext:
    """Create the database engine and every active provider (no network calls: factories are cheap)."""
    _private_folder(config.core.data_dir)
    providers = build_providers(config)
    problems = bucket_name_problems(config, providers.storage)
    if problems:
        providers.close()
        raise ConfigurationError(problems)
    engine = create_db_engine(config.core.effective_database_url)
    metrics = Metrics()
    metrics.plugins_failed.set(len(config.plugins.failed()))
    pool = engine.pool
    metrics.db_connections.set_function(lambda: pool.checkedout() if hasattr(pool, "checkedout") else 0)
    summary = config.summary()
    from cmbcluster import __version__

    metrics.info.labels(__version__, summary["storage"], summary["compute"], summary["auth"], summary["infra"]).set(1)
    from cmbcluster.services import accounting

    sessions = session_factory(engine)
    accounting.install(sessions)  # environments' usage intervals follow every status change

    def usage_totals() -> accounting.Totals:
        with sessions() as db:
            return accounting.totals_by_user_and_group(db)

    metrics.registry.register(UsageCollector(usage_totals))
    context = AppContext(
        config=config,
        engine=engine,
        sessions=sessions,
        storage=providers.storage,
        compute=providers.compute,
        infra=providers.infra,
        auth=providers.auth,
        metrics=metrics,
        secret_key=secret_key(config.core),
        previous_secret_keys=previous_secret_keys(config.core),
    )
    context.prices  # noqa: B018 - a wrong CMBCLUSTER_PRICES stops the start, not the first report
    return context
