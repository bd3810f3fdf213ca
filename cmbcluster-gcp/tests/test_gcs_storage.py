"""GcsStorage against a real GCS emulator: the core storage contract, then what is GCS-specific."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
import tracemalloc
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import google.auth.exceptions
import pytest
import requests
from fastapi.testclient import TestClient
from google.api_core import exceptions as api_exceptions

import cmbcluster_gcp.uploads as gcs_uploads
from cmbcluster.app import create_app
from cmbcluster.errors import (
    ConfigurationError,
    Conflict,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    ProviderUnavailable,
)
from cmbcluster.interfaces import (
    BucketOptions,
    CloudIdentity,
    MountRequest,
    StorageBackend,
    StorageClass,
    UserRef,
)
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in, make_bucket
from cmbcluster.testing.storage import StorageContract
from cmbcluster_gcp.errors import error_for_status, translate_error
from cmbcluster_gcp.labels import decode_display_name, encode_display_name
from cmbcluster_gcp.settings import GcpSettings
from cmbcluster_gcp.storage import GcsStorage

MiB = 1024 * 1024
EmulatorApi = Callable[..., Any]
PRINCIPAL_A = (
    "principal://iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/"
    "cmbcluster-test.svc.id.goog/subject/ns/cmbcluster-users/sa/user-a"
)
PRINCIPAL_B = PRINCIPAL_A.removesuffix("user-a") + "user-b"


class TestGcsStorageContract(StorageContract):
    other_storage_class = StorageClass.INFREQUENT
    keeps_versions = False  # GCS keeps them, but the emulator keeps one version per object
    reports_md5 = True

    @pytest.fixture
    def storage_backend(self, gcs: GcsStorage) -> StorageBackend:
        return gcs

    @pytest.fixture
    def identity(self, owner: UserRef) -> CloudIdentity:
        return CloudIdentity(user=owner, principal=PRINCIPAL_A)

    @pytest.fixture
    def bucket(self, gcs: GcsStorage, owner: UserRef) -> str:
        # Left in place: the emulator is wiped after every test (see gcp_settings), and it refuses to
        # delete a bucket with an unfinished resumable upload, whose cancel it does not implement
        # (501); on GCS the session is cancelled (test_session_cancel_answers_are_checked).
        return gcs.create_bucket(owner, BucketOptions(display_name="Contract bucket")).name


@pytest.fixture
def owner() -> UserRef:
    return UserRef(id=uuid.uuid4().hex, email="ada.lovelace@example.org")


@pytest.fixture
def bucket(gcs: GcsStorage, owner: UserRef) -> str:
    # No clean-up needed: the emulator is wiped after every test (see gcp_settings).
    return gcs.create_bucket(owner, BucketOptions(display_name="GCS tests")).name


def raw_bucket(emulator_api: EmulatorApi, name: str) -> dict[str, Any]:
    result: dict[str, Any] = emulator_api(f"/storage/v1/b/{name}")
    return result


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# -- buckets ----------------------------------------------------------------------------------------
def test_new_bucket_is_private_versioned_and_labelled(
    gcs: GcsStorage, emulator_api: EmulatorApi, owner: UserRef
) -> None:
    info = gcs.create_bucket(owner, BucketOptions(display_name="Maps & spectra"))
    raw = raw_bucket(emulator_api, info.name)

    assert raw["iamConfiguration"]["uniformBucketLevelAccess"]["enabled"] is True
    assert raw["iamConfiguration"]["publicAccessPrevention"] == "enforced"
    assert raw["versioning"] == {"enabled": True}
    assert gcs.settings.noncurrent_versions_kept == 3 and gcs.settings.noncurrent_version_days == 30
    assert raw["lifecycle"] == {
        "rule": [
            {"action": {"type": "Delete"}, "condition": {"isLive": False, "daysSinceNoncurrentTime": 30}},
            {"action": {"type": "Delete"}, "condition": {"isLive": False, "numNewerVersions": 4}},
        ]
    }
    assert raw["storageClass"] == "STANDARD"
    labels = raw["labels"]
    assert labels["owner"] == owner.id
    assert labels["managed-by"] == "cmbcluster"
    assert labels["storage-class"] == "standard"
    assert decode_display_name(labels) == "Maps & spectra"
    assert "lovelace" not in str(raw)  # no personal data in the cloud resource

    assert info.name.startswith("cmbcluster-user-")
    assert info.versioning is True
    assert info.labels == {"owner": owner.id, "managed-by": "cmbcluster", "cmbcluster-deployment": "cmbcluster",
                           "storage-class": "standard"}  # fmt: skip


@pytest.mark.parametrize(
    ("portable", "gcs_class"),
    [(StorageClass.INFREQUENT, "NEARLINE"), (StorageClass.COLD, "COLDLINE"), (StorageClass.ARCHIVE, "ARCHIVE")],
)
def test_storage_classes_map_to_gcs(
    gcs: GcsStorage, emulator_api: EmulatorApi, owner: UserRef, portable: StorageClass, gcs_class: str
) -> None:
    info = gcs.create_bucket(owner, BucketOptions(display_name="cold data", storage_class=portable))
    assert raw_bucket(emulator_api, info.name)["storageClass"] == gcs_class
    assert gcs.get_bucket(info.name).storage_class == portable


def test_auto_storage_class_is_refused_before_creating_anything(gcs: GcsStorage, owner: UserRef) -> None:
    with pytest.raises(InvalidRequest):
        gcs.create_bucket(owner, BucketOptions(display_name="x", storage_class=StorageClass.AUTO))
    assert gcs.list_buckets(owner) == []


def test_no_lifecycle_rule_without_versioning_and_zero_days_keeps_no_versions(
    gcp_settings: GcpSettings, emulator_api: EmulatorApi, owner: UserRef, monkeypatch: pytest.MonkeyPatch
) -> None:
    unversioned = GcsStorage(gcp_settings).create_bucket(owner, BucketOptions(display_name="u", versioning=False))
    raw = raw_bucket(emulator_api, unversioned.name)
    assert raw["versioning"] == {"enabled": False}
    assert raw.get("lifecycle", {}).get("rule", []) == []
    assert unversioned.versioning is False

    keep_none = GcsStorage(gcp_settings.model_copy(update={"noncurrent_version_days": 0}))
    plain = keep_none.create_bucket(owner, BucketOptions(display_name="v"))
    raw = raw_bucket(emulator_api, plain.name)
    assert raw["versioning"] == {"enabled": False}  # an overwrite or a delete keeps nothing
    assert raw.get("lifecycle", {}).get("rule", []) == []

    # The age alone, without a count bound; and the one variable for both clouds.
    monkeypatch.setenv("NONCURRENT_VERSION_DAYS", "7")
    assert GcpSettings(project_id=gcp_settings.project_id).noncurrent_version_days == 7
    aged = GcsStorage(gcp_settings.model_copy(update={"noncurrent_version_days": 7, "noncurrent_versions_kept": 0}))
    raw = raw_bucket(emulator_api, aged.create_bucket(owner, BucketOptions(display_name="w")).name)
    assert raw["lifecycle"] == {
        "rule": [{"action": {"type": "Delete"}, "condition": {"isLive": False, "daysSinceNoncurrentTime": 7}}]
    }


@pytest.mark.parametrize(
    "display_name",
    ["", "x", "Données Planck 2018 — cartes & spectres ✓", "A" * 100, "🌌" * 100, "UPPER lower_-=+/\\ \t\"'"],
)
def test_display_names_round_trip_exactly(gcs: GcsStorage, owner: UserRef, display_name: str) -> None:
    labels = encode_display_name(display_name)
    assert all(len(v) <= 63 and v == v.lower() for v in labels.values())
    assert decode_display_name(labels) == display_name
    info = gcs.create_bucket(owner, BucketOptions(display_name=display_name))
    assert info.display_name == display_name
    assert gcs.get_bucket(info.name).display_name == display_name


def test_overlong_display_name_is_refused(gcs: GcsStorage, owner: UserRef) -> None:
    with pytest.raises(InvalidRequest):
        gcs.create_bucket(owner, BucketOptions(display_name="🌌" * 200))


def test_list_buckets_filters_by_prefix_owner_and_marker(
    gcs: GcsStorage, emulator_api: EmulatorApi, owner: UserRef, bucket: str
) -> None:
    # The emulator ignores list_buckets(prefix=): the filtering must happen in GcsStorage.
    owned_labels = {"owner": owner.id, "managed-by": "cmbcluster"}
    for name, labels in [
        (f"other-app-{uuid.uuid4().hex[:8]}", owned_labels),  # outside our prefix
        (f"cmbcluster-user-{uuid.uuid4().hex[:8]}", {"owner": owner.id}),  # not ours
    ]:
        emulator_api(f"/storage/v1/b?project={gcs.settings.project_id}", method="POST", body={"name": name})
        emulator_api(f"/storage/v1/b/{name}", method="PATCH", body={"labels": labels})
    second = gcs.create_bucket(owner, BucketOptions(display_name="second")).name

    assert [b.name for b in gcs.list_buckets(owner)] == [bucket, second]  # oldest first
    assert gcs.list_buckets(UserRef(id=uuid.uuid4().hex)) == []


def test_bucket_is_removed_when_configuring_it_fails(
    gcp_settings: GcpSettings, emulator_api: EmulatorApi, owner: UserRef
) -> None:
    forbidden: type[Exception] = api_exceptions.Forbidden

    class FailingPatch(GcsStorage):
        calls = 0

        def _configure(self, bucket: Any, *args: Any) -> None:
            super()._configure(bucket, *args)
            self.calls += 1
            if self.calls == 2:  # the PATCH after the create
                raise forbidden("storage.buckets.update denied")

    with pytest.raises(PermissionDenied):
        FailingPatch(gcp_settings).create_bucket(owner, BucketOptions(display_name="doomed"))
    assert emulator_api(f"/storage/v1/b?project={gcp_settings.project_id}").get("items", []) == []


def test_owner_id_must_fit_a_label(gcs: GcsStorage) -> None:
    with pytest.raises(InvalidRequest):
        gcs.create_bucket(UserRef(id="Not A Label!"), BucketOptions(display_name="x"))


def test_invalid_bucket_names_are_not_found(gcs: GcsStorage) -> None:
    for name in ["", "../etc", "UPPER", "a", "x/y", "cmb?x=1"]:
        with pytest.raises(NotFound):
            gcs.get_bucket(name)
        with pytest.raises(NotFound):
            gcs.list_objects(name)


def test_force_delete_removes_more_than_one_batch(gcs: GcsStorage, bucket: str) -> None:
    for i in range(130):
        gcs.upload_object(bucket, f"many/{i:03d}", [b"x"])
    assert gcs.bucket_usage(bucket).object_count == 130
    with pytest.raises(Conflict):
        gcs.delete_bucket(bucket)
    gcs.delete_bucket(bucket, force=True)
    with pytest.raises(NotFound):
        gcs.get_bucket(bucket)


# -- IAM ---------------------------------------------------------------------------------------------
def _bindings(emulator_api: EmulatorApi, bucket: str) -> dict[str, list[str]]:
    policy = emulator_api(f"/storage/v1/b/{bucket}/iam")
    return {b["role"]: sorted(b["members"]) for b in policy.get("bindings", [])}


def test_bucket_access_binds_only_the_given_principal(gcs: GcsStorage, emulator_api: EmulatorApi, bucket: str) -> None:
    emulator_api(
        f"/storage/v1/b/{bucket}/iam",
        method="PUT",
        body={
            "bindings": [
                {"role": "roles/storage.objectUser", "members": ["serviceAccount:old@example.iam.gserviceaccount.com"]},
                {"role": "roles/storage.objectViewer", "members": ["allUsers", "group:readers@example.org"]},
                {"role": "roles/storage.legacyBucketReader", "members": ["allAuthenticatedUsers"]},
                {"role": "roles/storage.admin", "members": ["serviceAccount:ops@example.iam.gserviceaccount.com"]},
            ]
        },
    )
    owner = UserRef(id="a")
    gcs.ensure_bucket_access(bucket, CloudIdentity(user=owner, principal=PRINCIPAL_A))
    assert _bindings(emulator_api, bucket) == {
        "roles/storage.objectUser": [PRINCIPAL_A],
        "roles/storage.objectViewer": ["group:readers@example.org"],
        "roles/storage.admin": ["serviceAccount:ops@example.iam.gserviceaccount.com"],
    }

    gcs.ensure_bucket_access(bucket, CloudIdentity(user=owner, principal=PRINCIPAL_A))  # idempotent
    assert _bindings(emulator_api, bucket)["roles/storage.objectUser"] == [PRINCIPAL_A]

    gcs.ensure_bucket_access(bucket, CloudIdentity(user=owner, principal=PRINCIPAL_B))  # replaces
    bindings = _bindings(emulator_api, bucket)
    assert bindings["roles/storage.objectUser"] == [PRINCIPAL_B]
    assert not any(m in {"allUsers", "allAuthenticatedUsers"} for ms in bindings.values() for m in ms)


def test_a_service_account_not_yet_known_is_granted_once_iam_has_propagated_it(
    gcs: GcsStorage, bucket: str, emulator_api: EmulatorApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's Google service account made moments ago (service-account mode) is refused as a member
    ("Invalid argument") until IAM has propagated it: retried for that window, then reported."""
    from google.cloud.storage import Bucket

    real, refusals = Bucket.set_iam_policy, {"left": 2}
    pauses: list[float] = []

    def set_iam_policy(self: Bucket, *args: Any, **kwargs: Any) -> Any:
        if refusals["left"]:
            refusals["left"] -= 1
            raise api_exceptions.BadRequest("Invalid argument.")  # type: ignore[no-untyped-call]
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Bucket, "set_iam_policy", set_iam_policy)
    monkeypatch.setattr(time, "sleep", pauses.append)
    member = "serviceAccount:cmbcluster-0123456789abcdefghi@cmbcluster-test.iam.gserviceaccount.com"
    gcs.ensure_bucket_access(bucket, CloudIdentity(user=UserRef(id="a"), principal=member))
    assert _bindings(emulator_api, bucket)["roles/storage.objectUser"] == [member]
    assert pauses == [1.0, 2.0]
    # a Workload Identity principal needs no propagation: its refusal is reported at once
    refusals["left"], pauses[:] = 1, []
    with pytest.raises(InvalidRequest, match="refused the request") as refused:
        gcs.ensure_bucket_access(bucket, CloudIdentity(user=UserRef(id="a"), principal=PRINCIPAL_A))
    assert "Invalid argument" in str(refused.value.detail) and pauses == []


