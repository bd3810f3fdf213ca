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

Transfers use the standard library's http.client, in 1 MiB blocks, so that the client is not
what is measured; sign-in and set-up use httpx.

    python tests/benchmarks/bench_transfer.py [--size-mib N] [--rounds N] [--plain-copy-baseline]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ

MIB = 1024 * 1024
TARGET_RSS_GROWTH_MIB = 64
TARGET_RATIO = 0.5
CHUNK = MIB


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (VmRSS is in KiB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssSampler:
    """The peak RSS of a process while the ``with`` block runs, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


def make_file(path: Path, size: int) -> str:
    """Write ``size`` pseudo-random bytes (incompressible, cheap to make); return their sha256."""
    digest = hashlib.sha256()
    rng = random.Random(20240611)
    with open(path, "wb") as out:
        for _ in range(size // CHUNK):
            block = rng.randbytes(CHUNK)
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            yield block


def timed(action: Callable[[], object]) -> float:
    os.sync()  # start every measurement without a backlog of dirty pages from the previous one
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def upload(port: int, path: str, headers: dict[str, str], source: Path, size: int) -> None:
    """PUT the file, streamed from disk in 1 MiB blocks, with its Content-Length."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120, blocksize=CHUNK)
    try:
        with open(source, "rb") as body:
            connection.request(
                "PUT", path, body=body,
                headers={**headers, "Content-Length": str(size), "Content-Type": "application/octet-stream"},
            )  # fmt: skip
        answer = connection.getresponse()
        text = answer.read()
        assert answer.status == 201, text
        assert json.loads(text)["size"] == size, text
    finally:
        connection.close()


def download(port: int, path: str, headers: dict[str, str], target: Path | None, size: int) -> None:
    """GET the object, streamed to disk (or, with no target, discarded) through one reused 1 MiB buffer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("GET", path, headers=headers)
        answer = connection.getresponse()
        assert answer.status == 200, answer.read()
        assert int(answer.headers["Content-Length"]) == size
        buffer = memoryview(bytearray(CHUNK))
        if target is None:  # what the server and the network sustain, without this VM's disk writes
            while answer.readinto(buffer):
                pass
            return
        with open(target, "wb") as out:
            while count := answer.readinto(buffer):
                out.write(buffer[:count])
    finally:
        connection.close()


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
