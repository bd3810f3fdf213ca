"""A throwaway PostgreSQL server on 127.0.0.1 for the tests of several control-plane replicas.

Debian's ``postgresql`` package gives the server binaries (``/usr/lib/postgresql/<version>/bin``);
the fixture installs the package when they are missing and it may (root, apt-get), makes a
cluster in a temporary folder owned by the ``postgres`` user (the server refuses to run as root),
starts it on a free port, yields its SQLAlchemy URL, and stops it by its PID file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

PG_ROOT = Path("/usr/lib/postgresql")


def _bin_dir() -> Path | None:
    versions = sorted((p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()), reverse=True)
    return versions[0] if versions else None


def _install() -> Path:
    found = _bin_dir()
    if found is not None:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("PostgreSQL server binaries are missing: apt-get install --no-install-recommends postgresql",
                    pytrace=False)  # fmt: skip
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]
    for args in (["apt-get", "update", "-qq"], install):
        subprocess.run(args, check=True, timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = _bin_dir()
    if found is None:
        pytest.fail("installing Debian's postgresql package gave no initdb", pytrace=False)
    return found


def _as_postgres(*args: str) -> list[str]:
    """Run as the postgres user when we are root (initdb and postgres refuse root)."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """``postgresql://cmbcluster@127.0.0.1:<port>/cmbcluster`` of a fresh server."""
    pytest.importorskip("psycopg")
    with postgres_server() as url:
        yield url


def emptied(url: str) -> str:
    """``url``, its database emptied (every table dropped): a test's fresh start on the shared server."""
    from cmbcluster.db import create_db_engine

    engine = create_db_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return url


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A fresh server's URL while the block runs (the fixture's, and the benchmarks')."""
    bin_dir = _install()
    root = Path(tempfile.mkdtemp(prefix="cmbcluster-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = _free_port()
    subprocess.run(
        _as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-U", "cmbcluster", "--auth=trust", "-E", "UTF8"),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    log = root / "server.log"
    subprocess.run(
        _as_postgres(
            str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
            "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200",
        ),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        createdb = [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "cmbcluster", "cmbcluster"]
        subprocess.run(_as_postgres(*createdb), check=True, capture_output=True, timeout=60)
        yield f"postgresql://cmbcluster@127.0.0.1:{port}/cmbcluster"  # as an operator writes it
    finally:
        subprocess.run(
            _as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"),
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        time.sleep(0.1)
        shutil.rmtree(root, ignore_errors=True)
