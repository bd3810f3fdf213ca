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
