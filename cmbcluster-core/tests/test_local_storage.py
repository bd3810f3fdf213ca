from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cmbcluster.interfaces import StorageBackend
from cmbcluster.local.storage import LocalStorage
from cmbcluster.testing.storage import StorageContract


class TestLocalStorageContract(StorageContract):
    supports_versioning = False
    keeps_content_type = False  # guessed from the key's extension

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


# -- links planted in a bucket (an environment can write anything into its mounted folder) --------
@pytest.fixture
def planted(tmp_path: Path) -> tuple[LocalStorage, str, Path]:
    """A bucket holding a link to a file outside it and a link to a folder outside it."""
    from cmbcluster.interfaces import BucketOptions, UserRef

    storage = LocalStorage(tmp_path / "buckets")
    bucket = storage.create_bucket(UserRef(id="abc"), BucketOptions(display_name="d")).name
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"server secret")
    folder = tmp_path / "buckets" / bucket
    (folder / "leak.txt").symlink_to(outside / "secret.txt")
    (folder / "outdir").symlink_to(outside, target_is_directory=True)
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(outside, target_is_directory=True)
    storage.upload_object(bucket, "real.txt", [b"mine"])
    return storage, bucket, outside


def test_links_are_not_read(planted: tuple[LocalStorage, str, Path]) -> None:
    from cmbcluster.errors import NotFound

    storage, bucket, _ = planted
    for key in ("leak.txt", "outdir/secret.txt", "sub/up/secret.txt"):
        with pytest.raises(NotFound):
            storage.head_object(bucket, key)
        with pytest.raises(NotFound):
            b"".join(storage.download_object(bucket, key))
    assert b"".join(storage.download_object(bucket, "real.txt")) == b"mine"


def test_links_are_not_listed_or_counted(planted: tuple[LocalStorage, str, Path]) -> None:
    storage, bucket, _ = planted
    top = storage.list_objects(bucket)
    assert [o.key for o in top.objects] == ["real.txt"] and top.prefixes == ["sub/"]
    everything = storage.list_objects(bucket, delimiter=None)
    assert [o.key for o in everything.objects] == ["real.txt"]
    for prefix in ("outdir/", "outdir/s", "sub/up/", "leak"):
        page = storage.list_objects(bucket, prefix)
        assert page.objects == [] and page.prefixes == [], prefix
        assert storage.list_objects(bucket, prefix, delimiter=None).objects == []
    assert storage.bucket_usage(bucket).size_bytes == len(b"mine")


def test_links_are_not_written_through(planted: tuple[LocalStorage, str, Path]) -> None:
    from cmbcluster.errors import Conflict

    storage, bucket, outside = planted
    for key in ("outdir/new.txt", "sub/up/new.txt", "outdir/secret.txt"):
        with pytest.raises(Conflict):
            storage.upload_object(bucket, key, [b"evil"])
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    # writing the link's own key replaces the link, never the file it pointed to
    storage.upload_object(bucket, "leak.txt", [b"replaced"])
    assert (outside / "secret.txt").read_bytes() == b"server secret"
    assert b"".join(storage.download_object(bucket, "leak.txt")) == b"replaced"


def test_links_are_not_deleted_through(planted: tuple[LocalStorage, str, Path]) -> None:
    storage, bucket, outside = planted
    storage.delete_objects(bucket, ["outdir/secret.txt", "sub/up/secret.txt", "leak.txt"])
    assert (outside / "secret.txt").read_bytes() == b"server secret"
    storage.delete_objects(bucket, ["real.txt"])
    assert storage.list_objects(bucket, delimiter=None).objects == []


def test_a_bucket_folder_replaced_by_a_link_is_not_a_bucket(tmp_path: Path) -> None:
    from cmbcluster.errors import NotFound
    from cmbcluster.interfaces import BucketOptions, UserRef

    storage = LocalStorage(tmp_path / "buckets")
    bucket = storage.create_bucket(UserRef(id="abc"), BucketOptions(display_name="d")).name
    (tmp_path / "buckets" / bucket).rmdir()
    (tmp_path / "buckets" / bucket).symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(NotFound):
        storage.list_objects(bucket)
    with pytest.raises(NotFound):
        storage.upload_object(bucket, "x", [b"x"])


