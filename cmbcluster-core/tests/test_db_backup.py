"""SQLite backups to the storage backend and restore, on the embedded default's local storage."""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from waiting import wait_until_running

from cmbcluster.app import create_app
from cmbcluster.db.backup import BackupUnavailable, DatabaseBackups, sweep_backup_leftovers
from cmbcluster.errors import ConfigurationError, InvalidRequest, NotFound
from cmbcluster.local.storage import LocalStorage
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in
from cmbcluster.testing.backup import probe_database, read_probe, write_probe
from cmbcluster.testing.process import ServeProcess, clean_environ, free_port
from cmbcluster.testing.process import run_cli as cmbcluster

BUCKET = "cmbcluster-database"


@pytest.fixture
def settings(tmp_path: Path) -> CoreSettings:
    data_dir = tmp_path / "data"
    (data_dir / "buckets" / BUCKET).mkdir(parents=True)  # the operator's database bucket
    return CoreSettings(data_dir=data_dir, database_bucket=BUCKET, database_backups_kept=3)


@pytest.fixture
def database(settings: CoreSettings) -> Path:
    """A migrated CMBCluster database with a probe table the tests write to."""
    return probe_database(settings.data_dir / "cmbcluster.db")


@pytest.fixture
def storage(settings: CoreSettings) -> LocalStorage:
    return LocalStorage(settings.data_dir / "buckets")


@pytest.fixture
def backups(settings: CoreSettings, storage: LocalStorage, database: Path) -> DatabaseBackups:
    return DatabaseBackups.from_settings(settings, storage)


def test_backup_is_a_gzipped_copy_named_by_time_and_listed(
    backups: DatabaseBackups, database: Path, storage: LocalStorage, tmp_path: Path
) -> None:
    write_probe(database, "first")
    backup = backups.backup()
    assert backup.key == f"cmbcluster-db/cmbcluster-{backup.version}.sqlite3.gz"
    assert backups.list() == [backup]
    copy = tmp_path / "copy.db"
    copy.write_bytes(gzip.decompress(b"".join(storage.download_object(BUCKET, backup.key))))
    assert read_probe(copy) == ["first"]
    # No temporary file is left beside the database.
    assert sorted(p.name for p in database.parent.iterdir() if p.name.startswith(".cmbcluster-backup")) == []


def test_restore_newest_keeps_the_current_database_aside(backups: DatabaseBackups, database: Path) -> None:
    write_probe(database, "first")
    backups.backup()
    write_probe(database, "second")
    newest = backups.backup()
    write_probe(database, "third")  # not backed up

    result = backups.restore()
    assert result.backup == newest
    assert read_probe(database) == ["first", "second"]
    assert result.kept_aside is not None and result.kept_aside.name.startswith("cmbcluster.db.before-restore-")
    assert read_probe(result.kept_aside) == ["first", "second", "third"]  # nothing lost


def test_a_restore_keeps_access_taken_away_since_the_backup(backups: DatabaseBackups, database: Path) -> None:
    """A restore brought back what administrators had taken away since the backup: a deactivated
    account's API token answered again (found by an outsider's trial); so would a deleted account,
    an admin's withdrawn rights, a session signed out or a token revoked."""
    from sqlalchemy import delete, select, update
    from sqlalchemy.orm import Session as OrmSession

    from cmbcluster.db import create_db_engine
    from cmbcluster.db.models import ApiToken, Session, User, utcnow

    engine = create_db_engine(f"sqlite:///{database}")
    later = utcnow() + dt.timedelta(hours=1)
    with OrmSession(engine) as db, db.begin():
        for name, role in (("ada", "admin"), ("bob", "admin"), ("eve", "user"), ("zoe", "user"), ("kim", "user")):
            db.add(User(id=name, email=f"{name}@example.org", role=role, auth_provider="dev", subject=name))
        db.flush()
        for name in ("ada", "eve", "kim"):
            db.add(Session(id=f"s-{name}", user_id=name, token_hash=f"s{name}", expires_at=later))
            db.add(ApiToken(id=f"t-{name}", user_id=name, name="script", token_hash=f"t{name}", display_prefix="x"))
    backup = backups.backup()
    with OrmSession(engine) as db, db.begin():  # what administrators did after it
        db.execute(update(User).where(User.id == "eve").values(status="deactivated"))
        db.execute(delete(User).where(User.id == "zoe"))
        db.execute(update(User).where(User.id == "bob").values(role="user"))
        db.execute(update(Session).where(Session.id == "s-kim").values(revoked_at=utcnow()))  # signed out
        db.execute(update(ApiToken).where(ApiToken.id == "t-kim").values(revoked_at=utcnow()))
        db.add(User(id="new", email="new@example.org", auth_provider="dev", subject="new"))
    engine.dispose()

    result = backups.restore(backup.version)
    engine = create_db_engine(f"sqlite:///{database}")
    with OrmSession(engine) as db:
        users = {u.id: (u.status, u.role) for u in db.execute(select(User)).scalars()}
        revoked = {row.id for table in (Session, ApiToken)
                   for row in db.execute(select(table.id).where(table.revoked_at.is_not(None)))}  # fmt: skip
    engine.dispose()
    assert users == {"ada": ("active", "admin"), "bob": ("active", "user"), "eve": ("deactivated", "user"),
                     "zoe": ("deactivated", "user"), "kim": ("active", "user")}  # fmt: skip
    assert revoked == {"s-kim", "t-kim"}  # (eve's own still live: her status refuses them)
    assert result.access_kept_away == (
        "2 accounts deactivated or deleted since the backup stay deactivated: eve@example.org, zoe@example.org",
        "1 admins demoted since the backup stay users: bob@example.org",
        "1 sessions and 1 API tokens ended since the backup stay ended",
    )