@pytest.mark.parametrize(
    "principal", ["allUsers", "allAuthenticatedUsers", "", "user:someone@example.org", "principalSet://iam.x/y"]
)
def test_bucket_access_refuses_public_or_broad_members(gcs: GcsStorage, bucket: str, principal: str) -> None:
    with pytest.raises(InvalidRequest):
        gcs.ensure_bucket_access(bucket, CloudIdentity(user=UserRef(id="a"), principal=principal))


def test_bucket_access_on_missing_bucket_is_not_found(gcs: GcsStorage) -> None:
    with pytest.raises(NotFound):
        gcs.ensure_bucket_access(
            "cmbcluster-user-missing-0", CloudIdentity(user=UserRef(id="a"), principal=PRINCIPAL_A)
        )


# -- volumes -----------------------------------------------------------------------------------------
def test_volume_spec_is_an_inline_gcsfuse_csi_volume(gcs: GcsStorage, owner: UserRef) -> None:
    name = "cmbcluster-user-0123456789-abcdef01"
    spec = gcs.volume_spec(MountRequest(bucket=name, mount_path="/home/jovyan/data", user=owner, environment_id="e1"))
    assert spec.volume == {
        "name": f"gcs-{name}",
        "csi": {
            "driver": "gcsfuse.csi.storage.gke.io",
            "readOnly": False,
            "volumeAttributes": {
                "bucketName": name,
                "mountOptions": "implicit-dirs,uid=1000,gid=100,file-mode=0664,dir-mode=0775",
            },
        },
    }
    assert spec.mount == {"name": f"gcs-{name}", "mountPath": "/home/jovyan/data", "readOnly": False}
    assert spec.pod_annotations == {"gke-gcsfuse/volumes": "true"}
    assert spec.objects == [] and spec.local_path is None


