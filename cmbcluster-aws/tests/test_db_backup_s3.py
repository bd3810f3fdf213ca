"""Database backups on S3 (core's one implementation, through S3Storage), against the moto server."""

from __future__ import annotations

import contextlib
import gzip
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cmbcluster.app import create_app
from cmbcluster.config import load_core_settings
from cmbcluster.db import create_db_engine, upgrade
from cmbcluster.db.backup import DatabaseBackups
from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import clean_environ
from cmbcluster.testing.process import run_cli as cmbcluster
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import S3Storage

BUCKET = "cmbcluster-test-database"


@pytest.fixture
def database_bucket(s3: Any) -> str:
    """The operator's database bucket: versioned, as the AWS issue asks."""
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return BUCKET


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "cmbcluster.db"
    engine = create_db_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE probe (value TEXT)")
    return path


@pytest.fixture
def storage(aws_settings: AwsSettings) -> Iterator[S3Storage]:
    backend = S3Storage(aws_settings)
    yield backend
    backend.close()


def write(path: Path, value: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO probe VALUES (?)", (value,))


def read(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute("SELECT value FROM probe ORDER BY rowid")]


def test_backup_to_a_versioned_bucket_and_restore(
    storage: S3Storage, database_bucket: str, database: Path, s3: Any, tmp_path: Path
) -> None:
    backups = DatabaseBackups(storage, database_bucket, database, prefix="cmbcluster-db/", kept=1)
    write(database, "first")
    first = backups.backup()
    # What S3 holds is the gzipped database, as an operator could fetch it by hand.
    stored = s3.get_object(Bucket=database_bucket, Key=first.key)
    assert stored["ContentType"] == "application/gzip"
    copy = tmp_path / "fetched.db"
    copy.write_bytes(gzip.decompress(stored["Body"].read()))
    assert read(copy) == ["first"]

    write(database, "second")
    second = backups.backup()
    assert backups.list() == [second]  # kept=1: the first is deleted...
    versions = s3.list_object_versions(Bucket=database_bucket, Prefix=first.key)
    assert [v["Key"] for v in versions["Versions"]] == [first.key]  # ...but the versioned bucket keeps it
    assert versions["DeleteMarkers"][0]["IsLatest"]

    write(database, "third")
    result = backups.restore()
    assert result.backup == second and read(database) == ["first", "second"]
    assert result.kept_aside is not None and read(result.kept_aside) == ["first", "second", "third"]


@pytest.fixture
def aws_env(moto_reset: str, database_bucket: str, tmp_path: Path) -> dict[str, str]:
    """A control plane on S3 (sign-in and compute stay local), with the original variable names."""
    return {
        **clean_environ(),
        "CMBCLUSTER_DATA_DIR": str(tmp_path / "server"),
        "CMBCLUSTER_STORAGE_BACKEND": "aws",
        "AWS_REGION": "eu-west-1",
        "AWS_ACCOUNT_ID": "123456789012",
        "AWS_ENDPOINT_URL": moto_reset,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "S3_DATABASE_BUCKET": database_bucket,
    }


@contextlib.contextmanager
def serving(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    with monkeypatch.context() as patch:
        for name in set(os.environ) - set(env):
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        app = create_app(load_core_settings())
    with TestClient(app) as client:
        yield client


def test_cli_backup_then_a_server_on_a_fresh_disk_restores_it(
    aws_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving(aws_env, monkeypatch) as client:
        dev_sign_in(client, "ada@example.org", "Ada")  # the first user: the admin
    made = cmbcluster("db", "backup", env=aws_env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert f"database backed up to {BUCKET}/cmbcluster-db/" in made.stdout
    listed = cmbcluster("db", "backup", "--list", env={**aws_env, "COLUMNS": "200"}, cwd=tmp_path)
    assert listed.returncode == 0 and "cmbcluster-db/cmbcluster-" in listed.stdout

    for path in (tmp_path / "server").glob("cmbcluster.db*"):
        path.unlink()  # a new pod on an empty disk
    with serving(aws_env, monkeypatch) as client:
        bob = dev_sign_in(client, "bob@example.org", "Bob")
        assert client.get("/api/v1/admin/users", headers=bob).status_code == 403  # Ada is still the admin


def test_cli_errors_name_the_problem(aws_env: dict[str, str], tmp_path: Path) -> None:
    missing = cmbcluster(
        "db", "backup", "--list", env={**aws_env, "S3_DATABASE_BUCKET": "no-such-db-bucket"}, cwd=tmp_path
    )
    assert missing.returncode == 1
    assert "no-such-db-bucket" in missing.stderr and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    nothing = cmbcluster("db", "restore", env=aws_env, cwd=tmp_path)
    assert nothing.returncode == 1
    assert f"there is no database backup in {BUCKET}/cmbcluster-db/" in " ".join(nothing.stderr.split())
