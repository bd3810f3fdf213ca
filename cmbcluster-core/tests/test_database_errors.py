"""A database URL or file the server cannot use: one clear line from every command, never a traceback.

Found by an operator's trial: an unparseable or driverless CMBCLUSTER_DATABASE_URL, or a SQLite file
this user cannot open, ended commands in SQLAlchemy's traceback, `config check --connect` said
"configuration OK" without connecting, `db current` created the folders of a database that did not
exist, and the database file was created readable by every user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cmbcluster.db.engine import create_db_engine, current_revision, upgrade
from cmbcluster.testing.process import clean_environ, free_port
from cmbcluster.testing.process import run_cli as cmbcluster

#: A module that shadows the installed psycopg, as on a machine without the `postgresql` extra.
NO_PSYCOPG = "raise ModuleNotFoundError(\"No module named 'psycopg'\", name='psycopg')\n"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**clean_environ(), "CMBCLUSTER_DATA_DIR": str(tmp_path / "data")}


def _one_line_error(result: object, *said: str) -> None:
    stderr = getattr(result, "stderr", "")
    assert getattr(result, "returncode", 0) != 0, stderr
    assert "Traceback" not in stderr, stderr
    for part in said:
        assert part in stderr, stderr


def test_an_unparseable_database_url_is_one_line_naming_the_variable(env: dict[str, str], tmp_path: Path) -> None:
    bad = {**env, "CMBCLUSTER_DATABASE_URL": "notaurl"}
    for command in (["config", "check"], ["db", "current"], ["db", "upgrade"], ["serve"], ["groups", "list"]):
        result = cmbcluster(*command, env=bad, cwd=tmp_path)
        _one_line_error(result, "CMBCLUSTER_DATABASE_URL is not a database URL")
        assert "configuration OK" not in result.stdout


def test_an_unsupported_database_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    mysql = {**env, "CMBCLUSTER_DATABASE_URL": "mysql://u:p@127.0.0.1:1/x"}
    for command in (["config", "check", "--connect"], ["db", "current"]):
        result = cmbcluster(*command, env=mysql, cwd=tmp_path)
        _one_line_error(result, "CMBCLUSTER_DATABASE_URL names mysql, which is not supported")
        assert "configuration OK" not in result.stdout and "MySQLdb" not in result.stderr


def test_a_postgresql_url_without_its_driver_says_what_to_install(env: dict[str, str], tmp_path: Path) -> None:
    shadow = tmp_path / "site" / "psycopg"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(NO_PSYCOPG)
    without = {
        **env, "CMBCLUSTER_DATABASE_URL": "postgresql://u:p@127.0.0.1:1/x",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")])),
    }  # fmt: skip
    said = "CMBCLUSTER_DATABASE_URL: the driver for postgresql (psycopg) is not installed: pip install "
    for command in (["config", "check"], ["config", "check", "--connect"], ["serve"], ["db", "upgrade"]):
        result = cmbcluster(*command, env=without, cwd=tmp_path)
        _one_line_error(result, said, "cmbcluster-core[postgresql]")
        assert "configuration OK" not in result.stdout


def test_config_check_connect_reaches_the_database(env: dict[str, str], tmp_path: Path) -> None:
    closed = {**env, "CMBCLUSTER_DATABASE_URL": f"postgresql://u:secret@127.0.0.1:{free_port()}/x"}
    offline = cmbcluster("config", "check", env=closed, cwd=tmp_path)
    assert offline.returncode == 0, offline.stderr  # no connection without --connect
    connected = cmbcluster("config", "check", "--connect", env=closed, cwd=tmp_path)
    _one_line_error(connected, "database postgresql://u:***@127.0.0.1:", "did not answer", "Connection refused")
    assert "configuration OK" not in connected.stdout and "secret" not in connected.stderr

    sqlite = cmbcluster("config", "check", "--connect", env=env, cwd=tmp_path)
    assert sqlite.returncode == 0, sqlite.stderr
    assert "cmbcluster.db does not exist yet; serve creates it" in sqlite.stdout
    assert not (tmp_path / "data" / "cmbcluster.db").exists()  # a check creates no database
    assert cmbcluster("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    upgraded = cmbcluster("config", "check", "--connect", env=env, cwd=tmp_path)
    assert upgraded.returncode == 0 and "cmbcluster.db: answered (" in upgraded.stdout, upgraded.stderr


def test_a_database_file_that_cannot_be_opened_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    """As root too: a folder where the database file should be is opened by no one."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    there = {**env, "CMBCLUSTER_DATABASE_URL": f"sqlite:///{folder}"}
    commands = (["db", "current"], ["db", "upgrade"], ["users", "token", "ada@example.org"], ["groups", "list"],
                ["secrets", "reencrypt"], ["config", "check", "--connect"])  # fmt: skip
    for command in commands:
        result = cmbcluster(*command, env=there, cwd=tmp_path)
        _one_line_error(result, f"sqlite:///{folder}", "unable to open database file", "is a folder, not a database")


def test_a_file_that_is_not_a_database_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    """SQLite says so while connecting (DatabaseError, not OperationalError): a traceback, the very
    case of an operator checking a damaged database before a restore (found by a review)."""
    text = tmp_path / "notes.db"
    text.write_text("not a database, " * 100)
    there = {**env, "CMBCLUSTER_DATABASE_URL": f"sqlite:///{text}"}
    for command in (["db", "current"], ["config", "check", "--connect"]):
        result = cmbcluster(*command, env=there, cwd=tmp_path)
        _one_line_error(result, "file is not a database")


def test_db_current_says_a_missing_database_does_not_exist_and_creates_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    missing = tmp_path / "nonexistent" / "dir" / "x.db"
    result = cmbcluster("db", "current", env={**env, "CMBCLUSTER_DATABASE_URL": f"sqlite:///{missing}"}, cwd=tmp_path)
    _one_line_error(result, f"the database {missing} does not exist")
    assert "(empty database)" not in result.stdout
    assert not (tmp_path / "nonexistent").exists()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_sqlite_database_and_its_wal_files_are_created_private(tmp_path: Path) -> None:
    database = tmp_path / "elsewhere" / "cmbcluster.db"  # a CMBCLUSTER_DATABASE_URL outside the data directory
    previous = os.umask(0o022)  # the usual umask, under which SQLite made it 0644
    try:
        engine = create_db_engine(f"sqlite:///{database}")
        upgrade(engine)
        with engine.connect() as connection:  # WAL: the -wal and -shm files exist while it is open
            assert current_revision(engine) is not None
            files = [database, database.with_name("cmbcluster.db-wal"), database.with_name("cmbcluster.db-shm")]
            assert all(file.exists() for file in files)
            assert {file.name: _mode(file) for file in files} == {file.name: 0o600 for file in files}
            connection.close()
        engine.dispose()
    finally:
        os.umask(previous)


def test_a_database_readable_by_others_is_made_private_at_its_next_connection(tmp_path: Path) -> None:
    database = tmp_path / "cmbcluster.db"
    database.touch(mode=0o644)
    database.chmod(0o644)
    engine = create_db_engine(f"sqlite:///{database}")
    with engine.connect():
        assert _mode(database) == 0o600
    engine.dispose()


def test_an_engine_creates_no_database_file_before_its_first_connection(tmp_path: Path) -> None:
    """A server restores a missing database from its backup after creating its engine: an empty file
    made with the engine would read as present, and no backup would be restored."""
    database = tmp_path / "cmbcluster.db"
    engine = create_db_engine(f"sqlite:///{database}")
    assert not database.exists()
    engine.dispose()
