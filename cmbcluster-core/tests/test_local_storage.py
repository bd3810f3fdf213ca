from __future__ import annotations

from pathlib import Path

import pytest

from cmbcluster.interfaces import StorageBackend
from cmbcluster.local.storage import LocalStorage
from cmbcluster.testing.storage import StorageContract


class TestLocalStorageContract(StorageContract):
    @pytest.fixture
    def storage_backend(self, tmp_path: Path) -> StorageBackend:
        return LocalStorage(tmp_path / "buckets")


def test_bucket_folder_is_what_environments_mount(tmp_path: Path) -> None:
    from cmbcluster.interfaces import BucketOptions, MountRequest, UserRef

    storage = LocalStorage(tmp_path / "buckets")
    user = UserRef(id="0123456789abcdef")
    bucket = storage.create_bucket(user, BucketOptions(display_name="data")).name
    storage.upload_object(bucket, "maps/cmb.txt", [b"T"])
    spec = storage.volume_spec(MountRequest(bucket=bucket, mount_path="/data", user=user, environment_id="e1"))
    assert spec.local_path is not None
    assert (spec.local_path / "maps" / "cmb.txt").read_bytes() == b"T"
    # upload temporaries never appear inside the bucket folder
    assert sorted(p.name for p in spec.local_path.iterdir()) == ["maps"]


def test_object_next_to_file_prefix_is_a_conflict(tmp_path: Path) -> None:
    from cmbcluster.errors import Conflict
    from cmbcluster.interfaces import BucketOptions, UserRef

    storage = LocalStorage(tmp_path / "buckets")
    bucket = storage.create_bucket(UserRef(id="abc"), BucketOptions(display_name="d")).name
    storage.upload_object(bucket, "a", [b"file"])
    with pytest.raises(Conflict):
        storage.upload_object(bucket, "a/b", [b"under a file"])
    assert b"".join(storage.download_object(bucket, "a")) == b"file"
