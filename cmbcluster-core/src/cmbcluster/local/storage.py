"""Local storage: each bucket is a folder under ``<data dir>/buckets``.

Uploads go to a temporary file beside the buckets and are renamed into place, so a failed
upload never leaves a partial object nor destroys the previous version.
"""

from __future__ import annotations

import datetime as dt
import json
import mimetypes
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from cmbcluster.errors import Conflict, InvalidRequest, NotFound
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
from cmbcluster.naming import bucket_name, validate_object_key

BUCKET_PREFIX = "cmb"


class LocalStorage(StorageBackend):
    def __init__(self, root: Path) -> None:
        self.root = root
        self._meta = root / ".meta"
        self._tmp = root / ".tmp"
        for folder in (self.root, self._meta, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)

    # -- buckets -----------------------------------------------------------------------------
    def create_bucket(self, owner: UserRef, options: BucketOptions) -> BucketInfo:
        if options.storage_class not in (StorageClass.STANDARD,):
            raise InvalidRequest(
                f"the local provider offers only the standard storage class, not {options.storage_class}"
            )
        while True:
            name = bucket_name(BUCKET_PREFIX, owner.id)
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
        folder = self._bucket_dir(bucket)
        size = count = 0
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                size += os.stat(os.path.join(dirpath, name)).st_size
                count += 1
        return BucketUsage(size_bytes=size, object_count=count)

    def volume_spec(self, request: MountRequest) -> VolumeSpec:
        folder = self._bucket_dir(request.bucket)
        return VolumeSpec(local_path=folder / request.subpath if request.subpath else folder)

    def ensure_bucket_access(self, bucket: str, identity: CloudIdentity) -> None:
        # One machine, one operating-system user: the control plane and the environments it
        # starts share the folder's permissions; there is no cloud identity to grant.
        self._bucket_dir(bucket)

    # -- objects -----------------------------------------------------------------------------
    def list_objects(
        self,
        bucket: str,
        prefix: str = "",
        *,
        delimiter: str | None = "/",
        page_token: str | None = None,
        page_size: int = 1000,
    ) -> ObjectPage:
        folder = self._bucket_dir(bucket)
        check_listing(prefix, delimiter, page_size)
        entries = sorted(self._entries(folder, prefix, delimiter is not None))
        if page_token:
            entries = [e for e in entries if e[0] > page_token]
        page = entries[:page_size]
        objects = [self._object_info(folder, key) for key, is_dir in page if not is_dir]
        prefixes = [key for key, is_dir in page if is_dir]
        next_token = page[-1][0] if len(entries) > page_size else None
        return ObjectPage(objects=objects, prefixes=prefixes, next_token=next_token)

    def _entries(self, folder: Path, prefix: str, one_level: bool) -> Iterator[tuple[str, bool]]:
        directory, _, partial = prefix.rpartition("/")
        base = folder / directory if directory else folder
        if not base.is_dir():
            return
        if one_level:
            for entry in os.scandir(base):
                if entry.name.startswith(partial):
                    key = f"{directory}/{entry.name}" if directory else entry.name
                    if entry.is_dir(follow_symlinks=False):
                        yield key + "/", True
                    elif entry.is_file(follow_symlinks=False):
                        yield key, False
            return
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, folder)
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key, False

    def head_object(self, bucket: str, key: str) -> ObjectInfo:
        return self._object_info(self._bucket_dir(bucket), validate_object_key(key))

    def _object_info(self, folder: Path, key: str) -> ObjectInfo:
        path = folder / key
        try:
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"object {key} not found") from None
        if not path.is_file():
            raise NotFound(f"object {key} not found")
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        return ObjectInfo(
            key=key,
            size=stat.st_size,
            last_modified=dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC),
            etag=f"{stat.st_mtime_ns:x}-{stat.st_size:x}",
            content_type=content_type,
        )

    def upload_object(
        self, bucket: str, key: str, chunks: Iterable[bytes], *, content_type: str | None = None
    ) -> ObjectInfo:
        folder = self._bucket_dir(bucket)
        target = folder / validate_object_key(key)
        if target.is_dir():
            raise Conflict(f"{key} is a folder in this bucket")
        for parent in target.relative_to(folder).parents:
            if (folder / parent).is_file():
                raise Conflict(f"{parent} is a file in this bucket, so {key} cannot be created under it")
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return self._object_info(folder, key)

    def download_object(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: tuple[int, int | None] | None = None,
        chunk_size: int = 1024 * 1024,
    ) -> Iterator[bytes]:
        folder = self._bucket_dir(bucket)
        info = self._object_info(folder, validate_object_key(key))
        start, end = resolve_byte_range(byte_range, info.size)
        handle = open(folder / key, "rb")  # noqa: SIM115 - closed by the generator below
        return _read_range(handle, start, end, chunk_size)

    def delete_objects(self, bucket: str, keys: Sequence[str]) -> None:
        folder = self._bucket_dir(bucket)
        for key in keys:
            path = folder / validate_object_key(key)
            if path.is_file():
                path.unlink()
                _prune_empty_parents(path.parent, folder)

    # -- helpers -------------------------------------------------------------------------------
    def _bucket_dir(self, bucket: str) -> Path:
        if not bucket or "/" in bucket or bucket.startswith(".") or not (self.root / bucket).is_dir():
            raise NotFound(f"bucket {bucket} not found")
        return self.root / bucket


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


def _prune_empty_parents(directory: Path, stop: Path) -> None:
    while directory != stop:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


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
