"""`cmbcluster migrate` on the embedded default: the engine between two local storage roots, through
the API's own rows and real environments (the clouds, the CLI and SIGKILL are in tests/test_migration.py)."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.db.models import MigrationBucket, MigrationObject, Storage
from cmbcluster.errors import Conflict, PluginError
from cmbcluster.hookspecs import hookimpl
from cmbcluster.interfaces import ManagedTransfer, ObjectInfo, ObjectPage, TransferEnd
from cmbcluster.local.storage import LocalStorage
from cmbcluster.migration.copy import list_all
from cmbcluster.migration.engine import Events, Migration, Side, finish
from cmbcluster.plugins import PluginManager
from cmbcluster.testing import api as testing_api

FILES = {"notes.txt": b"hello", "empty": b"", "a/b/deep.bin": b"\x00" * 70_000, "été/☀.csv": "é,☀\n".encode()}


def sessions_of(app: FastAPI) -> sessionmaker[Session]:
    return app.state.context.sessions  # type: ignore[no-any-return]


def make_bucket(client: TestClient, headers: dict[str, str]) -> str:
    return testing_api.make_bucket(client, headers, FILES)


@pytest.fixture
def target(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "elsewhere")


def migration(app: FastAPI, target: LocalStorage) -> Migration:
    source = Side(name="local", storage=app.state.context.storage)
    return Migration(sessions_of(app), source, Side(name="elsewhere", storage=target), parallel=3)


def row(app: FastAPI, storage_id: str) -> Storage:
    with sessions_of(app)() as db:
        found = db.get(Storage, storage_id)
        assert found is not None
        return found


def test_run_copies_verifies_and_switches_and_resumes_without_copying_again(
    app: FastAPI, client: TestClient, admin: dict[str, str], alice: dict[str, str], target: LocalStorage
) -> None:
    storage_id = make_bucket(client, alice)
    source_bucket = row(app, storage_id).bucket_name

    result = migration(app, target).run()

    assert [b.state for b in result.buckets] == ["switched"], result
    assert result.buckets[0].copied == len(FILES)
    switched = row(app, storage_id)
    assert switched.backend == "elsewhere" and switched.bucket_name != source_bucket
    for key, content in FILES.items():
        assert b"".join(target.download_object(switched.bucket_name, key)) == content
    # the source is kept until `finish`
    assert b"".join(app.state.context.storage.download_object(source_bucket, "notes.txt")) == b"hello"
    # until the server moves too, its owner is told where the files are and when they come back
    listing = client.get(f"/api/v1/storages/{storage_id}/objects", headers=alice)
    assert listing.status_code == 409
    assert listing.json()["message"] == (
        "the bucket 'data' lives on the storage backend 'elsewhere' now, and this server uses 'local': its files "
        "are there, and can be used again once the server is configured for 'elsewhere' (ask an administrator)"
    )

    progress = client.get("/api/v1/admin/migration", headers=admin)
    assert progress.status_code == 200
    body: dict[str, Any] = progress.json()
    assert body["switched"] == 1 and body["objects_verified"] == len(FILES) == body["objects_total"]
    assert body["buckets"][0]["owner"] == "alice@example.org"
    assert client.get("/api/v1/admin/migration", headers=alice).status_code == 403
    assert client.get("/api/v1/admin/migration").status_code == 401

    outcomes = finish(sessions_of(app)(), {"local": app.state.context.storage}.__getitem__)
    assert [o.deleted for o in outcomes] == [True]
    assert source_bucket not in {b.name for b in app.state.context.storage.list_buckets(_owner(app, storage_id))}


def test_finish_goes_on_past_a_source_it_cannot_delete_and_reports_it_kept(
    app: FastAPI, client: TestClient, alice: dict[str, str], bob: dict[str, str], target: LocalStorage
) -> None:
    first, second = make_bucket(client, alice), make_bucket(client, bob)
    assert [b.state for b in migration(app, target).run().buckets] == ["switched", "switched"]
    with sessions_of(app)() as db:
        sources = {m.storage_id: m.source_bucket for m in db.execute(select(MigrationBucket)).scalars()}

    class Busy(LocalStorage):  # a source bucket something keeps writing to (a forgotten VM, say)
        def delete_bucket(self, bucket: str, *, force: bool = False) -> None:
            if bucket == sources[first]:
                raise Conflict(f"bucket {bucket} keeps receiving objects; stop what writes to it and try again")
            super().delete_bucket(bucket, force=force)

    source = Busy(app.state.context.storage.root)
    outcomes = finish(sessions_of(app)(), {"local": source}.__getitem__)

    by_storage = {o.storage_id: o for o in outcomes}
    assert not by_storage[first].deleted and "keeps receiving objects" in by_storage[first].message
    assert by_storage[second].deleted  # the next one was still deleted
    assert sources[first] in {b.name for b in source.list_buckets(_owner(app, first))}
    # kept, so a later finish tries it again
    outcomes = finish(sessions_of(app)(), {"local": app.state.context.storage}.__getitem__)
    assert [(o.storage_id, o.deleted) for o in outcomes] == [(first, True)]


def _owner(app: FastAPI, storage_id: str) -> Any:
    from cmbcluster.interfaces import UserRef

    storage = row(app, storage_id)
    return UserRef(id=storage.user_id)


def test_a_copy_only_run_switches_nothing_and_the_switching_run_copies_only_what_changed(
    app: FastAPI, client: TestClient, alice: dict[str, str], target: LocalStorage
) -> None:
    storage_id = make_bucket(client, alice)
    source = Side(name="local", storage=app.state.context.storage)
    ahead = Migration(sessions_of(app), source, Side(name="elsewhere", storage=target), copy_only=True).run()

    assert [(b.state, b.copied) for b in ahead.buckets] == [("copied", len(FILES))] and not ahead.complete
    assert row(app, storage_id).backend == "local"  # its owner goes on working on it
    written = client.put(f"/api/v1/storages/{storage_id}/objects/notes.txt", headers=alice, content=b"changed")
    assert written.is_success, written.text

    result = migration(app, target).run()

    assert [(b.state, b.copied, b.skipped) for b in result.buckets] == [("switched", 1, len(FILES) - 1)]
    assert b"".join(target.download_object(row(app, storage_id).bucket_name, "notes.txt")) == b"changed"


def test_a_second_run_copies_only_what_changed_on_the_source(
    app: FastAPI, client: TestClient, alice: dict[str, str], target: LocalStorage
) -> None:
    storage_id = make_bucket(client, alice)
    bucket = row(app, storage_id).bucket_name
    engine = migration(app, target)
    # What a run killed before its switch leaves: the target bucket and a manifest of verified copies.
    with sessions_of(app)() as db:
        storage = db.get(Storage, storage_id)
        assert storage is not None
        manifest = engine._manifest_row(db, storage)
        from cmbcluster.interfaces import UserRef

        manifest.target_bucket = engine._create_target_bucket(storage, UserRef(id=storage.user_id))
        db.commit()
        from cmbcluster.migration.engine import BucketOutcome

        engine._copy_pass(
            db, manifest, BucketOutcome(storage_id="", owner="", display_name="", state=""), announce=False
        )
    time.sleep(0.01)
    app.state.context.storage.upload_object(bucket, "notes.txt", [b"changed"])
    app.state.context.storage.delete_objects(bucket, ["empty"])

    result = engine.run()

    assert result.buckets[0].state == "switched"
    assert result.buckets[0].copied == 1 and result.buckets[0].skipped == len(FILES) - 2
    switched = row(app, storage_id)
    assert b"".join(target.download_object(switched.bucket_name, "notes.txt")) == b"changed"
    assert "empty" not in {o.key for o in target.list_objects(switched.bucket_name, delimiter=None).objects}


def test_a_bucket_mounted_by_a_running_environment_is_not_switched(
    app: FastAPI, client: TestClient, alice: dict[str, str], target: LocalStorage
) -> None:
    storage_id = make_bucket(client, alice)
    env = client.post(
        "/api/v1/environments", headers=alice,
        json={"application": "files", "mounts": [{"storage_id": storage_id, "mount_path": "/data"}]},
    ).json()  # fmt: skip
    deadline = time.monotonic() + 30
    while client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["status"] != "running":
        assert time.monotonic() < deadline, "the environment did not start"
        time.sleep(0.1)

    result = migration(app, target).run()

    assert result.buckets[0].state == "waiting"
    assert "environment" in result.buckets[0].message and "alice@example.org" in result.buckets[0].message
    assert row(app, storage_id).backend == "local" and row(app, storage_id).status == "active"
    # its owner sees it marked as being moved, and can use it meanwhile
    listed = client.get("/api/v1/storages", headers=alice).json()["storages"]
    assert [(s["id"], s["moving_to"]) for s in listed] == [(storage_id, "elsewhere")]
    assert client.get(f"/api/v1/storages/{storage_id}", headers=alice).json()["moving_to"] == "elsewhere"
    # once it stops, the next run switches without copying again
    assert client.post(f"/api/v1/environments/{env['id']}/stop", headers=alice).status_code == 200
    again = migration(app, target).run()
    assert again.buckets[0].state == "switched" and again.buckets[0].copied == 0
    assert client.get(f"/api/v1/storages/{storage_id}", headers=alice).json()["moving_to"] is None


def test_an_object_changed_on_the_target_behind_the_copy_is_caught_and_not_switched(
    app: FastAPI, client: TestClient, alice: dict[str, str], target: LocalStorage
) -> None:
    storage_id = make_bucket(client, alice)

    class Tamper(Migration):
        def _check_target(self, db: Session, row: Any) -> str:  # someone writes to the target just before
            time.sleep(0.01)
            target.upload_object(row.target_bucket, "notes.txt", [b"HELLO"])
            return super()._check_target(db, row)

    result = Tamper(
        sessions_of(app), Side(name="local", storage=app.state.context.storage), Side(name="elsewhere", storage=target)
    ).run()

    assert result.buckets[0].state == "failed" and "notes.txt changed on the target" in result.buckets[0].message
    assert row(app, storage_id).backend == "local" and row(app, storage_id).status == "active"
    with sessions_of(app)() as db:  # forgotten by the manifest: the next run copies it again
        assert "notes.txt" not in set(db.execute(select(MigrationObject.key)).scalars())
    result = migration(app, target).run()
    assert result.buckets[0].state == "switched" and result.buckets[0].copied == 1
    assert b"".join(target.download_object(row(app, storage_id).bucket_name, "notes.txt")) == b"hello"


# -- a managed transfer offered by a plugin (cmbcluster_managed_transfer) --------------------------
class FakeTransferService(ManagedTransfer):
    """Our own stand-in for a cloud's transfer service (none runs here): it reads the source
    bucket and writes the target bucket through its own LocalStorage on the target's root, as a
    service writes the bucket directly, not through the migration; ``damage`` names an object it
    leaves with other bytes of the same size."""

    service = "the fake transfer service"

    def __init__(
        self, source: TransferEnd, target: TransferEnd, *, damage: str | None = None, broken: bool = False
    ) -> None:
        assert isinstance(target.storage, LocalStorage)
        self.source, self.target, self.damage, self.broken = source, target, damage, broken
        self.writer = LocalStorage(target.storage.root)
        self.runs = 0

    def run(self, progress: Callable[[int], None] | None = None) -> None:
        self.runs += 1
        if self.broken:
            raise RuntimeError("the job's status call answered garbage")
        for obj in list_all(self.source.storage, self.source.bucket):
            data = b"".join(self.source.storage.download_object(self.source.bucket, obj.key))
            if obj.key == self.damage:
                data = bytes(b ^ 0xFF for b in data)
            self.writer.upload_object(self.target.bucket, obj.key, [data])
            if progress is not None:
                progress(len(data))


class CountingStorage(LocalStorage):
    """The migration's target: counts the objects the migration itself uploads."""

    uploads = 0

    def upload_object(
        self, bucket: str, key: str, chunks: Iterable[bytes], *, content_type: str | None = None
    ) -> ObjectInfo:
        self.uploads += 1
        return super().upload_object(bucket, key, chunks, content_type=content_type)


