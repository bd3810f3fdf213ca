"""Everything a running control plane holds: configuration, database, providers, metrics."""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.config import ResolvedConfig
from cmbcluster.db import create_db_engine, session_factory
from cmbcluster.errors import CmbclusterError, ConfigurationError
from cmbcluster.interfaces import AuthProvider, ComputeBackend, InfraProvider, StorageBackend
from cmbcluster.observability import Metrics
from cmbcluster.registrations import Registration
from cmbcluster.security import Sealer, previous_secret_keys, secret_key

if TYPE_CHECKING:
    from cmbcluster.services.progress import ProgressHub
    from cmbcluster.services.storages import StorageRuntime

log = logging.getLogger(__name__)


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

    def sealer(self, purpose: str) -> Sealer:
        """Encryption at rest for one purpose (``secret-files``, ``env-vars``, ``login-state``)."""
        return Sealer(self.secret_key, purpose, previous=self.previous_secret_keys)

    @functools.cached_property
    def progress(self) -> ProgressHub:
        """The progress of starting environments, for this process's progress streams."""
        from cmbcluster.services.progress import ProgressHub

        hub = ProgressHub(self)
        self.metrics.progress_streams.set_function(lambda: hub.followed)
        return hub

    @functools.cached_property
    def storage_runtime(self) -> StorageRuntime:
        """The storage API's per-server state (usage refresher, upload limiter), made on first use."""
        from cmbcluster.services.storages import StorageRuntime

        return StorageRuntime(self.storage, self.sessions)

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
        closers = [self.storage.close, self.compute.close]
        if "storage_runtime" in self.__dict__:
            closers.insert(0, self.storage_runtime.close)
        for closer in closers:
            try:
                closer()
            except Exception:
                log.exception("error while closing a provider")
        self.engine.dispose()


def _build(config: ResolvedConfig, registration: Registration[Any]) -> Any:
    try:
        return registration.factory(config.context_for(registration))
    except CmbclusterError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            [f"{registration.kind} {registration.name!r} could not be created: {type(exc).__name__}: {exc}"]
        ) from exc


def build_context(config: ResolvedConfig) -> AppContext:
    """Create the database engine and every active provider (no network calls: factories are cheap)."""
    config.core.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(config.core.effective_database_url)
    metrics = Metrics()
    metrics.plugins_failed.set(len(config.plugins.failed()))
    pool = engine.pool
    metrics.db_connections.set_function(lambda: pool.checkedout() if hasattr(pool, "checkedout") else 0)
    summary = config.summary()
    from cmbcluster import __version__

    metrics.info.labels(__version__, summary["storage"], summary["compute"], summary["auth"], summary["infra"]).set(1)
    return AppContext(
        config=config,
        engine=engine,
        sessions=session_factory(engine),
        storage=_build(config, config.storage),
        compute=_build(config, config.compute),
        infra=_build(config, config.infra),
        auth={registration.name: _build(config, registration) for registration in config.auth},
        metrics=metrics,
        secret_key=secret_key(config.core),
        previous_secret_keys=previous_secret_keys(config.core),
    )