def test_a_backup_from_before_a_column_the_carry_over_writes_still_keeps_access_taken_away(
    backups: DatabaseBackups, database: Path
) -> None:
    """A backup from before migration 0010 has no users.admin_because: writing it failed, the whole
    carry-over was undone, and a user deactivated since came back active (found by a review)."""
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        for name, role in (("bob", "admin"), ("eve", "user")):
            db.execute("INSERT INTO users (id, email, name, role, status, email_verified, auth_provider, subject, "
                       "created_at) VALUES (?, ?, '', ?, 'active', 0, 'dev', ?, '2026-11-01 00:00:00.000000')",
                       (name, f"{name}@example.org", role, name))  # fmt: skip
        db.execute("ALTER TABLE users DROP COLUMN admin_because")  # as before 0010
    backup = backups.backup()
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("ALTER TABLE users ADD COLUMN admin_because VARCHAR(20)")  # the server upgraded since
        db.execute("UPDATE users SET role = 'user' WHERE id = 'bob'")
        db.execute("UPDATE users SET status = 'deactivated' WHERE id = 'eve'")
    result = backups.restore(backup.version)
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert dict(db.execute("SELECT id, role || '/' || status FROM users").fetchall()) == {
            "bob": "user/active", "eve": "user/deactivated"}  # fmt: skip
    assert len(result.access_kept_away) == 2, result.access_kept_away


def test_a_damaged_database_is_replaced_though_it_cannot_say_what_it_took_away(
    backups: DatabaseBackups, database: Path
) -> None:
    write_probe(database, "good")
    backups.backup()
    for path in [database, *database.parent.glob(database.name + "-*")]:
        path.unlink()
    database.write_bytes(b"a disk error's garbage" * 100)
    result = backups.restore()
    assert read_probe(database) == ["good"]
    (line,) = result.access_kept_away
    assert line.startswith("could not read what access the replaced database took away since the backup")


def test_restore_a_named_version_and_refuse_an_unknown_one(backups: DatabaseBackups, database: Path) -> None:
    write_probe(database, "first")
    oldest = backups.backup()
    write_probe(database, "second")
    backups.backup()
    assert backups.restore(oldest.version).backup == oldest
    assert read_probe(database) == ["first"]
    with pytest.raises(NotFound, match=r"no database backup .20990101T000000000000Z.*the newest is"):
        backups.restore("20990101T000000000000Z")


def test_restore_with_no_backup_says_so(backups: DatabaseBackups) -> None:
    with pytest.raises(NotFound, match="there is no database backup in cmbcluster-database/cmbcluster-db/"):
        backups.restore()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not gzip at all", "not valid gzip data"),
        (gzip.compress(b"SQLite format 3\x00" + b"\x00" * 4000, mtime=0)[:-12], "truncated"),
        (gzip.compress(b"a plain text file, gzipped", mtime=0), "not a usable SQLite database"),
    ],
)
def test_a_damaged_backup_is_refused_and_the_database_left_untouched(
    backups: DatabaseBackups, database: Path, storage: LocalStorage, content: bytes, message: str
) -> None:
    write_probe(database, "precious")
    before = database.read_bytes()
    storage.upload_object(BUCKET, "cmbcluster-db/cmbcluster-20990101T000000000000Z.sqlite3.gz", [content])
    with pytest.raises(InvalidRequest, match=message):
        backups.restore()
    assert database.read_bytes() == before and read_probe(database) == ["precious"]
    assert not list(database.parent.glob("*.before-restore-*"))


