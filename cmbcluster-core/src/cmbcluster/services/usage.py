"""The storage API's per-server state: the cache of buckets' usage (size and object count, measured
in a small pool of its own) and the limit on uploads running at once.

:mod:`cmbcluster.services.storages` answers with it; the :class:`~cmbcluster.context.AppContext`
holds one :class:`StorageRuntime` per server.
"""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import anyio
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.db.models import Storage, utcnow
from cmbcluster.interfaces import StorageBackend
from cmbcluster.services import accounting

__all__ = ["USAGE_MAX_AGE", "StorageRuntime", "Usage", "UsageRefresher", "cached_usage", "is_stale"]

#: Cached usage older than this is measured again (a full listing on a cloud bucket).
USAGE_MAX_AGE = dt.timedelta(seconds=60)
#: Buckets measured at once per server: a listing of many buckets never starts more than this.
USAGE_WORKERS = 4
#: Uploads running at once per server; each holds a worker thread for its whole duration, so
#: they get their own pool instead of starving the one every other request's thread uses.
MAX_CONCURRENT_UPLOADS = 16


@dataclass(frozen=True)
class Usage:
    """A bucket's measured usage: current objects, and the noncurrent versions the backend keeps
    (and bills) beside them; None until first measured."""

    size_bytes: int | None
    object_count: int | None
    measured_at: dt.datetime | None
    noncurrent_bytes: int | None = None
    noncurrent_count: int | None = None

    @property
    def billed_bytes(self) -> int:
        """Current and noncurrent bytes (what quotas count); 0 while never measured."""
        return (self.size_bytes or 0) + (self.noncurrent_bytes or 0)


def cached_usage(storage: Storage) -> Usage:
    return Usage(
        storage.usage_bytes, storage.usage_objects, storage.usage_at,
        storage.usage_noncurrent_bytes, storage.usage_noncurrent_objects,
    )  # fmt: skip


def is_stale(storage: Storage, now: dt.datetime | None = None) -> bool:
    return storage.usage_at is None or (now or utcnow()) - storage.usage_at > USAGE_MAX_AGE


class UsageRefresher:
    """Measures buckets' usage in a small pool of its own, and stores each result.

    - Bounded: at most ``workers`` listings at once, however many buckets a listing shows.
    - One measurement at a time per storage: callers asking meanwhile share it.
    - A caller waits only as long as it chooses (see :func:`wait_usage`); a measurement it gave
      up on still finishes and is stored by the thread that made it, for the next request.
    - A change made through the API during a measurement, on any replica, makes that measurement's
      result not stored (the storage's ``usage_version`` changed), so the cache never goes back to
      the figures from before, which would drop an upload's bytes from a quota. After one on this
      replica (:meth:`invalidate`), the next caller starts a new measurement.
    """

    def __init__(self, backend: StorageBackend, sessions: sessionmaker[Session], workers: int = USAGE_WORKERS):
        self._backend = backend
        self._sessions = sessions
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="storage-usage")
        # Re-entrant: a measurement that ends at once (a missing bucket fails fast) runs its done
        # callback, which takes this lock, in the thread that is still adding it under the lock.
        self._lock = threading.RLock()
        self._running: dict[str, Future[Usage]] = {}

    def refresh(self, storage_id: str, bucket: str) -> Future[Usage]:
        with self._lock:
            future = self._running.get(storage_id)
            if future is None:
                future = self._executor.submit(self._measure, storage_id, bucket)
                self._running[storage_id] = future
                future.add_done_callback(lambda done: self._forget(storage_id, done))
            return future

    def invalidate(self, storage_id: str) -> None:
        with self._lock:
            self._running.pop(storage_id, None)

    def _forget(self, storage_id: str, future: Future[Usage]) -> None:
        with self._lock:
            if self._running.get(storage_id) is future:
                del self._running[storage_id]

    def _measure(self, storage_id: str, bucket: str) -> Usage:
        with self._sessions() as db:  # read before listing: a change committed after it is not in the listing
            version = db.execute(select(Storage.usage_version).where(Storage.id == storage_id)).scalar_one_or_none()
        started = utcnow()
        usage = self._backend.bucket_usage(bucket)
        result = Usage(usage.size_bytes, usage.object_count, started, usage.noncurrent_bytes, usage.noncurrent_count)
        if version is None:  # the storage is gone
            return result
        with self._sessions() as db:
            stored = db.execute(
                update(Storage)
                .where(Storage.id == storage_id, Storage.usage_version == version)
                .values(
                    usage_bytes=result.size_bytes,
                    usage_objects=result.object_count,
                    usage_at=started,
                    usage_noncurrent_bytes=result.noncurrent_bytes,
                    usage_noncurrent_objects=result.noncurrent_count,
                )
            )
            storage = db.get(Storage, storage_id) if stored.rowcount else None  # type: ignore[attr-defined]
            if storage is not None:  # the usage reports' record of bytes stored over time
                accounting.record_stored_bytes(db, storage, result.size_bytes, started)
            db.commit()
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class StorageRuntime:
    """Per-server state of the storage API: the usage refresher and the upload threads' limit."""

    def __init__(self, backend: StorageBackend, sessions: sessionmaker[Session]) -> None:
        self.refresher = UsageRefresher(backend, sessions)
        self._upload_limiter: anyio.CapacityLimiter | None = None

    @property
    def upload_limiter(self) -> anyio.CapacityLimiter:
        if self._upload_limiter is None:  # created on first use, in async code on the server's loop
            self._upload_limiter = anyio.CapacityLimiter(MAX_CONCURRENT_UPLOADS)
        return self._upload_limiter

    def close(self) -> None:
        self.refresher.close()
