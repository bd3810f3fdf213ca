"""Storage Transfer Service as the bulk path of `cmbcluster migrate run --managed-transfer`, S3 -> GCS:
S3 is a moto server, Cloud Storage the GCS emulator, and Storage Transfer our fake of its REST API
(google_api_fake.py), whose jobs really copy from moto into the emulator. Core then verifies both
listings and switches; what the service left wrong is caught."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google_api_fake import TOKEN, FakeServer, GoogleApiFake
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from cmbcluster.app import create_app
from cmbcluster.db.models import Storage
from cmbcluster.errors import ConfigurationError, PermissionDenied, ProviderUnavailable
from cmbcluster.migration.copy import list_all
from cmbcluster.migration.engine import Migration, Side
from cmbcluster.plugins import PluginManager
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in, make_bucket
from cmbcluster.testing.process import clean_environ, run_cli
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import S3Storage
from cmbcluster_gcp.settings import GcpSettings
from cmbcluster_gcp.storage import GcsStorage
from cmbcluster_gcp.transfer import StorageTransferJob

PROJECT, REGION, ACCOUNT = "cmbcluster-test", "eu-west-1", "123456789012"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
    "AWS_EC2_METADATA_DISABLED": "true", "AWS_REGION": REGION, "AWS_ACCOUNT_ID": ACCOUNT,
    "S3_USER_BUCKET_PREFIX": "cmbsts",
}  # fmt: skip
FILES = {
    "readme.txt": b"hello",
    "empty": b"",
    "runs/2026/12/chain_1.txt": bytes(range(256)) * 1000,
    "données/température ☀.csv": "é,☀\n1,2\n".encode(),
}


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def sts(moto: str, gcs_emulator: str) -> Iterator[GoogleApiFake]:
    server = FakeServer(GoogleApiFake(project=PROJECT, s3_endpoint=moto, gcs_endpoint=gcs_emulator)).start()
    yield server.fake
    server.stop()


def seed(data_dir: Path) -> str:
    """A user with a bucket of FILES on S3 (a server configured for aws); the storage's id."""
    with TestClient(create_app(CoreSettings(data_dir=data_dir, storage_backend="aws")), base_url=LOCAL) as client:
        dev_sign_in(client, "root@example.org")
        return make_bucket(client, dev_sign_in(client, "alice@example.org", "Alice"), FILES)


def gcp_settings(sts: GoogleApiFake, gcs_emulator: str, **extra: Any) -> GcpSettings:
    return GcpSettings(project_id=PROJECT, region="europe-west1", storage_emulator_host=gcs_emulator,
                       google_api_endpoint=sts.url, google_oauth_access_token=SecretStr(TOKEN), **extra)  # fmt: skip


def migration(data_dir: Path, moto: str, target: GcsStorage, settings: GcpSettings) -> tuple[Migration, Any]:
    app = create_app(CoreSettings(data_dir=data_dir, storage_backend="aws"))
    s3 = S3Storage(AwsSettings(_env_file=None, aws_region=REGION, aws_account_id=ACCOUNT, endpoint_url=moto))  # type: ignore[call-arg]
    plugins = PluginManager.from_settings(CoreSettings(data_dir=data_dir))  # the installed plugins' hooks
    return Migration(
        app.state.context.sessions, Side(name="aws", storage=s3), Side(name="gcp", storage=target, settings=settings),
        parallel=2, transfers=plugins.managed_transfer,
    ), app  # fmt: skip


KEY = {"storage_transfer_aws_access_key_id": "AKIAEXAMPLE", "storage_transfer_aws_secret_access_key": "secret"}


