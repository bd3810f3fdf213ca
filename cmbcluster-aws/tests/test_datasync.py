"""AWS DataSync as the bulk path of `cmbcluster migrate run --managed-transfer`, Cloud Storage -> S3:
Cloud Storage is a gcp-storage-emulator, S3 a moto server, and DataSync our stand-in served by that
moto (datasync_stand_in.py), whose executions really copy from the emulator into moto. Core then
verifies both listings and switches; what DataSync left wrong is caught."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import datasync_stand_in
import pytest
from fastapi.testclient import TestClient
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from moto.datasync.models import datasync_backends

from cmbcluster.app import create_app
from cmbcluster.db.models import Storage
from cmbcluster.errors import ConfigurationError, PermissionDenied, ProviderUnavailable
from cmbcluster.migration.copy import list_all
from cmbcluster.migration.engine import Migration, Side
from cmbcluster.plugins import PluginManager
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in, make_bucket
from cmbcluster.testing.process import ToolServer, clean_environ, run_cli
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import S3Storage
from cmbcluster_aws.transfer import DataSyncTransfer
from cmbcluster_gcp.settings import GcpSettings
from cmbcluster_gcp.storage import GcsStorage

REGION, ACCOUNT_ID = "eu-west-1", "123456789012"  # as in conftest.py
PROJECT, PREFIX = "cmbcluster-test", "cmbds"
HMAC_ID, HMAC_SECRET = "GOOG1EXAMPLEHMACKEY", "hmac-secret"
ROLE = f"arn:aws:iam::{ACCOUNT_ID}:role/datasync-writer"
FILES = {
    "readme.txt": b"hello",
    "empty": b"",
    "runs/2026/12/chain_1.txt": bytes(range(256)) * 1000,
    "données/température ☀.csv": "é,☀\n1,2\n".encode(),
}
TRUST = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", ' \
        '"Principal": {"Service": "datasync.amazonaws.com"}}]}'  # fmt: skip


@pytest.fixture(scope="module")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    command = ["gcp-storage-emulator", "start", "-H", "127.0.0.1", "--port", "{port}", "--in-memory", "-q"]
    with ToolServer(command, clean_environ(), tmp_path_factory.mktemp("gcs") / "emulator.log") as emulator:
        yield emulator.url


@pytest.fixture
def datasync(moto_reset: str, gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto (with DataSync) and the emulator, Cloud Storage's HMAC key and DataSync's role made;
    the environment of a server configured for gcp (the migration's source)."""
    monkeypatch.setattr(datasync_stand_in, "GCS_ENDPOINT", gcs_emulator)
    datasync_stand_in.HMAC_KEYS[HMAC_ID] = HMAC_SECRET
    iam = boto3.client("iam", region_name=REGION, endpoint_url=moto_reset)
    iam.create_role(RoleName="datasync-writer", AssumeRolePolicyDocument=TRUST)
    iam.close()
    for name, value in {"PROJECT_ID": PROJECT, "REGION": "europe-west1", "STORAGE_EMULATOR_HOST": gcs_emulator,
                        "AWS_REGION": REGION, "AWS_ACCOUNT_ID": ACCOUNT_ID}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    yield moto_reset
    with urllib.request.urlopen(gcs_emulator + "/wipe", timeout=10) as wiped:  # every test from an empty emulator
        wiped.read()


def aws_settings(moto: str, **datasync: Any) -> AwsSettings:
    values = {"datasync_gcs_hmac_access_id": HMAC_ID, "datasync_gcs_hmac_secret": HMAC_SECRET,
              "datasync_s3_role_arn": ROLE, **datasync}  # fmt: skip
    return AwsSettings(_env_file=None, aws_region=REGION, aws_account_id=ACCOUNT_ID, endpoint_url=moto,  # type: ignore[call-arg]
                       s3_user_bucket_prefix=PREFIX, **values)  # fmt: skip


