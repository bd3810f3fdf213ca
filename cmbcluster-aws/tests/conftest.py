"""A real S3 API for the tests: moto in server mode on 127.0.0.1, one per test session."""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.s3.models import FakeDeleteMarker, S3Backend
from moto.server import ThreadedMotoServer

from cmbcluster_aws.settings import AwsSettings

sys.path.insert(0, str(Path(__file__).parent))
import datasync_stand_in
import moto_stand_ins

REGION = "eu-west-1"
ACCOUNT_ID = "123456789012"


def _hide_deleted_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make moto list "folders" as S3 does in versioned buckets.

    S3 reports a CommonPrefix only when a current, non-deleted object lies under it; moto 5.2
    also reports prefixes whose objects all end in a delete marker (so a folder emptied in a
    versioned bucket would never disappear). The server runs in this process, so its
    listing is corrected here instead of teaching the backend to distrust S3.
    """
    original = S3Backend.list_objects

    def list_objects(self: S3Backend, bucket: Any, *args: Any, **kwargs: Any) -> Any:
        keys, folders, truncated, marker = original(self, bucket, *args, **kwargs)
        live = [name for name, key in bucket.keys.items() if not isinstance(key, FakeDeleteMarker)]
        return keys, [f for f in folders if any(n.startswith(f) for n in live)], truncated, marker

    monkeypatch.setattr(S3Backend, "list_objects", list_objects)


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a moto server; dummy credentials so no real account can ever be reached."""
    empty = tmp_path_factory.mktemp("aws-config") / "none"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_SESSION_TOKEN", "testing")
        mp.setenv("AWS_CONFIG_FILE", str(empty))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        _hide_deleted_folders(mp)
        moto_stand_ins.install(mp)  # EKS add-ons and the IAM policy simulator, which moto lacks
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def moto_reset(moto_endpoint: str) -> str:
    """Start the test from an empty moto."""
    request = urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")
    # A reset reloads AWS's managed IAM policies (MOTO_IAM_LOAD_MANAGED_POLICIES): seconds of CPU,
    # longer on a busy machine
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
    moto_stand_ins.DENIED.clear()
    datasync_stand_in.reset()
    return moto_endpoint


@pytest.fixture
def make_settings(moto_reset: str) -> Callable[..., AwsSettings]:
    def make(**overrides: Any) -> AwsSettings:
        values: dict[str, Any] = {
            "aws_region": REGION,
            "aws_account_id": ACCOUNT_ID,
            "s3_user_bucket_prefix": "cmbtest",
            "s3_versioning": True,
            "endpoint_url": moto_reset,
        }
        values.update(overrides)
        return AwsSettings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
def aws_settings(make_settings: Callable[..., AwsSettings]) -> AwsSettings:
    return make_settings()


@pytest.fixture
def s3(moto_reset: str) -> Iterator[Any]:
    """A plain boto3 client on the same moto, to read back what the backend did."""
    client = boto3.client("s3", region_name=REGION, endpoint_url=moto_reset)
    yield client
    client.close()
