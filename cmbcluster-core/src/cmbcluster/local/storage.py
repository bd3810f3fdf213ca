"""Local storage: each bucket is a folder under ``<data dir>/buckets``.

Uploads go to a temporary file beside the buckets and are renamed into place, so a failed
upload never leaves a partial object nor destroys the previous version.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import mimetypes
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from cmbcluster.errors import Conflict, InvalidRequest, NotFound, ProviderUnavailable
from cmbcluster.interfaces import (
    BucketInfo,
    BucketOptions,
    BucketUsage,
    CloudIdentity,
    MountRequest,
    ObjectInfo,
    ObjectPage,
    StorageBackend,
    StorageClass,
    UserRef,
    VolumeSpec,
    check_listing,
    resolve_byte_range,
)
from cmbcluster.naming import validate_object_key

BUCKET_PREFIX = "cmb"


class LocalStorage(StorageBackend):
    def __init__(self, root: Path) -> None:
        self.root = root
        self._meta = root / ".meta"
        self._tmp = root / ".tmp"
        for folder in (self.root, self._meta, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.sweep_abandoned_uploads()

    # -- buckets -----------------------------------------------------------------------------
    def create_bucket(self, owner: UserRef, options: BucketOptions) -> BucketInfo:
        if options.storage_class not in (StorageClass.STANDARD,):
            raise InvalidRequest(
                f"the local provider offers only the standard storage class, not {options.storage_class}"
            )
        if options.versioning:
            raise InvalidRequest("the local provider keeps no earlier versions of objects: create the bucket without")
        while True:
            name = self.bucket_names.new_name(BUCKET_PREFIX, owner.id)
            try:
                (self.root / name).mkdir()
                break
            except FileExistsError:  # a random-suffix collision: pick another
                continue
        info = BucketInfo(
            name=name,
            owner_id=owner.id,
            display_name=options.display_name,
            storage_class=StorageClass.STANDARD,
            created_at=dt.datetime.now(dt.UTC),
            location="local",
            labels={"owner": owner.id, "managed-by": "cmbcluster"},
        )
        _write_json_atomic(self._meta / f"{name}.json", _info_to_json(info))
        return info

    def delete_bucket(self, bucket: str, *, force: bool = False) -> None:
        folder = self._bucket_dir(bucket)
        if not force and any(folder.iterdir()):
            raise Conflict(f"bucket {bucket} is not empty; delete its objects first or use force")
        shutil.rmtree(folder)
        (self._meta / f"{bucket}.json").unlink(missing_ok=True)

    def get_bucket(self, bucket: str) -> BucketInfo:
        self._bucket_dir(bucket)
        return _info_from_json(json.loads((self._meta / f"{bucket}.json").read_text()))

    def list_buckets(self, owner: UserRef) -> list[BucketInfo]:
        infos = []
        for meta in self._meta.glob("*.json"):
            info = _info_from_json(json.loads(meta.read_text()))
            if info.owner_id == owner.id and (self.root / info.name).is_dir():
                infos.append(info)
        return sorted(infos, key=lambda i: (i.created_at, i.name))

    def bucket_usage(self, bucket: str) -> BucketUsage:
        size = count = 0
        with self._bucket_fd(bucket) as root:
            for _key, st in _entries(root, "", one_level=False):
                if st is not None:
                    size += st.st_size
                    count += 1
        return BucketUsage(size_bytes=size, object_count=count)

    def volume_spec(self, request: MountRequest) -> VolumeSpec:
        folder = self._bucket_dir(request.bucket)
        if not request.subpath:
            return VolumeSpec(local_path=folder)
        target = (folder / request.subpath).resolve()
        if not target.is_relative_to(folder.resolve()):
            raise InvalidRequest(f"{request.subpath} leads outside the bucket")
        return VolumeSpec(local_path=target)

    def ensure_bucket_access(self, bucket: str, identity: CloudIdentity) -> None:
        # One machine, one operating-system user: the control plane and the environments it
        # starts share the folder's permissions; there is no cloud identity to grant.
        self._bucket_dir(bucket)

    # -- objects -----------------------------------------------------------------------------
    # Every object path is opened relative to the bucket folder's descriptor, one segment at a
    # time, never following a symbolic link (O_NOFOLLOW): an environment can plant links in its
    # bucket, and none of them may lead the API to read, write, list or delete outside it.
    def list_objects(
        self,
        bucket: str,
        prefix: str = "",
        *,
        delimiter: str | None = "/",
        page_token: str | None = None,
        page_size: int = 1000,
    ) -> ObjectPage:
        check_listing(prefix, delimiter, page_size)
        with self._bucket_fd(bucket) as root, _os_errors(prefix):
            entries = sorted(_entries(root, prefix, delimiter is not None), key=lambda e: e[0])
        if page_token:
            entries = [e for e in entries if e[0] > page_token]
        page = entries[:page_size]
        objects = [_info(key, st) for key, st in page if st is not None]
        prefixes = [key for key, st in page if st is None]
        next_token = page[-1][0] if len(entries) > page_size else None
        return ObjectPage(objects=objects, prefixes=prefixes, next_token=next_token)

    def head_object(self, bucket: str, key: str) -> ObjectInfo:
        validate_object_key(key)
        with self._bucket_fd(bucket) as root, _os_errors(key), _parent_fd(root, key, create=False) as parent:
            return _info(key, _regular_stat(parent, key))

    def upload_object(
        self, bucket: str, key: str, chunks: Iterable[bytes], *, content_type: str | None = None
    ) -> ObjectInfo:
        validate_object_key(key)
        with self._bucket_fd(bucket):  # the bucket exists before anything is written
            pass
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix=UPLOAD_PREFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX)  # in progress: the start-up sweep leaves it alone
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
                with self._bucket_fd(bucket) as root, _os_errors(key), _parent_fd(root, key, create=True) as parent:
                    name = _name(key)
                    try:
                        if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                            raise Conflict(f"{key} is a folder in this bucket")
                    except FileNotFoundError:
                        pass
                    # renameat replaces a link planted at the key itself, never what it points to
                    os.replace(tmp_name, name, dst_dir_fd=parent)
                    return _info(key, os.stat(name, dir_fd=parent, follow_symlinks=False))
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def download_object(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: tuple[int, int | None] | None = None,
        chunk_size: int = 1024 * 1024,
    ) -> Iterator[bytes]:
        validate_object_key(key)
        with self._bucket_fd(bucket) as root, _os_errors(key), _parent_fd(root, key, create=False) as parent:
            try:
                # O_NONBLOCK: opening a FIFO planted (or swapped in) at the key returns at once
                # instead of holding a worker thread until someone writes to it
                fd = os.open(_name(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise NotFound(f"object {key} not found") from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a link, not an object
                    raise NotFound(f"object {key} not found") from None
                raise
        size = os.fstat(fd)
        if not stat.S_ISREG(size.st_mode):
            os.close(fd)
            raise NotFound(f"object {key} not found")
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
        start, end = resolve_byte_range(byte_range, size.st_size)
        return _read_range(handle, start, end, chunk_size)

    def delete_objects(self, bucket: str, keys: Sequence[str]) -> None:
        for key in keys:
            validate_object_key(key)
        with self._bucket_fd(bucket) as root:
            for key in keys:
                with _os_errors(key):
                    _delete_one(root, key)

    # -- helpers -------------------------------------------------------------------------------
    def _bucket_dir(self, bucket: str) -> Path:
        with self._bucket_fd(bucket):
            return self.root / bucket

    @contextlib.contextmanager
    def _bucket_fd(self, bucket: str) -> Iterator[int]:
        if not bucket or "/" in bucket or bucket.startswith("."):
            raise NotFound(f"bucket {bucket} not found")
        try:
            fd = os.open(self.root / bucket, _DIR_FLAGS)
        except OSError:  # missing, a file, or a link: not one of our buckets
            raise NotFound(f"bucket {bucket} not found") from None
        try:
            yield fd
        finally:
            os.close(fd)

    def sweep_abandoned_uploads(self) -> int:
        """Delete temporaries of uploads that no process is writing any more (a killed server's).

        Runs at start-up. An upload holds a lock on its temporary while it writes; one a minute
        old whose lock is free was abandoned (the minute covers the instant between creating the
        file and locking it).
        """
        removed = 0
        now = time.time()
        for path in self._tmp.glob(f"{UPLOAD_PREFIX}*"):
            try:
                if now - path.stat().st_mtime < ABANDONED_AFTER_SECONDS:
                    continue
                with open(path, "rb") as handle:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    path.unlink()
                    removed += 1
            except (BlockingIOError, FileNotFoundError):
                continue  # being written, or gone already
        return removed


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
UPLOAD_PREFIX = "upload-"
ABANDONED_AFTER_SECONDS = 60


def _name(key: str) -> str:
    return key.rpartition("/")[2]


@contextlib.contextmanager
def _parent_fd(root: int, key: str, *, create: bool) -> Iterator[int]:
    """A descriptor of the folder that holds ``key``'s last segment, walked without following links.

    Missing folders: created with ``create``, else NotFound. A segment that is a file or a link:
    Conflict when creating, NotFound otherwise.
    """
    fd = os.dup(root)
    try:
        for segment in key.split("/")[:-1]:
            try:
                child = os.open(segment, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise NotFound(f"object {key} not found") from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(segment, dir_fd=fd)
                child = os.open(segment, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                if create:
                    raise Conflict(f"{segment} is a file or a link in this bucket: {key} cannot be created") from None
                raise NotFound(f"object {key} not found") from None
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _regular_stat(parent: int, key: str) -> os.stat_result:
    try:
        st = os.stat(_name(key), dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        raise NotFound(f"object {key} not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotFound(f"object {key} not found")
    return st


def _delete_one(root: int, key: str) -> None:
    segments = key.split("/")
    try:
        with _parent_fd(root, key, create=False) as parent:
            try:
                st = os.stat(segments[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return
            if not stat.S_ISREG(st.st_mode):
                return  # a folder or a link is not an object
            os.unlink(segments[-1], dir_fd=parent)
    except NotFound:
        return
    # prune folders left empty, deepest first, each removed relative to its own parent
    for depth in range(len(segments) - 1, 0, -1):
        folder = "/".join(segments[:depth])
        try:
            with _parent_fd(root, folder, create=False) as parent:
                os.rmdir(segments[depth - 1], dir_fd=parent)
        except (OSError, NotFound):
            return


def _entries(root: int, prefix: str, one_level: bool) -> Iterator[tuple[str, os.stat_result | None]]:
    """(key, stat) of regular files and (prefix, None) of folders under ``prefix``; links skipped."""
    directory, _, partial = prefix.rpartition("/")
    try:
        # the folder ``directory`` itself: the parent of a key one segment below it
        with _parent_fd(root, f"{directory}/-", create=False) if directory else contextlib.nullcontext(root) as folder:
            base = os.dup(folder)
    except NotFound:
        return
    try:
        if one_level:
            with os.scandir(base) as listing:
                for entry in listing:
                    if not entry.name.startswith(partial):
                        continue
                    key = f"{directory}/{entry.name}" if directory else entry.name
                    if entry.is_dir(follow_symlinks=False):
                        yield key + "/", None
                    elif entry.is_file(follow_symlinks=False):
                        yield key, entry.stat(follow_symlinks=False)
            return
        for dirpath, _dirs, files, dirfd in os.fwalk(".", dir_fd=base, follow_symlinks=False):
            rel = os.path.normpath(os.path.join(directory, dirpath)) if directory else os.path.normpath(dirpath)
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if not key.startswith(prefix):
                    continue
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    yield key, st
    finally:
        os.close(base)


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(
        key=key,
        size=st.st_size,
        last_modified=dt.datetime.fromtimestamp(st.st_mtime, dt.UTC),
        etag=f"{st.st_mtime_ns:x}-{st.st_size:x}",
        content_type=mimetypes.guess_type(key)[0] or "application/octet-stream",
    )


@contextlib.contextmanager
def _os_errors(key: str) -> Iterator[None]:
    """Operating-system errors as typed errors: nothing reaches the API as a 500."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise InvalidRequest(f"object key {key!r} has a name too long for this file system") from None
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ProviderUnavailable("the server's disk is full; nothing was stored") from None
        if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENOENT):
            raise NotFound(f"object {key} not found") from None
        raise ProviderUnavailable(f"local storage failed on {key!r}: {exc.strerror}") from None


def _read_range(handle: BinaryIO, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
    with handle as f:
        f.seek(start)
        remaining = end - start
        while remaining > 0:
            chunk = f.read(min(chunk_size, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


def _write_json_atomic(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _info_to_json(info: BucketInfo) -> dict[str, object]:
    return {
        "name": info.name,
        "owner_id": info.owner_id,
        "display_name": info.display_name,
        "storage_class": str(info.storage_class),
        "created_at": info.created_at.isoformat(),
        "location": info.location,
        "labels": info.labels,
    }


def _info_from_json(data: dict[str, Any]) -> BucketInfo:
    return BucketInfo(
        name=str(data["name"]),
        owner_id=str(data["owner_id"]),
        display_name=str(data["display_name"]),
        storage_class=StorageClass(str(data["storage_class"])),
        created_at=dt.datetime.fromisoformat(str(data["created_at"])),
        location=str(data.get("location", "")),
        labels={str(k): str(v) for k, v in dict(data.get("labels") or {}).items()},
    )
