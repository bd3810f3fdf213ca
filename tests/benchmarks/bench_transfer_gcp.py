"""Object transfer on GCS: a 1 GiB upload and download through the storage API of `cmbcluster serve`
(CLOUD_PROVIDER=gcp) versus google-cloud-storage directly, against the same gcp-storage-emulator,
in the same run.

Starts its own emulator (in memory) and `cmbcluster serve` with the GCS storage backend (sign-in,
compute and infra stay `local`: only storage is measured). google-cloud-storage uses its own
defaults (``upload_from_filename``: a resumable upload in 100 MiB pieces; ``download_to_filename``:
one streamed GET), as a script would; the API is judged against that. For comparison it also
uploads in 8 MiB resumable chunks: the emulator appends every chunk by copying the whole upload
so far, so its cost grows with the number of chunks, whoever sends them (which is why the server
sends large pieces, spooled to disk to keep its memory flat).
The server's resident memory is sampled every 50 ms during the API transfers. Targets (GCP
issue): API throughput >= 0.8 x google-cloud-storage for the upload and the download each,
server RSS growth <= 64 MiB. Prints the figures; exits 1 when a target is missed. Helpers:
transfer_common.py.

    python tests/benchmarks/bench_transfer_gcp.py [--size-mib N] [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.api_core.client_options import ClientOptions
from google.cloud import storage
from transfer_common import MIB, SdkClient, compare_with_sdk

from cmbcluster.testing.process import ToolServer, clean_environ

PROJECT = "cmbcluster-bench"


def upload(bucket: Any, key: str, source: Path, chunk_size: int | None = None) -> None:
    """The library's own way: a resumable upload in 100 MiB pieces unless ``chunk_size`` is given."""
    bucket.blob(key, chunk_size=chunk_size).upload_from_filename(str(source))


def download(bucket: Any, key: str, target: Path) -> None:
    bucket.blob(key).download_to_filename(str(target))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the transferred file (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each transfer; the best counts")
    args, _ = parser.parse_known_args()  # `nox -s benchmark -- ...` passes the same arguments to every script

    with tempfile.TemporaryDirectory(prefix="bench-gcs-") as tmp:
        command = ["gcp-storage-emulator", "start", "-H", "127.0.0.1", "--port", "{port}", "--in-memory", "-q"]
        with ToolServer(command, clean_environ(), Path(tmp) / "emulator.log") as emulator:

            @contextmanager
            def sdk(bucket: str) -> Iterator[SdkClient]:
                client = storage.Client(
                    project=PROJECT,
                    client_options=ClientOptions(api_endpoint=emulator.url),
                    use_auth_w_custom_endpoint=False,
                )
                target = client.bucket(bucket)
                try:
                    yield SdkClient(
                        name="google-cloud-storage",
                        uploads={
                            "upload_from_filename": lambda source, key: upload(target, key, source),
                            # What the emulator makes of small resumable chunks.
                            "upload_from_filename 8 MiB chunks": lambda source, key: upload(
                                target, key, source, 8 * MIB
                            ),
                        },
                        downloads={"download_to_filename": lambda key, path: download(target, key, path)},
                        delete=lambda key: target.blob(key).delete(),
                    )
                finally:
                    client.close()

            serve_env = {
                "CLOUD_PROVIDER": "gcp",
                # Storage only: sign in, run environments and the rest on this machine.
                "CMBCLUSTER_AUTH_PROVIDERS": "local",
                "CMBCLUSTER_COMPUTE_BACKEND": "local",
                "CMBCLUSTER_INFRA_PROVIDER": "local",
                "PROJECT_ID": PROJECT,
                "STORAGE_EMULATOR_HOST": emulator.url,
            }
            missed: int = compare_with_sdk(
                title="GCS on gcp-storage-emulator: cmbcluster serve (CLOUD_PROVIDER=gcp) vs google-cloud-storage",
                serve_env=serve_env,
                sdk=sdk,
                stand_in_pid=emulator.process.pid,
                size_mib=args.size_mib,
                rounds=args.rounds,
                target_ratio=0.8,
            )
            return missed


if __name__ == "__main__":
    sys.exit(main())
