"""Copying objects between any two storage backends, verified, in constant memory.

Generic over :class:`~cmbcluster.interfaces.StorageBackend`: each object is a streamed
``download_object`` fed straight into ``upload_object`` (the destination holds at most a few
chunks), its size counted on the way through. Its MD5 is the one the source reports of what it
stores (``ObjectInfo.md5`` in the listing: GCS, S3 for single-part objects), or where it reports
none, computed on the way. Verification then compares them with what the destination holds:

- its reported size must be the copied size, always;
- when the destination reports the MD5 it computed of what it stored (``ObjectInfo.md5``), that
  must be the object's MD5, and is enough (with the source's own MD5, the comparison is end to
  end: the bytes each service stores);
- otherwise (the local backend, multipart S3, a backend that reports none) the object is read
  back from the destination and its MD5 computed again.

A mismatch, or a source that changed under the copy, is retried; after the last attempt the
object is reported (:class:`CopyFailed`), never counted as copied. Several objects are copied at
once by a bounded pool of threads; results come back to the caller's thread, which alone writes
the manifest (a database session is not shared between threads).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from cmbcluster.errors import CmbclusterError, NotFound, ProviderUnavailable
from cmbcluster.interfaces import ObjectInfo, StorageBackend

log = logging.getLogger(__name__)

#: Each copy holds a few of these at once (read, hashed, handed to the upload): 1 MiB keeps the
#: per-chunk cost small and a migration's memory flat at any parallelism.
CHUNK_SIZE = 1024 * 1024
ATTEMPTS = 3
#: Errors worth another attempt: a service that did not answer, or bytes that did not match.
_RETRIED: tuple[type[Exception], ...] = (ProviderUnavailable, OSError)


class CopyFailed(CmbclusterError):
    """An object could not be copied and verified after every attempt."""

    code = "copy_failed"


@dataclass(frozen=True, kw_only=True)
class Copied:
    """One object copied and verified. ``source`` is the listing it was copied from (its ETag and
    modification time tell a later change apart); ``target_etag`` what the destination reported."""

    source: ObjectInfo
    size: int
    md5: str
    target_etag: str
    reread: bool
    attempts: int


@dataclass(frozen=True, kw_only=True)
class Failed:
    source: ObjectInfo
    error: str


#: Called with each chunk's size as it passes, from the copying threads (a progress display).
OnBytes = Callable[[int], None]


def _measured(
    chunks: Iterator[bytes], digest: Any | None, sizes: list[int], progress: OnBytes | None
) -> Iterator[bytes]:
    try:
        for chunk in chunks:
            if digest is not None:
                digest.update(chunk)
            sizes[0] += len(chunk)
            if progress is not None:
                progress(len(chunk))
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def md5_of(backend: StorageBackend, bucket: str, key: str) -> tuple[str, int]:
    """The MD5 (hex) and size of an object as ``backend`` serves it, read in a stream."""
    digest, sizes = hashlib.md5(usedforsecurity=False), [0]
    for _ in _measured(backend.download_object(bucket, key, chunk_size=CHUNK_SIZE), digest, sizes, None):
        pass
    return digest.hexdigest(), sizes[0]


def copy_object(
    source: StorageBackend,
    source_bucket: str,
    target: StorageBackend,
    target_bucket: str,
    obj: ObjectInfo,
    *,
    attempts: int = ATTEMPTS,
    progress: OnBytes | None = None,
) -> Copied:
    """Copy one object and verify it (see the module's description); CopyFailed after ``attempts``.

    A source object gone meanwhile raises NotFound (the caller drops it from the migration).
    """
    problem = ""
    for attempt in range(1, attempts + 1):
        # The source's own MD5 when it reports one (no hashing here), else the MD5 of what passes.
        digest, sizes = None if obj.md5 else hashlib.md5(usedforsecurity=False), [0]
        try:
            chunks = source.download_object(source_bucket, obj.key, chunk_size=CHUNK_SIZE)
            stored = target.upload_object(
                target_bucket, obj.key, _measured(chunks, digest, sizes, progress), content_type=obj.content_type
            )
            md5, size = digest.hexdigest() if digest is not None else str(obj.md5), sizes[0]
            if size != obj.size:
                # The source changed between its listing and this read: copy the version listed next time.
                problem = f"the source changed while it was copied ({obj.size} bytes listed, {size} read)"
                obj = source.head_object(source_bucket, obj.key)
                continue
            if stored.size != size:
                problem = f"the destination reports {stored.size} bytes after {size} were sent"
                continue
            reread = stored.md5 is None
            if not reread and stored.md5 != md5:
                problem = f"the destination reports MD5 {stored.md5}, the source's is {md5}"
                if digest is None:  # perhaps a version of the same size written since the listing
                    obj = source.head_object(source_bucket, obj.key)
                continue
            if reread:
                again, again_size = md5_of(target, target_bucket, obj.key)
                if (again, again_size) != (md5, size):
                    problem = f"the destination holds other bytes ({again_size} bytes, MD5 {again}; the source's {md5})"
                    continue
            return Copied(source=obj, size=size, md5=md5, target_etag=stored.etag, reread=reread, attempts=attempt)
        except NotFound:
            raise
        except _RETRIED as exc:
            problem = f"{type(exc).__name__}: {exc}"
        log.warning("copying %s/%s, attempt %d of %d: %s", source_bucket, obj.key, attempt, attempts, problem)
    raise CopyFailed(f"{source_bucket}/{obj.key} could not be copied and verified after {attempts} attempts: {problem}")


def copy_objects(
    source: StorageBackend,
    source_bucket: str,
    target: StorageBackend,
    target_bucket: str,
    objects: Iterable[ObjectInfo],
    *,
    parallel: int = 8,
    progress: OnBytes | None = None,
    copy: Callable[..., Copied] = copy_object,
) -> Iterator[Copied | Failed | ObjectInfo]:
    """Copy ``objects`` with at most ``parallel`` at once; yield each result in the caller's thread.

    ``objects`` is consumed lazily, never more than ``2 * parallel`` ahead of the copies, so a
    listing of millions of objects is never held in memory. A result is a :class:`Copied`, a
    :class:`Failed` (reported, the others carry on), or the ObjectInfo of a source object that
    disappeared meanwhile.
    """
    pending: dict[Future[Copied], ObjectInfo] = {}
    listing = iter(objects)
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="migrate-copy") as pool:
        exhausted = False
        while True:
            while not exhausted and len(pending) < 2 * parallel:
                obj = next(listing, None)
                if obj is None:
                    exhausted = True
                    break
                future = pool.submit(copy, source, source_bucket, target, target_bucket, obj, progress=progress)
                pending[future] = obj
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                obj = pending.pop(future)
                try:
                    yield future.result()
                except NotFound:
                    yield obj
                except CmbclusterError as exc:
                    yield Failed(source=obj, error=exc.message)
                except Exception as exc:  # a bug or an unexpected SDK error: reported, the others carry on
                    log.exception("copying %s/%s failed", source_bucket, obj.key)
                    yield Failed(source=obj, error=f"{type(exc).__name__}: {exc}")


def list_all(backend: StorageBackend, bucket: str) -> Iterator[ObjectInfo]:
    """Every object of a bucket, page by page (no delimiter: nested folders included)."""
    token: str | None = None
    while True:
        page = backend.list_objects(bucket, "", delimiter=None, page_token=token, page_size=1000)
        yield from page.objects
        token = page.next_token
        if token is None:
            return


class _Keyed(Protocol):
    @property
    def key(self) -> str: ...


L = TypeVar("L", bound=_Keyed)
R = TypeVar("R", bound=_Keyed)


def merge_by_key(left: Iterable[L], right: Iterable[R]) -> Iterator[tuple[L | None, R | None]]:
    """Walk two key-ordered listings side by side: each key once, with its entry on each side (None
    where it has none). Constant memory, whatever the listings' length.

    A listing out of order would pair wrongly (an object taken for missing, then deleted or copied
    again), so it stops the walk with an error instead.
    """
    lefts, rights = iter(left), iter(right)
    a, b = next(lefts, None), next(rights, None)
    last_a = last_b = None
    while a is not None or b is not None:
        for entry, last, side in ((a, last_a, "first"), (b, last_b, "second")):
            if entry is not None and last is not None and entry.key <= last:
                raise CmbclusterError(
                    f"the {side} listing is not in key order ({entry.key!r} after {last!r}): stopped there"
                )
        if b is None or (a is not None and a.key < b.key):
            assert a is not None
            yield a, None
            last_a, a = a.key, next(lefts, None)
        elif a is None or b.key < a.key:
            yield None, b
            last_b, b = b.key, next(rights, None)
        else:
            yield a, b
            last_a, last_b = a.key, b.key
            a, b = next(lefts, None), next(rights, None)
