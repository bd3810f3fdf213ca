"""Object transfer: a 1 GiB upload and download through the storage API of `cmbcluster serve`.

Streams a file from local disk to the API and back to local disk, on the embedded default
(local storage), and compares the throughput with copying the same file on the same disk
(`shutil.copyfile`) in the same run; a plain read of the file is printed too. The server's
resident memory is sampled every 50 ms during the transfers. Targets (storage issue): peak RSS
growth <= 64 MiB over the RSS before the transfers, and API throughput >= 0.5 x the local copy,
for the upload and the download each. Prints the figures; exits 1 when a target is missed.

The local backend makes every upload durable (written, fsync'ed, renamed into place), so the
upload is judged against a *durable* local copy (copyfile, then fsync), the same work;
``--plain-copy-baseline`` judges it against the plain copy instead (the page cache only).
The download is judged against the plain copy: neither side syncs. Each transfer is measured
``--rounds`` times and the best counts (the first round on a cold machine is always slow).

Transfers use the standard library's http.client, in 1 MiB blocks (helpers in transfer_common.py,
shared with the cloud benchmarks), so that the client is not what is measured; sign-in and set-up use httpx.

    python tests/benchmarks/bench_transfer.py [--size-mib N] [--rounds N] [--plain-copy-baseline]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
from transfer_common import (
    MIB,
    TARGET_RSS_GROWTH_MIB,
    RssSampler,
    download,
    make_file,
    read_chunks,
    rss_bytes,
    sha256_of,
    timed,
    upload,
)

from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ

TARGET_RATIO = 0.5


def durable_copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    with open(target, "rb") as f:
        os.fsync(f.fileno())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the transferred file (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each transfer; the best counts")
    parser.add_argument(
        "--plain-copy-baseline", action="store_true", help="judge uploads against the plain copy, not the durable one"
    )
    args, _ = parser.parse_known_args()  # `nox -s benchmark -- ...` passes the same arguments to every script
    size = args.size_mib * MIB
    times: dict[str, list[float]] = {
        "copy": [],
        "durable copy": [],
        "read": [],
        "upload": [],
        "download": [],
        "download, discarded": [],
    }
    peaks: list[int] = []
    identical = False

    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        root = Path(tmp)
        source, copy, back = root / "source.bin", root / "copy.bin", root / "back.bin"
        started = time.perf_counter()
        expected = make_file(source, size)
        print(f"{args.size_mib} MiB test file written in {time.perf_counter() - started:.1f} s")
        env = clean_environ({"CMBCLUSTER_DATA_DIR": str(root / "data"), "CMBCLUSTER_LOG_LEVEL": "WARNING"})
        with ServeProcess(env, root) as server, httpx.Client(base_url=server.url, timeout=60) as client:
            server.wait_ready("/readyz")
            headers = dev_sign_in(client, "bench@example.org", "Bench")
            created = client.post("/api/v1/storages", json={"display_name": "bench"}, headers=headers)
            assert created.status_code == 201, created.text
            objects = f"/api/v1/storages/{created.json()['id']}/objects"
            path = f"{objects}/bench/source.bin"
            pid = server.process.pid
            rss_before = rss_bytes(pid)
            for _ in range(args.rounds):
                # The local baselines: same disk, same run, just before the transfers.
                times["copy"].append(timed(lambda: shutil.copyfile(source, copy)))
                copy.unlink()
                times["durable copy"].append(timed(lambda: durable_copy(source, copy)))
                copy.unlink()
                times["read"].append(timed(lambda: sum(1 for _ in read_chunks(source))))
                with RssSampler(pid) as sampler:
                    times["upload"].append(timed(lambda: upload(server.port, path, headers, source, size)))
                    times["download"].append(timed(lambda: download(server.port, path, headers, back, size)))
                    times["download, discarded"].append(timed(lambda: download(server.port, path, headers, None, size)))
                peaks.append(sampler.peak)
                identical = sha256_of(back) == expected
                back.unlink()
                deleted = client.post(f"{objects}/delete", json={"keys": ["bench/source.bin"]}, headers=headers)
                assert deleted.status_code == 200, deleted.text
                if not identical:
                    break
            server_log = server.output()

    best = {name: size / MIB / min(values) for name, values in times.items()}  # MiB/s
    upload_baseline = "copy" if args.plain_copy_baseline else "durable copy"
    ratios = {"upload": best["upload"] / best[upload_baseline], "download": best["download"] / best["copy"]}
    growth = max(peaks) - rss_before
    print(f"{args.rounds} rounds of {args.size_mib} MiB; server: cmbcluster serve, local storage; best of the rounds:")
    for name, values in times.items():
        rounds = ", ".join(f"{size / MIB / v:.0f}" for v in values)
        extra = ""
        if name == "upload":
            extra = (
                f"  {best['upload'] / best['durable copy']:.2f} x the durable copy, "
                f"{best['upload'] / best['copy']:.2f} x the plain copy"
            )
        elif name == "download":
            extra = f"  {ratios['download']:.2f} x the plain copy"
        elif name == "download, discarded":
            extra = f"  {best[name] / best['copy']:.2f} x the plain copy (not written to disk: the server's own rate)"
        label = f"{'local' if name in ('copy', 'durable copy', 'read') else 'API'} {name}"
        print(f"  {label:26} {best[name]:6.0f} MiB/s (rounds: {rounds}){extra}")
    print(
        f"server RSS before the transfers {rss_before / MIB:.1f} MiB, peak during them {max(peaks) / MIB:.1f} MiB: "
        f"growth {growth / MIB:.1f} MiB (target <= {TARGET_RSS_GROWTH_MIB} MiB)"
    )
    print(f"downloaded file byte-identical (sha256): {identical}")
    failures = []
    if not identical:
        failures.append("the downloaded file differs from the uploaded one")
    if growth > TARGET_RSS_GROWTH_MIB * MIB:
        failures.append(f"server RSS grew by {growth / MIB:.1f} MiB (target <= {TARGET_RSS_GROWTH_MIB} MiB)")
    baselines = {"upload": upload_baseline, "download": "copy"}
    for direction, ratio in ratios.items():
        if ratio < TARGET_RATIO:
            failures.append(f"{direction} at {ratio:.2f} x the local {baselines[direction]} (target >= {TARGET_RATIO})")
    if " 500 " in server_log or "Traceback" in server_log:
        failures.append("the server logged an error:\n" + server_log[-2000:])
    for failure in failures:
        print(f"MISSES: {failure}")
    if not failures:
        print(f"meets every target (upload vs the {upload_baseline}, download vs the copy)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