def test_volume_spec_with_subpath_read_only_and_ids(gcs: GcsStorage, owner: UserRef) -> None:
    name = "cmbcluster-user-0123456789-abcdef01"
    spec = gcs.volume_spec(
        MountRequest(
            bucket=name,
            mount_path="/data/maps",
            user=owner,
            environment_id="e1",
            uid=1001,
            gid=1002,
            read_only=True,
            subpath="maps/planck",
        )
    )
    assert spec.volume is not None and spec.mount is not None
    assert spec.volume["csi"]["readOnly"] is True
    assert spec.volume["csi"]["volumeAttributes"] == {
        "bucketName": name,
        "mountOptions": "implicit-dirs,uid=1001,gid=1002,file-mode=0664,dir-mode=0775,only-dir=maps/planck",
    }
    assert spec.mount["readOnly"] is True
    assert spec.mount["name"] == spec.volume["name"]
    assert len(spec.volume["name"]) <= 63
    whole = gcs.volume_spec(MountRequest(bucket=name, mount_path="/data", user=owner, environment_id="e1"))
    assert whole.volume is not None and whole.volume["name"] != spec.volume["name"]  # both fit in one pod


@pytest.mark.parametrize("subpath", ["a,uid=0", "a=b", "../up", "a//b"])
def test_volume_spec_refuses_subpaths_that_would_inject_options(gcs: GcsStorage, owner: UserRef, subpath: str) -> None:
    with pytest.raises(InvalidRequest):
        gcs.volume_spec(
            MountRequest(
                bucket="cmbcluster-user-x-1", mount_path="/data", user=owner, environment_id="e", subpath=subpath
            )
        )