def offering(damage: str | None, offers: list[FakeTransferService], *, broken: bool = False) -> PluginManager:
    """A plugin manager with one in-process plugin whose hook offers the fake service to "elsewhere"."""

    @hookimpl
    def cmbcluster_managed_transfer(source: TransferEnd, target: TransferEnd) -> ManagedTransfer | None:
        if target.backend != "elsewhere":
            return None
        offers.append(FakeTransferService(source, target, damage=damage, broken=broken))
        return offers[-1]

    manager = PluginManager(entry_points_enabled=False)
    manager.register(SimpleNamespace(cmbcluster_managed_transfer=cmbcluster_managed_transfer), name="fake-transfer")
    return manager


def managed(app: FastAPI, target: LocalStorage, plugins: PluginManager | None) -> Migration:
    source = Side(name="local", storage=app.state.context.storage)
    return Migration(
        sessions_of(app), source, Side(name="elsewhere", storage=target), parallel=3,
        transfers=plugins.managed_transfer if plugins is not None else None,
    )  # fmt: skip


def test_a_managed_transfer_is_verified_from_both_listings_then_switched(
    app: FastAPI, client: TestClient, alice: dict[str, str], tmp_path: Path
) -> None:
    storage_id = make_bucket(client, alice)
    target = CountingStorage(tmp_path / "elsewhere")
    offers: list[FakeTransferService] = []

    result = managed(app, target, offering(None, offers)).run()

    assert [b.state for b in result.buckets] == ["switched"], result
    # each object counted once, as the service's (it said "4 copied, 4 already verified")
    assert (result.buckets[0].copied, result.buckets[0].skipped) == (len(FILES), 0)
    assert [o.runs for o in offers] == [1]
    assert target.uploads == 0  # the service copied everything; the migration streamed nothing
    switched = row(app, storage_id)
    assert switched.backend == "elsewhere"
    for key, content in FILES.items():
        assert b"".join(target.download_object(switched.bucket_name, key)) == content
    with sessions_of(app)() as db:
        assert set(db.execute(select(MigrationObject.key)).scalars()) == set(FILES)


