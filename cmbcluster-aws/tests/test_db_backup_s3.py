"""Database backups on S3 (core's one implementation, through S3Storage), against the moto server."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmbcluster.db.backup import DatabaseBackups
from cmbcluster.testing.backup import check_a_lost_database_comes_back, probe_database, read_probe, write_probe
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
    return probe_database(tmp_path / "data" / "cmbcluster.db")


@pytest.fixture
def storage(aws_settings: AwsSettings) -> Iterator[S3Storage]:
    backend = S3Storage(aws_settings)
    yield backend
    backend.close()


def test_backup_to_a_versioned_bucket_and_restore(
    storage: S3Storage, database_bucket: str, database: Path, s3: Any, tmp_path: Path
) -> None:
    backups = DatabaseBackups(storage, database_bucket, database, prefix="cmbcluster-db/", kept=1)
    write_probe(database, "first")
    first = backups.backup()
    # What S3 holds is the gzipped database, as an operator could fetch it by hand.
    stored = s3.get_object(Bucket=database_bucket, Key=first.key)
    assert stored["ContentType"] == "application/gzip"
    copy = tmp_path / "fetched.db"
    copy.write_bytes(gzip.decompress(stored["Body"].read()))
    assert read_probe(copy) == ["first"]

    write_probe(database, "second")
    second = backups.backup()
    assert backups.list() == [second]  # kept=1: the first is deleted...
    versions = s3.list_object_versions(Bucket=database_bucket, Prefix=first.key)
    assert [v["Key"] for v in versions["Versions"]] == [first.key]  # ...but the versioned bucket keeps it
    assert versions["DeleteMarkers"][0]["IsLatest"]

    write_probe(database, "third")
    result = backups.restore()
    assert result.backup == second and read_probe(database) == ["first", "second"]
    assert result.kept_aside is not None and read_probe(result.kept_aside) == ["first", "second", "third"]


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


def test_cli_backup_then_a_server_on_a_fresh_disk_restores_it(
    aws_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_a_lost_database_comes_back(aws_env, tmp_path / "server", tmp_path, monkeypatch, BUCKET)
    listed = cmbcluster("db", "backup", "--list", env={**aws_env, "COLUMNS": "200"}, cwd=tmp_path)
    assert listed.returncode == 0 and "cmbcluster-db/cmbcluster-" in listed.stdout


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
