"""Migrations and the SQLite set-up."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from cmbcluster.db import create_db_engine, current_revision, upgrade
from cmbcluster.db.models import Base


def test_migrations_create_the_whole_schema(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'nested' / 'db.sqlite'}")
    upgrade(engine)
    assert current_revision(engine) is not None
    tables = set(inspect(engine).get_table_names())
    assert {
        "users", "sessions", "api_tokens", "environments", "applications", "storages",
        "environment_storages", "env_vars", "secret_files", "activity", "audit_events",
    } <= tables  # fmt: skip


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    """A model change without its migration fails here."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_upgrade_is_idempotent(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    first = current_revision(engine)
    upgrade(engine)
    assert current_revision(engine) == first


def test_schema_head_constant_is_the_newest_migration(tmp_path: Path) -> None:
    from cmbcluster.db.engine import SCHEMA_HEAD, head_revision

    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert head_revision(engine) == SCHEMA_HEAD


def test_empty_database_gets_the_same_schema_as_the_migrations(tmp_path: Path) -> None:
    """The fast path for a new database (create_all and stamp) and the migrations agree."""
    from alembic import command

    from cmbcluster.db.engine import _alembic_config

    fast = create_db_engine(f"sqlite:///{tmp_path / 'fast.sqlite'}")
    upgrade(fast)  # empty: created from the models and stamped
    migrated = create_db_engine(f"sqlite:///{tmp_path / 'migrated.sqlite'}")
    cfg = _alembic_config(migrated)
    with migrated.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")  # the migrations, step by step
    assert current_revision(fast) == current_revision(migrated)

    def schema(engine: object) -> dict[str, object]:
        inspector = inspect(engine)
        return {
            table: (
                sorted((c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)),
                sorted(tuple(i["column_names"]) for i in inspector.get_indexes(table)),
                sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
            )
            for table in inspector.get_table_names()
        }

    assert schema(fast) == schema(migrated)


def test_one_writer_queues_this_processs_writers_and_never_waits_with_the_database_locked(tmp_path: Path) -> None:
    """one_writer() makes starts wait for each other on a lock that wakes them at once; a session
    that already holds the database's write lock passes it, or the two would wait on each other."""
    import threading
    import time

    from cmbcluster.db.engine import one_writer, session_factory

    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    sessions = session_factory(engine)
    insert = text("INSERT INTO rate_limits (key, window_start, count) VALUES (:key, '2026-01-01 00:00:00', 1)")
    holding, queued = sessions(), sessions()
    holding.execute(insert, {"key": "first"})  # holds SQLite's write lock
    entered = threading.Event()

    def queue_behind() -> None:
        with one_writer(queued):
            entered.set()
            queued.execute(insert, {"key": "second"})  # waits for the holder's commit
            queued.commit()

    writer = threading.Thread(target=queue_behind)
    writer.start()
    assert entered.wait(5)  # the other thread has this process's writer lock
    began = time.monotonic()
    with one_writer(holding):  # and this session holds the database's: it goes on
        holding.commit()
    writer.join(10)
    assert not writer.is_alive() and time.monotonic() - began < 5
    with sessions() as db:
        assert db.execute(text("SELECT count(*) FROM rate_limits")).scalar_one() == 2
    holding.close()
    queued.close()
    engine.dispose()
