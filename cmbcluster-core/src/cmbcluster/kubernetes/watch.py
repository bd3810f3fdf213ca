"""A namespaced kind's objects kept current by one list-and-watch, instead of polling each object.

:class:`WatchCache` lists the objects once, then follows a watch from that list's
resourceVersion in a daemon thread; readers get the cached JSON. While the watch is down (API
server restarting, network trouble) the cache says so (``synced`` is False) and readers fall
back to direct reads; the thread relists with backoff and resumes. A ``410 Gone`` (the
resourceVersion is too old) relists at once, as client-go's reflector does.

The blocking HTTP stream stays in its own thread, off the event loop; :meth:`WatchCache.close`
shuts its socket down so that it ends at once instead of at the server's timeout.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException

from cmbcluster.kubernetes.labels import metadata

log = logging.getLogger(__name__)

Key = Callable[[dict[str, Any]], str | None]

#: how long one watch request lasts before the server ends it and the thread resumes it
WATCH_SECONDS = 240
_MAX_BACKOFF_SECONDS = 5.0
#: How many deleted objects' uids a cache remembers (see WatchCache.put).
DELETED_KEPT = 4096


class _Expired(Exception):
    """The watch's resourceVersion is too old (HTTP 410 or an ERROR event with code 410)."""


def by_name(obj: dict[str, Any]) -> str | None:
    name = metadata(obj).get("name")
    return str(name) if name else None