def seed(data_dir: Path, storage_class: str = "standard") -> str:
    """A user with a bucket of FILES on Cloud Storage (a server configured for gcp); the storage's id."""
    with TestClient(create_app(CoreSettings(data_dir=data_dir, storage_backend="gcp")), base_url=LOCAL) as client:
        dev_sign_in(client, "root@example.org")
        alice = dev_sign_in(client, "alice@example.org", "Alice")
        return make_bucket(client, alice, FILES, storage_class=storage_class)


def row(data_dir: Path, storage_id: str) -> Storage:
    app = create_app(CoreSettings(data_dir=data_dir))
    try:
        with app.state.context.sessions() as db:
            found: Storage | None = db.get(Storage, storage_id)
            assert found is not None
            return found
    finally:
        app.state.context.close()


def backend_of(app: Any, storage_id: str) -> str:
    with app.state.context.sessions() as db:
        stored: Storage | None = db.get(Storage, storage_id)
        assert stored is not None
        return stored.backend


def calls(operation: str) -> list[dict[str, Any]]:
    return [params for name, params in datasync_stand_in.CALLS if name == operation]


def left_behind() -> tuple[int, int]:
    """The tasks and locations DataSync still holds (every account and region of this moto)."""
    states = [b.__dict__.get("_cmbcluster_state") for _, _, b in datasync_backends.iter_backends()]
    return sum(len(s.tasks) for s in states if s), sum(len(s.locations) for s in states if s)


def executions() -> list[datasync_stand_in.Execution]:
    states = [b.__dict__.get("_cmbcluster_state") for _, _, b in datasync_backends.iter_backends()]
    return [e for s in states if s for e in s.executions.values()]


def test_the_cli_moves_gcs_to_s3_with_datasync_then_core_verifies_and_switches(tmp_path: Path, datasync: str) -> None:
    data_dir = tmp_path / "data"
    storage_id = seed(data_dir, storage_class="infrequent")
    source_bucket = row(data_dir, storage_id).bucket_name
    env = clean_environ({
        "CMBCLUSTER_DATA_DIR": str(data_dir), "CMBCLUSTER_STORAGE_BACKEND": "gcp", "CMBCLUSTER_DATABASE_BUCKET": "",
        "PROJECT_ID": PROJECT, "REGION": "europe-west1", "STORAGE_EMULATOR_HOST": datasync_stand_in.GCS_ENDPOINT or "",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_ENDPOINT_URL": datasync, "AWS_REGION": REGION, "AWS_ACCOUNT_ID": ACCOUNT_ID,
        "S3_USER_BUCKET_PREFIX": PREFIX, "DATASYNC_GCS_HMAC_ACCESS_ID": HMAC_ID,
        "DATASYNC_GCS_HMAC_SECRET": HMAC_SECRET, "DATASYNC_S3_ROLE_ARN": ROLE,
    })  # fmt: skip
    done = run_cli("migrate", "run", "--to", "aws", "--managed-transfer", env=env, cwd=tmp_path, timeout=180)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "AWS DataSync copies the bucket" in done.stdout, done.stdout
    target_bucket = row(data_dir, storage_id).bucket_name
    assert row(data_dir, storage_id).backend == "aws" and target_bucket.startswith(PREFIX)
    tags = [{"Key": "cmbcluster:migration", "Value": f"cmbcluster-{source_bucket}-to-{target_bucket}"}]
    (source,) = calls("CreateLocationObjectStorage")
    assert source == {"ServerHostname": "storage.googleapis.com", "ServerProtocol": "HTTPS", "ServerPort": 443,
                      "BucketName": source_bucket, "AccessKey": HMAC_ID, "SecretKey": "***", "Tags": tags}  # fmt: skip
    (target,) = calls("CreateLocationS3")
    assert target["S3BucketArn"] == f"arn:aws:s3:::{target_bucket}"
    assert target["S3Config"] == {"BucketAccessRoleArn": ROLE}
    assert target["S3StorageClass"] == "STANDARD_IA"  # the bucket's class ("infrequent"), as a streamed copy keeps it
    (task,) = calls("CreateTask")
    assert task["TaskMode"] == "ENHANCED"  # no agent: DataSync's agentless transfer from another cloud
    assert task["Options"] == {
        "VerifyMode": "ONLY_FILES_TRANSFERRED", "TransferMode": "CHANGED", "OverwriteMode": "ALWAYS",
        "PreserveDeletedFiles": "PRESERVE", "ObjectTags": "NONE",
    }  # fmt: skip
    assert len(calls("StartTaskExecution")) == 1 and calls("DescribeTaskExecution")
    (execution,) = executions()
    assert execution.status == "SUCCESS" and execution.counters["FilesTransferred"] == len(FILES)  # DataSync copied
    assert left_behind() == (0, 0)  # the task and both locations (with the HMAC secret) deleted
    s3 = S3Storage(aws_settings(datasync))
    try:
        assert {o.key: o.size for o in list_all(s3, target_bucket)} == {k: len(v) for k, v in FILES.items()}
        for key, content in FILES.items():
            assert b"".join(s3.download_object(target_bucket, key)) == content
    finally:
        s3.close()


