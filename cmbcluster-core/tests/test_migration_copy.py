"""The verified streaming copy between storage backends (local to local here; the clouds in tests/)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cmbcluster.interfaces import BucketOptions, ObjectInfo, ObjectPage, UserRef
from cmbcluster.local.storage import LocalStorage
from cmbcluster.migration.copy import Copied, CopyFailed, Failed, copy_object, copy_objects, list_all

OWNER = UserRef(id="u1", email="u1@example.org")
OBJECTS = {
    "top.txt": b"hello",
    "empty": b"",
    "a/b/c/deep.bin": os.urandom(70_000),
    "données/été ☀.csv": "température,☀\n1,2\n".encode(),
    "large.bin": os.urandom(20 * 1024 * 1024 + 123),
}


class CorruptingStorage(LocalStorage):
    """A destination that flips a byte of what it stores (a real LocalStorage underneath)."""

    def __init__(self, root: Path, *, times: int) -> None:
        super().__init__(root)
        self.times = times

    def upload_object(
        self, bucket: str, key: str, chunks: Iterable[bytes], *, content_type: str | None = None
    ) -> ObjectInfo:
        if self.times <= 0:
            return super().upload_object(bucket, key, chunks, content_type=content_type)
        self.times -= 1
        data = bytearray(b"".join(chunks))
        if data:
            data[len(data) // 2] ^= 0xFF
        return super().upload_object(bucket, key, [bytes(data)], content_type=content_type)


class ChecksummingStorage(LocalStorage):
    """A destination that reports the MD5 of what it stored, as GCS does (computed here from the
    stored file itself), optionally of bytes it then damages; counts reads of its objects."""

    def __init__(self, root: Path, *, damage: bool = False) -> None:
        super().__init__(root)
        self.damage = damage
        self.reads = 0

    def upload_object(
        self, bucket: str, key: str, chunks: Iterable[bytes], *, content_type: str | None = None
    ) -> ObjectInfo:
        stored = super().upload_object(bucket, key, chunks, content_type=content_type)
        digest = hashlib.md5(b"".join(super().download_object(bucket, key)))
        if self.damage:
            digest.update(b"!")
        return dataclasses.replace(stored, md5=digest.hexdigest())

    def download_object(self, bucket: str, key: str, **kwargs: Any) -> Iterator[bytes]:
        self.reads += 1
        return super().download_object(bucket, key, **kwargs)


def _filled(tmp_path: Path) -> tuple[LocalStorage, str]:
    source = LocalStorage(tmp_path / "source")
    bucket = source.create_bucket(OWNER, BucketOptions(display_name="data")).name
    for key, data in OBJECTS.items():
        source.upload_object(bucket, key, [data])
    return source, bucket


def test_every_object_arrives_whole_with_its_checksum(tmp_path: Path) -> None:
    source, bucket = _filled(tmp_path)
    target = LocalStorage(tmp_path / "target")
    target_bucket = target.create_bucket(OWNER, BucketOptions(display_name="data")).name

    results = list(copy_objects(source, bucket, target, target_bucket, list_all(source, bucket), parallel=3))

    assert all(isinstance(r, Copied) for r in results)
    assert {r.source.key for r in results if isinstance(r, Copied)} == set(OBJECTS)
    for key, data in OBJECTS.items():
        assert b"".join(target.download_object(target_bucket, key)) == data
    by_key = {r.source.key: r for r in results if isinstance(r, Copied)}
    assert by_key["large.bin"].md5 == hashlib.md5(OBJECTS["large.bin"]).hexdigest()
    assert by_key["empty"].size == 0


def test_a_corrupted_copy_is_retried_then_verified(tmp_path: Path) -> None:
    source, bucket = _filled(tmp_path)
    target = CorruptingStorage(tmp_path / "target", times=1)
    target_bucket = target.create_bucket(OWNER, BucketOptions(display_name="data")).name
    info = source.head_object(bucket, "top.txt")

    copied = copy_object(source, bucket, target, target_bucket, info)

    assert copied.attempts == 2 and copied.reread
    assert b"".join(target.download_object(target_bucket, "top.txt")) == b"hello"


def test_a_copy_that_never_verifies_is_reported_not_counted(tmp_path: Path) -> None:
    source, bucket = _filled(tmp_path)
    target = CorruptingStorage(tmp_path / "target", times=100)
    target_bucket = target.create_bucket(OWNER, BucketOptions(display_name="data")).name
    info = source.head_object(bucket, "a/b/c/deep.bin")

    with pytest.raises(CopyFailed, match="other bytes"):
        copy_object(source, bucket, target, target_bucket, info)
    results = list(copy_objects(source, bucket, target, target_bucket, [info]))
    assert len(results) == 1 and isinstance(results[0], Failed) and "3 attempts" in results[0].error


def test_a_destination_reporting_the_md5_is_verified_without_reading_back(tmp_path: Path) -> None:
    source, bucket = _filled(tmp_path)
    target = ChecksummingStorage(tmp_path / "target")
    target_bucket = target.create_bucket(OWNER, BucketOptions(display_name="data")).name

    results = list(copy_objects(source, bucket, target, target_bucket, list_all(source, bucket), parallel=2))

    assert all(isinstance(r, Copied) and not r.reread for r in results)
    assert target.reads == 0
    for key, data in OBJECTS.items():
        assert b"".join(target.download_object(target_bucket, key)) == data


def test_a_reported_md5_that_differs_is_not_counted(tmp_path: Path) -> None:
    source, bucket = _filled(tmp_path)
    target = ChecksummingStorage(tmp_path / "target", damage=True)
    target_bucket = target.create_bucket(OWNER, BucketOptions(display_name="data")).name

    with pytest.raises(CopyFailed, match="reports MD5"):
        copy_object(source, bucket, target, target_bucket, source.head_object(bucket, "large.bin"))
    assert target.reads == 0


class ReportingSource(LocalStorage):
    """A source whose listing reports each object's MD5, as GCS's and S3's do."""

    def list_objects(self, bucket: str, prefix: str = "", **kwargs: Any) -> ObjectPage:
        page = super().list_objects(bucket, prefix, **kwargs)
        objects = [
            dataclasses.replace(o, md5=hashlib.md5(b"".join(self.download_object(bucket, o.key))).hexdigest())
            for o in page.objects
        ]
        return dataclasses.replace(page, objects=objects)


def test_a_source_reporting_the_md5_is_compared_with_the_destinations_end_to_end(tmp_path: Path) -> None:
    source = ReportingSource(tmp_path / "source")
    bucket = source.create_bucket(OWNER, BucketOptions(display_name="data")).name
    for key, data in OBJECTS.items():
        source.upload_object(bucket, key, [data])
    target = ChecksummingStorage(tmp_path / "target")
    target_bucket = target.create_bucket(OWNER, BucketOptions(display_name="data")).name

    results = list(copy_objects(source, bucket, target, target_bucket, list_all(source, bucket), parallel=2))

    assert {r.source.key: r.md5 for r in results if isinstance(r, Copied)} == {
        key: hashlib.md5(data).hexdigest() for key, data in OBJECTS.items()
    }
    assert target.reads == 0
    damaged = ChecksummingStorage(tmp_path / "damaged", damage=True)
    damaged_bucket = damaged.create_bucket(OWNER, BucketOptions(display_name="data")).name
    listed = next(o for o in list_all(source, bucket) if o.key == "top.txt")
    with pytest.raises(CopyFailed, match="the source's is"):
        copy_object(source, bucket, damaged, damaged_bucket, listed)
