"""`cmbcluster migrate` across clouds, on the real stand-ins: moto in server mode for S3 and
gcp-storage-emulator for GCS. Local -> S3 through the CLI, killed with SIGKILL mid-copy and
resumed; then S3 -> GCS and GCS -> local with the engine, every object checked byte for byte."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient
from moto.s3.models import S3Backend
from moto.server import ThreadedMotoServer
from sqlalchemy import func, select

from cmbcluster.app import create_app
from cmbcluster.db.models import MigrationObject, Storage
from cmbcluster.local.storage import LocalStorage
from cmbcluster.migration.engine import Migration, Side
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in, make_bucket
from cmbcluster.testing.process import ServeProcess, clean_environ, free_port, run_cli
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import S3Storage
from cmbcluster_gcp.settings import GcpSettings
from cmbcluster_gcp.storage import GcsStorage

REGION, ACCOUNT = "eu-west-1", "123456789012"
#: The large object (100 MiB and a few bytes, so the last part of a multipart copy is short) is
#: never held whole: it is generated chunk by chunk, the same bytes each time, and checked by MD5.
LARGE_KEY, LARGE_SIZE = "maps/large.fits", 100 * 1024 * 1024 + 7


def large_chunks(chunk: int = 1024 * 1024) -> Iterator[bytes]:
    rng = random.Random(LARGE_SIZE)  # seeded: every call yields the same bytes
    for start in range(0, LARGE_SIZE, chunk):
        yield rng.randbytes(min(chunk, LARGE_SIZE - start))


def md5_of_chunks(chunks: Iterable[bytes]) -> str:
    digest = hashlib.md5()
    for part in chunks:
        digest.update(part)
    return digest.hexdigest()


FILES: dict[str, bytes] = {
    "readme.txt": b"hello",
    "empty": b"",
    "runs/2026/12/chain_1.txt": os.urandom(300_000),
    "données/température ☀.csv": "é,☀\n1,2\n".encode(),
    **{f"small/{i:03d}.dat": os.urandom(4096) for i in range(300)},
}
#: Every object's expected size and MD5, the large one's computed once while streaming it.
EXPECTED: dict[str, tuple[int, str]] = {
    **{key: (len(content), hashlib.md5(content).hexdigest()) for key, content in FILES.items()},
    LARGE_KEY: (LARGE_SIZE, md5_of_chunks(large_chunks())),
}
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
    "AWS_EC2_METADATA_DISABLED": "true", "AWS_REGION": REGION, "AWS_ACCOUNT_ID": ACCOUNT,
    "S3_USER_BUCKET_PREFIX": "cmbmig",
}  # fmt: skip


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(autouse=True)
def _aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials for the clients made in the tests (the harness clears the environment)."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def puts(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Objects written to moto, by key (it serves from this process; a completed multipart upload
    stores its object through put_object too)."""
    counted: Counter[str] = Counter()
    put = S3Backend.put_object

    def put_object(self: S3Backend, bucket_name: str, key_name: str, *args: Any, **kwargs: Any) -> Any:
        counted[key_name] += 1
        return put(self, bucket_name, key_name, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "put_object", put_object)
    return counted


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    executable = Path(sys.executable).with_name("gcp-storage-emulator")
    process = subprocess.Popen(
        [str(executable), "start", "-H", "127.0.0.1", "--port", str(port), "--in-memory", "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "gcp-storage-emulator did not start"
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def seed(data_dir: Path) -> str:
    """A user with a bucket of FILES and the large object on the embedded default; the storage's id."""
    app = create_app(CoreSettings(data_dir=data_dir))
    with TestClient(app, base_url=LOCAL) as client:
        dev_sign_in(client, "root@example.org")
        alice = dev_sign_in(client, "alice@example.org", "Alice")
        return make_bucket(client, alice, {**FILES, LARGE_KEY: large_chunks()})


def assert_holds_files(backend: Any, bucket: str) -> None:
    listed = {o.key: o.size for o in _all(backend, bucket)}
    assert listed == {key: size for key, (size, _) in EXPECTED.items()}
    for key, (_, md5) in EXPECTED.items():
        assert md5_of_chunks(backend.download_object(bucket, key)) == md5, key


def _all(backend: Any, bucket: str) -> list[Any]:
    from cmbcluster.migration.copy import list_all

    return list(list_all(backend, bucket))


def test_local_to_s3_killed_mid_copy_resumes_without_copying_verified_objects_again(
    tmp_path: Path, moto: str, puts: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    storage_id = seed(data_dir)
    env = clean_environ({**AWS_ENV, "AWS_ENDPOINT_URL": moto, "CMBCLUSTER_DATA_DIR": str(data_dir),
                         "CMBCLUSTER_DATABASE_BUCKET": ""})  # fmt: skip
    app = create_app(CoreSettings(data_dir=data_dir))
    sessions = app.state.context.sessions

    def verified() -> set[str]:
        with sessions() as db:
            return set(db.execute(select(MigrationObject.key)).scalars())

    command = [sys.executable, "-m", "cmbcluster.cli", "migrate", "run", "--to", "aws", "--parallel", "1"]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not verified():
        assert process.poll() is None, process.communicate()[0].decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before_kill = verified()
    assert 0 < len(before_kill) < len(EXPECTED)
    written = Counter(puts)

    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    for key in before_kill:  # verified before the kill: not written again
        assert puts[key] == written[key] == 1, key
    assert all(puts[key] >= 1 for key in EXPECTED)
    with sessions() as db:
        row = db.get(Storage, storage_id)
        assert row is not None and row.backend == "aws"
        assert db.execute(select(func.count()).select_from(MigrationObject)).scalar_one() == len(EXPECTED)
        bucket = row.bucket_name
    s3 = S3Storage(AwsSettings(_env_file=None, aws_region=REGION, aws_account_id=ACCOUNT, endpoint_url=moto))  # type: ignore[call-arg]
    try:
        assert_holds_files(s3, bucket)
    finally:
        s3.close()
    app.state.context.close()
    served_by_the_destination(data_dir, storage_id, moto, monkeypatch)


def test_a_database_bucket_the_target_would_refuse_stops_the_run_before_any_copy(tmp_path: Path, moto: str) -> None:
    """The database moves last, into a bucket of the target named by the operator: a name the target's
    service refuses (its bucket_names) is said at once, not after every bucket has been copied."""
    data_dir = tmp_path / "data"
    storage_id = seed(data_dir)
    env = clean_environ({**AWS_ENV, "AWS_ENDPOINT_URL": moto, "CMBCLUSTER_DATA_DIR": str(data_dir)})
    refused = run_cli("migrate", "run", "--to", "aws", "--database-bucket", "cmb..database", env=env, cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--database-bucket on aws: 'cmb..database' is not a valid bucket name: 3-63 lower-case letters" in " ".join(
        refused.stderr.split()
    )
    app = create_app(CoreSettings(data_dir=data_dir))
    try:
        with app.state.context.sessions() as db:
            row = db.get(Storage, storage_id)
            assert row is not None and row.backend == "local"  # nothing was copied or switched
            assert db.execute(select(func.count()).select_from(MigrationObject)).scalar_one() == 0
    finally:
        app.state.context.close()


def test_the_database_does_not_move_while_a_control_plane_still_serves_it(tmp_path: Path, moto: str) -> None:
    """What the old server changes after the database's copy (a bucket made, a sign-in) would never
    reach the new one: the run switches the buckets but moves the database only once no server runs."""
    data_dir = tmp_path / "data"
    app = create_app(CoreSettings(data_dir=data_dir))
    with TestClient(app, base_url=LOCAL) as client:
        alice = dev_sign_in(client, "alice@example.org", "Alice")
        storage_id = make_bucket(client, alice, {"readme.txt": b"hello"})
    app.state.context.close()
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto)
    s3.create_bucket(Bucket="cmbmig-database", CreateBucketConfiguration={"LocationConstraint": REGION})
    env = clean_environ({**AWS_ENV, "AWS_ENDPOINT_URL": moto, "CMBCLUSTER_DATA_DIR": str(data_dir)})
    command = ("migrate", "run", "--to", "aws", "--database-bucket", "cmbmig-database")

    with ServeProcess(clean_environ({"CMBCLUSTER_DATA_DIR": str(data_dir)}), tmp_path) as server:
        assert server.wait_ready("/readyz").status_code == 200, server.output()
        ahead = run_cli("migrate", "run", "--to", "aws", "--copy-only", env=env, cwd=tmp_path, timeout=120)
        assert ahead.returncode == 0, ahead.stdout + ahead.stderr  # while users work: copied, nothing switched
        assert "1 buckets copied to aws and verified; nothing switched" in " ".join(ahead.stdout.split())
        refused = run_cli(*command, env=env, cwd=tmp_path, timeout=120)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stdout + refused.stderr
    assert "0 copied, 1 already verified" in refused.stdout  # the run that switches copies only what changed
    said = " ".join((refused.stdout + refused.stderr).split())
    assert f"a control plane (pid {server.process.pid}) still serves" in said, said
    assert "Stop it, then run `cmbcluster migrate run --to aws` again" in said, said
    assert s3.list_objects_v2(Bucket="cmbmig-database").get("KeyCount") == 0  # no stale copy to restore
    app = create_app(CoreSettings(data_dir=data_dir))
    with app.state.context.sessions() as db:  # the buckets were switched all the same
        assert db.get(Storage, storage_id).backend == "aws"
    app.state.context.close()

    moved = run_cli(*command, env=env, cwd=tmp_path, timeout=120)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "database backed up to cmbmig-database/" in " ".join(moved.stdout.split())
    assert s3.list_objects_v2(Bucket="cmbmig-database")["KeyCount"] == 1
    s3.close()


def served_by_the_destination(data_dir: Path, storage_id: str, moto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server configured for the destination: the same person signs in to the same account and
    finds the bucket, its listing and every file's bytes, now read from S3."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto)
    with TestClient(create_app(CoreSettings(data_dir=data_dir, storage_backend="aws")), base_url=LOCAL) as client:
        alice = dev_sign_in(client, "alice@example.org", "Alice")
        storages = client.get("/api/v1/storages", headers=alice)
        assert storages.status_code == 200, storages.text
        assert [(s["id"], s["display_name"]) for s in storages.json()["storages"]] == [(storage_id, "data")]
        for key in ("readme.txt", "empty", "données/température ☀.csv", LARGE_KEY):
            with client.stream("GET", f"/api/v1/storages/{storage_id}/objects/{key}", headers=alice) as got:
                assert got.status_code == 200, (key, got.read())
                assert md5_of_chunks(got.iter_bytes()) == EXPECTED[key][1], key


def test_s3_to_gcs_to_local(tmp_path: Path, moto: str, gcs: str) -> None:
    data_dir = tmp_path / "data"
    storage_id = seed(data_dir)
    app = create_app(CoreSettings(data_dir=data_dir))
    sessions = app.state.context.sessions
    s3 = S3Storage(AwsSettings(_env_file=None, aws_region=REGION, aws_account_id=ACCOUNT, endpoint_url=moto,  # type: ignore[call-arg]
                               s3_user_bucket_prefix="cmbhop"))  # fmt: skip
    google = GcsStorage(GcpSettings(project_id="cmbcluster-test", region="europe-west1", storage_emulator_host=gcs))
    local = LocalStorage(tmp_path / "back-home")
    try:
        hops = [Side(name="local", storage=app.state.context.storage), Side(name="aws", storage=s3),
                Side(name="gcp", storage=google), Side(name="home", storage=local)]  # fmt: skip
        for source, target in itertools.pairwise(hops):
            result = Migration(sessions, source, target, parallel=4).run()
            assert [b.state for b in result.buckets] == ["switched"], (source.name, target.name, result)
            with sessions() as db:
                row = db.get(Storage, storage_id)
                assert row is not None and row.backend == target.name
                assert_holds_files(target.storage, row.bucket_name)
    finally:
        s3.close()
        google.close()
        app.state.context.close()
