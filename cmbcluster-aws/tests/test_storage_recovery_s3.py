"""`cmbcluster serve` on S3 (moto) killed mid-work: what the crash left is cleaned up at the next start,
and usage shows what S3 stores and bills."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ

MiB = 1024 * 1024
API = "/api/v1/storages"


@pytest.fixture
def serve_env(moto_reset: str, tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "no-aws-config"
    return clean_environ(
        {
            "CMBCLUSTER_DATA_DIR": str(tmp_path / "data"),
            "CMBCLUSTER_STORAGE_BACKEND": "aws",
            "AWS_REGION": "eu-west-1",
            "AWS_ACCOUNT_ID": "123456789012",
            "AWS_ENDPOINT_URL": moto_reset,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": str(empty),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty),
            "AWS_EC2_METADATA_DISABLED": "true",
            "S3_USER_BUCKET_PREFIX": "cmbkill",
        }
    )


def _signed_in(server: ServeProcess) -> tuple[httpx.Client, dict[str, str]]:
    assert server.wait_ready("/readyz").status_code == 200, server.output()
    client = httpx.Client(base_url=server.url, timeout=30)
    return client, dev_sign_in(client, "ada@example.org")


def _kill(server: ServeProcess) -> None:
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()


def test_sigkill_mid_upload_leaves_no_multipart_upload_after_the_next_start(
    serve_env: dict[str, str], tmp_path: Path, s3: Any
) -> None:
    server = ServeProcess(serve_env, tmp_path)
    try:
        client, headers = _signed_in(server)
        storage = client.post(API, headers=headers, json={"display_name": "maps"}).json()
        bucket = storage["bucket_name"]
        sent, killed = threading.Event(), threading.Event()

        def body() -> Iterator[bytes]:
            for i in range(64):
                if i == 24:  # three 8 MiB parts are on their way: the multipart upload exists
                    sent.set()
                    killed.wait(30)  # hold the upload open until the server is killed
                yield b"m" * MiB

        def upload() -> None:
            try:
                httpx.put(f"{server.url}{API}/{storage['id']}/objects/big.fits", headers=headers, content=body(),
                          timeout=60)  # fmt: skip
            except httpx.TransportError:
                pass  # the server was killed under it

        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        assert sent.wait(30)
        deadline = time.monotonic() + 20
        while not s3.list_multipart_uploads(Bucket=bucket).get("Uploads") and time.monotonic() < deadline:
            time.sleep(0.1)
        (left,) = s3.list_multipart_uploads(Bucket=bucket)["Uploads"]
        while not s3.list_parts(Bucket=bucket, Key="big.fits", UploadId=left["UploadId"]).get("Parts"):
            assert time.monotonic() < deadline, "no part arrived"
            time.sleep(0.1)
        _kill(server)
        killed.set()
        uploader.join(40)
        assert s3.list_multipart_uploads(Bucket=bucket)["Uploads"] == [left]  # billed parts, left behind
        client.close()
    finally:
        server.stop()

    with ServeProcess(serve_env, tmp_path) as restarted:
        client, headers = _signed_in(restarted)
        assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)
        assert "aborted 1 unfinished uploads" in restarted.output()
        with pytest.raises(Exception):
            s3.head_object(Bucket=bucket, Key="big.fits")
        client.close()


def test_usage_and_quota_through_the_api_count_noncurrent_versions(
    serve_env: dict[str, str], tmp_path: Path, s3: Any
) -> None:
    quota = {**serve_env, "CMBCLUSTER_STORAGE_QUOTA_BYTES": str(5 * MiB)}
    with ServeProcess(quota, tmp_path) as server:
        client, headers = _signed_in(server)
        storage = client.post(API, headers=headers, json={"display_name": "versions"}).json()
        objects = f"{API}/{storage['id']}/objects"
        for fill in (b"a", b"b", b"c", b"d"):  # a write and three overwrites
            assert client.put(f"{objects}/map.fits", headers=headers, content=fill * MiB).status_code == 201
        assert client.post(f"{objects}/delete", headers=headers, json={"keys": ["map.fits"]}).status_code == 200
        got = client.get(f"{API}/{storage['id']}", headers=headers).json()
        assert (got["size_bytes"], got["object_count"]) == (0, 0)
        assert (got["noncurrent_bytes"], got["noncurrent_object_count"]) == (4 * MiB, 4)
        versions = s3.list_object_versions(Bucket=storage["bucket_name"])["Versions"]
        assert sum(v["Size"] for v in versions) == got["size_bytes"] + got["noncurrent_bytes"]

        # The quota counts what S3 bills: 4 MiB of earlier versions leave 1 MiB of 5.
        listed = client.get(API, headers=headers).json()["quota"]
        assert listed == {"quota_bytes": 5 * MiB, "used_bytes": 4 * MiB, "noncurrent_bytes": 4 * MiB}
        refused = client.put(f"{objects}/more.fits", headers=headers, content=b"m" * (2 * MiB))
        assert refused.status_code == 413 and "left of your storage quota" in refused.json()["message"]
        streamed = client.put(f"{objects}/more.fits", headers=headers, content=iter([b"m" * MiB] * 12))
        assert streamed.status_code == 413
        assert "Contents" not in s3.list_objects_v2(Bucket=storage["bucket_name"])  # nothing stored
        assert "Uploads" not in s3.list_multipart_uploads(Bucket=storage["bucket_name"])
        client.close()


def test_moves_in_a_versioned_bucket_count_the_versions_they_keep(
    serve_env: dict[str, str], tmp_path: Path, s3: Any
) -> None:
    """A move copies and deletes: in a versioned bucket the original stays, billed, as an earlier
    version. Moves were not checked against the quota, so moving a file back and forth passed any
    quota; now a move that the quota has no room for is refused, and nothing is moved."""
    quota = {**serve_env, "CMBCLUSTER_STORAGE_QUOTA_BYTES": str(5 * MiB)}
    with ServeProcess(quota, tmp_path) as server:
        client, headers = _signed_in(server)
        storage = client.post(API, headers=headers, json={"display_name": "moves"}).json()
        objects, bucket = f"{API}/{storage['id']}/objects", storage["bucket_name"]
        assert client.put(f"{objects}/map.fits", headers=headers, content=b"m" * (2 * MiB)).status_code == 201
        moved = client.post(f"{objects}/move", headers=headers, json={"source": "map.fits", "destination": "a.fits"})
        assert moved.status_code == 200, moved.text  # 2 MiB current, 2 MiB kept: 4 of 5 used
        refused = client.post(f"{objects}/move", headers=headers, json={"source": "a.fits", "destination": "b.fits"})
        assert refused.status_code == 507, refused.text
        message = refused.json()["message"]
        assert message.startswith("this bucket keeps earlier versions: moving 1 file keeps their 2.0 MiB"), message
        assert "1.0 MiB left of your storage quota of 5.0 MiB" in message and "nothing was moved" in message
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["a.fits"]
        versions = s3.list_object_versions(Bucket=bucket)["Versions"]
        assert sum(v["Size"] for v in versions) == 4 * MiB
        listed = client.get(API, headers=headers).json()["quota"]
        assert listed["used_bytes"] <= 5 * MiB, listed
        client.close()


def _reserved(data: Path) -> list[int]:
    with sqlite3.connect(data / "cmbcluster.db") as db:
        return [row[0] for row in db.execute("SELECT reserved_bytes FROM upload_journal")]


def test_two_uploads_at_once_cannot_together_pass_the_quota(serve_env: dict[str, str], tmp_path: Path, s3: Any) -> None:
    """5 MiB of quota, two 3 MiB uploads at once: the first holds its 3 MiB while it runs, so the
    second is refused (declared or streamed), and S3 ends with 3 MiB, not 6."""
    quota = {**serve_env, "CMBCLUSTER_STORAGE_QUOTA_BYTES": str(5 * MiB)}
    data = Path(serve_env["CMBCLUSTER_DATA_DIR"])
    with ServeProcess(quota, tmp_path) as server:
        client, headers = _signed_in(server)
        storage = client.post(API, headers=headers, json={"display_name": "race"}).json()
        objects = f"{server.url}{API}/{storage['id']}/objects"
        release = threading.Event()
        answers: list[httpx.Response] = []

        def held() -> Iterator[bytes]:
            yield b"a" * MiB
            release.wait(30)  # the upload stays under way until the other one was answered
            yield b"a" * (2 * MiB)

        def first() -> None:
            answers.append(httpx.put(f"{objects}/one.fits", headers={**headers, "Content-Length": str(3 * MiB)},
                                     content=held(), timeout=60))  # fmt: skip

        uploader = threading.Thread(target=first)
        uploader.start()
        try:
            deadline = time.monotonic() + 30
            while _reserved(data) != [3 * MiB] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _reserved(data) == [3 * MiB], server.output()
            second = client.put(f"{objects}/two.fits", headers=headers, content=b"b" * (3 * MiB))
            assert second.status_code == 413, second.text
            assert "held by uploads under way" in second.json()["message"]
            streamed = client.put(f"{objects}/two.fits", headers=headers, content=iter([b"b" * MiB] * 3))
            assert streamed.status_code == 413, streamed.text
        finally:
            release.set()
            uploader.join(60)
        assert answers[0].status_code == 201, answers[0].text
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=storage["bucket_name"])["Contents"]] == ["one.fits"]
        assert "Uploads" not in s3.list_multipart_uploads(Bucket=storage["bucket_name"])
        assert _reserved(data) == []  # an upload's hold ends with it
        # What is left once it ended (2 MiB) is what the next upload gets.
        assert client.put(f"{objects}/two.fits", headers=headers, content=b"b" * (2 * MiB)).status_code == 201
        client.close()


def _mark_deleting(data: Path, storage_id: str, *, force: bool) -> None:
    """What a server killed in the middle of a bucket delete leaves in its database."""
    with sqlite3.connect(data / "cmbcluster.db") as db:
        db.execute("UPDATE storages SET status = 'deleting', delete_force = ? WHERE id = ?", (force, storage_id))


def test_an_interrupted_delete_is_finished_or_rolled_back_at_the_next_start(
    serve_env: dict[str, str], tmp_path: Path, s3: Any
) -> None:
    server = ServeProcess(serve_env, tmp_path)
    try:
        client, headers = _signed_in(server)
        forced = client.post(API, headers=headers, json={"display_name": "forced"}).json()
        plain = client.post(API, headers=headers, json={"display_name": "plain"}).json()
        for storage in (forced, plain):
            for key in ("a.txt", "b.txt"):
                client.put(f"{API}/{storage['id']}/objects/{key}", headers=headers, content=b"x" * 100)
        s3.delete_object(Bucket=forced["bucket_name"], Key="a.txt")  # the delete had begun
        _kill(server)
        client.close()
    finally:
        server.stop()
    data = Path(serve_env["CMBCLUSTER_DATA_DIR"])
    _mark_deleting(data, forced["id"], force=True)
    _mark_deleting(data, plain["id"], force=False)

    with ServeProcess(serve_env, tmp_path) as restarted:
        client, headers = _signed_in(restarted)
        listed = {s["id"]: s for s in client.get(API, headers=headers).json()["storages"]}
        # The forced delete was finished: bucket and record are gone.
        assert forced["id"] not in listed
        assert s3.list_buckets(Prefix=forced["bucket_name"]).get("Buckets", []) == []
        # A delete without force of a non-empty bucket cannot finish: the storage is usable again,
        # its usage measured anew.
        assert listed[plain["id"]]["status"] == "active"
        assert (listed[plain["id"]]["size_bytes"], listed[plain["id"]]["object_count"]) == (200, 2)
        got = client.get(f"{API}/{plain['id']}/objects/a.txt", headers=headers)
        assert got.status_code == 200 and got.content == b"x" * 100
        client.close()
