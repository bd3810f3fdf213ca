"""Database backups through a storage backend, checked as an operator relies on them.

Core makes every backup (:mod:`cmbcluster.db.backup`); a storage plugin only stores the files.
These helpers let a plugin's tests check that round trip against its real store (moto, an
emulator): a probe database to write to, and the whole operator story in one call: a backup
made with ``cmbcluster db backup``, the database lost, a server on the empty disk restoring it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cmbcluster.app import create_app
from cmbcluster.config import load_core_settings
from cmbcluster.db import create_db_engine, upgrade
from cmbcluster.testing.api import LOCAL, dev_sign_in
from cmbcluster.testing.process import run_cli


def probe_database(path: Path) -> Path:
    """A migrated CMBCluster database at ``path`` with a ``probe`` table to write values to."""
    engine = create_db_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE probe (value TEXT)")
    return path


def write_probe(path: Path, *values: str) -> None:
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db, db:
        db.executemany("INSERT INTO probe VALUES (?)", [(v,) for v in values])


def read_probe(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute("SELECT value FROM probe ORDER BY rowid")]


@contextlib.contextmanager
def serving(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The control plane configured by exactly the variables ``env`` (nothing else of this process's)."""
    with monkeypatch.context() as patch:
        for name in set(os.environ) - set(env):
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        app = create_app(load_core_settings())
    with TestClient(app, base_url=LOCAL) as client:
        yield client


def check_a_lost_database_comes_back(
    env: Mapping[str, str], data_dir: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch, bucket: str
) -> None:
    """Ada signs in first (the admin); ``cmbcluster db backup`` stores the database in ``bucket``;
    the database files vanish (a new pod on an empty disk); the next server restores them: Ada is
    still the admin and Bob, new, is not."""
    with serving(env, monkeypatch) as client:
        dev_sign_in(client, "ada@example.org", "Ada")
    made = run_cli("db", "backup", env=env, cwd=cwd)
    assert made.returncode == 0, made.stderr
    assert f"database backed up to {bucket}/" in made.stdout
    for path in data_dir.glob("cmbcluster.db*"):
        path.unlink()
    with serving(env, monkeypatch) as client:
        bob = dev_sign_in(client, "bob@example.org", "Bob")
        assert client.get("/api/v1/admin/users", headers=bob).status_code == 403