def migration(data_dir: Path, moto: str, settings: AwsSettings) -> tuple[Migration, Any, S3Storage]:
    app = create_app(CoreSettings(data_dir=data_dir, storage_backend="gcp"))
    emulator = datasync_stand_in.GCS_ENDPOINT
    source = GcsStorage(GcpSettings(project_id=PROJECT, region="europe-west1", storage_emulator_host=emulator))
    target = S3Storage(settings)
    plugins = PluginManager.from_settings(CoreSettings(data_dir=data_dir))  # the installed plugins' hooks
    run = Migration(app.state.context.sessions, Side(name="gcp", storage=source), Side(name="aws", storage=target,
                    settings=settings), parallel=2, transfers=plugins.managed_transfer)  # fmt: skip
    return run, app, target


def test_an_object_datasync_left_wrong_is_caught_and_the_bucket_stays(tmp_path: Path, datasync: str) -> None:
    storage_id = seed(tmp_path)
    datasync_stand_in.DAMAGES.add("runs/2026/12/chain_1.txt")
    run, app, target = migration(tmp_path, datasync, aws_settings(datasync))
    try:
        result = run.run()
        assert result.buckets[0].state == "failed", result
        wrong = "AWS DataSync left 1 object(s) wrong: runs/2026/12/chain_1.txt holds other bytes"
        assert wrong in result.buckets[0].message
        assert executions()[0].status == "SUCCESS"  # DataSync said it went well; core's check says otherwise
        assert backend_of(app, storage_id) == "gcp"  # the bucket stays where it was
    finally:
        target.close()
        app.state.context.close()


def test_missing_settings_are_said_before_any_call(tmp_path: Path, datasync: str) -> None:
    unset = {"datasync_gcs_hmac_access_id": None, "datasync_gcs_hmac_secret": None, "datasync_s3_role_arn": None}
    bare = aws_settings(datasync, **unset)
    with pytest.raises(ConfigurationError) as raised:
        DataSyncTransfer(bare, "a-bucket", "b-bucket")
    assert "set DATASYNC_GCS_HMAC_ACCESS_ID and DATASYNC_GCS_HMAC_SECRET" in str(raised.value)
    assert "set DATASYNC_S3_ROLE_ARN (a role trusting datasync.amazonaws.com" in str(raised.value)
    storage_id = seed(tmp_path)
    run, app, target = migration(tmp_path, datasync, bare)
    try:
        result = run.run()  # the offer is refused for the bucket, which is not switched
        assert result.buckets[0].state == "failed" and "DATASYNC_S3_ROLE_ARN" in result.buckets[0].message
        assert backend_of(app, storage_id) == "gcp"  # the bucket stays where it was
    finally:
        target.close()
        app.state.context.close()
    assert datasync_stand_in.CALLS == []
    with pytest.raises(ValueError, match="is not a DataSync agent ARN"):
        aws_settings(datasync, datasync_agent_arns="arn:aws:datasync:eu-west-1:123456789012:agent/nope")