def test_an_object_a_managed_transfer_left_wrong_is_caught_and_the_bucket_not_switched(
    app: FastAPI, client: TestClient, alice: dict[str, str], tmp_path: Path
) -> None:
    storage_id = make_bucket(client, alice)
    target = CountingStorage(tmp_path / "elsewhere")
    offers: list[FakeTransferService] = []

    result = managed(app, target, offering("a/b/deep.bin", offers)).run()

    assert result.buckets[0].state == "failed"
    assert "the fake transfer service left 1 object(s) wrong" in result.buckets[0].message
    assert "a/b/deep.bin holds other bytes" in result.buckets[0].message
    assert row(app, storage_id).backend == "local" and row(app, storage_id).status == "active"
    with sessions_of(app)() as db:  # the others are verified; the damaged one is not
        assert set(db.execute(select(MigrationObject.key)).scalars()) == set(FILES) - {"a/b/deep.bin"}
    # a service that fails outright: the bucket is reported, nothing is recorded or switched
    broken = managed(app, target, offering(None, offers, broken=True)).run()
    assert broken.buckets[0].state == "failed"
    assert "the fake transfer service failed: RuntimeError" in broken.buckets[0].message
    assert row(app, storage_id).backend == "local"
    # streamed the next time: only the damaged object is copied, then the bucket switches
    again = managed(app, target, None).run()
    assert again.buckets[0].state == "switched" and again.buckets[0].copied == 1 and target.uploads == 1
    assert b"".join(target.download_object(row(app, storage_id).bucket_name, "a/b/deep.bin")) == FILES["a/b/deep.bin"]


