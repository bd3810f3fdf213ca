"""Helpers shared by the transfer benchmarks (bench_transfer*.py): test files, timing, the
server's memory, and 1 GiB transfers through the storage API of `cmbcluster serve`.

Transfers use the standard library's http.client, in 1 MiB blocks, so that the client is not
what is measured. ``compare_with_sdk`` is the whole benchmark of a cloud backend: the same file
through the control plane's API and through the cloud's own SDK, against the same server, in
the same run.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx

from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ

MIB = 1024 * 1024
CHUNK = MIB
TARGET_RSS_GROWTH_MIB = 64
SDK_KEY = "bench/sdk.bin"


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(action: Callable[[], object]) -> float:
    os.sync()  # start every measurement without a backlog of dirty pages from the previous one
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def upload(port: int, path: str, headers: dict[str, str], source: Path, size: int) -> None:
    """PUT the file, streamed from disk in 1 MiB blocks, with its Content-Length."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300, blocksize=CHUNK)
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
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
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


@dataclass
class ApiBucket:
    """A bucket created through the API of a running server, and how to reach its objects."""

    server: ServeProcess
    client: httpx.Client
    headers: dict[str, str]
    storage_id: str
    bucket_name: str

    @property
    def objects(self) -> str:
        return f"/api/v1/storages/{self.storage_id}/objects"

    def delete(self, key: str) -> None:
        deleted = self.client.post(f"{self.objects}/delete", json={"keys": [key]}, headers=self.headers)
        assert deleted.status_code == 200, deleted.text


def create_api_bucket(server: ServeProcess, client: httpx.Client, display_name: str = "bench") -> ApiBucket:
    """Wait for the server, sign in with the development login and create a bucket."""
    ready = server.wait_ready("/readyz", timeout=60)
    assert ready.status_code == 200, ready.text
    headers = dev_sign_in(client, "bench@example.org", "Bench")
    created = client.post("/api/v1/storages", json={"display_name": display_name}, headers=headers)
    assert created.status_code == 201, created.text
    body = created.json()
    return ApiBucket(server, client, headers, body["id"], body["bucket_name"])


@dataclass
class SdkClient:
    """The cloud's own SDK on the same bucket. ``uploads`` copy a local file to a key and
    ``downloads`` a key to a local file, each the SDK's way named by its key; the API is
    compared with the fastest of them."""

    name: str
    uploads: dict[str, Callable[[Path, str], None]]
    downloads: dict[str, Callable[[str, Path], None]]
    delete: Callable[[str], None]