def make_buckets(moto: str) -> None:
    """gs://src-bucket holding FILES, and an empty s3://dst-bucket."""
    anonymous: Any = AnonymousCredentials()  # type: ignore[no-untyped-call]
    google = storage.Client(project=PROJECT, credentials=anonymous,
                            client_options={"api_endpoint": datasync_stand_in.GCS_ENDPOINT})  # fmt: skip
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto)
    try:
        bucket = google.create_bucket("src-bucket")
        for key, content in FILES.items():
            bucket.blob(key).upload_from_string(content)
        s3.create_bucket(Bucket="dst-bucket", CreateBucketConfiguration={"LocationConstraint": REGION})
    finally:
        google.close()
        s3.close()


def transfer(moto: str, source: str = "src-bucket", **datasync: Any) -> DataSyncTransfer:
    job = DataSyncTransfer(aws_settings(moto, **datasync), source, "dst-bucket", poll_interval=0.05)
    job.first_poll_interval = 0.01
    return job


def test_a_failed_execution_is_reported_with_datasyncs_reason_and_cleaned_up(datasync: str) -> None:
    make_buckets(datasync)
    with pytest.raises(ProviderUnavailable, match="transfer of gs://src-bucket to s3://dst-bucket failed") as failed:
        transfer(datasync, datasync_gcs_hmac_secret="not-the-secret").run()
    assert failed.value.detail == ("prepare phase: AccessDenied: storage.googleapis.com refused listing bucket "
                                   "src-bucket: InvalidAccessKeyId (403)")  # fmt: skip
    with pytest.raises(ProviderUnavailable) as missing:
        transfer(datasync, source="no-such-bucket").run()
    assert "NoSuchBucket: the bucket no-such-bucket does not exist" in str(missing.value.detail)
    assert left_behind() == (0, 0)


def test_throttling_and_server_errors_are_retried(datasync: str) -> None:
    make_buckets(datasync)
    datasync_stand_in.fail_next("CreateTask", "ThrottlingException")
    datasync_stand_in.fail_next("StartTaskExecution", "InternalException", 500)
    datasync_stand_in.fail_next("DescribeTaskExecution", "ServiceUnavailable", 503)
    progress: list[int] = []
    transfer(datasync).run(progress.append)
    assert len(calls("CreateTask")) == 2 and len(calls("StartTaskExecution")) == 2
    assert sum(progress) == sum(len(v) for v in FILES.values())
    assert left_behind() == (0, 0)


def test_access_denied_names_the_permission_and_leaves_nothing(datasync: str) -> None:
    make_buckets(datasync)
    datasync_stand_in.DENIED.add("datasync:CreateTask")
    with pytest.raises(PermissionDenied) as denied:
        transfer(datasync).run()
    assert "not authorized to perform: datasync:CreateTask" in denied.value.message
    assert "needs datasync:CreateTask and, once per account for Enhanced mode, iam:CreateServiceLinkedRole" in (
        denied.value.message
    )
    assert len(calls("CreateTask")) == 1  # a refusal is not retried
    assert left_behind() == (0, 0)  # the two locations made before the refusal are deleted
    datasync_stand_in.DENIED.clear()
    datasync_stand_in.DENIED.add("iam:PassRole")
    with pytest.raises(PermissionDenied, match=f"needs datasync:CreateLocationS3 and iam:PassRole on {ROLE}"):
        transfer(datasync).run()
    assert left_behind() == (0, 0)


def test_a_run_interrupted_while_datasync_copies_waits_for_that_execution(datasync: str) -> None:
    make_buckets(datasync)
    datasync_stand_in.HOLD.clear()  # executions wait before transferring
    first = transfer(datasync)
    first.start()  # then the process dies: no cleanup, the execution goes on in DataSync
    first.close()
    second = transfer(datasync)
    waiter = threading.Thread(target=second.run)
    waiter.start()
    deadline = time.monotonic() + 10
    while not calls("DescribeTaskExecution") and time.monotonic() < deadline:
        time.sleep(0.01)
    datasync_stand_in.HOLD.set()
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert len(calls("StartTaskExecution")) == 1 and len(calls("CreateTask")) == 1  # the first run's, reused
    assert [e.status for e in executions()] == ["SUCCESS"] and left_behind() == (0, 0)