class ListsOtherMd5s(LocalStorage):
    """A source whose listing reports, where an MD5 belongs, a value that is none: what S3 lists for
    objects encrypted otherwise than their bucket's default says (SSE-KMS or SSE-C asked per
    object), whose ETags are no MD5s. moto's ETags are always MD5s, so it cannot stand in here."""

    def list_objects(self, bucket: str, prefix: str = "", **kwargs: Any) -> ObjectPage:
        page = super().list_objects(bucket, prefix, **kwargs)
        etags = [replace(o, md5=hashlib.md5(o.key.encode(), usedforsecurity=False).hexdigest()) for o in page.objects]
        return replace(page, objects=etags)


@pytest.mark.parametrize("damage", [None, "a/b/deep.bin"])
def test_a_listed_md5_that_is_none_is_checked_against_the_bytes_before_an_object_is_called_wrong(
    app: FastAPI, client: TestClient, alice: dict[str, str], tmp_path: Path, damage: str | None
) -> None:
    make_bucket(client, alice)
    source = Side(name="local", storage=ListsOtherMd5s(app.state.context.storage.root))
    target = CountingStorage(tmp_path / "elsewhere")
    transfers = offering(damage, []).managed_transfer
    result = Migration(sessions_of(app), source, Side(name="elsewhere", storage=target), transfers=transfers).run()
    if damage is None:
        assert [b.state for b in result.buckets] == ["switched"], result
        assert result.buckets[0].copied == len(FILES) and target.uploads == 0  # nothing copied twice
    else:  # an object really left wrong is still caught
        assert result.buckets[0].state == "failed"
        assert "left 1 object(s) wrong: a/b/deep.bin holds other bytes" in result.buckets[0].message