def test_a_database_that_is_not_cmbclusters_is_refused(
    backups: DatabaseBackups, database: Path, storage: LocalStorage, tmp_path: Path
) -> None:
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as db, db:
        db.execute("CREATE TABLE t (x)")
    key = "cmbcluster-db/cmbcluster-20990101T000000000000Z.sqlite3.gz"
    storage.upload_object(BUCKET, key, [gzip.compress(other.read_bytes())])
    with pytest.raises(InvalidRequest, match="not a CMBCluster database"):
        backups.restore()


def test_only_the_newest_backups_are_kept(backups: DatabaseBackups, database: Path) -> None:
    made = [backups.backup() for _ in range(5)]
    assert backups.list() == made[-3:]  # CMBCLUSTER_DATABASE_BACKUPS_KEPT=3


def test_backups_named_in_the_future_do_not_make_the_new_one_pruned(
    backups: DatabaseBackups, database: Path, storage: LocalStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """Three objects named after now (a clock that once ran ahead, or damaged ones) counted as the
    three newest: the backup just made and every good one before it were deleted."""
    write_probe(database, "good")
    earlier = [backups.backup() for _ in range(2)]
    ahead = [f"cmbcluster-db/cmbcluster-2099010{day}T000000000000Z.sqlite3.gz" for day in (1, 2, 3)]
    for key in ahead:
        storage.upload_object(BUCKET, key, [b"x"])
    made = backups.backup()
    assert [b.key for b in backups.list()] == [*(b.key for b in [*earlier, made]), *ahead]
    assert "named after the one just made" in caplog.text
    more = [backups.backup() for _ in range(2)]  # the kept count still holds for ours
    assert [b.key for b in backups.list()] == [*(b.key for b in [made, *more]), *ahead]


def test_writers_are_not_blocked_while_a_backup_runs(backups: DatabaseBackups, database: Path) -> None:
    with contextlib.closing(sqlite3.connect(database)) as db, db:  # ~40 MB, so the copy takes a while
        db.executemany("INSERT INTO probe VALUES (?)", (("x" * 4000,) for _ in range(10_000)))
    latencies: list[float] = []
    stop = threading.Event()

    def writer() -> None:
        with contextlib.closing(sqlite3.connect(database, timeout=30)) as db:
            while not stop.is_set():
                started = time.perf_counter()
                with db:
                    db.execute("INSERT INTO probe VALUES ('during')")
                latencies.append(time.perf_counter() - started)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.05)
        started = time.perf_counter()
        backups.backup()
        duration = time.perf_counter() - started
        writes_before = len(latencies)
        time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert writes_before > 10, "the writer made no progress during the backup"
    assert max(latencies) < min(0.5, duration), (max(latencies), duration)
    backups.restore()
    assert read_probe(database).count("x" * 4000) == 10_000  # a consistent snapshot, taken mid-write


def test_no_backups_for_postgresql_or_without_a_bucket(tmp_path: Path, storage: LocalStorage) -> None:
    postgres = CoreSettings(data_dir=tmp_path, database_bucket=BUCKET, database_url="postgresql://db/cmbcluster")
    with pytest.raises(BackupUnavailable, match=r"not a SQLite file.*pg_dump"):
        DatabaseBackups.from_settings(postgres, storage)
    with pytest.raises(BackupUnavailable, match="set CMBCLUSTER_DATABASE_BUCKET"):
        DatabaseBackups.from_settings(CoreSettings(data_dir=tmp_path), storage)


def test_the_original_variable_names_select_the_database_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("S3_DATABASE_BUCKET", "GCS_DATABASE_BUCKET", "DATABASE_BUCKET", "CMBCLUSTER_DATABASE_BUCKET"):
        monkeypatch.setenv(name, f"from-{name.lower()}")
        assert CoreSettings().database_bucket == f"from-{name.lower()}"
        monkeypatch.delenv(name)