# -- objects -----------------------------------------------------------------------------------------
def test_twenty_mib_streamed_in_one_mib_chunks_round_trips(gcs: GcsStorage, bucket: str) -> None:
    data = os.urandom(20 * MiB + 321)
    info = gcs.upload_object(bucket, "maps/big.fits", chunks_of(data, MiB))
    assert info.size == len(data)
    digest = hashlib.sha256()
    total = 0
    for chunk in gcs.download_object(bucket, "maps/big.fits", chunk_size=MiB):
        assert 0 < len(chunk) <= MiB
        digest.update(chunk)
        total += len(chunk)
    assert total == len(data)
    assert digest.digest() == hashlib.sha256(data).digest()
    # A range across the internal 8 MiB fetch boundary, in odd-sized pieces.
    first, last = 8 * MiB - 1000, 9 * MiB + 17
    pieces = list(gcs.download_object(bucket, "maps/big.fits", byte_range=(first, last), chunk_size=300_000))
    assert all(len(p) <= 300_000 for p in pieces)
    assert b"".join(pieces) == data[first : last + 1]


@pytest.mark.parametrize(
    ("size", "piece"),
    [(8 * MiB - 1, MiB), (8 * MiB, MiB), (8 * MiB + 1, MiB), (16 * MiB, 3 * MiB), (17 * MiB, 17 * MiB)],
)
def test_uploads_around_the_chunk_boundary(gcs: GcsStorage, bucket: str, size: int, piece: int) -> None:
    data = os.urandom(size)
    assert gcs.upload_object(bucket, "edge.bin", chunks_of(data, piece)).size == size
    assert b"".join(gcs.download_object(bucket, "edge.bin", chunk_size=4 * MiB)) == data