def test_without_an_offer_the_bucket_is_streamed_and_a_wrong_offer_is_a_plugin_error(
    app: FastAPI, client: TestClient, alice: dict[str, str], tmp_path: Path
) -> None:
    make_bucket(client, alice)
    target = CountingStorage(tmp_path / "elsewhere")
    notes: list[str] = []

    class Notes(Events):
        def note(self, text: str) -> None:
            notes.append(text)

    source = Side(name="local", storage=app.state.context.storage)
    result = Migration(
        sessions_of(app), source, Side(name="elsewhere", storage=target), events=Notes(),
        transfers=PluginManager(entry_points_enabled=False).managed_transfer,
    ).run()  # fmt: skip
    assert result.buckets[0].state == "switched" and target.uploads == len(FILES)
    assert any("no plugin offers a managed transfer" in n for n in notes)

    @hookimpl
    def cmbcluster_managed_transfer(source: TransferEnd, target: TransferEnd) -> object:
        return "a job id"

    manager = PluginManager(entry_points_enabled=False)
    manager.register(SimpleNamespace(cmbcluster_managed_transfer=cmbcluster_managed_transfer), name="confused")
    end = TransferEnd(backend="local", bucket="b", storage=target)
    with pytest.raises(PluginError, match="'confused' returned str from cmbcluster_managed_transfer"):
        manager.managed_transfer(end, end)