# -- the server ---------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(settings: CoreSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        yield client


def test_a_server_without_its_database_restores_the_newest_backup(settings: CoreSettings) -> None:
    with serving(settings) as client:
        dev_sign_in(client, "ada@example.org", "Ada")
    backups = DatabaseBackups.from_settings(settings, LocalStorage(settings.data_dir / "buckets"))
    backups.backup()
    for path in settings.data_dir.glob("cmbcluster.db*"):
        path.unlink()  # a fresh disk
    with serving(settings) as client:
        headers = dev_sign_in(client, "bob@example.org", "Bob")
        users = client.get("/api/v1/admin/users", headers=headers)
        # Ada, restored, is still the first user, hence the admin; Bob is not.
        assert users.status_code == 403, users.text


def test_a_restore_from_before_an_environment_keeps_its_users_files(
    settings: CoreSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Restored from a backup older than an environment, the database has no record of it, and the
    reconcile loop at start deleted its home folder with it: the user's files lost for good, the
    database set aside beside them no help (found by an outsider's trial). The same when a server
    starts on a new database in a data directory that holds environments."""
    backups = DatabaseBackups.from_settings(settings, LocalStorage(settings.data_dir / "buckets"))
    with serving(settings) as client:
        alice = dev_sign_in(client, "alice@example.org", "Alice")
        before = backups.backup()  # (the server backs up again as it stops: that one has it)
        created = client.post("/api/v1/environments", headers=alice, json={"application": "files", "preset": "light"})
        assert created.status_code == 201, created.text
        env_id = created.json()["id"]
        wait_until_running(client.app.state.context, env_id)  # type: ignore[attr-defined]
        home = settings.data_dir / "homes" / env_id
        (home / "thesis.txt").write_text("three months of work\n")
    backups.restore(before.version)
    with serving(settings) as client:
        assert client.get("/readyz").status_code == 200  # the reconcile at start has run
        context = client.app.state.context  # type: ignore[attr-defined]
        assert env_id not in {status.environment_id for status in context.compute.list_managed()}
    assert (home / "thesis.txt").read_text() == "three months of work\n"
    assert f"the home folder of environment {env_id}, which has no record, is kept" in caplog.text


def test_a_server_whose_backups_cannot_be_read_does_not_start_empty(settings: CoreSettings) -> None:
    missing = settings.model_copy(update={"database_bucket": "no-such-bucket"})
    with pytest.raises(ConfigurationError, match="is missing and its backups in no-such-bucket cannot be listed"):
        with serving(missing):
            pass
    assert not (settings.data_dir / "cmbcluster.db").exists()


def test_a_server_with_no_backup_yet_starts_with_a_new_database(settings: CoreSettings, tmp_path: Path) -> None:
    env = {**clean_environ(), "CMBCLUSTER_DATA_DIR": str(settings.data_dir), "CMBCLUSTER_DATABASE_BUCKET": BUCKET,
           "CMBCLUSTER_LOG_LEVEL": "INFO", "CMBCLUSTER_LOG_FORMAT": "text"}  # fmt: skip
    with ServeProcess(env, tmp_path) as server:
        assert server.wait_ready("/readyz").status_code == 200
        said = server.output()
    assert (settings.data_dir / "cmbcluster.db").exists()
    assert said.count("starting with a new database") == 1, said  # (`serve` asked, then the app's start-up again)


def test_the_server_backs_up_periodically_when_the_database_changed(settings: CoreSettings) -> None:
    periodic = settings.model_copy(update={"database_backup_interval_minutes": 0.005})  # 0.3 s
    backups = DatabaseBackups.from_settings(periodic, LocalStorage(settings.data_dir / "buckets"))
    with serving(periodic) as client:
        dev_sign_in(client, "ada@example.org", "Ada")
        deadline = time.monotonic() + 10
        while not backups.list() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert backups.list(), "no periodic backup within 10 s"


def test_a_stopping_server_backs_up_what_changed_and_only_that(settings: CoreSettings) -> None:
    backups = DatabaseBackups.from_settings(settings, LocalStorage(settings.data_dir / "buckets"))
    with serving(settings) as client:
        dev_sign_in(client, "ada@example.org", "Ada")
    assert len(backups.list()) == 1  # made at stop, long before the 60 minutes
    with serving(settings) as client:
        assert client.get("/readyz").status_code == 200
    assert len(backups.list()) == 1  # nothing changed: nothing uploaded


# -- the command line ---------------------------------------------------------------------------


def test_a_database_bucket_that_is_not_there_is_said_by_config_check_and_at_start(
    settings: CoreSettings, database: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`config check --connect` said "configuration OK" of a database bucket that does not exist, and
    the server started without a word: backups failed first an hour later, or at the stop (found by
    an outsider's trial)."""
    env = {**clean_environ(), "CMBCLUSTER_DATA_DIR": str(settings.data_dir), "COLUMNS": "200"}
    present = cmbcluster("config", "check", "--connect", env={**env, "CMBCLUSTER_DATABASE_BUCKET": BUCKET},
                         cwd=tmp_path)  # fmt: skip
    assert present.returncode == 0, present.stderr
    assert f"database bucket {BUCKET}: answered (0 backups)" in present.stdout
    absent = cmbcluster("config", "check", "--connect", env={**env, "CMBCLUSTER_DATABASE_BUCKET": "no-such-bucket"},
                        cwd=tmp_path)  # fmt: skip
    assert absent.returncode == 1 and "configuration OK" not in absent.stdout, absent.stdout
    assert "database bucket no-such-bucket: did not answer" in absent.stderr, absent.stderr
    assert "Traceback" not in absent.stderr

    with serving(settings.model_copy(update={"database_bucket": "no-such-bucket"})) as client:
        assert client.get("/readyz").status_code == 200  # it serves
        deadline = time.monotonic() + 10
        while "the database bucket no-such-bucket cannot be read" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "the database bucket no-such-bucket cannot be read, so database backups will fail" in caplog.text


def test_cli_backup_of_a_file_that_is_not_a_database_is_one_line(settings: CoreSettings, tmp_path: Path) -> None:
    """Found by an outsider's trial: a traceback from SQLite's backup API."""
    text = tmp_path / "notes.db"
    text.write_text("not a database, " * 100)
    env = {**clean_environ(), "CMBCLUSTER_DATA_DIR": str(settings.data_dir), "CMBCLUSTER_DATABASE_BUCKET": BUCKET,
           "CMBCLUSTER_DATABASE_URL": f"sqlite:///{text}"}  # fmt: skip
    made = cmbcluster("db", "backup", env=env, cwd=tmp_path)
    assert made.returncode != 0 and "Traceback" not in made.stderr, made.stderr
    assert f"cannot back up {text}: file is not a database" in made.stderr, made.stderr


def test_cli_backup_list_and_restore(settings: CoreSettings, database: Path, tmp_path: Path) -> None:
    env = {
        **clean_environ(),
        "CMBCLUSTER_DATA_DIR": str(settings.data_dir),
        "S3_DATABASE_BUCKET": BUCKET,  # the original deployment's name works as well
        "COLUMNS": "200",
    }
    write_probe(database, "first")
    made = cmbcluster("db", "backup", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert f"database backed up to {BUCKET}/cmbcluster-db/cmbcluster-" in made.stdout
    version = made.stdout.split("cmbcluster-db/cmbcluster-")[1].split(".sqlite3.gz")[0]
    listed = cmbcluster("db", "backup", "--list", env=env, cwd=tmp_path)
    assert listed.returncode == 0 and version in listed.stdout
    write_probe(database, "second")
    restored = cmbcluster("db", "restore", "--version", version, env=env, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert "the previous database is kept as" in restored.stdout
    assert read_probe(database) == ["first"]


def test_cli_errors_are_clear(settings: CoreSettings, tmp_path: Path) -> None:
    env = {**clean_environ(), "CMBCLUSTER_DATA_DIR": str(settings.data_dir)}
    for args, extra, message in [
        (["db", "backup"], {}, "no database bucket is configured"),
        (["db", "backup"], {"CMBCLUSTER_DATABASE_URL": "postgresql://db/x"}, "not a SQLite file"),
        (["db", "restore"], {"CMBCLUSTER_DATABASE_BUCKET": BUCKET}, "there is no database backup in"),
        (["db", "restore", "--version", "nope"], {"CMBCLUSTER_DATABASE_BUCKET": "absent"}, "bucket absent not found"),
        (["db", "backup"], {"CMBCLUSTER_DATABASE_BUCKET": BUCKET}, "there is no database at"),
        # A server with no database whose backups cannot be read refuses to start empty, in one line.
        (["serve", "--port", str(free_port())], {"CMBCLUSTER_DATABASE_BUCKET": "absent"}, "backups in absent cannot"),
        # A name the storage service would refuse (the backend's bucket_names), before any backup
        (["db", "backup"], {"CMBCLUSTER_DATABASE_BUCKET": "Backups_2026"},
         "the database bucket: 'Backups_2026' is not a valid bucket name: 3-63 lower-case letters"),
        (["serve", "--port", str(free_port())], {"CMBCLUSTER_DATABASE_BUCKET": "Backups_2026"},
         "CMBCLUSTER_DATABASE_BUCKET: 'Backups_2026' is not a valid bucket name"),
        (["config", "check"], {"CMBCLUSTER_DATABASE_BUCKET": "Backups_2026"},
         "CMBCLUSTER_DATABASE_BUCKET: 'Backups_2026' is not a valid bucket name"),
    ]:  # fmt: skip
        result = cmbcluster(*args, env={**env, **extra}, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in " ".join(result.stderr.split()), (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_restore_is_refused_while_a_server_serves_the_database(
    settings: CoreSettings, database: Path, tmp_path: Path
) -> None:
    """A restore under a running server would leave it writing to the file set aside: refused,
    nothing changed, and allowed again once the server has stopped (even killed)."""
    from cmbcluster.testing.process import ServeProcess

    env = {**clean_environ(), "CMBCLUSTER_DATA_DIR": str(settings.data_dir), "CMBCLUSTER_DATABASE_BUCKET": BUCKET}
    write_probe(database, "first")
    assert cmbcluster("db", "backup", env=env, cwd=tmp_path).returncode == 0
    write_probe(database, "second")
    with ServeProcess(env, tmp_path) as server:
        server.wait_ready("/readyz")
        refused = cmbcluster("db", "restore", env=env, cwd=tmp_path)
        assert refused.returncode == 1
        assert f"(pid {server.process.pid}) is serving" in refused.stderr and "Traceback" not in refused.stderr
        assert read_probe(database) == ["first", "second"]  # untouched
        second = ServeProcess(env, tmp_path)  # nor may a second server open the same SQLite file
        try:
            assert second.process.wait(timeout=60) != 0
            assert "one control plane per SQLite database" in second.output()
            assert "Traceback" not in second.output()  # one clear line, before uvicorn starts
        finally:
            second.stop()
        server.process.kill()  # even killed, its lock goes with it
        server.process.wait()
    restored = cmbcluster("db", "restore", env=env, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert read_probe(database) == ["first"]


# -- what a crash leaves, and damaged backups ------------------------------------------------------

_KILLED_BACKUP = """
import sys, time
from pathlib import Path
from cmbcluster.db.backup import DatabaseBackups
from cmbcluster.local.storage import LocalStorage

class Stalling(LocalStorage):
    def upload_object(self, bucket, key, chunks, *, content_type=None):
        print("copied", flush=True)  # the full copy is beside the database now
        time.sleep(60)

database, buckets, bucket = sys.argv[1:]
DatabaseBackups(Stalling(Path(buckets)), bucket, Path(database)).backup()
"""


def test_a_killed_backup_leaves_no_copy_after_the_next_start(
    settings: CoreSettings, database: Path, tmp_path: Path
) -> None:
    write_probe(database, "precious")
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BACKUP, str(database), str(settings.data_dir / "buckets"), BUCKET],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == b"copied\n"
    finally:
        process.kill()  # SIGKILL: no clean-up runs
        process.wait()
    left = list(database.parent.glob(".cmbcluster-backup-*"))
    assert left and left[0].stat().st_size > 0, "the killed backup left its copy"

    with serving(settings) as client:
        assert client.get("/readyz").status_code == 200
    assert list(database.parent.glob(".cmbcluster-backup-*")) == []
    assert read_probe(database) == ["precious"]


def test_a_copy_in_use_is_not_swept(backups: DatabaseBackups, database: Path) -> None:
    with backups._temporary_file() as copy:  # as a backup under way holds it
        copy.write_bytes(b"in use")
        assert sweep_backup_leftovers(database) == []
        assert copy.read_bytes() == b"in use"
    assert list(database.parent.glob(".cmbcluster-backup-*")) == []


def test_restore_falls_back_past_damaged_newer_backups_and_names_them(
    backups: DatabaseBackups, database: Path, storage: LocalStorage
) -> None:
    write_probe(database, "good")
    good = backups.backup()
    damaged = {
        "cmbcluster-db/cmbcluster-20990101T000000000000Z.sqlite3.gz": b"not gzip at all",
        "cmbcluster-db/cmbcluster-20990102T000000000000Z.sqlite3.gz": gzip.compress(b"plain text"),
    }
    for key, content in damaged.items():
        storage.upload_object(BUCKET, key, [content])
    write_probe(database, "later")

    result = backups.restore()
    assert result.backup == good
    assert [(s.backup.key, s.reason.split(": ")[0]) for s in result.skipped] == [
        ("cmbcluster-db/cmbcluster-20990102T000000000000Z.sqlite3.gz",
         "backup cmbcluster-db/cmbcluster-20990102T000000000000Z.sqlite3.gz is not a usable SQLite database"),
        ("cmbcluster-db/cmbcluster-20990101T000000000000Z.sqlite3.gz",
         "backup cmbcluster-db/cmbcluster-20990101T000000000000Z.sqlite3.gz is not valid gzip data"),
    ]  # fmt: skip
    assert read_probe(database) == ["good"]
    # A named version is restored or refused as it is: no fallback.
    with pytest.raises(InvalidRequest, match="not valid gzip data"):
        backups.restore("20990101T000000000000Z")


def test_a_first_start_restores_the_newest_backup_that_verifies(
    settings: CoreSettings, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(settings) as client:
        dev_sign_in(client, "ada@example.org", "Ada")
    storage = LocalStorage(settings.data_dir / "buckets")
    DatabaseBackups.from_settings(settings, storage).backup()
    damaged = "cmbcluster-db/cmbcluster-20990101T000000000000Z.sqlite3.gz"
    storage.upload_object(BUCKET, damaged, [gzip.compress(b"SQLite format 3\x00" + b"\x00" * 4000)[:-12]])
    for path in settings.data_dir.glob("cmbcluster.db*"):
        path.unlink()  # a fresh disk
    with serving(settings) as client:
        headers = dev_sign_in(client, "bob@example.org", "Bob")
        assert client.get("/api/v1/admin/users", headers=headers).status_code == 403  # Ada's database is back
    skipped = [r.getMessage() for r in caplog.records if "does not verify and is skipped" in r.getMessage()]
    assert len(skipped) == 1 and damaged in skipped[0] and "truncated" in skipped[0]


def test_cli_restore_says_which_backup_it_skipped(settings: CoreSettings, database: Path, tmp_path: Path) -> None:
    env = {**clean_environ(), "CMBCLUSTER_DATA_DIR": str(settings.data_dir),
           "CMBCLUSTER_DATABASE_BUCKET": BUCKET, "COLUMNS": "200"}  # fmt: skip
    write_probe(database, "first")
    assert cmbcluster("db", "backup", env=env, cwd=tmp_path).returncode == 0
    damaged = "cmbcluster-db/cmbcluster-20990101T000000000000Z.sqlite3.gz"
    LocalStorage(settings.data_dir / "buckets").upload_object(BUCKET, damaged, [b"junk"])
    restored = cmbcluster("db", "restore", env=env, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert f"skipped {BUCKET}/{damaged}, which does not verify: backup {damaged} is not valid gzip data" in (
        restored.stdout.replace("\n", " ")
    )


def test_a_stop_with_storage_not_answering_bounds_its_final_backup(
    settings: CoreSettings, caplog: pytest.LogCaptureFixture
) -> None:
    bounded = settings.model_copy(update={"database_stop_backup_seconds": 1.0})
    released = threading.Event()
    client_cm = serving(bounded)
    client = client_cm.__enter__()
    try:
        dev_sign_in(client, "ada@example.org", "Ada")  # a change the final backup would carry

        def hanging(*args: object, **kwargs: object) -> object:
            released.wait(30)  # a storage service that does not answer
            raise ConnectionError("storage down")

        storage = client.app.state.context.storage  # type: ignore[attr-defined]
        storage.upload_object = hanging
    finally:
        started = time.monotonic()
        client_cm.__exit__(None, None, None)
        took = time.monotonic() - started
        released.set()
    assert took < 5, f"the stop took {took:.1f} s"
    warned = [r.getMessage() for r in caplog.records if "final database backup did not finish" in r.getMessage()]
    assert len(warned) == 1 and "within 1 s" in warned[0] and "stops without it" in warned[0]