def test_with_agents_it_is_a_basic_mode_task_through_them(datasync: str) -> None:
    make_buckets(datasync)
    agent = f"arn:aws:datasync:{REGION}:{ACCOUNT_ID}:agent/agent-0123456789abcdef0"
    datasync_stand_in.AGENTS.add(agent)
    transfer(datasync, datasync_agent_arns=agent).run()
    assert calls("CreateLocationObjectStorage")[0]["AgentArns"] == [agent]
    assert calls("CreateTask")[0]["TaskMode"] == "BASIC"


def test_the_stand_in_refuses_what_datasync_refuses(datasync: str) -> None:
    """Our stand-in is only worth its checks: each wrong shape below is refused, as by DataSync."""
    make_buckets(datasync)
    client = boto3.client("datasync", region_name=REGION, endpoint_url=datasync)
    invalid = client.exceptions.InvalidRequestException

    def gcs(**extra: Any) -> str:
        return str(client.create_location_object_storage(ServerHostname="storage.googleapis.com",
                                                         BucketName="src-bucket", **extra)["LocationArn"])  # fmt: skip

    with pytest.raises(invalid, match="without scheme"):
        client.create_location_object_storage(ServerHostname="https://storage.googleapis.com", BucketName="src-bucket")
    with pytest.raises(invalid, match="AccessKey and SecretKey"):
        gcs(AccessKey=HMAC_ID)
    with pytest.raises(invalid, match=r"Agent .* is not found"):
        gcs(AgentArns=[f"arn:aws:datasync:{REGION}:{ACCOUNT_ID}:agent/agent-0123456789abcdef0"])
    iam = boto3.client("iam", region_name=REGION, endpoint_url=datasync)
    ec2_only = iam.create_role(RoleName="ec2-only", AssumeRolePolicyDocument=TRUST.replace("datasync", "ec2"))
    with pytest.raises(invalid, match=r"does not allow datasync\.amazonaws\.com"):
        client.create_location_s3(S3BucketArn="arn:aws:s3:::dst-bucket",
                                  S3Config={"BucketAccessRoleArn": ec2_only["Role"]["Arn"]})  # fmt: skip
    with pytest.raises(invalid, match="does not exist"):
        client.create_location_s3(S3BucketArn="arn:aws:s3:::no-such-bucket", S3Config={"BucketAccessRoleArn": ROLE})
    source = gcs(AccessKey=HMAC_ID, SecretKey=HMAC_SECRET)
    target = str(client.create_location_s3(S3BucketArn="arn:aws:s3:::dst-bucket",
                                           S3Config={"BucketAccessRoleArn": ROLE})["LocationArn"])  # fmt: skip
    with pytest.raises(invalid, match="POINT_IN_TIME_CONSISTENT is not supported"):
        client.create_task(SourceLocationArn=source, DestinationLocationArn=target, TaskMode="ENHANCED",
                           Options={"VerifyMode": "POINT_IN_TIME_CONSISTENT"})  # fmt: skip
    with pytest.raises(invalid, match="Basic mode tasks need an agent"):
        client.create_task(SourceLocationArn=source, DestinationLocationArn=target)
    task = client.create_task(SourceLocationArn=source, DestinationLocationArn=target, TaskMode="ENHANCED")["TaskArn"]
    with pytest.raises(invalid, match="is used by a task"):
        client.delete_location(LocationArn=source)
    execution = client.start_task_execution(TaskArn=task)["TaskExecutionArn"]
    deadline = time.monotonic() + 10
    while (status := client.describe_task_execution(TaskExecutionArn=execution))["Status"] != "ERROR":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert status["Result"]["ErrorCode"] == "ObjectTagsNotSupported"  # object tags asked of Cloud Storage
    client.close()
    iam.close()