def test_a_bucket_larger_than_a_manifest_batch_is_walked_batch_by_batch(
    app: FastAPI, client: TestClient, alice: dict[str, str], target: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import event

    from cmbcluster.migration import engine as migration_engine

    monkeypatch.setattr(migration_engine, "MANIFEST_BATCH", 4)
    storage_id = make_bucket(client, alice)
    bucket = row(app, storage_id).bucket_name
    source = app.state.context.storage
    many = {f"many/{i:02d}.txt": f"object {i}".encode() for i in range(30)}
    for key, content in many.items():
        source.upload_object(bucket, key, [content])
    everything = FILES | many
    engine = migration(app, target)
    with sessions_of(app)() as db:  # what a run killed before its switch leaves
        storage = db.get(Storage, storage_id)
        assert storage is not None
        manifest = engine._manifest_row(db, storage)
        from cmbcluster.interfaces import UserRef
        from cmbcluster.migration.engine import BucketOutcome

        manifest.target_bucket = engine._create_target_bucket(storage, UserRef(id=storage.user_id))
        db.commit()
        engine._copy_pass(db, manifest, BucketOutcome(storage_id="", owner="", display_name="", state=""),
                          announce=False)  # fmt: skip
    time.sleep(0.01)
    # changes and deletions on both sides of batch boundaries, and at both ends of the listing
    changed = ["a/b/deep.bin", "many/03.txt", "many/04.txt", "many/29.txt"]
    deleted = ["empty", "many/07.txt", "many/08.txt", "many/28.txt", "été/☀.csv"]
    for key in changed:
        source.upload_object(bucket, key, [b"changed " + key.encode()])
    source.delete_objects(bucket, deleted)
    reads: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM migration_objects" in statement:
            reads.append(statement)

    db_engine = sessions_of(app).kw["bind"]
    event.listen(db_engine, "before_cursor_execute", count)
    try:
        result = engine.run()
    finally:
        event.remove(db_engine, "before_cursor_execute", count)

    assert result.buckets[0].state == "switched", result.buckets[0].message
    assert result.buckets[0].copied == len(changed)
    assert result.buckets[0].skipped == len(everything) - len(changed) - len(deleted)
    switched = row(app, storage_id).bucket_name
    listed = {o.key for o in list_all(target, switched)}
    assert listed == set(everything) - set(deleted)
    for key in listed:
        want = b"changed " + key.encode() if key in changed else everything[key]
        assert b"".join(target.download_object(switched, key)) == want
    # the manifest was read in batches of 4 (34 objects: several queries per walk), never whole
    batched = [s for s in reads if "LIMIT" in s.upper()]
    assert len(batched) >= 3 * (len(everything) // 4) and all("ORDER BY" in s.upper() for s in batched)
    assert not [s for s in reads if "LIMIT" not in s.upper() and "count(" not in s and "sum(" not in s]


def test_the_run_display_rates_every_bucket_s_bytes_not_only_the_last_bucket_s() -> None:
    """The "all buckets" line's rate covers the whole run: it was the last bucket's alone (a few bytes a
    second after 126 MB, when a small bucket came last), and bytes a managed transfer reported counted twice."""
    from rich.console import Console
    from rich.progress import Progress

    from cmbcluster.commands.migrate import _Display

    now = [0.0]
    progress = Progress(console=Console(file=io.StringIO()), get_time=lambda: now[0], auto_refresh=False)
    display = _Display(progress)
    display.bucket_started("alice / data", 2, 10_000_000, 0)
    for _ in range(10):  # 10 MB in 10 s
        now[0] += 1
        display.bytes_copied(1_000_000)
    display.bucket_done(SimpleNamespace(state="switched", owner="alice", display_name="data", copied=2, skipped=0,
                                        message=""))  # fmt: skip
    display.bucket_started("bob / notes", 1, 1_000, 500)  # half of it verified by an earlier run
    now[0] += 5
    display.bytes_copied(500)

    overall = progress.tasks[display.total]
    assert overall.completed == 10_000_500  # copied by this run, each byte once
    assert overall.speed is not None and 600_000 < overall.speed < 1_100_000  # about 10 MB over 15 s