def compare_with_sdk(
    *,
    title: str,
    serve_env: Mapping[str, str],
    sdk: Callable[[str], AbstractContextManager[SdkClient]],
    stand_in_pid: int,
    size_mib: int,
    rounds: int,
    target_ratio: float,
) -> int:
    """Move a ``size_mib`` file up and down through the API of `cmbcluster serve` (started here
    with ``serve_env``) and through each way of ``sdk(bucket_name)``, ``rounds`` times each,
    alternating; print the best throughputs, the ratios of the API to the fastest SDK way and the
    server's RSS growth; return 1 if a target is missed. The CPU time each transfer cost the
    server, the cloud's stand-in (process ``stand_in_pid``) and this client is printed too: on a
    small machine they compete for the same cores.
    """
    size = size_mib * MIB
    times: dict[str, list[float]] = {"API upload": [], "API download": []}
    cpu: dict[str, list[tuple[float, float, float]]] = {}  # server, stand-in, client; per round
    peaks: dict[str, list[int]] = {"upload": [], "download": []}
    identical: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        root = Path(tmp)
        source, back = root / "source.bin", root / "back.bin"
        started = time.perf_counter()
        expected = make_file(source, size)
        print(f"{size_mib} MiB test file written in {time.perf_counter() - started:.1f} s", flush=True)
        env = clean_environ({"CMBCLUSTER_DATA_DIR": str(root / "data"), "CMBCLUSTER_LOG_LEVEL": "WARNING", **serve_env})
        with ServeProcess(env, root) as server, httpx.Client(base_url=server.url, timeout=120) as client:
            bucket = create_api_bucket(server, client)
            path = f"{bucket.objects}/bench/api.bin"
            pid, port, headers = server.process.pid, server.port, bucket.headers

            def measure(name: str, action: Callable[[], object]) -> None:
                before = (cpu_seconds(pid), cpu_seconds(stand_in_pid), time.process_time())
                times.setdefault(name, []).append(timed(action))
                after = (cpu_seconds(pid), cpu_seconds(stand_in_pid), time.process_time())
                cpu.setdefault(name, []).append((after[0] - before[0], after[1] - before[1], after[2] - before[2]))

            rss_before = rss_bytes(pid)
            with sdk(bucket.bucket_name) as direct:
                for number in range(1, rounds + 1):
                    for way, send in direct.uploads.items():
                        measure(f"{direct.name} {way}", partial(send, source, SDK_KEY))
                    for way, fetch in direct.downloads.items():
                        measure(f"{direct.name} {way}", partial(fetch, SDK_KEY, back))
                        identical[f"{direct.name} {way}"] = sha256_of(back) == expected
                        back.unlink()
                    direct.delete(SDK_KEY)
                    with RssSampler(pid) as sampler:
                        measure("API upload", partial(upload, port, path, headers, source, size))
                    peaks["upload"].append(sampler.peak)
                    with RssSampler(pid) as sampler:
                        measure("API download", partial(download, port, path, headers, back, size))
                    peaks["download"].append(sampler.peak)
                    identical["API"] = sha256_of(back) == expected
                    back.unlink()
                    bucket.delete("bench/api.bin")
                    line = ", ".join(f"{name} {size / MIB / values[-1]:.0f}" for name, values in times.items())
                    print(f"  round {number}: {line} MiB/s", flush=True)
                    if not all(identical.values()):
                        break
            server_log = server.output()

    best = {name: size / MIB / min(values) for name, values in times.items()}  # MiB/s
    fastest = {
        "upload": max((f"{direct.name} {way}" for way in direct.uploads), key=best.__getitem__),
        "download": max((f"{direct.name} {way}" for way in direct.downloads), key=best.__getitem__),
    }
    ratios = {d: best[f"API {d}"] / best[fastest[d]] for d in fastest}
    growth = {direction: max(values) - rss_before for direction, values in peaks.items()}
    limit = TARGET_RSS_GROWTH_MIB
    print(f"{title}: {len(times['API upload'])} rounds of {size_mib} MiB, best of the rounds (MiB/s):")
    print(f"  {'':36} {'MiB/s':>7}   CPU s (best round): server, stand-in, client")
    for name, values in times.items():
        server_cpu, stand_in_cpu, client_cpu = cpu[name][values.index(min(values))]
        print(f"  {name:36} {best[name]:7.0f}   {server_cpu:5.1f} {stand_in_cpu:5.1f} {client_cpu:5.1f}")
    for direction, ratio in ratios.items():
        print(f"  API {direction} / {fastest[direction]}: ratio {ratio:.2f} (target >= {target_ratio})")
    for direction, peak_values in peaks.items():
        print(
            f"  server RSS before the transfers {rss_before / MIB:.1f} MiB, peak during the {direction}s "
            f"{max(peak_values) / MIB:.1f} MiB: growth {growth[direction] / MIB:.1f} MiB (target <= {limit} MiB)"
        )
    print(f"  downloaded files byte-identical (sha256): {identical}")
    failures = [f"the file downloaded through {via} differs" for via, ok in identical.items() if not ok]
    for direction, grown in growth.items():
        if grown > TARGET_RSS_GROWTH_MIB * MIB:
            failures.append(f"server RSS grew by {grown / MIB:.1f} MiB during the {direction}s (target <= {limit} MiB)")
    for direction, ratio in ratios.items():
        if ratio < target_ratio:
            failures.append(f"API {direction} at {ratio:.2f} x {fastest[direction]} (target >= {target_ratio})")
    if " 500 " in server_log or "Traceback" in server_log:
        failures.append("the server logged an error:\n" + server_log[-2000:])
    for failure in failures:
        print(f"MISSES: {failure}")
    if not failures:
        print("meets every target")
    return 1 if failures else 0
