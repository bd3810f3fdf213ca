"""Object transfer on S3: a 1 GiB upload and download through the storage API of `cmbcluster serve`
(CLOUD_PROVIDER=aws) versus boto3 directly, against the same moto server, in the same run.

Starts its own moto server and `cmbcluster serve` with the S3 storage backend (sign-in, compute
and infra stay `local`: only storage is measured). boto3 uploads two ways, its managed transfer
(``upload_file``: concurrent 8 MiB parts) and one streamed ``put_object``, and the API is judged
against the faster; it downloads with one streamed ``get_object``. (boto3's managed
``download_file`` is left out: its concurrent ranged GETs ran at 12 MiB/s here, as moto copies
the whole object to answer each range, which would flatter the API.) The server's
resident memory is sampled every 50 ms during the API transfers. Targets (AWS issue): API
throughput >= 0.8 x boto3 for the upload and the download each, server RSS growth <= 64 MiB.
Prints the figures; exits 1 when a target is missed. Helpers: transfer_common.py.

    python tests/benchmarks/bench_transfer_aws.py [--size-mib N] [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from transfer_common import MIB, SdkClient, compare_with_sdk

from cmbcluster.testing.process import ToolServer, clean_environ

REGION = "eu-west-1"
#: Dummy credentials and no shared config: nothing here can reach a real AWS account.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def put_object(client: Any, bucket: str, key: str, source: Path) -> None:
    """One PutObject, the body streamed from the file."""
    with open(source, "rb") as body:
        client.put_object(Bucket=bucket, Key=key, Body=body)


def get_object(client: Any, bucket: str, key: str, target: Path) -> None:
    """One GetObject, the body streamed to the file in 1 MiB blocks."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    with open(target, "wb") as out:
        for chunk in body.iter_chunks(MIB):
            out.write(chunk)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the transferred file (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each transfer; the best counts")
    args, _ = parser.parse_known_args()  # `nox -s benchmark -- ...` passes the same arguments to every script

    with tempfile.TemporaryDirectory(prefix="bench-moto-") as tmp:
        env = clean_environ(AWS_ENV)
        with ToolServer(["moto_server", "-H", "127.0.0.1", "-p", "{port}"], env, Path(tmp) / "moto.log") as moto:

            @contextmanager
            def sdk(bucket: str) -> Iterator[SdkClient]:
                client = boto3.client(
                    "s3", region_name=REGION, endpoint_url=moto.url, aws_access_key_id="testing",
                    aws_secret_access_key="testing",
                )  # fmt: skip
                try:
                    yield SdkClient(
                        name="boto3",
                        uploads={
                            "upload_file": lambda source, key: client.upload_file(str(source), bucket, key),
                            "put_object": lambda source, key: put_object(client, bucket, key, source),
                        },
                        downloads={"get_object": lambda key, target: get_object(client, bucket, key, target)},
                        delete=lambda key: client.delete_object(Bucket=bucket, Key=key),
                    )
                finally:
                    client.close()

            serve_env = {
                **AWS_ENV,
                "CLOUD_PROVIDER": "aws",
                # Storage only: sign in, run environments and the rest on this machine.
                "CMBCLUSTER_AUTH_PROVIDERS": "local",
                "CMBCLUSTER_COMPUTE_BACKEND": "local",
                "CMBCLUSTER_INFRA_PROVIDER": "local",
                "AWS_REGION": REGION,
                "AWS_ACCOUNT_ID": "123456789012",
                "AWS_ENDPOINT_URL": moto.url,
                "S3_VERSIONING": "false",  # moto keeps every version in memory: 1 GiB per round
            }
            missed: int = compare_with_sdk(
                title="S3 on moto: cmbcluster serve (CLOUD_PROVIDER=aws) vs boto3",
                serve_env=serve_env,
                sdk=sdk,
                stand_in_pid=moto.process.pid,
                size_mib=args.size_mib,
                rounds=args.rounds,
                target_ratio=0.8,
            )
            return missed


if __name__ == "__main__":
    sys.exit(main())
