"""S3Storage against moto in server mode: the core storage contract, then what only S3 has."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

import cmbcluster_aws.storage as storage_module
from cmbcluster.errors import (
    AlreadyExists,
    ConfigurationError,
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ProviderUnavailable,
)
from cmbcluster.interfaces import BucketOptions, CloudIdentity, MountRequest, StorageBackend, StorageClass, UserRef
from cmbcluster.testing.storage import StorageContract
from cmbcluster_aws.errors import map_aws_error
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import S3Storage
from cmbcluster_aws.tags import decode_tag_value, encode_tag_value
from cmbcluster_aws.uploads import part_size

MiB = 1024 * 1024
REGION = "eu-west-1"  # as in conftest.py
ACCOUNT_ID = "123456789012"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/cmbcluster-user-0123456789"


class TestS3StorageContract(StorageContract):
    other_storage_class = StorageClass.INFREQUENT
    keeps_versions = True
    reports_md5 = True
    creation_time_resolution = 1.05  # S3 reports bucket creation times in whole seconds

    @pytest.fixture
    def identity(self, owner: UserRef) -> CloudIdentity:
        return CloudIdentity(user=owner, principal=ROLE_ARN)

    @pytest.fixture
    def storage_backend(self, aws_settings: AwsSettings) -> Iterator[StorageBackend]:
        backend = S3Storage(aws_settings)
        yield backend
        backend.close()


@pytest.fixture
def backend(aws_settings: AwsSettings) -> Iterator[S3Storage]:
    storage = S3Storage(aws_settings)
    yield storage
    storage.close()


@pytest.fixture
def owner() -> UserRef:
    return UserRef(id=uuid.uuid4().hex, email="ada.lovelace@example.org")


def _chunks(data: bytes, size: int = MiB) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _tags(s3: Any, bucket: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]}


def _bucket_exists(s3: Any, bucket: str) -> bool:
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        return False
    return True


# -- bucket creation -------------------------------------------------------------------------
def test_new_bucket_is_private_encrypted_versioned_and_tagged(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="Maps & spectra = été"))
    name = info.name
    assert name.startswith(f"cmbtest-{owner.id[:10]}-")
    assert s3.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }
    rules = s3.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]["Rules"]
    assert [r["ApplyServerSideEncryptionByDefault"] for r in rules] == [{"SSEAlgorithm": "AES256"}]
    assert s3.get_bucket_versioning(Bucket=name)["Status"] == "Enabled"
    assert s3.get_bucket_ownership_controls(Bucket=name)["OwnershipControls"]["Rules"] == [
        {"ObjectOwnership": "BucketOwnerEnforced"}
    ]
    assert s3.get_bucket_location(Bucket=name)["LocationConstraint"] == REGION
    tags = _tags(s3, name)
    assert tags == {
        "owner": owner.id,
        "managed-by": "cmbcluster",
        "cmbcluster:deployment": "cmbcluster-eks",  # the deployment's name (the default cluster's)
        "cmbcluster-display-name": "Maps =26 spectra =3D =C3=A9t=C3=A9",
        "cmbcluster-storage-class": "STANDARD",
    }
    for value in tags.values():  # the documented S3 tag character set
        assert re.fullmatch(r"[A-Za-z0-9 +\-=._:/@]{0,256}", value), value
    fetched = backend.get_bucket(name)
    assert fetched.display_name == "Maps & spectra = été"
    assert fetched.versioning is True and info.versioning is True
    assert fetched.location == REGION
    assert fetched.labels == {"owner": owner.id, "managed-by": "cmbcluster", "cmbcluster:deployment": "cmbcluster-eks",
                              "cmbcluster-storage-class": "STANDARD"}  # fmt: skip
    assert fetched.created_at.tzinfo is not None


EXPECTED_LIFECYCLE_30_DAYS = [
    {
        "ID": "cmbcluster-abort-incomplete-uploads",
        "Status": "Enabled",
        "Filter": {},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
    },
    {
        "ID": "cmbcluster-expire-noncurrent-versions",
        "Status": "Enabled",
        "Filter": {},
        "NoncurrentVersionExpiration": {"NoncurrentDays": 30},
        "Expiration": {"ExpiredObjectDeleteMarker": True},
    },
]


def test_new_bucket_has_the_lifecycle_rules_exactly(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="lifecycle"))
    assert s3.get_bucket_lifecycle_configuration(Bucket=info.name)["Rules"] == EXPECTED_LIFECYCLE_30_DAYS


def test_noncurrent_days_are_configurable_and_zero_keeps_no_versions(
    make_settings: Callable[..., AwsSettings], owner: UserRef, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NONCURRENT_VERSION_DAYS", "7")  # the one variable for both clouds
    week = S3Storage(make_settings()).create_bucket(owner, BucketOptions(display_name="week"))
    rules = s3.get_bucket_lifecycle_configuration(Bucket=week.name)["Rules"]
    assert rules[1]["NoncurrentVersionExpiration"] == {"NoncurrentDays": 7}

    none = S3Storage(make_settings(s3_noncurrent_version_days=0))
    plain = none.create_bucket(owner, BucketOptions(display_name="none"))
    assert "Status" not in s3.get_bucket_versioning(Bucket=plain.name)  # an overwrite keeps nothing
    assert plain.versioning is False
    # S3's shortest period is a day: versions left by an earlier setting go after one.
    rules = s3.get_bucket_lifecycle_configuration(Bucket=plain.name)["Rules"]
    assert rules[0] == EXPECTED_LIFECYCLE_30_DAYS[0]
    assert rules[1]["NoncurrentVersionExpiration"] == {"NoncurrentDays": 1}
    none.upload_object(plain.name, "a.bin", [b"1" * 1000])
    none.upload_object(plain.name, "a.bin", [b"2" * 10])
    usage = none.bucket_usage(plain.name)
    assert (usage.size_bytes, usage.noncurrent_bytes) == (10, 0)


def _billed(s3: Any, bucket: str) -> tuple[int, int]:
    """What S3 stores for ``bucket``, read directly: current bytes and noncurrent bytes."""
    current = noncurrent = 0
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for version in page.get("Versions", []):
            if version["IsLatest"]:
                current += version["Size"]
            else:
                noncurrent += version["Size"]
    return current, noncurrent


def _apply_lifecycle(s3: Any, bucket: str, now: dt.datetime) -> None:
    """Do what S3 does with the bucket's lifecycle configuration as stored (moto never runs it) on
    day ``now``: a noncurrent version expires NoncurrentDays after it stopped being current (here its
    own write time: every version in these tests is superseded within seconds of being written);
    then a delete marker with no version behind it goes."""
    (rule,) = [r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
               if "NoncurrentVersionExpiration" in r]  # fmt: skip
    days = dt.timedelta(days=rule["NoncurrentVersionExpiration"]["NoncurrentDays"])
    versions = s3.list_object_versions(Bucket=bucket)
    for entry in [*versions.get("Versions", []), *versions.get("DeleteMarkers", [])]:
        if not entry["IsLatest"] and now - entry["LastModified"] > days:
            s3.delete_object(Bucket=bucket, Key=entry["Key"], VersionId=entry["VersionId"])
    if rule["Expiration"].get("ExpiredObjectDeleteMarker"):
        remaining = s3.list_object_versions(Bucket=bucket)
        live_keys = {v["Key"] for v in remaining.get("Versions", [])}
        for marker in remaining.get("DeleteMarkers", []):
            if marker["Key"] not in live_keys:
                s3.delete_object(Bucket=bucket, Key=marker["Key"], VersionId=marker["VersionId"])


def test_usage_reports_what_s3_bills_and_the_lifecycle_leaves_current_bytes(
    backend: S3Storage, owner: UserRef, s3: Any
) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="billed"))
    four = 4 * MiB
    backend.upload_object(info.name, "map.fits", [b"a" * four])
    for fill in (b"b", b"c", b"d"):  # three overwrites
        backend.upload_object(info.name, "map.fits", [fill * four])
    backend.delete_objects(info.name, ["map.fits"])
    backend.upload_object(info.name, "kept.txt", [b"k" * 1000])
    backend.upload_object(info.name, "kept.txt", [b"K" * 100])

    usage = backend.bucket_usage(info.name)
    assert (usage.size_bytes, usage.object_count) == (100, 1)
    assert (usage.noncurrent_bytes, usage.noncurrent_count) == (4 * four + 1000, 5)
    assert (usage.size_bytes, usage.noncurrent_bytes) == _billed(s3, info.name)
    assert usage.billed_bytes == 100 + 4 * four + 1000

    _apply_lifecycle(s3, info.name, dt.datetime.now(dt.UTC) + dt.timedelta(days=29))
    assert backend.bucket_usage(info.name).noncurrent_bytes == 4 * four + 1000  # inside the window: kept
    _apply_lifecycle(s3, info.name, dt.datetime.now(dt.UTC) + dt.timedelta(days=31))
    after = backend.bucket_usage(info.name)
    assert (after.size_bytes, after.object_count, after.noncurrent_bytes, after.noncurrent_count) == (100, 1, 0, 0)
    assert _billed(s3, info.name) == (100, 0)
    assert s3.list_object_versions(Bucket=info.name).get("DeleteMarkers", []) == []


def test_unfinished_uploads_are_aborted_by_key_and_age(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="sweep"))
    mine = s3.create_multipart_upload(Bucket=info.name, Key="mine.bin")["UploadId"]
    s3.upload_part(Bucket=info.name, Key="mine.bin", UploadId=mine, PartNumber=1, Body=b"x" * MiB)
    other = s3.create_multipart_upload(Bucket=info.name, Key="mine.bin.other")["UploadId"]
    started = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)

    assert backend.abort_unfinished_uploads(info.name, key="mine.bin", started_before=started) == 1
    left = [(u["Key"], u["UploadId"]) for u in s3.list_multipart_uploads(Bucket=info.name).get("Uploads", [])]
    assert left == [("mine.bin.other", other)]
    # One begun after the given time is left to whoever is sending it. (moto reports every upload
    # as initiated on 2010-11-10, so the bound is checked with a time before that.)
    assert backend.abort_unfinished_uploads(info.name, started_before=dt.datetime(2010, 1, 1, tzinfo=dt.UTC)) == 0
    assert backend.abort_unfinished_uploads(info.name, started_before=started) == 1
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=info.name)


def test_kms_key_and_versioning_override(make_settings: Callable[..., AwsSettings], owner: UserRef, s3: Any) -> None:
    key_arn = f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    backend = S3Storage(make_settings(s3_kms_key_id=key_arn))
    info = backend.create_bucket(owner, BucketOptions(display_name="kms", versioning=False))
    rule = s3.get_bucket_encryption(Bucket=info.name)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn}
    assert rule["BucketKeyEnabled"] is True
    assert "Status" not in s3.get_bucket_versioning(Bucket=info.name)
    assert info.versioning is False and backend.get_bucket(info.name).versioning is False
    # SSE-KMS ETags are no MD5: none is reported
    stored = backend.upload_object(info.name, "one.txt", [b"one request"])
    assert stored.md5 is None and backend.list_objects(info.name).objects[0].md5 is None


def test_versioning_follows_settings_unless_overridden(
    make_settings: Callable[..., AwsSettings], owner: UserRef, s3: Any
) -> None:
    backend = S3Storage(make_settings(s3_versioning=False))
    plain = backend.create_bucket(owner, BucketOptions(display_name="plain"))
    versioned = backend.create_bucket(owner, BucketOptions(display_name="versioned", versioning=True))
    assert "Status" not in s3.get_bucket_versioning(Bucket=plain.name)
    assert s3.get_bucket_versioning(Bucket=versioned.name)["Status"] == "Enabled"


def test_us_east_1_has_no_location_constraint(
    make_settings: Callable[..., AwsSettings], owner: UserRef, s3: Any
) -> None:
    backend = S3Storage(make_settings(aws_region="us-east-1"))
    info = backend.create_bucket(owner, BucketOptions(display_name="virginia"))
    assert s3.get_bucket_location(Bucket=info.name)["LocationConstraint"] is None
    assert backend.get_bucket(info.name).location == "us-east-1"


def test_a_listing_trusts_an_etag_as_md5_only_where_the_buckets_default_encryption_allows(
    backend: S3Storage, owner: UserRef, s3: Any, aws_settings: AwsSettings
) -> None:
    """A listing does not say how each object is encrypted, and a KMS-encrypted object's ETag is no
    MD5: the bucket's own default encryption decides, whoever set it (a bucket given KMS outside
    CMBCluster, as a migration's source may be), not this deployment's S3_KMS_KEY_ID. A migration
    trusting a wrong MD5 would find every copy of such a bucket "holding other bytes"."""
    data = b"one request"
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    plain = backend.create_bucket(owner, BucketOptions(display_name="aes"))
    assert backend.upload_object(plain.name, "a.txt", [data]).md5 == md5
    assert backend.list_objects(plain.name).objects[0].md5 == md5  # SSE-S3: the ETag is the MD5

    outside = backend.create_bucket(owner, BucketOptions(display_name="kms outside"))
    key_arn = f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    s3.put_bucket_encryption(Bucket=outside.name, ServerSideEncryptionConfiguration={"Rules": [
        {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn}}]})  # fmt: skip
    s3.put_object(Bucket=outside.name, Key="a.txt", Body=data)
    assert backend.head_object(outside.name, "a.txt").md5 is None
    assert backend.list_objects(outside.name).objects[0].md5 is None

    # S3 cannot say: no listed ETag is taken for an MD5; asked again after a failure, not a denial.
    denied = S3Storage(aws_settings, client=_FailingClient(s3, "get_bucket_encryption"))
    assert denied.list_objects(plain.name).objects[0].md5 is None
    failing = _FailingClient(s3, "get_bucket_encryption", code="ServiceUnavailable")
    busy = S3Storage(aws_settings, client=failing)
    assert busy.list_objects(plain.name).objects[0].md5 is None
    failing._failing = ""  # S3 answers again
    assert busy.list_objects(plain.name).objects[0].md5 == md5


def test_display_name_survives_any_characters_and_length(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    name = 'Ωmega <maps> & "spectra" 100% = ok; 🚀 ' * 12  # encodes to far more than 256 characters
    info = backend.create_bucket(owner, BucketOptions(display_name=name))
    tags = _tags(s3, info.name)
    pieces = sorted(k for k in tags if k.startswith("cmbcluster-display-name"))
    assert len(pieces) > 1
    assert all(len(tags[k]) <= 256 for k in pieces)
    assert backend.get_bucket(info.name).display_name == name
    with pytest.raises(InvalidRequest):
        backend.create_bucket(owner, BucketOptions(display_name="🚀" * 1000))


@pytest.mark.parametrize(
    "text", ["", " ", "  edge  ", "plain", "a=b", "=3D", "x & y", "été", "\U0001f680", "tab\there", "=" * 300]
)
def test_tag_encoding_round_trips(text: str) -> None:
    encoded = encode_tag_value(text)
    assert re.fullmatch(r"[A-Za-z0-9 +\-=._:/@]*", encoded)
    assert decode_tag_value(encoded) == text


def test_archive_class_is_refused_and_creates_nothing(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    with pytest.raises(InvalidRequest, match="archive"):
        backend.create_bucket(owner, BucketOptions(display_name="x", storage_class=StorageClass.ARCHIVE))
    assert s3.list_buckets()["Buckets"] == []


@pytest.mark.parametrize(
    ("portable", "s3_class"),
    [
        (StorageClass.INFREQUENT, "STANDARD_IA"),
        (StorageClass.AUTO, "INTELLIGENT_TIERING"),
        (StorageClass.COLD, "GLACIER_IR"),
    ],
)
def test_storage_class_is_tagged_and_applied_to_uploads(
    aws_settings: AwsSettings, owner: UserRef, s3: Any, portable: StorageClass, s3_class: str
) -> None:
    backend = S3Storage(aws_settings)
    info = backend.create_bucket(owner, BucketOptions(display_name="cool", storage_class=portable))
    assert _tags(s3, info.name)["cmbcluster-storage-class"] == s3_class
    backend.upload_object(info.name, "small.txt", [b"tiny"])
    # A fresh backend has no cache: it reads the class from the tag.
    fresh = S3Storage(aws_settings)
    fresh.upload_object(info.name, "big.bin", _chunks(os.urandom(9 * MiB)))
    for key in ("small.txt", "big.bin"):
        assert s3.head_object(Bucket=info.name, Key=key)["StorageClass"] == s3_class
    assert fresh.get_bucket(info.name).storage_class == portable


def test_standard_bucket_uploads_as_standard(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="std"))
    backend.upload_object(info.name, "a.txt", [b"a"])
    listed = s3.list_objects_v2(Bucket=info.name)["Contents"]
    assert [o["StorageClass"] for o in listed] == ["STANDARD"]


class _FailingClient:
    """The real client, except that one operation fails as AWS would refuse it."""

    def __init__(self, client: Any, failing: str, code: str = "AccessDenied") -> None:
        self._client = client
        self._failing = failing
        self._code = code

    def __getattr__(self, name: str) -> Any:
        if name == self._failing:

            def fail(**kwargs: Any) -> Any:
                raise ClientError({"Error": {"Code": self._code, "Message": "refused"}}, name)

            return fail
        return getattr(self._client, name)


@pytest.mark.parametrize(
    "failing", ["put_public_access_block", "put_bucket_encryption", "put_bucket_versioning", "put_bucket_tagging"]
)
def test_a_bucket_that_cannot_be_configured_is_deleted(
    aws_settings: AwsSettings, owner: UserRef, s3: Any, failing: str
) -> None:
    backend = S3Storage(aws_settings, client=_FailingClient(s3, failing))
    with pytest.raises(PermissionDenied):
        backend.create_bucket(owner, BucketOptions(display_name="half"))
    assert s3.list_buckets()["Buckets"] == []


def test_a_taken_name_is_retried(aws_settings: AwsSettings, owner: UserRef, s3: Any) -> None:
    class Collides(_FailingClient):
        calls = 0

        def create_bucket(self, **kwargs: Any) -> Any:
            Collides.calls += 1
            if Collides.calls == 1:
                raise ClientError({"Error": {"Code": "BucketAlreadyExists", "Message": "taken"}}, "CreateBucket")
            return self._client.create_bucket(**kwargs)

    backend = S3Storage(aws_settings, client=Collides(s3, failing=""))
    info = backend.create_bucket(owner, BucketOptions(display_name="second try"))
    assert Collides.calls == 2
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == [info.name]


# -- listing and ownership ---------------------------------------------------------------------
def test_list_buckets_trusts_tags_not_names(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    mine = backend.create_bucket(owner, BucketOptions(display_name="mine"))
    time.sleep(1.1)  # CreationDate has one-second resolution
    second = backend.create_bucket(owner, BucketOptions(display_name="second"))
    impostor = f"cmbtest-{owner.id[:10]}-ffffffff"  # the owner's name pattern, someone else's tag
    s3.create_bucket(Bucket=impostor, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_bucket_tagging(
        Bucket=impostor,
        Tagging={"TagSet": [{"Key": "owner", "Value": "someone-else"}, {"Key": "managed-by", "Value": "cmbcluster"}]},
    )
    unmanaged = f"cmbtest-{owner.id[:10]}-eeeeeeee"
    s3.create_bucket(Bucket=unmanaged, CreateBucketConfiguration={"LocationConstraint": REGION})
    listed = backend.list_buckets(owner)
    assert [b.name for b in listed] == [mine.name, second.name]  # oldest first
    assert [b.display_name for b in listed] == ["mine", "second"]
    assert all(b.owner_id == owner.id for b in listed)
    with pytest.raises(NotFound):
        backend.get_bucket(unmanaged)


def test_unmanaged_bucket_is_never_deleted(backend: S3Storage, s3: Any) -> None:
    s3.create_bucket(Bucket="cmbcluster-database", CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_object(Bucket="cmbcluster-database", Key="db.sqlite", Body=b"precious")
    with pytest.raises(PermissionDenied):
        backend.delete_bucket("cmbcluster-database", force=True)
    assert s3.get_object(Bucket="cmbcluster-database", Key="db.sqlite")["Body"].read() == b"precious"


# -- deleting ----------------------------------------------------------------------------------
def test_force_delete_removes_every_version(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="history"))
    for n in range(3):
        backend.upload_object(info.name, "same/key.txt", [f"version {n}".encode()])
    backend.upload_object(info.name, "gone.txt", [b"soon deleted"])
    backend.delete_objects(info.name, ["gone.txt"])  # leaves a delete marker and a version
    versions = s3.list_object_versions(Bucket=info.name)
    assert len(versions["Versions"]) == 4 and len(versions["DeleteMarkers"]) == 1
    with pytest.raises(Conflict):
        backend.delete_bucket(info.name)
    assert len(s3.list_object_versions(Bucket=info.name)["Versions"]) == 4  # nothing was lost
    backend.delete_bucket(info.name, force=True)
    assert not _bucket_exists(s3, info.name)


def test_force_delete_pages_through_many_versions(
    backend: S3Storage, owner: UserRef, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_module, "DELETE_BATCH", 4)  # pages and batches of 4, not 1000
    info = backend.create_bucket(owner, BucketOptions(display_name="many"))
    keys = [f"k/{i:02d}" for i in range(11)]
    for key in keys:
        s3.put_object(Bucket=info.name, Key=key, Body=b"1")
        s3.put_object(Bucket=info.name, Key=key, Body=b"2")
    s3.delete_objects(Bucket=info.name, Delete={"Objects": [{"Key": k} for k in keys[:5]], "Quiet": True})
    backend.delete_bucket(info.name, force=True)
    assert not _bucket_exists(s3, info.name)


def test_purging_old_versions_keeps_current_ones_across_pages(
    backend: S3Storage, owner: UserRef, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_module, "DELETE_BATCH", 3)
    info = backend.create_bucket(owner, BucketOptions(display_name="history"))
    for key in ("a", "b", "c", "d", "e"):
        for n in range(3):
            s3.put_object(Bucket=info.name, Key=key, Body=f"{key}{n}".encode())
    s3.delete_objects(Bucket=info.name, Delete={"Objects": [{"Key": "b"}, {"Key": "d"}], "Quiet": True})
    backend._purge_versions(info.name, current_too=False)
    versions = s3.list_object_versions(Bucket=info.name)
    assert "DeleteMarkers" not in versions
    assert sorted((v["Key"], v["IsLatest"]) for v in versions["Versions"]) == [("a", True), ("c", True), ("e", True)]
    assert b"".join(backend.download_object(info.name, "e")) == b"e2"


def test_bucket_with_only_old_versions_deletes_without_force(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="emptied"))
    backend.upload_object(info.name, "a.txt", [b"1"])
    backend.upload_object(info.name, "a.txt", [b"2"])
    backend.delete_objects(info.name, ["a.txt"])
    assert backend.list_objects(info.name).objects == []
    backend.delete_bucket(info.name)
    assert not _bucket_exists(s3, info.name)


def test_force_delete_aborts_multipart_uploads(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="uploads"))
    upload = s3.create_multipart_upload(Bucket=info.name, Key="half.bin")
    s3.upload_part(Bucket=info.name, Key="half.bin", UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * MiB)
    backend.delete_bucket(info.name, force=True)
    assert not _bucket_exists(s3, info.name)


# -- uploads and downloads -----------------------------------------------------------------------
def test_multipart_round_trip_leaves_no_uploads(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="big"))
    data = os.urandom(20 * MiB + 123)
    result = backend.upload_object(info.name, "maps/big.fits", _chunks(data), content_type="application/fits")
    assert result.size == len(data)
    assert result.content_type == "application/fits"
    assert result.etag.endswith("-3")  # 8 MiB + 8 MiB + the rest: a multipart upload
    # a multipart ETag is no MD5: none is reported, so the migration reads such objects back
    assert result.md5 is None and backend.list_objects(info.name, "maps/", delimiter=None).objects[0].md5 is None
    digest = hashlib.sha256()
    for chunk in backend.download_object(info.name, "maps/big.fits", chunk_size=MiB):
        assert 0 < len(chunk) <= MiB
        digest.update(chunk)
    assert digest.digest() == hashlib.sha256(data).digest()
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=info.name)


def test_upload_streams_instead_of_buffering(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    """Parts reach S3 while the source is still being read, and at most UPLOAD_PARTS_IN_FLIGHT wait."""
    info = backend.create_bucket(owner, BucketOptions(display_name="stream"))
    seen_in_progress: list[int] = []

    def source() -> Iterator[bytes]:
        for i in range(48):
            if i == 44:  # 44 MiB in: part 5 (from 40 MiB) was only sent once part 1 had arrived
                uploads = s3.list_multipart_uploads(Bucket=info.name).get("Uploads", [])
                for upload in uploads:
                    parts = s3.list_parts(Bucket=info.name, Key="s.bin", UploadId=upload["UploadId"])
                    seen_in_progress.append(len(parts.get("Parts", [])))
            yield b"z" * MiB

    backend.upload_object(info.name, "s.bin", source())
    assert len(seen_in_progress) == 1
    assert 1 <= seen_in_progress[0] <= 5
    assert backend.head_object(info.name, "s.bin").size == 48 * MiB
    assert b"".join(backend.download_object(info.name, "s.bin")) == b"z" * 48 * MiB


def test_failed_multipart_upload_is_aborted(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="broken"))
    backend.upload_object(info.name, "data.bin", [b"previous"])

    def broken() -> Iterator[bytes]:
        for _ in range(17):
            yield b"p" * MiB
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        backend.upload_object(info.name, "data.bin", broken())
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=info.name)
    assert b"".join(backend.download_object(info.name, "data.bin")) == b"previous"


def test_s3_failure_during_multipart_is_mapped_and_aborted(aws_settings: AwsSettings, owner: UserRef, s3: Any) -> None:
    backend = S3Storage(aws_settings, client=_FailingClient(s3, "complete_multipart_upload", "SlowDown"))
    info = backend.create_bucket(owner, BucketOptions(display_name="throttled"))
    with pytest.raises(ProviderUnavailable):
        backend.upload_object(info.name, "t.bin", _chunks(b"t" * 9 * MiB))
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=info.name)
    with pytest.raises(NotFound):
        backend.head_object(info.name, "t.bin")


def test_exactly_one_part_is_a_single_put(backend: S3Storage, owner: UserRef) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="edge"))
    result = backend.upload_object(info.name, "eight.bin", _chunks(b"e" * 8 * MiB))
    assert "-" not in result.etag
    assert result.size == 8 * MiB


def test_content_type_is_kept_or_guessed(backend: S3Storage, owner: UserRef) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="types"))
    backend.upload_object(info.name, "a.json", [b"{}"])
    backend.upload_object(info.name, "b.dat", [b"x"], content_type="text/plain")
    assert backend.head_object(info.name, "a.json").content_type == "application/json"
    assert backend.head_object(info.name, "b.dat").content_type == "text/plain"


def test_unsatisfiable_ranges_are_invalid_requests(backend: S3Storage, owner: UserRef) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="ranges"))
    backend.upload_object(info.name, "r.txt", [b"0123456789"])
    for bad in [(10, None), (5, 2), (-1, 3)]:
        with pytest.raises(InvalidRequest):
            backend.download_object(info.name, "r.txt", byte_range=bad)
    assert b"".join(backend.download_object(info.name, "r.txt", byte_range=(8, 100))) == b"89"
    assert b"".join(backend.download_object(info.name, "r.txt", byte_range=(0, 0))) == b"0"


def test_delete_objects_in_batches(
    backend: S3Storage, owner: UserRef, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_module, "DELETE_BATCH", 4)
    info = backend.create_bucket(owner, BucketOptions(display_name="batch", versioning=False))
    keys = [f"b/{i:04d}" for i in range(10)]
    for key in keys:
        s3.put_object(Bucket=info.name, Key=key, Body=b"")
    backend.delete_objects(info.name, [*keys, keys[0], "never/was"])
    assert backend.bucket_usage(info.name).object_count == 0
    with pytest.raises(InvalidRequest):
        backend.delete_objects(info.name, ["ok", "../bad"])


def test_keys_xml_cannot_carry_are_deleted_one_by_one(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    """A file an environment wrote through the mount may be named with a character XML 1.0 cannot
    carry (U+FFFE, U+FFFF; control characters): DeleteObjects, whose request is XML, refuses it (S3
    answers MalformedXML; moto 500), so such keys are deleted with one DeleteObject each, their key in
    the URL. It was a 503 ("AWS did not complete the request"): a file the user could list, never delete."""
    info = backend.create_bucket(owner, BucketOptions(display_name="xml", versioning=False))
    odd, plain = "notes/a\ufffeb.txt", "notes/plain.txt"
    for key in (odd, plain):
        s3.put_object(Bucket=info.name, Key=key, Body=b"x")  # as Mountpoint writes it
    assert {o.key for o in backend.list_objects(info.name, "notes/", delimiter=None).objects} == {odd, plain}
    backend.delete_objects(info.name, [odd, plain])
    assert backend.list_objects(info.name, "notes/", delimiter=None).objects == []


def test_list_page_size_above_s3_limit_still_pages(
    backend: S3Storage, owner: UserRef, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_module, "MAX_LIST_KEYS", 5)  # S3 caps pages at 1000
    info = backend.create_bucket(owner, BucketOptions(display_name="pages", versioning=False))
    for i in range(6):
        s3.put_object(Bucket=info.name, Key=f"{i:04d}", Body=b"")
    first = backend.list_objects(info.name, page_size=5000)
    assert len(first.objects) == 5 and first.next_token
    second = backend.list_objects(info.name, page_size=5000, page_token=first.next_token)
    assert [o.key for o in second.objects] == ["0005"] and second.next_token is None
    with pytest.raises(InvalidRequest):
        backend.list_objects(info.name, page_size=0)


# -- mounting and access -------------------------------------------------------------------------
def test_volume_spec_is_a_static_pv_and_claim(backend: S3Storage, owner: UserRef) -> None:
    env_id = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    bucket = f"cmbtest-{owner.id[:10]}-0a1b2c3d"
    spec = backend.volume_spec(
        MountRequest(
            bucket=bucket, mount_path="/home/jovyan/data", user=owner, environment_id=env_id, subpath="maps/planck"
        )
    )
    assert len(spec.objects) == 2
    pv, pvc = spec.objects
    name = pv["metadata"]["name"]
    assert re.fullmatch(r"cmbcluster-s3-0f1e2d3c4b5a-[0-9a-f]{16}", name)
    labels = {
        "app.kubernetes.io/managed-by": "cmbcluster",
        "cmbcluster.io/user-id": owner.id,
        "cmbcluster.io/environment-id": env_id,
    }
    assert pv == {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "capacity": {"storage": "1200Gi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "mountOptions": [
                "allow-delete",
                f"region {REGION}",
                "uid=1000",
                "gid=100",
                "allow-other",
                "prefix maps/planck/",
            ],
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": name},
            "csi": {
                "driver": "s3.csi.aws.com",
                "volumeHandle": f"{bucket}-0f1e2d3c4b5a-{name.rsplit('-', 1)[1]}",
                "volumeAttributes": {"bucketName": bucket},
            },
        },
    }
    assert pvc == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": name,
            "resources": {"requests": {"storage": "1200Gi"}},
        },
    }
    assert spec.volume == {"name": name, "persistentVolumeClaim": {"claimName": name}}
    assert spec.mount == {"name": name, "mountPath": "/home/jovyan/data", "readOnly": False}
    assert "lovelace" not in json.dumps(spec.objects) and "@" not in json.dumps(spec.objects)
    assert spec.pod_annotations == {} and spec.local_path is None


def test_volume_spec_read_only_and_uniqueness(backend: S3Storage, owner: UserRef) -> None:
    bucket = f"cmbtest-{owner.id[:10]}-0a1b2c3d"

    def spec(env: str, path: str = "/data", **kw: Any) -> Any:
        return backend.volume_spec(MountRequest(bucket=bucket, mount_path=path, user=owner, environment_id=env, **kw))

    ro = spec("env-1", read_only=True, uid=1001, gid=1001)
    pv = ro.objects[0]
    assert pv["spec"]["mountOptions"] == ["read-only", f"region {REGION}", "uid=1001", "gid=1001", "allow-other"]
    assert pv["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert ro.mount is not None and ro.mount["readOnly"] is True
    names = {spec(env, path).objects[0]["metadata"]["name"] for env in ("env-1", "env-2") for path in ("/a", "/b")}
    handles = {
        spec(env, path).objects[0]["spec"]["csi"]["volumeHandle"] for env in ("env-1", "env-2") for path in ("/a", "/b")
    }
    assert len(names) == 4 and len(handles) == 4
    assert spec("env-1").objects == spec("env-1").objects  # deterministic: re-applying is idempotent
    with pytest.raises(InvalidRequest):
        spec("env-1", subpath="../other")


def test_bucket_policy_grants_the_role_only(backend: S3Storage, owner: UserRef, s3: Any) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="shared"))
    identity = CloudIdentity(user=owner, principal=ROLE_ARN, service_account="cmb-user", namespace="cmbcluster")
    backend.ensure_bucket_access(info.name, identity)
    backend.ensure_bucket_access(info.name, identity)  # idempotent
    arn = f"arn:aws:s3:::{info.name}"
    assert json.loads(s3.get_bucket_policy(Bucket=info.name)["Policy"]) == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [arn, f"{arn}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            },
            {
                "Sid": "CmbclusterUserList",
                "Effect": "Allow",
                "Principal": {"AWS": ROLE_ARN},
                "Action": "s3:ListBucket",
                "Resource": arn,
            },
            {
                "Sid": "CmbclusterUserObjects",
                "Effect": "Allow",
                "Principal": {"AWS": ROLE_ARN},
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                "Resource": f"{arn}/*",
            },
        ],
    }
    for bad in ("*", "arn:aws:iam::123456789012:user/alice", "123456789012", ""):
        with pytest.raises(InvalidRequest):
            backend.ensure_bucket_access(info.name, CloudIdentity(user=owner, principal=bad))


def _refuse_principal(backend: S3Storage, monkeypatch: pytest.MonkeyPatch, times: int, code: str = "MalformedPolicy",
                      message: str = "Invalid principal in policy") -> list[float]:  # fmt: skip
    """S3 refusing a new role as a principal ``times`` times (IAM has not propagated it yet); the
    pauses the backend takes between tries are returned (the backend's clock is not really slept)."""
    real, calls = backend._client.put_bucket_policy, {"n": 0}
    pauses: list[float] = []

    def put_bucket_policy(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= times:
            raise ClientError({"Error": {"Code": code, "Message": message}}, "PutBucketPolicy")
        return real(**kwargs)

    monkeypatch.setattr(backend._client, "put_bucket_policy", put_bucket_policy)
    monkeypatch.setattr(time, "sleep", pauses.append)  # the one clock cmbcluster_aws.clients sleeps on
    return pauses


def test_a_new_role_refused_as_principal_is_retried_for_the_propagation_window(
    backend: S3Storage, owner: UserRef, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = backend.create_bucket(owner, BucketOptions(display_name="new user"))
    identity = CloudIdentity(user=owner, principal=ROLE_ARN, service_account="cmb-user", namespace="cmbcluster")
    pauses = _refuse_principal(backend, monkeypatch, times=3)
    backend.ensure_bucket_access(info.name, identity)  # IAM caught up on the fourth try
    assert pauses == [0.5, 1.0, 2.0]  # backing off
    assert ROLE_ARN in s3.get_bucket_policy(Bucket=info.name)["Policy"]


def test_a_principal_still_refused_after_the_window_is_reported(
    make_settings: Callable[..., AwsSettings], owner: UserRef, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = S3Storage(make_settings(), propagation_seconds=10)
    info = backend.create_bucket(owner, BucketOptions(display_name="never"))
    identity = CloudIdentity(user=owner, principal=ROLE_ARN, service_account="cmb-user", namespace="cmbcluster")
    pauses = _refuse_principal(backend, monkeypatch, times=100)
    with pytest.raises(InvalidRequest, match="Invalid principal"):
        backend.ensure_bucket_access(info.name, identity)
    assert sum(pauses) == pytest.approx(10)  # the whole window, not one second more
    # anything else is not IAM catching up: reported at once, never retried
    other = _refuse_principal(
        backend, monkeypatch, times=1, code="MalformedPolicy", message="Policy has invalid action"
    )
    with pytest.raises(InvalidRequest, match="invalid action"):
        backend.ensure_bucket_access(info.name, identity)
    assert other == []


# -- errors --------------------------------------------------------------------------------------
def test_missing_buckets_are_not_found_everywhere(backend: S3Storage, owner: UserRef) -> None:
    missing = f"cmbtest-missing-{uuid.uuid4().hex[:8]}"
    calls: list[Callable[[], object]] = [
        lambda: backend.bucket_usage(missing),
        lambda: backend.upload_object(missing, "k", [b"x"]),
        lambda: backend.download_object(missing, "k"),
        lambda: backend.head_object(missing, "k"),
        lambda: backend.delete_objects(missing, ["k"]),
        lambda: backend.ensure_bucket_access(missing, CloudIdentity(user=owner, principal=ROLE_ARN)),
        lambda: backend.get_bucket("Not_A/Valid..Name"),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            call()


def test_unreachable_endpoint_is_provider_unavailable_promptly(
    make_settings: Callable[..., AwsSettings], owner: UserRef
) -> None:
    backend = S3Storage(
        make_settings(endpoint_url="http://127.0.0.1:9"), max_attempts=1, connect_timeout=1, read_timeout=1
    )
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable):
        backend.check_ready()
    with pytest.raises(ProviderUnavailable):
        backend.create_bucket(owner, BucketOptions(display_name="x"))
    with pytest.raises(ProviderUnavailable):
        backend.list_objects("cmbtest-anything-00000000")
    assert time.monotonic() - started < 5
    backend.close()


def test_check_ready_against_moto(backend: S3Storage) -> None:
    backend.check_ready()


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("NoSuchBucket", 404, NotFound),
        ("NoSuchKey", 404, NotFound),
        ("404", 404, NotFound),
        ("BucketNotEmpty", 409, Conflict),
        ("PreconditionFailed", 412, Conflict),
        ("BucketAlreadyExists", 409, AlreadyExists),
        ("AccessDenied", 403, PermissionDenied),
        ("403", 403, PermissionDenied),
        ("InvalidRange", 416, InvalidRequest),
        ("InvalidArgument", 400, InvalidRequest),
        ("EntityTooLarge", 400, PayloadTooLarge),
        ("SlowDown", 503, ProviderUnavailable),
        ("Throttling", 400, ProviderUnavailable),
        ("InternalError", 500, ProviderUnavailable),
        ("SomethingNew", 502, ProviderUnavailable),
        ("SomethingNew", 400, InvalidRequest),
    ],
)
def test_error_mapping(code: str, status: int, expected: type[Exception]) -> None:
    exc = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")
    assert type(map_aws_error(exc, "thing")) is expected


def test_connection_errors_map_to_provider_unavailable() -> None:
    assert isinstance(map_aws_error(EndpointConnectionError(endpoint_url="http://x"), "x"), ProviderUnavailable)
    assert isinstance(map_aws_error(ReadTimeoutError(endpoint_url="http://x"), "x"), ProviderUnavailable)


def test_plugin_import_does_not_load_boto3() -> None:
    code = "import sys, cmbcluster_aws.plugin; sys.exit('boto3' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_part_size_is_validated(aws_settings: AwsSettings) -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3Storage(aws_settings, part_size=MiB)


def test_an_object_replaced_between_head_and_get_is_a_conflict(
    aws_settings: AwsSettings, owner: UserRef, s3: Any
) -> None:
    class StaleHead(_FailingClient):
        def head_object(self, **kwargs: Any) -> Any:
            head = dict(self._client.head_object(**kwargs))
            head["ETag"] = '"0123456789abcdef0123456789abcdef"'  # what it was before someone overwrote it
            return head

    backend = S3Storage(aws_settings, client=StaleHead(s3, failing=""))
    info = backend.create_bucket(owner, BucketOptions(display_name="race"))
    backend.upload_object(info.name, "x.txt", [b"new content"])
    with pytest.raises(Conflict):
        backend.download_object(info.name, "x.txt")


def test_the_plugin_factory_builds_s3_storage(aws_settings: AwsSettings) -> None:
    from cmbcluster.registrations import ProviderContext
    from cmbcluster.settings import CoreSettings
    from cmbcluster_aws import plugin

    (registration,) = list(plugin.cmbcluster_storage_backends())
    assert registration.name == "aws"
    core = CoreSettings(_env_file=None)  # type: ignore[call-arg]
    backend = registration.factory(ProviderContext(core=core, provider_settings=aws_settings))
    assert isinstance(backend, S3Storage)
    backend.check_ready()
    backend.close()


def test_parts_grow_so_large_objects_fit_in_10000_parts(aws_settings: AwsSettings) -> None:
    backend = S3Storage(aws_settings)
    sizes = [part_size(backend.part_size, n) for n in (1, 1000, 1001, 10_000)]
    assert sizes == [8 * MiB, 8 * MiB, 16 * MiB, 80 * MiB]
    assert sum(part_size(backend.part_size, n) for n in range(1, 10_001)) > 400 * 1024 * MiB
    with pytest.raises(PayloadTooLarge):
        part_size(backend.part_size, 10_001)


def test_s3_declares_s3s_own_bucket_name_rules(backend: S3Storage) -> None:
    """Names S3 takes (a dotted database bucket) are valid; those S3 reserves or refuses are not, and
    never reach botocore: such a bucket cannot exist."""
    rules = backend.bucket_names
    assert rules.problem("backups.example.org") is None and rules.problem("cmbcluster-eks-db-123456789012") is None
    for refused in ("xn--backups", "sthree-data", "data-s3alias", "data--ol-s3", "192.168.1.10", "a..b", "a_b"):
        assert rules.problem(refused) is not None, refused
        with pytest.raises(NotFound):
            backend.get_bucket(refused)


def test_a_bucket_prefix_s3_would_refuse_is_refused_when_the_backend_is_built(
    make_settings: Callable[..., AwsSettings],
) -> None:
    """At start and by `config check`, not at a user's first bucket."""
    with pytest.raises(ConfigurationError, match="S3_USER_BUCKET_PREFIX: bucket prefix 'xn--lab' makes bucket names"):
        S3Storage(make_settings(s3_user_bucket_prefix="xn--lab"))
