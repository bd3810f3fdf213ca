"""Database backups on GCS (core's one implementation, through GcsStorage), against gcp-storage-emulator."""

from __future__ import annotations

import gzip
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cmbcluster.db.backup import DatabaseBackups
from cmbcluster.testing.backup import check_a_lost_database_comes_back, probe_database, read_probe, write_probe
from cmbcluster.testing.process import clean_environ
from cmbcluster.testing.process import run_cli as cmbcluster
from cmbcluster_gcp.settings import GcpSettings
from cmbcluster_gcp.storage import GcsStorage

BUCKET = "cmbcluster-test-database"
EmulatorApi = Callable[..., Any]


@pytest.fixture
def database_bucket(emulator_api: EmulatorApi, gcp_settings: GcpSettings) -> str:
    """The operator's database bucket, versioned (the emulator keeps one version only)."""
    emulator_api(
        f"/storage/v1/b?project={gcp_settings.project_id}",
        method="POST",
        body={"name": BUCKET, "versioning": {"enabled": True}},
    )
    return BUCKET


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return probe_database(tmp_path / "data" / "cmbcluster.db")


def test_backup_and_restore_through_gcs(
    gcs: GcsStorage, database_bucket: str, database: Path, gcs_emulator: str, emulator_api: EmulatorApi, tmp_path: Path
) -> None:
    backups = DatabaseBackups(gcs, database_bucket, database, prefix="cmbcluster-db/", kept=2)
    write_probe(database, "first")
    first = backups.backup()
    # What the bucket holds is the gzipped database, as an operator could fetch it by hand.
    listed = emulator_api(f"/storage/v1/b/{database_bucket}/o")
    assert [item["name"] for item in listed["items"]] == [first.key]
    media = (
        f"{gcs_emulator}/download/storage/v1/b/{database_bucket}/o/{urllib.parse.quote(first.key, safe='')}?alt=media"
    )
    with urllib.request.urlopen(media, timeout=10) as response:
        (tmp_path / "fetched.db").write_bytes(gzip.decompress(response.read()))
    assert read_probe(tmp_path / "fetched.db") == ["first"]

    write_probe(database, "second")
    backups.backup()
    write_probe(database, "third")
    newest = backups.backup()
    assert [b.key for b in backups.list()][-1] == newest.key and len(backups.list()) == 2  # kept=2

    write_probe(database, "fourth")
    result = backups.restore()
    assert result.backup == newest and read_probe(database) == ["first", "second", "third"]
    assert result.kept_aside is not None and read_probe(result.kept_aside)[-1] == "fourth"


@pytest.fixture
def gcp_env(gcp_settings: GcpSettings, database_bucket: str, tmp_path: Path) -> dict[str, str]:
    """A control plane on GCS (sign-in and compute stay local), with the original variable names."""
    return {
        **clean_environ(),
        "CMBCLUSTER_DATA_DIR": str(tmp_path / "server"),
        "CMBCLUSTER_STORAGE_BACKEND": "gcp",
        "PROJECT_ID": gcp_settings.project_id,
        "STORAGE_EMULATOR_HOST": str(gcp_settings.storage_emulator_host),
        "GCS_DATABASE_BUCKET": database_bucket,
    }


def test_cli_backup_then_a_server_on_a_fresh_disk_restores_it(
    gcp_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_a_lost_database_comes_back(gcp_env, tmp_path / "server", tmp_path, monkeypatch, BUCKET)
    restored = cmbcluster("db", "restore", env=gcp_env, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert "the previous database is kept as" in restored.stdout


def test_cli_errors_name_the_problem(gcp_env: dict[str, str], tmp_path: Path) -> None:
    env = {**gcp_env, "GCS_DATABASE_BUCKET": "no-such-db-bucket"}
    missing = cmbcluster("db", "restore", "--version", "20260101T000000000000Z", env=env, cwd=tmp_path)
    assert missing.returncode == 1
    assert "no-such-db-bucket" in missing.stderr and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    unknown = cmbcluster("db", "restore", "--version", "nope", env=gcp_env, cwd=tmp_path)
    assert unknown.returncode == 1
    assert f"there is no database backup in {BUCKET}/cmbcluster-db/" in " ".join(unknown.stderr.split())