def test_an_object_of_up_to_8_mib_goes_up_in_one_request_in_little_memory(
    gcs: GcsStorage, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request stores an object of a few MiB (not a session, pieces and a read back), streamed
    from a spool that keeps at most 1 MiB in memory; a request GCS fails is sent again whole."""
    http = gcs._client._http
    sent: list[str] = []
    unavailable = [False]  # the next upload request is answered 503 (GCS's own retryable answer)
    request = http.request

    def counting(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(f"{method} {urllib.parse.urlsplit(url).path}")
        if unavailable[0] and "/upload/" in url:
            unavailable[0] = False
            answer = requests.Response()
            answer.status_code = 503
            return answer
        return request(method, url, *args, **kwargs)

    monkeypatch.setattr(http, "request", counting)
    monkeypatch.setattr("time.sleep", lambda _s: None)
    for size in (5 * MiB + 7, 8 * MiB):
        data = os.urandom(size)
        sent.clear()
        tracemalloc.start()
        try:
            info = gcs.upload_object(bucket, "few.bin", chunks_of(data, MiB))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert sent == [f"POST /upload/storage/v1/b/{bucket}/o"]
        assert info.size == size and info.md5 == hashlib.md5(data, usedforsecurity=False).hexdigest()
        assert peak < 5 * MiB, peak  # the source's chunks and 1 MiB of spool, never the object
        assert b"".join(gcs.download_object(bucket, "few.bin")) == data
    unavailable[0] = True
    sent.clear()
    assert gcs.upload_object(bucket, "again.bin", [b"a" * 3 * MiB]).size == 3 * MiB
    assert len(sent) == 2 and b"".join(gcs.download_object(bucket, "again.bin")) == b"a" * 3 * MiB


def test_an_upload_through_the_api_larger_than_one_request_reaches_gcs_whole(
    gcp_settings: GcpSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The API hands the backend an iterator fed from the event loop, which the resumable upload
    # reads from its own read-ahead thread: a 20 MiB file answered 500 so (found seeding a migration).
    monkeypatch.setenv("PROJECT_ID", gcp_settings.project_id)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", str(gcp_settings.storage_emulator_host))
    core = CoreSettings(
        data_dir=tmp_path / "data", storage_backend="gcp", compute_backend="local", infra_provider="local",
        auth_providers=["local"],
    )  # fmt: skip
    data = os.urandom(20 * MiB + 5)
    with TestClient(create_app(core), base_url=LOCAL) as client:
        headers = dev_sign_in(client, "ada@example.org")
        storage = make_bucket(client, headers, {"maps/big.fits": chunks_of(data, MiB)})
        answer = client.get(f"/api/v1/storages/{storage}/objects/maps/big.fits", headers=headers)
    assert answer.status_code == 200
    assert hashlib.sha256(answer.content).digest() == hashlib.sha256(data).digest()


def test_upload_and_download_run_in_constant_memory(gcs: GcsStorage, bucket: str) -> None:
    size = 96 * MiB
    block = os.urandom(MiB)

    def source() -> Iterator[bytes]:
        for _ in range(size // MiB):
            yield block

    tracemalloc.start()
    try:
        gcs.upload_object(bucket, "big.bin", source())
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        received = sum(len(chunk) for chunk in gcs.download_object(bucket, "big.bin", chunk_size=MiB))
        _, download_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == size
    # A few 8 MiB upload chunks or download fetches at a time, never the 96 MiB object.
    assert upload_peak < 40 * MiB, upload_peak
    assert download_peak < 30 * MiB, download_peak


def test_failed_large_upload_leaves_no_object(gcs: GcsStorage, bucket: str) -> None:
    gcs.upload_object(bucket, "precious.bin", [b"keep me"])
    failure = ConnectionResetError("client went away")

    def broken() -> Iterator[bytes]:
        for _ in range(10):  # more than one 8 MiB upload chunk: the resumable session has started
            yield b"p" * MiB
        raise failure

    for key in ["precious.bin", "new.bin"]:
        with pytest.raises(ConnectionResetError) as caught:
            gcs.upload_object(bucket, key, broken())
        assert caught.value is failure
    assert b"".join(gcs.download_object(bucket, "precious.bin")) == b"keep me"
    with pytest.raises(NotFound):
        gcs.head_object(bucket, "new.bin")
    assert [o.key for o in gcs.list_objects(bucket).objects] == ["precious.bin"]


def test_content_type_is_kept_or_guessed(gcs: GcsStorage, bucket: str) -> None:
    assert gcs.upload_object(bucket, "t.txt", [b"x"]).content_type == "text/plain"
    assert gcs.upload_object(bucket, "t.bin", [b"x"], content_type="application/x-cmb").content_type == (
        "application/x-cmb"
    )
    assert gcs.upload_object(bucket, "noext", [b"x"]).content_type == "application/octet-stream"


def test_unsatisfiable_range_is_invalid(gcs: GcsStorage, bucket: str) -> None:
    gcs.upload_object(bucket, "r.txt", [b"0123456789"])
    for byte_range in [(10, None), (5, 2), (-1, 3)]:
        with pytest.raises(InvalidRequest):
            gcs.download_object(bucket, "r.txt", byte_range=byte_range)
    assert b"".join(gcs.download_object(bucket, "r.txt", byte_range=(8, 100))) == b"89"


def test_missing_bucket_is_not_found_for_objects(gcs: GcsStorage) -> None:
    missing = "cmbcluster-user-missing-1"
    with pytest.raises(NotFound):
        gcs.download_object(missing, "a.txt")
    with pytest.raises(NotFound):
        gcs.upload_object(missing, "small.txt", [b"x"])
    with pytest.raises(NotFound):
        gcs.upload_object(missing, "large.bin", chunks_of(b"x" * 9 * MiB, MiB))
    with pytest.raises(NotFound):
        gcs.bucket_usage(missing)


def test_pages_mix_folders_and_objects_in_key_order(gcs: GcsStorage, bucket: str) -> None:
    keys = ["a.txt", "b/1", "c.txt", "d/1", "d/2", "e.txt", "f/x/y"]
    for key in keys:
        gcs.upload_object(bucket, key, [b"."])
    seen: list[str] = []
    token = None
    while True:
        page = gcs.list_objects(bucket, page_token=token, page_size=2)
        assert len(page.objects) + len(page.prefixes) <= 2
        seen += [o.key for o in page.objects] + page.prefixes
        token = page.next_token
        if token is None:
            break
    assert seen == ["a.txt", "b/", "c.txt", "d/", "e.txt", "f/"]


def test_bad_page_token_and_page_size_are_invalid(gcs: GcsStorage, bucket: str) -> None:
    for token in ["not base64 !", "eyJ4IjoxfQ"]:
        with pytest.raises(InvalidRequest):
            gcs.list_objects(bucket, page_token=token)
    for size in [0, 10_001]:
        with pytest.raises(InvalidRequest):
            gcs.list_objects(bucket, page_size=size)


def test_delete_objects_in_several_batches(gcs: GcsStorage, bucket: str) -> None:
    keys = [f"k/{i:03d}" for i in range(120)]
    for key in keys:
        gcs.upload_object(bucket, key, [b"."])
    gcs.upload_object(bucket, "keep", [b"."])
    gcs.delete_objects(bucket, [*keys, "k/missing", keys[0]])
    assert [o.key for o in gcs.list_objects(bucket, delimiter=None).objects] == ["keep"]
    with pytest.raises(InvalidRequest):
        gcs.delete_objects(bucket, ["ok", "../bad"])
    assert gcs.head_object(bucket, "keep").size == 1  # nothing deleted when one key is unsafe


def test_delete_objects_in_missing_bucket_is_not_found(gcs: GcsStorage) -> None:
    with pytest.raises(NotFound):
        gcs.delete_objects("cmbcluster-user-missing-2", ["a"])


# -- availability and errors ---------------------------------------------------------------------------
def test_ready_against_the_emulator(gcs: GcsStorage) -> None:
    gcs.check_ready()


def test_unreachable_service_is_provider_unavailable_quickly() -> None:
    settings = GcpSettings(project_id="cmbcluster-test", storage_emulator_host="http://127.0.0.1:9")
    backend = GcsStorage(settings, retry_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable):
        backend.check_ready()
    assert time.monotonic() - started < 5
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable):
        backend.get_bucket("cmbcluster-user-anything-1")
    with pytest.raises(ProviderUnavailable):
        list(backend.download_object("cmbcluster-user-anything-1", "a"))
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("error_type", "expected"),
    [
        (api_exceptions.NotFound, NotFound),
        (api_exceptions.Conflict, Conflict),
        (api_exceptions.PreconditionFailed, Conflict),
        (api_exceptions.Forbidden, PermissionDenied),
        (api_exceptions.Unauthorized, ProviderUnavailable),
        (api_exceptions.BadRequest, InvalidRequest),
        (api_exceptions.RequestRangeNotSatisfiable, InvalidRequest),
        (api_exceptions.TooManyRequests, LimitExceeded),
        (api_exceptions.ServiceUnavailable, ProviderUnavailable),
        (api_exceptions.InternalServerError, ProviderUnavailable),
        (api_exceptions.RetryError, ProviderUnavailable),
        (requests.ConnectionError, ProviderUnavailable),
        (requests.Timeout, ProviderUnavailable),
        (google.auth.exceptions.TransportError, ProviderUnavailable),
        (google.auth.exceptions.RefreshError, ProviderUnavailable),
    ],
)
def test_google_errors_map_to_typed_errors(error_type: type[Exception], expected: type[Exception]) -> None:
    error = error_type("message", Exception("cause"))
    assert isinstance(translate_error(error, "bucket x"), expected)


def test_rate_limit_carries_retry_after() -> None:
    response = requests.Response()
    response.status_code = 429
    response.headers["Retry-After"] = "7"
    mapped = error_for_status(429, "bucket x", response=response)
    assert isinstance(mapped, LimitExceeded) and mapped.retry_after == 7


def test_other_errors_are_not_translated() -> None:
    assert translate_error(KeyError("x"), "bucket x") is None


def test_quoted_keys_reach_the_right_object(gcs: GcsStorage, bucket: str, emulator_api: EmulatorApi) -> None:
    key = "spectra/été 2024 #1?.txt"
    gcs.upload_object(bucket, key, [b"ok"])
    raw = emulator_api(f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}")
    assert raw["name"] == key and raw["size"] == "2"


# -- noncurrent versions and unfinished uploads ----------------------------------------------------
def test_usage_counts_current_objects_on_the_emulator(gcs: GcsStorage, bucket: str) -> None:
    """The emulator keeps one version per object (no noncurrent ones): what is current is all it holds."""
    gcs.upload_object(bucket, "map.fits", [b"a" * 4000])
    gcs.upload_object(bucket, "map.fits", [b"b" * 400])
    gcs.upload_object(bucket, "gone.txt", [b"g" * 10])
    gcs.delete_objects(bucket, ["gone.txt"])
    usage = gcs.bucket_usage(bucket)
    assert (usage.size_bytes, usage.object_count, usage.noncurrent_bytes, usage.noncurrent_count) == (400, 1, 0, 0)


class _Generation:
    def __init__(self, size: int, noncurrent: bool) -> None:
        self.size = size
        self.time_deleted = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) if noncurrent else None


def test_usage_reports_noncurrent_generations_beside_live_ones(gcs: GcsStorage, bucket: str) -> None:
    """What GCS lists for a bucket after three overwrites and a delete of a 4 MiB object and two writes
    of another, as google-cloud-storage returns it (the emulator keeps no old generations): every
    generation is billed, and the noncurrent ones carry timeDeleted."""
    asked: dict[str, Any] = {}
    generations = [_Generation(4 * MiB, noncurrent=True) for _ in range(4)]
    generations += [_Generation(1000, noncurrent=True), _Generation(100, noncurrent=False)]

    def list_blobs(ref: Any, **kwargs: Any) -> list[_Generation]:
        asked.update(kwargs, bucket=ref.name)
        return generations

    gcs._client.list_blobs = list_blobs
    usage = gcs.bucket_usage(bucket)
    assert asked["versions"] is True and asked["bucket"] == bucket
    assert "timeDeleted" in asked["fields"]
    assert (usage.size_bytes, usage.object_count) == (100, 1)
    assert (usage.noncurrent_bytes, usage.noncurrent_count) == (16 * MiB + 1000, 5)
    assert usage.billed_bytes == 16 * MiB + 1100


class _SessionHttp:
    """Answers to DELETE on a resumable session, in order (the emulator cannot cancel sessions)."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    def delete(self, url: str, timeout: float) -> Any:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        response = requests.Response()
        response.status_code = answer
        response._content = b"denied" if answer == 403 else b""
        return response


@pytest.mark.parametrize(
    ("answers", "cancelled", "calls"),
    [
        ((499,), True, 1),  # GCS's answer to a cancelled session
        ((404,), True, 1),  # already gone
        ((503, 499), True, 2),  # retried
        ((403,), False, 1),  # not retried, reported
        ((requests.ConnectionError("down"),) * 3, False, 3),
    ],
)
def test_session_cancel_answers_are_checked(
    answers: tuple[int | Exception, ...], cancelled: bool, calls: int, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr("time.sleep", lambda _s: None)
    http = _SessionHttp(*answers)
    assert gcs_uploads._cancel_session(http, "https://upload/session", "object a.bin") is cancelled
    assert http.calls == calls
    warned = [r.getMessage() for r in caplog.records if "could not cancel" in r.getMessage()]
    assert bool(warned) is not cancelled
    if answers == (403,):
        assert "HTTP 403 denied" in warned[0]


def test_gcs_declares_cloud_storages_own_bucket_name_rules(gcs: GcsStorage) -> None:
    rules = gcs.bucket_names
    assert rules.problem("backups.example.org") is None and rules.problem("lab_backups") is None
    assert rules.problem("a" * 63 + "." + "b" * 63) is None  # dotted names may be longer than 63
    for refused in ("a" * 64, "google-lab", "goog-lab", "lab-g00gle", "192.168.1.10", "-lab", "Lab"):
        assert rules.problem(refused) is not None, refused
        with pytest.raises(NotFound):
            gcs.get_bucket(refused)


def test_a_bucket_prefix_cloud_storage_would_refuse_is_refused_when_the_backend_is_built(
    gcp_settings: GcpSettings,
) -> None:
    """At start and by `config check`, not at a user's first bucket."""
    with pytest.raises(ConfigurationError, match="GCS_USER_BUCKET_PREFIX: bucket prefix 'google-lab' makes bucket"):
        GcsStorage(gcp_settings.model_copy(update={"user_bucket_prefix": "google-lab"}))
