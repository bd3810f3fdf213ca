"""Several control-plane replicas on one PostgreSQL database (a real server, tests/postgres.py).

What an operator running more than one replica relies on: the migrations build the same schema
as the models; a user signed in through one replica is known to every other; a deactivation on
one locks the user out on all at their next request; and the server-wide start limit holds
across replicas (PostgreSQL's advisory lock serialises the reservations).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update

from cmbcluster import hookimpl
from cmbcluster.app import create_app
from cmbcluster.db import create_db_engine, current_revision, upgrade
from cmbcluster.db.engine import SCHEMA_HEAD
from cmbcluster.db.models import ServerInstance, Storage, UploadJournal, utcnow
from cmbcluster.interfaces import ComputeBackend, EnvironmentPhase, EnvironmentSpec, EnvironmentStatus
from cmbcluster.plugins import PluginManager
from cmbcluster.registrations import ComputeBackendRegistration
from cmbcluster.services.revocation import CHECK_SECONDS
from cmbcluster.services.storages import QuotaState, reserved_bytes
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in
from tests.postgres import emptied, postgres_url  # noqa: F401 - a fixture, registered by importing it


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:  # noqa: F811 - the fixture imported above
    """The server's database, emptied for each test."""
    yield emptied(postgres_url)


def test_migrations_build_the_models_schema_on_postgresql(database: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from cmbcluster.db.models import Base

    engine = create_db_engine(database)
    with engine.begin() as connection:  # the migration path, not the empty-database shortcut
        connection.execute(text("CREATE TABLE placeholder (id INTEGER)"))
    upgrade(engine)
    assert current_revision(engine) == SCHEMA_HEAD
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE placeholder"))
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


def test_replicas_starting_together_on_an_empty_database_both_start(database: str) -> None:
    """Found by a fresh-clone run: two replicas creating the schema of an empty database at once, and
    one failed to start (duplicate key in pg_type). They take turns; the second finds it made."""
    engines = [create_db_engine(database) for _ in range(4)]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(engines)) as pool:
            list(pool.map(upgrade, engines))  # raises what any of them raised
        assert {current_revision(engine) for engine in engines} == {SCHEMA_HEAD}
    finally:
        for engine in engines:
            engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_uploads_of_the_previous_version_survive_the_heartbeat_migration(
    kind: str,
    postgres_url: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """During a rolling update the previous version's servers keep uploading after the new one
    migrated: their journal inserts do not name ``heartbeat_at`` and must still work, and their
    uploads already running count from the migration on, not from their start (they are not
    renewed, and would be aborted as expired at once)."""
    from alembic import command

    from cmbcluster.db.engine import _alembic_config

    engine = create_db_engine(emptied(postgres_url) if kind == "postgresql" else f"sqlite:///{tmp_path / 'db.sqlite'}")
    cfg = _alembic_config(engine)
    old_insert = text(
        "INSERT INTO upload_journal (id, storage_id, backend, bucket_name, key, started_at, owner, reserved_bytes) "
        "VALUES (:id, 's1', 'local', 'b', :key, :started, NULL, 0)"
    )
    long_ago = utcnow() - dt.timedelta(hours=2)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0007")
        connection.execute(old_insert, {"id": "running", "key": "big.fits", "started": long_ago})
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")
    before = utcnow() - dt.timedelta(minutes=1)
    with engine.begin() as connection:  # an old server's next upload
        connection.execute(old_insert, {"id": "next", "key": "small.fits", "started": utcnow()})
    with engine.connect() as connection:
        found: dict[str, Any] = dict(connection.execute(text("SELECT id, heartbeat_at FROM upload_journal")).all())
    for value in found.values():  # SQLite gives text: what the model's type reads it as
        when = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
        assert (when if when.tzinfo else when.replace(tzinfo=dt.UTC)) > before, found
    engine.dispose()


class NeverReady(ComputeBackend):
    """Environments that stay 'starting' hold their start slot: what the limit test needs."""

    def __init__(self) -> None:
        self.started: set[str] = set()
        self.ready: set[str] = set()  #: what a test lets run

    def start(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        self.started.add(spec.environment_id)
        return self.status(spec.environment_id)

    def stop(self, environment_id: str) -> None:
        self.started.discard(environment_id)

    def delete(self, environment_id: str) -> None:
        self.started.discard(environment_id)

    def status(self, environment_id: str) -> EnvironmentStatus:
        if environment_id in self.ready & self.started:
            return EnvironmentStatus(environment_id=environment_id, phase=EnvironmentPhase.RUNNING, url="http://env/")
        phase = EnvironmentPhase.STARTING if environment_id in self.started else EnvironmentPhase.MISSING
        return EnvironmentStatus(environment_id=environment_id, phase=phase, message="pulling the image")

    def list_managed(self) -> list[EnvironmentStatus]:
        return [self.status(i) for i in sorted(self.started)]


class Elected(NeverReady):
    """A backend whose replicas elect a leader, as the Kubernetes one does with a Lease; the test
    says which replica leads."""

    def __init__(self) -> None:
        super().__init__()
        self.leading = False

    @property
    def elects_leader(self) -> bool:
        return True

    def leads_background_work(self) -> bool:
        return self.leading


def replicas(
    database: str, tmp_path: Path, count: int = 2, backend_type: type[NeverReady] = NeverReady, **settings: Any
) -> list[TestClient]:
    """``count`` control planes on one database; each its own process-like app and data folder
    (and compute backend, as each replica has its own watch of the cluster)."""
    clients = []
    for i in range(count):
        backend = backend_type()

        @hookimpl
        def cmbcluster_compute_backends(backend: NeverReady = backend) -> Iterator[ComputeBackendRegistration]:
            yield ComputeBackendRegistration(name="never-ready", factory=lambda ctx: backend)

        manager = PluginManager(entry_points_enabled=False)
        manager.register(SimpleNamespace(cmbcluster_compute_backends=cmbcluster_compute_backends), name="never-ready")
        core = CoreSettings(
            data_dir=tmp_path / f"replica-{i}", database_url=database, compute_backend="never-ready", **settings
        )
        clients.append(TestClient(create_app(core, manager), base_url=LOCAL))
    return clients


def test_a_user_is_the_same_on_every_replica_and_deactivation_reaches_all(database: str, tmp_path: Path) -> None:
    one, two = replicas(database, tmp_path)
    with one, two:
        admin = dev_sign_in(one, "pi@example.org")  # the first user: the admin
        ada = dev_sign_in(one, "ada@example.org")
        assert two.get("/api/v1/auth/me", headers=ada).json()["email"] == "ada@example.org"
        created = two.post("/api/v1/environments", json={"application": "files", "start": False}, headers=ada)
        assert created.status_code == 201, created.text
        assert [e["id"] for e in one.get("/api/v1/environments", headers=ada).json()["items"]] == [created.json()["id"]]
        ada_id = one.get("/api/v1/auth/me", headers=ada).json()["id"]
        off = two.patch(f"/api/v1/admin/users/{ada_id}", json={"status": "deactivated"}, headers=admin)
        assert off.status_code == 200, off.text
        for replica in (one, two):  # at the very next request, whichever replica answers it
            refused = replica.get("/api/v1/environments", headers=ada)
            assert refused.status_code == 403 and "deactivated" in refused.json()["message"]


def test_the_start_limit_holds_across_replicas(database: str, tmp_path: Path) -> None:
    """Three start slots for the whole service, eight starts at once through two replicas: three
    start, five are told to retry later; never more than three, whatever the interleaving."""
    one, two = replicas(database, tmp_path, max_concurrent_starts=3, max_environments_per_user=20)
    with one, two:
        users = [dev_sign_in(one, f"user{i}@example.org") for i in range(8)]

        def create(i: int) -> int:
            client = (one, two)[i % 2]
            status: int = client.post(
                "/api/v1/environments", json={"application": "files"}, headers=users[i]
            ).status_code
            return status

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = sorted(pool.map(create, range(8)))
    assert answers == [201, 201, 201, 429, 429, 429, 429, 429]


def test_sign_in_attempts_at_once_through_two_replicas_are_counted_exactly(database: str, tmp_path: Path) -> None:
    """One address guessing in parallel through both replicas: 30 attempts against a limit of 8 get
    8 answers and 22 refusals, none a database error (the first attempts race to create the count)."""
    one, two = replicas(database, tmp_path, login_attempts_per_minute=8)
    with one, two:

        def attempt(i: int) -> int:
            status: int = (one, two)[i % 2].get("/api/v1/auth/local/login", follow_redirects=False).status_code
            return status

        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            answers = sorted(pool.map(attempt, range(30)))
    assert answers == [303] * 8 + [429] * 22, answers


def test_first_sign_ins_at_once_through_two_replicas_make_one_admin(database: str, tmp_path: Path) -> None:
    """Six people signing in at the same moment on a fresh install, through both replicas: one of
    them is the first user (the admin), whatever the interleaving; each gets one account."""
    one, two = replicas(database, tmp_path, login_attempts_per_minute=100)
    with one, two:
        barrier = threading.Barrier(6)

        def sign_in(i: int) -> str:
            barrier.wait()
            replica = (one, two)[i % 2]
            browser = TestClient(replica.app, base_url=LOCAL)  # cookies of its own
            me = replica.get("/api/v1/auth/me", headers=dev_sign_in(browser, f"user{i}@example.org")).json()
            role: str = me["role"]
            return role

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            roles = sorted(pool.map(sign_in, range(6)))
    assert roles == ["admin"] + ["user"] * 5, roles


def test_a_refresh_token_sent_twice_at_once_through_two_replicas_rotates_once(database: str, tmp_path: Path) -> None:
    """A refresh token works once, even when a stolen copy is sent at the same moment as the real
    one, through another replica: of eight refreshes at once, one gets a new session, seven a 401."""
    from cmbcluster.security import pkce_challenge

    one, two = replicas(database, tmp_path, login_attempts_per_minute=100)
    with one, two:
        provider = one.app.state.context.auth["local"]  # type: ignore[attr-defined]
        verifier = "v" * 50
        code = provider.issue_code(email="ada@example.org", name="", nonce="n", code_challenge=pkce_challenge(verifier))
        id_token = provider.exchange_code(code, redirect_uri="x", code_verifier=verifier).id_token
        session = one.post("/api/v1/auth/exchange", json={"provider": "local", "token": id_token}).json()
        barrier = threading.Barrier(8)

        def refresh(i: int) -> int:
            barrier.wait()
            answer = (one, two)[i % 2].post("/api/v1/auth/refresh", json={"refresh_token": session["refresh_token"]})
            status: int = answer.status_code
            return status

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = sorted(pool.map(refresh, range(8)))
    assert answers == [200] + [401] * 7, answers


def test_a_progress_stream_on_another_replica_sees_every_change(database: str, tmp_path: Path) -> None:
    """Starts go through one replica, whose backend sees them run and whose loops write it down;
    the launch dialog's stream is served by the other, which sees nothing of that cluster: it
    learns every change through the shared database, and holds no connection while it waits."""
    one, two = replicas(database, tmp_path, max_environments_per_user=20, max_concurrent_starts=20)
    backend_one: NeverReady = one.app.state.context.compute  # type: ignore[attr-defined]
    with one, two:
        ada = dev_sign_in(one, "ada@example.org")
        ids = [one.post("/api/v1/environments", json={"application": "files"}, headers=ada).json()["id"]
               for _ in range(10)]  # fmt: skip

        def follow(environment_id: str) -> list[str]:
            seen = []
            with two.stream("GET", f"/api/v1/environments/{environment_id}/events", headers=ada) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        seen.append(json.loads(line.removeprefix("data: "))["status"])
                        if len(seen) == 1:
                            opened.release()
            return seen

        opened = threading.Semaphore(0)
        with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
            streams = [pool.submit(follow, environment_id) for environment_id in ids]
            for _ in ids:
                assert opened.acquire(timeout=30)  # every stream sent "starting"
            assert two.app.state.context.engine.pool.checkedout() <= 1  # type: ignore[attr-defined]
            backend_one.ready.update(ids[:5])  # five come up on the cluster replica one watches
            for environment_id in ids[5:]:  # five are stopped through replica one
                assert one.post(f"/api/v1/environments/{environment_id}/stop", headers=ada).status_code == 200
            seen = [future.result(timeout=30) for future in streams]
    assert seen == [["starting", "running"]] * 5 + [["starting", "stopped"]] * 5


def test_a_sign_out_through_one_replica_ends_the_progress_streams_the_other_serves(
    database: str, tmp_path: Path
) -> None:
    """The launch dialog's stream is served by replica two; the user signs out through replica one,
    which two hears nothing of: two's periodic check of its open streams' sessions ends the stream,
    with a last event saying why."""
    one, two = replicas(database, tmp_path)
    with one, two:
        ada = dev_sign_in(one, "ada@example.org")
        environment_id = one.post("/api/v1/environments", json={"application": "files"}, headers=ada).json()["id"]
        opened = threading.Event()
        limit = CHECK_SECONDS + 5

        def follow() -> tuple[list[tuple[str, dict[str, Any]]], float | None]:
            events, name, signed_out_at = [], "message", None
            with two.stream("GET", f"/api/v1/environments/{environment_id}/events", headers=ada) as stream:
                for line in stream.iter_lines():  # a keep-alive at least every 15 s: never stuck for good
                    if line.startswith("event: "):
                        name = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        events.append((name, json.loads(line.removeprefix("data: "))))
                        opened.set()
                    if signed_out_at is None and signed_out:
                        signed_out_at = signed_out[0]
                    if signed_out_at is not None and time.monotonic() - signed_out_at > limit:
                        return events, None  # still open: the test fails below
            return events, None if signed_out_at is None else time.monotonic() - signed_out_at

        signed_out: list[float] = []
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stream = pool.submit(follow)
            assert opened.wait(30), "the stream sent no first event"
            assert one.post("/api/v1/auth/logout", headers=ada).status_code == 204
            signed_out.append(time.monotonic())
            events, ended_after = stream.result(timeout=60)
    assert events[-1] == ("signed_out", {"status": "signed_out", "message": "your session has ended; sign in again"})
    assert ended_after is not None and ended_after < limit, (ended_after, events)


def test_a_migration_walks_its_manifest_in_the_listings_order_whatever_the_collation(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest is read beside the listings in code-point order; a column under a linguistic
    collation (ICU's, where "a" < "B" < "é" < "Z") must not change that order, or the walk stops."""
    from cmbcluster.db.models import Storage
    from cmbcluster.local.storage import LocalStorage
    from cmbcluster.migration import engine as migration_engine

    monkeypatch.setattr(migration_engine, "MANIFEST_BATCH", 2)
    (client,) = replicas(database, tmp_path, count=1)
    with client:
        dev_sign_in(client, "pi@example.org")
        ada = dev_sign_in(client, "ada@example.org")
        created = client.post("/api/v1/storages", headers=ada, json={"display_name": "data"})
        assert created.status_code == 201, created.text
        storage_id = created.json()["id"]
        keys = ["B.txt", "Z.txt", "_x.txt", "a.txt", "e.txt", "é.txt", "z/1.txt"]
        for key in keys:
            assert client.put(
                f"/api/v1/storages/{storage_id}/objects/{key}", headers=ada, content=key.encode()
            ).is_success
        context = client.app.state.context  # type: ignore[attr-defined]
        with context.sessions() as db:
            db.execute(text('ALTER TABLE migration_objects ALTER COLUMN key TYPE varchar(1024) COLLATE "und-x-icu"'))
            db.commit()
        target = LocalStorage(tmp_path / "elsewhere")
        run = migration_engine.Migration(
            context.sessions, migration_engine.Side(name="local", storage=context.storage),
            migration_engine.Side(name="elsewhere", storage=target),
        )  # fmt: skip
        with context.sessions() as db:  # a first pass, as a run killed before its switch leaves it
            storage = db.get(Storage, storage_id)
            assert storage is not None
            manifest = run._manifest_row(db, storage)
            from cmbcluster.interfaces import UserRef

            manifest.target_bucket = run._create_target_bucket(storage, UserRef(id=storage.user_id))
            db.commit()
            target_bucket = manifest.target_bucket
            assert target_bucket is not None
            outcome = migration_engine.BucketOutcome(storage_id="", owner="", display_name="", state="")
            run._copy_pass(db, manifest, outcome, announce=False)
        result = run.run()
    assert result.buckets[0].state == "switched", result.buckets[0].message
    assert result.buckets[0].copied == 0 and result.buckets[0].skipped == len(keys)
    assert {o.key for o in target.list_objects(target_bucket, delimiter=None).objects} == set(keys)


def test_usage_rollups_add_up_on_postgresql(database: str) -> None:
    """The rollups' upserts (ON CONFLICT ... DO UPDATE) and their sums, as PostgreSQL returns them
    (numeric for big integers): an interval across two midnights, closed later; the bucket's bytes."""
    import datetime as dt

    from cmbcluster.db import session_factory
    from cmbcluster.db.models import StorageInterval, UsageInterval
    from cmbcluster.pricing import ComputePrice, PriceTable
    from cmbcluster.services import accounting

    engine = create_db_engine(database)
    upgrade(engine)
    nov = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    s = int(nov.timestamp())
    prices = PriceTable(
        provider="t", compute=ComputePrice(vcpu_hour=0.5, gib_hour=0.0), storage_gb_month={"standard": 1}
    )
    with session_factory(engine)() as db:
        running = UsageInterval(environment_id="e1", user_id="u1", application="files", preset="light", cpu=2,
                                memory_gib=4, start_s=s + 22 * 3600, seen_s=s + 22 * 3600)  # fmt: skip
        db.add_all([
            running,
            UsageInterval(environment_id="e2", user_id="u1", application="files", preset="light", cpu=1,
                          memory_gib=1, start_s=s + 3600, end_s=s + 2 * 3600, seen_s=s),
            StorageInterval(storage_id="b", user_id="u1", storage_class="standard", bytes=1024**3, start_s=s,
                            end_s=s + 3 * 86400),
        ])  # fmt: skip
        db.commit()
        running.end_s = s + 2 * 86400 + 3 * 3600  # closed: 22:00 on the 1st to 03:00 on the 3rd, 29 hours
        db.commit()
        now = nov + dt.timedelta(days=10)
        month = accounting.usage_by(db, prices, nov, nov + dt.timedelta(days=30), now=now)["u1"]
        assert (month.environment_hours, month.core_hours, month.compute_cost) == (30, 59, 29.5)
        assert month.storage_gb_months == pytest.approx(72 / 730)
        second = accounting.usage_by(db, prices, nov + dt.timedelta(days=1), nov + dt.timedelta(days=2), now=now)["u1"]
        assert second.core_hours == 48
        days = accounting.report(db, prices, nov, nov + dt.timedelta(days=4), "day", now=now).rows
        assert [round(usage.core_hours, 6) for _key, _label, usage in days] == [5, 48, 6, 0]
    engine.dispose()


def journal_work(context: Any, made: list[dict[str, Any]], *, gone: str, other: str) -> None:
    """Work in the journal as replicas leave it: ``gone``, a server instance whose heartbeat stopped
    two minutes ago, uploading into ``made[0]`` and deleting it; ``other`` uploading into
    ``made[1]`` and deleting ``made[2]``."""
    with context.sessions() as db:
        db.add(ServerInstance(id=gone, heartbeat_at=utcnow() - dt.timedelta(minutes=2)))
        for owner, storage in ((gone, made[0]), (other, made[1])):
            db.add(UploadJournal(storage_id=storage["id"], backend="local", bucket_name=storage["bucket_name"],
                                 key=f"from-{owner[:4]}", owner=owner, reserved_bytes=5))  # fmt: skip
        for owner, storage in ((gone, made[0]), (other, made[2])):
            db.execute(update(Storage).where(Storage.id == storage["id"])
                       .values(status="deleting", delete_force=True, delete_owner=owner))  # fmt: skip
        db.commit()


def test_the_leader_recovers_the_storage_work_of_gone_replicas_only(database: str, tmp_path: Path) -> None:
    """Uploads and bucket deletes are journalled with the server instance running them. The replica
    that takes over leadership finishes the work of instances that are gone (no heartbeat for a
    minute, or stopped), and leaves a live replica's in-flight work alone, until that replica goes."""
    one, two = replicas(database, tmp_path, backend_type=Elected, reconcile_interval_seconds=1)
    contexts = [client.app.state.context for client in (one, two)]  # type: ignore[attr-defined]
    aborted: list[tuple[str, str]] = []

    def record_abort(bucket: str, *, started_before: dt.datetime, key: str | None = None) -> int:
        aborted.append((bucket, key or ""))
        return 1

    contexts[1].storage.abort_unfinished_uploads = record_abort  # the storage service's view, on the leader
    with two, contextlib.ExitStack() as replica_one:
        replica_one.enter_context(one)
        ada = dev_sign_in(one, "ada@example.org")
        made = [one.post("/api/v1/storages", json={"display_name": f"b{i}"}, headers=ada).json() for i in range(3)]
        assert all("id" in m for m in made), made
        gone = "0" * 32  # a replica killed two minutes ago: its heartbeat stopped then
        live = contexts[0].instance_id
        journal_work(contexts[0], made, gone=gone, other=live)

        def journal() -> list[str | None]:
            with contexts[0].sessions() as db:
                return sorted(db.execute(select(UploadJournal.owner)).scalars(), key=str)

        def statuses() -> dict[str, str]:
            with contexts[0].sessions() as db:
                return dict(db.execute(select(Storage.id, Storage.status)).all())

        time.sleep(2)  # nobody leads yet: nothing is recovered
        assert journal() == sorted([gone, live]) and aborted == []
        contexts[1].compute.leading = True  # replica two takes over
        deadline = time.monotonic() + 20
        while journal() != [live] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert journal() == [live]  # the gone replica's upload was aborted, the live one's spared
        assert aborted == [(made[0]["bucket_name"], f"from-{gone[:4]}")]
        assert statuses() == {made[1]["id"]: "active", made[2]["id"]: "deleting"}  # its delete finished
        time.sleep(2.5)  # more full passes: still nothing of the live replica touched
        assert journal() == [live] and statuses()[made[2]["id"]] == "deleting"

        replica_one.close()  # replica one stops: its journalled work is the leader's now
        deadline = time.monotonic() + 20
        while (journal() or len(statuses()) > 1) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert journal() == []
        assert aborted[-1] == (made[1]["bucket_name"], f"from-{live[:4]}")
        assert statuses() == {made[1]["id"]: "active"}


def test_two_transactions_closing_one_interval_count_it_once(database: str, tmp_path: Path) -> None:
    """The progress hub records an environment's failure while the reconcile loop, in its own
    transaction (READ COMMITTED), finds it ended since its last pass and closes its usage interval
    at the moment last seen: the interval is closed once, by the first, and the daily and monthly
    rollups hold its hours once."""
    from sqlalchemy import func

    from cmbcluster.db.models import Environment, UsageInterval, UsageRollup
    from cmbcluster.services import accounting

    (one,) = replicas(database, tmp_path, count=1)
    with one:
        ada = dev_sign_in(one, "ada@example.org")
        made = one.post("/api/v1/environments", json={"application": "files"}, headers=ada)
        assert made.status_code == 201, made.text
        env_id = made.json()["id"]
        context = one.app.state.context  # type: ignore[attr-defined]
        with context.sessions() as db:  # opened an hour ago, last seen running 50 minutes ago
            start = int(time.time()) - 3600
            db.execute(update(UsageInterval).where(UsageInterval.environment_id == env_id)
                       .values(start_s=start, seen_s=start + 600))  # fmt: skip
            db.commit()
        with context.sessions() as hub, context.sessions() as loop:
            mine, theirs = hub.get(Environment, env_id), loop.get(Environment, env_id)
            assert mine is not None and theirs is not None and theirs.status == "starting"
            mine.status, mine.stopped_at = "failed", utcnow() - dt.timedelta(minutes=30)
            hub.flush()  # the hub closes the interval (30 minutes ago) and holds its locks

            def the_loop_closes_it_too() -> None:
                accounting.close_at_last_seen(loop, env_id)
                loop.flush()
                theirs.status, theirs.stopped_at = "failed", utcnow()
                loop.commit()

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                closing = pool.submit(the_loop_closes_it_too)
                time.sleep(1)  # the loop is waiting for the hub's lock by now
                hub.commit()
                closing.result(timeout=30)
        with context.sessions() as db:
            (interval,) = db.execute(select(UsageInterval).where(UsageInterval.environment_id == env_id)).scalars()
            assert interval.end_s == start + 1800
            for span in ("day", "month"):
                rolled = db.execute(select(func.sum(UsageRollup.seconds)).where(UsageRollup.span == span)).scalar_one()
                assert rolled == 1800, span


def test_without_leader_election_a_replica_spares_the_work_of_another_live_one(database: str, tmp_path: Path) -> None:
    """Leader election off on a shared database (a compute backend without it, or a Deployment's
    RollingUpdate starting the new pod beside the old): every replica recovers interrupted storage
    work on its full passes, and an owner counts as gone only once its heartbeat stops. The new
    replica leaves the old one's upload in flight and bucket delete alone, holds the upload's bytes
    against the quota, and recovers what a replica gone for two minutes left."""
    one, two = replicas(database, tmp_path, reconcile_interval_seconds=1)
    contexts = [client.app.state.context for client in (one, two)]  # type: ignore[attr-defined]
    assert not contexts[1].compute.elects_leader
    aborted: list[tuple[str, str]] = []

    def record_abort(bucket: str, *, started_before: dt.datetime, key: str | None = None) -> int:
        aborted.append((bucket, key or ""))
        return 1

    for context in contexts:  # either replica may recover the gone one's work
        context.storage.abort_unfinished_uploads = record_abort
    with one:
        ada = dev_sign_in(one, "ada@example.org")
        made = [one.post("/api/v1/storages", json={"display_name": f"b{i}"}, headers=ada).json() for i in range(3)]
        assert all("id" in m for m in made), made
        gone, old = "0" * 32, contexts[0].instance_id  # a replica killed two minutes ago; the old pod
        journal_work(contexts[0], made, gone=gone, other=old)
        with two:  # the new pod starts beside the old one: a start-up pass, then one every second
            time.sleep(2.5)
            with contexts[0].sessions() as db:
                assert list(db.execute(select(UploadJournal.owner)).scalars()) == [old]  # the gone one's aborted
                statuses = dict(db.execute(select(Storage.id, Storage.status)).all())
            assert aborted == [(made[0]["bucket_name"], f"from-{gone[:4]}")]
            assert statuses == {made[1]["id"]: "active", made[2]["id"]: "deleting"}  # the old pod's delete runs on
            ada_id = one.get("/api/v1/auth/me", headers=ada).json()["id"]
            held = QuotaState(quota_bytes=None, current_bytes=0, noncurrent_bytes=0, user_id=ada_id)
            with contexts[1].sessions() as db:  # its upload's bytes still count on the new pod
                assert reserved_bytes(db, contexts[1], held) == 5


def test_a_measurement_never_drops_what_another_replica_stored_meanwhile(database: str, tmp_path: Path) -> None:
    """A bucket's usage is measured on one replica (a listing, long on a cloud bucket) while an
    upload into it ends on the other: the measurement, which listed the bucket before that upload,
    is not stored over the upload's bytes, so the quota still counts them and refuses what would
    pass it. (Each replica keeps its own measurements apart; only the database says what changed.)"""
    core = CoreSettings(data_dir=tmp_path / "shared", database_url=database, storage_quota_bytes=3000)
    one, two = (TestClient(create_app(core), base_url=LOCAL) for _ in range(2))
    with one, two:
        ada = dev_sign_in(one, "ada@example.org")
        made = one.post("/api/v1/storages", json={"display_name": "data"}, headers=ada).json()
        context = one.app.state.context  # type: ignore[attr-defined]
        listed, release = threading.Event(), threading.Event()
        bucket_usage = context.storage.bucket_usage

        def slow_listing(bucket: str) -> Any:
            found = bucket_usage(bucket)  # the bucket as it is before the upload
            listed.set()
            release.wait(30)
            return found

        context.storage.bucket_usage = slow_listing
        measuring = context.storage_runtime.refresher.refresh(made["id"], made["bucket_name"])
        assert listed.wait(30)
        objects = f"/api/v1/storages/{made['id']}/objects"
        assert two.put(f"{objects}/a.bin", content=b"a" * 2000, headers=ada).status_code == 201
        release.set()
        assert measuring.result(timeout=30).size_bytes == 0  # what it listed
        context.storage.bucket_usage = bucket_usage
        refused = two.put(f"{objects}/b.bin", content=b"b" * 1001, headers=ada)
        assert refused.status_code == 413, refused.text
        assert one.get("/api/v1/storages", headers=ada).json()["quota"]["used_bytes"] == 2000
