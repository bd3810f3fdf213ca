"""Structured logs and Prometheus metrics, one registry per app (no import-time globals)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from cmbcluster.services.accounting import Totals
    from cmbcluster.settings import CoreSettings

log = logging.getLogger(__name__)

# record attributes that are not "extra" fields (uvicorn's color_message is a duplicate)
_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


#: Query parameters that hold a secret in an address a log line may show, by how their names end
#: (``token``, ``access_token``, ``cmbcluster_ticket``): JupyterLab's WebSocket URLs carry the
#: application's token (uvicorn logs each WebSocket's address as it accepts it), and with the access
#: log on, the sign-in callback's one-time code and a host's sign-in ticket. Over-hiding (a
#: ``zipcode``) costs nothing.
SECRET_PARAMETERS = ("token", "code", "ticket")


def _spelled_any_way(name: str) -> str:
    """A pattern of ``name`` with any of its letters percent-encoded (``tok%65n``), as a server decodes it."""
    return "".join(f"(?:{letter}|%{ord(letter):02x})" for letter in name)


_SECRET_NAME = rf"(?P<name>{'|'.join(_spelled_any_way(name) for name in SECRET_PARAMETERS)})"
# A parameter of the address (after ? or &): its value ends at the next & (a %26 in it is the value's);
# then one of an address carried inside another's query (enter's ``next``), after %3F or %26: its
# value ends at the next %26. Its = may be encoded or not (``next=/x?a=1%26token=...``, as a browser
# or a script may leave it: found by an outsider's trial).
_SECRETS_IN_ADDRESS = (
    re.compile(rf"(?P<before>[?&][\w.%-]*?){_SECRET_NAME}(?P<equals>=)[^&\s\"']+", re.IGNORECASE),
    re.compile(rf"(?P<before>(?:%3f|%26)[\w.%-]*?){_SECRET_NAME}(?P<equals>%3d|=)(?:(?!%26)[^&\s\"'])+", re.IGNORECASE),
)


def _named(match: re.Match[str]) -> str:
    """``token=[token]``, ``tok%65n=[token]``: the parameter as sent, its value by the name it ends with."""
    return f"{match['before']}{match['name']}{match['equals']}[{unquote(match['name']).lower()}]"


class _HideAddressSecrets(logging.Filter):
    """Writes ``[token]``, ``[code]`` or ``[ticket]`` for the value of such a parameter
    (:data:`SECRET_PARAMETERS`) in an address a log line's message holds (not in a traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = message
        for secrets_in_address in _SECRETS_IN_ADDRESS:
            hidden = secrets_in_address.sub(_named, hidden)
        if hidden != message:
            record.msg, record.args = hidden, ()
        return True


def configure_logging_for(core: CoreSettings) -> None:
    """The process's log as the core settings say (``cmbcluster serve`` and its reloader's child)."""
    configure_logging(core.log_level, core.log_format, access_log=core.access_log)


def configure_logging(level: str = "INFO", fmt: str = "json", *, access_log: bool = False) -> None:
    """The process's log: ``level`` and ``fmt`` as CMBCLUSTER_LOG_LEVEL and CMBCLUSTER_LOG_FORMAT say;
    ``access_log``: a line for every request answered (CMBCLUSTER_ACCESS_LOG), at INFO."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_HideAddressSecrets())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # off by default (CoreSettings.access_log says why)
    logging.getLogger("uvicorn.access").setLevel(logging.INFO if access_log else logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # httpx writes a line at INFO for every request it sends: every request the environment proxy
    # passes on (a JupyterLab page is dozens) and every cloud call. Shown at DEBUG only. httpcore's
    # DEBUG lines hold every header, the applications' cookies among them: never written.
    quiet = logging.NOTSET if root.level <= logging.DEBUG else max(root.level, logging.WARNING)
    logging.getLogger("httpx").setLevel(quiet)
    logging.getLogger("httpcore").setLevel(max(quiet, logging.INFO))


class Metrics:
    """The control plane's Prometheus metrics, registered on the app's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cmbcluster_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "cmbcluster_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.plugins_failed = Gauge("cmbcluster_plugins_failed", "Plugins that failed to load", registry=self.registry)
        self.environments = Gauge(
            "cmbcluster_environments", "Environments by status", ["status"], registry=self.registry
        )
        self.culled = Counter(
            "cmbcluster_environments_culled", "Environments stopped for idleness or uptime", registry=self.registry
        )
        self.info = Gauge(
            "cmbcluster_info", "Version and active providers", ["version", "storage", "compute", "auth", "infra"],
            registry=self.registry,
        )  # fmt: skip
        # What waiting requests could hold, read when /metrics is scraped (set up by build_context and the app).
        self.db_connections = Gauge(
            "cmbcluster_db_connections_in_use", "Database connections checked out of the pool", registry=self.registry
        )
        self.worker_threads = Gauge(
            "cmbcluster_worker_threads_busy", "Worker threads running blocking calls", registry=self.registry
        )
        self.progress_streams = Gauge(
            "cmbcluster_progress_streams", "Open progress streams (GET .../events)", registry=self.registry
        )


class UsageCollector(Collector):
    """Core-hours and stored bytes by user and by group, read from the usage records at each scrape
    (the records are the truth; counters kept in memory would restart from zero with each replica)."""

    def __init__(self, read: Callable[[], Totals]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        try:
            totals = self.read()
        except Exception:  # a scrape must still answer the other metrics
            log.exception("usage totals for /metrics could not be read")
            return
        for by, core, stored in (
            ("user", totals.core_hours_by_user, totals.stored_bytes_by_user),
            ("group", totals.core_hours_by_group, totals.stored_bytes_by_group),
        ):
            hours = CounterMetricFamily(
                f"cmbcluster_{by}_core_hours", f"Core-hours reserved by environments since records began, by {by}",
                labels=[by],
            )  # fmt: skip
            for key, value in sorted(core.items()):
                hours.add_metric([key], value)
            yield hours
            size = GaugeMetricFamily(f"cmbcluster_{by}_stored_bytes", f"Bytes stored in buckets now, by {by}",
                                     labels=[by])  # fmt: skip
            for key, value in sorted(stored.items()):
                size.add_metric([key], value)
            yield size


class MetricsMiddleware:
    """Counts and times every request by its route template (never by raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            key = (scope.get("method", "GET"), template, status)
            children = self._children.get(key)
            if children is None:  # labels() costs a lock and a lookup: resolve each series once
                children = self._children[key] = (
                    self.metrics.requests.labels(key[0], template, str(status)),
                    self.metrics.latency.labels(key[0], template),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - start)