class WatchCache:
    """The objects a ``list_namespaced_*`` call returns, kept current by a watch.

    ``key`` maps an object to its cache key (default: its name); when several objects share a
    key (events of one pod) the newest arrival wins, and ``order`` sorts a fresh list so that
    the newest comes last. ``on_change`` is called (in the watch thread) with each key that changed.
    """

    def __init__(
        self,
        list_method: Callable[..., Any],
        *,
        namespace: str,
        what: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        key: Key = by_name,
        order: Callable[[dict[str, Any]], Any] | None = None,
        on_change: Callable[[str], None] | None = None,
        connect_timeout: float = 5.0,
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self._list = list_method
        self.namespace = namespace
        self.what = what
        self._selectors = {
            k: v for k, v in (("label_selector", label_selector), ("field_selector", field_selector)) if v
        }
        self._key = key
        self._order = order
        self._on_change = on_change
        self._connect_timeout = connect_timeout
        self._watch_seconds = watch_seconds
        self._items: dict[str, dict[str, Any]] = {}
        # uids whose deletion the watch saw (the newest few): a put arriving after the event (a
        # delete call's answer, returned late) must not bring the object back
        self._deleted: dict[str, None] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._closed = threading.Event()
        self._response: Any = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # -- readers -----------------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        """True while the cache follows the API server (a list succeeded and its watch is up)."""
        return self._synced.is_set()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._items.get(key)

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items.values())

    def put(self, obj: dict[str, Any]) -> None:
        """Record an object this process just created or read, before its watch event arrives,
        so that a read right after a write sees it. The watch's later event replaces it."""
        key = self._key(obj)
        if key is None:
            return
        with self._lock:
            if metadata(obj).get("uid") in self._deleted:
                return
            current = self._items.get(key)
            if current is None or _newer_or_equal(obj, current):
                self._items[key] = obj

    def wait_synced(self, timeout: float) -> bool:
        self.start()
        return self._synced.wait(timeout)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the watch thread (idempotent; the first reader calls it)."""
        if self._thread is not None or self._closed.is_set():
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"cmbcluster-watch-{self.what}", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._closed.set()
        self._synced.clear()
        response = self._response
        if response is not None:
            _shutdown(response)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the watch thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.2
        while not self._closed.is_set():
            try:
                version = self._relist()
                self._synced.set()
                backoff = 0.2
                while not self._closed.is_set():
                    version = self._follow(version)
            except _Expired:
                log.info("watch of %s expired; listing again", self.what)
            except Exception as exc:  # noqa: BLE001 - any failure: fall back to direct reads, retry
                if self._closed.is_set():
                    break
                self._synced.clear()
                log.warning("watch of %s failed (%s); retrying in %.1fs", self.what, describe_error(exc), backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
        self._synced.clear()

    def _relist(self) -> str:
        response = self._list(
            self.namespace,
            _preload_content=False,
            _request_timeout=(self._connect_timeout, 60.0),
            **self._selectors,
        )
        body = json.loads(response.data or b"{}")
        items = [item for item in body.get("items") or [] if isinstance(item, dict)]
        if self._order is not None:
            items.sort(key=self._order)
        fresh: dict[str, dict[str, Any]] = {}
        for item in items:
            key = self._key(item)
            if key is not None:
                fresh[key] = item
        with self._lock:
            changed = set(fresh) ^ set(self._items) | {k for k in fresh if self._items.get(k) != fresh[k]}
            self._items = fresh
        self._notify(changed)
        return str(metadata(body).get("resourceVersion") or "")

    def _follow(self, version: str) -> str:
        """One watch request from ``version``; returns the last version seen when the server ends it."""
        try:
            response = self._list(
                self.namespace,
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=self._watch_seconds,
                _preload_content=False,
                _request_timeout=(self._connect_timeout, self._watch_seconds + 30.0),
                **self._selectors,
            )
        except ApiException as exc:
            if exc.status == 410:
                raise _Expired(exc.reason) from exc
            raise
        self._response = response
        try:
            if self._closed.is_set():
                return version
            for event in _events(response):
                version = self._apply(event) or version
        finally:
            self._response = None
            response.release_conn()
        return version

    def _apply(self, event: dict[str, Any]) -> str | None:
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(obj, dict):
            return None
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired(obj.get("message"))
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
        version = metadata(obj).get("resourceVersion")
        key = self._key(obj)
        if kind in ("ADDED", "MODIFIED") and key is not None:
            with self._lock:
                current = self._items.get(key)
                # A late event of an earlier object of the same name (a restart's previous pod) never
                # replaces the newer one a start has put here: its status would be taken for the new run's.
                if current is None or _newer_or_equal(obj, current):
                    self._items[key] = obj
            self._notify({key})
        elif kind == "DELETED" and key is not None:
            with self._lock:
                current = self._items.get(key)
                if current is not None and metadata(current).get("uid") == metadata(obj).get("uid"):
                    del self._items[key]
                uid = metadata(obj).get("uid")
                if uid:
                    self._deleted[str(uid)] = None
                    if len(self._deleted) > DELETED_KEPT:
                        del self._deleted[next(iter(self._deleted))]
            self._notify({key})
        return str(version) if version else None

    def _notify(self, keys: set[str]) -> None:
        if self._on_change is None:
            return
        for key in keys:
            try:
                self._on_change(key)
            except Exception:  # a listener's bug must not stop the watch
                log.exception("watch listener of %s failed", self.what)


def _events(response: Any) -> Iterator[dict[str, Any]]:
    """The watch's JSON lines as they arrive (one chunk may hold several, or part of one)."""
    pending = b""
    for chunk in response.stream(None, decode_content=True):
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                event = json.loads(line)
                if isinstance(event, dict):
                    yield event


def _newer_or_equal(obj: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether ``obj`` is at least as new as ``current``: a resourceVersion not below its.
    resourceVersions are opaque in general, but etcd's are integers from one counter of the whole
    cluster, so they also order two objects of one name: the later one was created after the
    earlier one was gone. Versions that are not integers: ``obj`` is taken as newer."""
    try:
        return int(metadata(obj).get("resourceVersion") or 0) >= int(metadata(current).get("resourceVersion") or 0)
    except ValueError:
        return True


def _shutdown(response: Any) -> None:
    """End a streaming response from another thread: closing alone does not wake a blocked read."""
    try:
        response.shutdown()  # urllib3 >= 2.3
    except Exception:  # best effort: the thread also checks the closed flag
        log.debug("shutting a watch down failed", exc_info=True)


def describe_error(exc: BaseException | None) -> str:
    """A failed Kubernetes call in a few words, for logs and error messages."""
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if exc is not None else "no answer"
