"""The storage contract: what every :class:`~cmbcluster.interfaces.StorageBackend` must do.

Provide a ``storage_backend`` fixture in a subclass; every test creates its own buckets and
deletes them (``force=True``) at the end, so the suite can run against a shared server.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import mimetypes
import os
import time
import uuid
from collections.abc import Iterator

import pytest

from cmbcluster.errors import Conflict, InvalidRequest, NotFound
from cmbcluster.interfaces import (
    BucketOptions,
    CloudIdentity,
    MountRequest,
    StorageBackend,
    StorageClass,
    UserRef,
)
from cmbcluster.interfaces.storage import MAX_PAGE_SIZE

MiB = 1024 * 1024


def _chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _missing(storage: StorageBackend) -> str:
    """A bucket name valid under the backend's rules that no bucket has."""
    return storage.bucket_names.new_name("cmb-missing", uuid.uuid4().hex)


class StorageContract:
    """Subclass and provide ``storage_backend``; set ``other_storage_class`` to one class it supports."""

    #: A storage class the backend supports besides STANDARD, or None.
    other_storage_class: StorageClass | None = None
    #: Whether new buckets keep earlier versions of overwritten and deleted objects (S3 and GCS do,
    #: by default); their bytes must then be reported as noncurrent usage.
    keeps_versions: bool = False
    #: Whether ``BucketOptions.versioning`` can turn versioning on (else it must be refused: InvalidRequest).
    supports_versioning: bool = True
    #: Whether the ``content_type`` given at upload is kept (else it is guessed from the key).
    keeps_content_type: bool = True
    #: Seconds between bucket creations for the "oldest first" check: a service whose creation
    #: times have whole seconds needs more than one.
    creation_time_resolution: float = 0.0
    #: Whether the backend reports the MD5 the service computed of an object's bytes
    #: (``ObjectInfo.md5``) for objects up to a few MiB. Leaving it False is always allowed: a
    #: backend that reports None makes the migration read objects back to verify them. Any MD5
    #: reported must be right.
    reports_md5: bool = False

    @pytest.fixture
    def storage_backend(self) -> StorageBackend:
        raise NotImplementedError("provide a storage_backend fixture in your subclass")

    @pytest.fixture
    def owner(self) -> UserRef:
        return UserRef(id=uuid.uuid4().hex, email="ada.lovelace@example.org")

    @pytest.fixture
    def identity(self, owner: UserRef) -> CloudIdentity:
        """A cloud identity of ``owner`` in the form your backend grants to (an IAM role ARN, a principal)."""
        return CloudIdentity(user=owner, principal=f"user:{owner.id}")

    @pytest.fixture
    def bucket(self, storage_backend: StorageBackend, owner: UserRef) -> Iterator[str]:
        info = storage_backend.create_bucket(owner, BucketOptions(display_name="Contract bucket"))
        yield info.name
        try:
            storage_backend.delete_bucket(info.name, force=True)
        except NotFound:
            pass

    # -- buckets -----------------------------------------------------------------------------
    def test_create_bucket_reports_owner_and_options(self, storage_backend: StorageBackend, owner: UserRef) -> None:
        info = storage_backend.create_bucket(owner, BucketOptions(display_name="Maps & spectra"))
        try:
            assert info.owner_id == owner.id
            assert info.display_name == "Maps & spectra"
            assert info.storage_class == StorageClass.STANDARD
            fetched = storage_backend.get_bucket(info.name)
            assert (fetched.name, fetched.owner_id, fetched.display_name) == (info.name, owner.id, "Maps & spectra")
        finally:
            storage_backend.delete_bucket(info.name, force=True)

    def test_bucket_names_are_valid_unique_and_anonymous(self, storage_backend: StorageBackend, owner: UserRef) -> None:
        a = storage_backend.create_bucket(owner, BucketOptions(display_name="same"))
        b = storage_backend.create_bucket(owner, BucketOptions(display_name="same"))
        try:
            assert a.name != b.name
            for name in (a.name, b.name):
                # made under the rules the backend declares, which core checks configured names against
                assert storage_backend.bucket_names.problem(name) is None, name
                assert "lovelace" not in name and "@" not in name
        finally:
            storage_backend.delete_bucket(a.name, force=True)
            storage_backend.delete_bucket(b.name, force=True)

    def test_bucket_name_rules_are_self_consistent(self, storage_backend: StorageBackend) -> None:
        rules = storage_backend.bucket_names
        assert rules.description and 1 <= rules.min_length <= rules.max_length
        assert rules.prefix_problem("cmb") is None
        made = [rules.new_name("cmb", user) for user in (uuid.uuid4().hex, "u1", "Ada.L@x", "9" * 40) for _ in range(5)]
        assert len(set(made)) == len(made)
        for name in made:
            assert rules.problem(name) is None and rules.check(name) == name, name
        # what core relies on of every bucket name: safe as a file name, in a path, in a Kubernetes object
        for bad in ("", "x" * (rules.max_length + 1), "Maps", "a/b", "a b", "..", "a@b.org", "-ab", "ab-"):
            assert rules.problem(bad) is not None, bad
            with pytest.raises(InvalidRequest):
                rules.check(bad)
        for prefix in ("-", "Bad Prefix"):
            assert rules.prefix_problem(prefix) is not None
            with pytest.raises(InvalidRequest):
                rules.new_name(prefix, uuid.uuid4().hex)

    def test_list_buckets_is_per_owner(self, storage_backend: StorageBackend, owner: UserRef, bucket: str) -> None:
        other = UserRef(id=uuid.uuid4().hex)
        assert bucket in [b.name for b in storage_backend.list_buckets(owner)]
        assert bucket not in [b.name for b in storage_backend.list_buckets(other)]

    def test_unknown_bucket_is_not_found(self, storage_backend: StorageBackend) -> None:
        missing = _missing(storage_backend)  # a name the backend's rules make: valid there, and free
        with pytest.raises(NotFound):
            storage_backend.get_bucket(missing)
        with pytest.raises(NotFound):
            storage_backend.list_objects(missing)
        with pytest.raises(NotFound):
            storage_backend.delete_bucket(missing)

    def test_other_storage_class(self, storage_backend: StorageBackend, owner: UserRef) -> None:
        if self.other_storage_class is None:
            with pytest.raises(InvalidRequest):
                storage_backend.create_bucket(owner, BucketOptions(display_name="x", storage_class=StorageClass.COLD))
            return
        info = storage_backend.create_bucket(
            owner, BucketOptions(display_name="x", storage_class=self.other_storage_class)
        )
        try:
            assert storage_backend.get_bucket(info.name).storage_class == self.other_storage_class
        finally:
            storage_backend.delete_bucket(info.name, force=True)

    def test_list_buckets_is_oldest_first(self, storage_backend: StorageBackend, owner: UserRef) -> None:
        made = []
        try:
            for i in range(3):
                if i:
                    time.sleep(self.creation_time_resolution)
                made.append(storage_backend.create_bucket(owner, BucketOptions(display_name=f"b{i}")).name)
            assert [b.name for b in storage_backend.list_buckets(owner)] == made
        finally:
            for name in made:
                storage_backend.delete_bucket(name, force=True)

    def test_versioning_as_asked(self, storage_backend: StorageBackend, owner: UserRef) -> None:
        plain = storage_backend.create_bucket(owner, BucketOptions(display_name="plain", versioning=False))
        try:
            assert storage_backend.get_bucket(plain.name).versioning is False
            storage_backend.upload_object(plain.name, "v", [b"1"])
            storage_backend.upload_object(plain.name, "v", [b"22"])
            assert storage_backend.bucket_usage(plain.name).noncurrent_count == 0
        finally:
            storage_backend.delete_bucket(plain.name, force=True)
        if not self.supports_versioning:
            with pytest.raises(InvalidRequest):
                storage_backend.create_bucket(owner, BucketOptions(display_name="kept", versioning=True))
            return
        kept = storage_backend.create_bucket(owner, BucketOptions(display_name="kept", versioning=True))
        try:
            assert kept.versioning is True and storage_backend.get_bucket(kept.name).versioning is True
            storage_backend.upload_object(kept.name, "v", [b"1"])
            storage_backend.upload_object(kept.name, "v", [b"22"])
            assert storage_backend.bucket_usage(kept.name).noncurrent_count == (1 if self.keeps_versions else 0)
        finally:
            storage_backend.delete_bucket(kept.name, force=True)

    def test_ensure_bucket_access_is_idempotent(
        self, storage_backend: StorageBackend, bucket: str, identity: CloudIdentity
    ) -> None:
        storage_backend.ensure_bucket_access(bucket, identity)
        storage_backend.ensure_bucket_access(bucket, identity)  # a start after a start: no error, no duplicate
        with pytest.raises(NotFound):
            storage_backend.ensure_bucket_access(_missing(storage_backend), identity)

    def test_check_ready_and_close(self, storage_backend: StorageBackend) -> None:
        storage_backend.check_ready()
        storage_backend.close()
        storage_backend.close()  # closing twice is harmless (the control plane and a CLI command may both)

    def test_delete_non_empty_bucket_needs_force(self, storage_backend: StorageBackend, owner: UserRef) -> None:
        info = storage_backend.create_bucket(owner, BucketOptions(display_name="to delete"))
        storage_backend.upload_object(info.name, "keep/me.txt", [b"data"])
        with pytest.raises(Conflict):
            storage_backend.delete_bucket(info.name)
        assert storage_backend.head_object(info.name, "keep/me.txt").size == 4  # nothing was lost
        storage_backend.delete_bucket(info.name, force=True)
        with pytest.raises(NotFound):
            storage_backend.get_bucket(info.name)

    def test_usage_counts_objects_and_bytes(self, storage_backend: StorageBackend, bucket: str) -> None:
        storage_backend.upload_object(bucket, "a.bin", [b"x" * 1000])
        storage_backend.upload_object(bucket, "dir/b.bin", [b"y" * 24])
        usage = storage_backend.bucket_usage(bucket)
        assert (usage.size_bytes, usage.object_count) == (1024, 2)

    def test_usage_reports_noncurrent_versions_beside_current_objects(
        self, storage_backend: StorageBackend, bucket: str
    ) -> None:
        storage_backend.upload_object(bucket, "v.bin", [b"1" * 1000])
        storage_backend.upload_object(bucket, "v.bin", [b"2" * 10])
        storage_backend.upload_object(bucket, "gone.bin", [b"3" * 5])
        storage_backend.delete_objects(bucket, ["gone.bin"])
        usage = storage_backend.bucket_usage(bucket)
        assert (usage.size_bytes, usage.object_count) == (10, 1)
        expected = (1005, 2) if self.keeps_versions else (0, 0)
        assert (usage.noncurrent_bytes, usage.noncurrent_count) == expected
        assert usage.billed_bytes == 10 + expected[0]

    def test_abort_unfinished_uploads_leaves_finished_objects(
        self, storage_backend: StorageBackend, bucket: str
    ) -> None:
        storage_backend.upload_object(bucket, "done.bin", [b"d" * 100])

        def broken() -> Iterator[bytes]:
            yield b"p" * (6 * MiB)
            raise ConnectionResetError("server killed")

        with pytest.raises(ConnectionResetError):
            storage_backend.upload_object(bucket, "half.bin", broken())
        later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
        aborted = storage_backend.abort_unfinished_uploads(bucket, key="half.bin", started_before=later)
        assert isinstance(aborted, int) and aborted >= 0
        assert storage_backend.abort_unfinished_uploads(bucket, started_before=later) >= 0
        assert b"".join(storage_backend.download_object(bucket, "done.bin")) == b"d" * 100
        with pytest.raises(NotFound):
            storage_backend.head_object(bucket, "half.bin")

    def test_volume_spec_mounts_the_bucket(
        self, storage_backend: StorageBackend, owner: UserRef, bucket: str, identity: CloudIdentity
    ) -> None:
        # as the user's cloud identity (what core passes when the infra provider gives one), or none
        for as_whom in (identity, None):
            request = MountRequest(
                bucket=bucket,
                mount_path="/home/user/data",
                user=owner,
                environment_id=uuid.uuid4().hex,
                identity=as_whom,
            )
            spec = storage_backend.volume_spec(request)
            assert spec.local_path is not None or (spec.volume is not None and spec.mount is not None)
            if spec.mount is not None:
                assert spec.mount["mountPath"] == "/home/user/data"

    # -- objects -----------------------------------------------------------------------------
    def test_streamed_round_trip(self, storage_backend: StorageBackend, bucket: str) -> None:
        data = os.urandom(3 * MiB + 12345)
        info = storage_backend.upload_object(bucket, "maps/planck.fits", _chunks(data), content_type="application/fits")
        assert info.size == len(data)
        assert storage_backend.head_object(bucket, "maps/planck.fits").size == len(data)
        received = hashlib.sha256()
        count = 0
        for chunk in storage_backend.download_object(bucket, "maps/planck.fits", chunk_size=MiB):
            assert len(chunk) <= MiB
            received.update(chunk)
            count += len(chunk)
        assert count == len(data)
        assert received.digest() == hashlib.sha256(data).digest()

    def test_a_reported_md5_is_the_md5_of_the_bytes(self, storage_backend: StorageBackend, bucket: str) -> None:
        objects = {"empty": b"", "one.txt": b"one request", "a/streamed.bin": os.urandom(3 * MiB + 7)}
        for key, data in objects.items():
            uploaded = storage_backend.upload_object(bucket, key, _chunks(data))
            listed = [o for o in storage_backend.list_objects(bucket, key, delimiter=None).objects if o.key == key]
            reported = {
                "upload": uploaded.md5, "head": storage_backend.head_object(bucket, key).md5, "listing": listed[0].md5
            }  # fmt: skip
            want = hashlib.md5(data, usedforsecurity=False).hexdigest()
            for where, md5 in reported.items():
                assert md5 is None or md5 == want, f"{key}: {where} reports MD5 {md5}, the bytes' is {want}"
                if self.reports_md5:
                    assert md5 == want, f"{key}: {where} reports no MD5 (reports_md5 is set)"

    def test_zero_byte_and_unicode_keys(self, storage_backend: StorageBackend, bucket: str) -> None:
        storage_backend.upload_object(bucket, "empty", [])
        storage_backend.upload_object(bucket, "spectra/été 2024.txt", [b"ok"])
        assert storage_backend.head_object(bucket, "empty").size == 0
        assert b"".join(storage_backend.download_object(bucket, "empty")) == b""
        assert b"".join(storage_backend.download_object(bucket, "spectra/été 2024.txt")) == b"ok"

    def test_ranged_download(self, storage_backend: StorageBackend, bucket: str) -> None:
        storage_backend.upload_object(bucket, "r.txt", [b"0123456789"])
        assert b"".join(storage_backend.download_object(bucket, "r.txt", byte_range=(2, 5))) == b"2345"
        assert b"".join(storage_backend.download_object(bucket, "r.txt", byte_range=(7, None))) == b"789"

    def test_unsatisfiable_ranges_are_refused(self, storage_backend: StorageBackend, bucket: str) -> None:
        storage_backend.upload_object(bucket, "r.txt", [b"0123456789"])
        for byte_range in ((10, None), (5, 2), (-1, 3)):
            with pytest.raises(InvalidRequest):
                b"".join(storage_backend.download_object(bucket, "r.txt", byte_range=byte_range))
        assert b"".join(storage_backend.download_object(bucket, "r.txt", byte_range=(8, 100))) == b"89"

    def test_content_type_survives_a_round_trip(self, storage_backend: StorageBackend, bucket: str) -> None:
        storage_backend.upload_object(bucket, "maps/planck.dat", [b"T"], content_type="application/x-planck-map")
        storage_backend.upload_object(bucket, "notes.txt", [b"n"])
        kept = storage_backend.head_object(bucket, "maps/planck.dat").content_type
        assert kept == ("application/x-planck-map" if self.keeps_content_type else
                        (mimetypes.guess_type("maps/planck.dat")[0] or "application/octet-stream"))  # fmt: skip
        assert storage_backend.head_object(bucket, "notes.txt").content_type.startswith(("text/plain", "application/"))

    def test_listing_limits_are_enforced(self, storage_backend: StorageBackend, bucket: str) -> None:
        for page_size in (0, MAX_PAGE_SIZE + 1, -5):
            with pytest.raises(InvalidRequest):
                storage_backend.list_objects(bucket, page_size=page_size)
        for prefix in ("../", "a//b", "/abs"):
            with pytest.raises(InvalidRequest):
                storage_backend.list_objects(bucket, prefix)
        with pytest.raises(InvalidRequest):
            storage_backend.list_objects(bucket, delimiter="|")
        assert storage_backend.list_objects(bucket, page_size=MAX_PAGE_SIZE).objects == []

    def test_overwrite_replaces_content(self, storage_backend: StorageBackend, bucket: str) -> None:
        storage_backend.upload_object(bucket, "notes.txt", [b"first version"])
        storage_backend.upload_object(bucket, "notes.txt", [b"second"])
        assert b"".join(storage_backend.download_object(bucket, "notes.txt")) == b"second"

    def test_failed_upload_leaves_previous_object(self, storage_backend: StorageBackend, bucket: str) -> None:
        storage_backend.upload_object(bucket, "precious.txt", [b"keep me"])

        def broken() -> Iterator[bytes]:
            yield b"partial " * 1000
            raise ConnectionResetError("client went away")

        with pytest.raises(ConnectionResetError):
            storage_backend.upload_object(bucket, "precious.txt", broken())
        with pytest.raises(ConnectionResetError):
            storage_backend.upload_object(bucket, "new.txt", broken())
        assert b"".join(storage_backend.download_object(bucket, "precious.txt")) == b"keep me"
        with pytest.raises(NotFound):
            storage_backend.head_object(bucket, "new.txt")

    def test_missing_object_is_not_found_before_streaming(self, storage_backend: StorageBackend, bucket: str) -> None:
        with pytest.raises(NotFound):
            storage_backend.download_object(bucket, "nope.txt")
        with pytest.raises(NotFound):
            storage_backend.head_object(bucket, "nope.txt")

    def test_list_with_delimiter_shows_folders(self, storage_backend: StorageBackend, bucket: str) -> None:
        for key in ["a.txt", "maps/1.fits", "maps/2.fits", "maps/deep/3.fits", "z.txt"]:
            storage_backend.upload_object(bucket, key, [b"1"])
        top = storage_backend.list_objects(bucket)
        assert [o.key for o in top.objects] == ["a.txt", "z.txt"]
        assert top.prefixes == ["maps/"]
        inner = storage_backend.list_objects(bucket, "maps/")
        assert [o.key for o in inner.objects] == ["maps/1.fits", "maps/2.fits"]
        assert inner.prefixes == ["maps/deep/"]
        flat = storage_backend.list_objects(bucket, "maps/", delimiter=None)
        assert [o.key for o in flat.objects] == ["maps/1.fits", "maps/2.fits", "maps/deep/3.fits"]

    def test_list_paginates_in_key_order(self, storage_backend: StorageBackend, bucket: str) -> None:
        keys = sorted(f"run/{i:03d}.dat" for i in range(23))
        for key in keys:
            storage_backend.upload_object(bucket, key, [b"."])
        seen: list[str] = []
        token = None
        pages = 0
        while True:
            page = storage_backend.list_objects(bucket, "run/", page_token=token, page_size=10)
            seen.extend(o.key for o in page.objects)
            pages += 1
            token = page.next_token
            if token is None:
                break
        assert seen == keys
        assert pages == 3

    def test_delete_objects_is_idempotent(self, storage_backend: StorageBackend, bucket: str) -> None:
        storage_backend.upload_object(bucket, "d/1", [b"1"])
        storage_backend.upload_object(bucket, "d/2", [b"2"])
        storage_backend.upload_object(bucket, "keep", [b"k"])
        storage_backend.delete_objects(bucket, ["d/1", "d/2", "never-existed"])
        storage_backend.delete_objects(bucket, ["d/1"])
        page = storage_backend.list_objects(bucket)
        assert [o.key for o in page.objects] == ["keep"]
        assert page.prefixes == []

    def test_unsafe_keys_are_refused(self, storage_backend: StorageBackend, bucket: str) -> None:
        for key in ["../escape", "a/../../b", "/abs", "a//b", "", "nul\x00byte"]:
            with pytest.raises(InvalidRequest):
                storage_backend.upload_object(bucket, key, [b"x"])
