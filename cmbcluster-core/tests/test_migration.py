"""`cmbcluster migrate` on the embedded default: the engine between two local storage roots, through
the API's own rows and real environments (the clouds, the CLI and SIGKILL are in tests/test_migration.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.db.models import MigrationObject, Storage
from cmbcluster.local.storage import LocalStorage
from cmbcluster.migration.engine import Migration, Side, finish

FILES = {"notes.txt": b"hello", "empty": b"", "a/b/deep.bin": b"\x00" * 70_000, "été/☀.csv": "é,☀\n".encode()}


def sessions_of(app: FastAPI) -> sessionmaker[Session]:
    return app.state.context.sessions  # type: ignore[no-any-return]


def make_bucket(client: TestClient, headers: dict[str, str]) -> str:
    response = client.post("/api/v1/storages", headers=headers, json={"display_name": "data"})
    assert response.status_code == 201, response.text
    storage_id = str(response.json()["id"])
    for key, content in FILES.items():
        assert client.put(f"/api/v1/storages/{storage_id}/objects/{key}", headers=headers, content=content).is_success
    return storage_id


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


def _owner(app: FastAPI, storage_id: str) -> Any:
    from cmbcluster.interfaces import UserRef

    storage = row(app, storage_id)
    return UserRef(id=storage.user_id)


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
    # once it stops, the next run switches without copying again
    assert client.post(f"/api/v1/environments/{env['id']}/stop", headers=alice).status_code == 200
    again = migration(app, target).run()
    assert again.buckets[0].state == "switched" and again.buckets[0].copied == 0


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