def test_os_errors_become_typed_errors(tmp_path: Path) -> None:
    from cmbcluster.errors import InvalidRequest, NotFound
    from cmbcluster.interfaces import BucketOptions, UserRef

    storage = LocalStorage(tmp_path / "buckets")
    bucket = storage.create_bucket(UserRef(id="abc"), BucketOptions(display_name="d")).name
    long_segment = "n" * 256
    for call in (
        lambda: storage.upload_object(bucket, long_segment, [b"x"]),
        lambda: storage.head_object(bucket, f"a/{long_segment}"),
        lambda: storage.list_objects(bucket, f"{long_segment}/"),
        lambda: storage.delete_objects(bucket, [long_segment]),
    ):
        with pytest.raises(InvalidRequest, match="255 bytes"):
            call()
    storage.upload_object(bucket, "n" * 255, [b"longest name"])
    with pytest.raises(NotFound):
        storage.head_object(bucket, "n" * 255 + "/x")


def test_abandoned_upload_temporaries_are_swept_but_not_running_ones(tmp_path: Path) -> None:
    import threading

    from cmbcluster.interfaces import BucketOptions, UserRef

    storage = LocalStorage(tmp_path / "buckets")
    bucket = storage.create_bucket(UserRef(id="abc"), BucketOptions(display_name="d")).name
    # what a killed server leaves: a temporary nobody holds
    import os
    import time

    killed = tmp_path / "buckets" / ".tmp" / "upload-killed"
    killed.write_bytes(b"partial")
    os.utime(killed, (time.time() - 120, time.time() - 120))
    release, writing = threading.Event(), threading.Event()

    def slow_chunks() -> Iterator[bytes]:
        yield b"first"
        writing.set()
        release.wait(10)
        yield b"second"

    upload = threading.Thread(target=lambda: storage.upload_object(bucket, "slow.bin", slow_chunks()))
    upload.start()
    assert writing.wait(10)
    LocalStorage(tmp_path / "buckets")  # a server starting (or a second process) sweeps
    assert not killed.exists()
    left = list((tmp_path / "buckets" / ".tmp").iterdir())
    assert [p.name.startswith("upload-") for p in left] == [True]  # the running upload's own
    os.utime(left[0], (time.time() - 120, time.time() - 120))  # even when it seems old, it is locked
    assert storage.sweep_abandoned_uploads() == 0
    release.set()
    upload.join(10)
    assert b"".join(storage.download_object(bucket, "slow.bin")) == b"firstsecond"
    assert not list((tmp_path / "buckets" / ".tmp").iterdir())


def test_a_fifo_at_a_key_never_holds_a_thread(tmp_path: Path) -> None:
    """An environment can swap a FIFO in at a key between the API's checks and its open: the open
    returns at once (404) instead of waiting forever for a writer."""
    import concurrent.futures
    import os

    from cmbcluster.errors import NotFound
    from cmbcluster.interfaces import BucketOptions, UserRef

    storage = LocalStorage(tmp_path / "buckets")
    bucket = storage.create_bucket(UserRef(id="abc"), BucketOptions(display_name="d")).name
    os.mkfifo(tmp_path / "buckets" / bucket / "pipe")
    os.mkdir(tmp_path / "buckets" / bucket / "dir")
    os.mkfifo(tmp_path / "buckets" / bucket / "dir" / "pipe")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for key in ("pipe", "dir/pipe", "pipe/below"):
            future = pool.submit(lambda k: b"".join(storage.download_object(bucket, k)), key)
            with pytest.raises(NotFound):
                future.result(timeout=5)
    assert [o.key for o in storage.list_objects(bucket, delimiter=None).objects] == []