def test_the_cli_moves_s3_to_gcs_with_storage_transfer_then_core_verifies_and_switches(
    tmp_path: Path, moto: str, sts: GoogleApiFake, gcs_emulator: str
) -> None:
    data_dir = tmp_path / "data"
    storage_id = seed(data_dir)
    env = clean_environ({
        **AWS_ENV, "AWS_ENDPOINT_URL": moto, "CMBCLUSTER_DATA_DIR": str(data_dir), "CMBCLUSTER_STORAGE_BACKEND": "aws",
        "CMBCLUSTER_DATABASE_BUCKET": "", "PROJECT_ID": PROJECT, "REGION": "europe-west1",
        "STORAGE_EMULATOR_HOST": gcs_emulator, "GOOGLE_API_ENDPOINT": sts.url, "GOOGLE_OAUTH_ACCESS_TOKEN": TOKEN,
        "GCP_IAM_ENDPOINT": sts.url, "GCP_RESOURCE_MANAGER_ENDPOINT": sts.url,
        "STORAGE_TRANSFER_AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "STORAGE_TRANSFER_AWS_SECRET_ACCESS_KEY": "secret",
    })  # fmt: skip
    done = run_cli("migrate", "run", "--to", "gcp", "--managed-transfer", env=env, cwd=tmp_path, timeout=180)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Google Storage Transfer Service copies the bucket" in done.stdout
    created = sts.calls("POST", r"^/v1/transferJobs$")
    assert len(created) == 1
    source = created[0].body["transferSpec"]["awsS3DataSource"]
    assert source["awsAccessKey"] == {"accessKeyId": "AKIAEXAMPLE", "secretAccessKey": "secret"}
    assert len(sts.calls("POST", r":run$")) == 1 and sts.calls("GET", r"^/v1/transferOperations/")
    assert [job["status"] for job in sts.transfer_jobs.values()] == ["DELETED"]  # cleaned up after the run
    app = create_app(CoreSettings(data_dir=data_dir))
    try:
        with app.state.context.sessions() as db:
            row = db.get(Storage, storage_id)
            assert row is not None and row.backend == "gcp"
            bucket = row.bucket_name
    finally:
        app.state.context.close()
    google = GcsStorage(gcp_settings(sts, gcs_emulator))
    try:
        assert {o.key: o.size for o in list_all(google, bucket)} == {k: len(v) for k, v in FILES.items()}
        for key, content in FILES.items():
            assert b"".join(google.download_object(bucket, key)) == content
    finally:
        google.close()


def test_an_object_the_service_left_wrong_is_caught_and_the_bucket_not_switched(
    tmp_path: Path, moto: str, sts: GoogleApiFake, gcs_emulator: str
) -> None:
    data_dir = tmp_path / "data"
    storage_id = seed(data_dir)
    sts.transfer_damages.add("runs/2026/12/chain_1.txt")
    role = f"arn:aws:iam::{ACCOUNT}:role/storage-transfer"  # the service assumes it (moto's STS)
    settings = gcp_settings(sts, gcs_emulator, storage_transfer_aws_role_arn=role)
    google = GcsStorage(settings)
    run, app = migration(data_dir, moto, google, settings)
    try:
        result = run.run()
        assert result.buckets[0].state == "failed", result
        assert "runs/2026/12/chain_1.txt holds other bytes" in result.buckets[0].message
        assert sts.calls("POST", r"^/v1/transferJobs$")[0].body["transferSpec"]["awsS3DataSource"]["roleArn"] == role
        with app.state.context.sessions() as db:
            row = db.get(Storage, storage_id)
            assert row is not None and row.backend == "aws"
    finally:
        google.close()
        app.state.context.close()


def test_a_failed_job_and_refused_calls_are_typed_errors(
    tmp_path: Path, moto: str, sts: GoogleApiFake, gcs_emulator: str
) -> None:
    settings = gcp_settings(sts, gcs_emulator, **KEY)

    def job(source: str) -> StorageTransferJob:  # its own client, as the hook makes it
        return StorageTransferJob(settings, source, "sink-bucket", poll_interval=0.01)

    # the source bucket does not exist: the operation ends FAILED, said with the service's reason
    failed_job = r"transfer of s3://no-such-bucket to gs://sink-bucket failed"
    with pytest.raises(ProviderUnavailable, match=failed_job) as failed:
        job("no-such-bucket").run()
    assert "NoSuchBucket" in str(failed.value.detail)
    # a 503 is retried, then the job runs
    sts.fail_next("POST", r"^/v1/transferJobs$", 503)
    sts.fail_next("POST", r":run$", 503)
    with pytest.raises(ProviderUnavailable):  # still the missing bucket, but reached past both 503s
        job("no-such-bucket").run()
    # a refusal is not retried: 403 becomes PermissionDenied naming what to grant
    sts.fail_next("POST", r"^/v1/transferJobs$", 403)
    before = len(sts.calls("POST", r"^/v1/transferJobs$"))
    with pytest.raises(PermissionDenied, match=r"storagetransfer\.user"):
        job("no-such-bucket").run()
    assert len(sts.calls("POST", r"^/v1/transferJobs$")) == before + 1
    # no credentials for S3: a clear configuration error before any call
    with pytest.raises(ConfigurationError, match="STORAGE_TRANSFER_AWS_ROLE_ARN"):
        StorageTransferJob(gcp_settings(sts, gcs_emulator), "a", "b")
