"""The control plane's proxy to environments (/environments/<id>/) on the embedded default.

1. A 1 GiB download from an environment: the catalog's Files application serves a file of its
   home, fetched by curl through `cmbcluster serve` and directly from the application (its Unix
   socket) in the same run; the server's resident memory is sampled every 50 ms. Targets:
   throughput through the proxy >= 0.7 x direct, peak RSS growth <= 64 MiB.
2. 200 WebSocket sessions at once through the proxy to an echo application, each sending a
   message every 100 ms (as a notebook's kernel channel does while someone works) and timing each
   round trip; the same load directly to the application for comparison. Target: p99 <= 20 ms.

3. Small requests through the proxy, as a JupyterLab page makes a hundred of: the Files
   application's listing of its home, by wrk (8 connections) for ``--seconds``: requests a second
   and the control plane's CPU per request (figures only: no target; needs wrk).

Prints the figures; exits 1 when a target is missed.

    python tests/benchmarks/bench_proxy.py [--size-mib N] [--rounds N] [--sessions N] [--messages N]
        [--seconds S] [--only download|websocket|small]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from transfer_common import MIB, TARGET_RSS_GROWTH_MIB, RssSampler, rss_bytes
from wrk_common import run_wrk

from cmbcluster.local.compute import LocalProcessCompute
from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ

TARGET_RATIO = 0.7
TARGET_P99_MS = 20.0

ECHO_APP = r"""
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(connection):
    async for message in connection:
        await connection.send(message)

async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), compression=None, max_size=None):
        await asyncio.Future()

asyncio.run(main())
"""


def wait_running(client: httpx.Client, headers: dict[str, str], env_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while True:
        body: dict[str, object] = client.get(f"/api/v1/environments/{env_id}", headers=headers).json()
        if body["status"] == "running":
            return body
        assert body["status"] in ("pending", "starting") and time.monotonic() < deadline, body
        time.sleep(0.1)


def curl_download(url: str, headers: dict[str, str], size: int, unix_socket: str | None = None) -> float:
    command = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}", url]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    if unix_socket:
        command += ["--unix-socket", unix_socket]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert int(result.stdout) == size, f"{url}: {result.stdout} bytes, {result.stderr}"
    return elapsed


async def echo_sessions(url: str, headers: dict[str, str], sessions: int, messages: int) -> list[float]:
    """Open ``sessions`` WebSockets (spread over a second, as people arrive), then, once all are open,
    send ``messages`` messages on each, one per 100 ms, timing each round trip."""
    from websockets.asyncio.client import connect

    round_trips: list[float] = []
    all_open = asyncio.Event()
    opened = 0

    async def one() -> None:
        nonlocal opened
        await asyncio.sleep(random.uniform(0, 1.0))  # people do not all start at the same millisecond
        async with connect(url, additional_headers=headers, max_size=None, open_timeout=60) as socket:
            opened += 1
            if opened == sessions:
                all_open.set()
            await all_open.wait()
            await asyncio.sleep(random.uniform(0, 0.1))  # and do not type in step
            for i in range(messages):
                payload = f"{i:06d}".ljust(200, ".")
                start = time.perf_counter()
                await socket.send(payload)
                answer = await socket.recv()
                round_trips.append(time.perf_counter() - start)
                assert answer == payload
                await asyncio.sleep(0.1)

    await asyncio.gather(*(one() for _ in range(sessions)))
    return round_trips


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bench_download(
    server: ServeProcess, client: httpx.Client, headers: dict[str, str], data: Path, compute: LocalProcessCompute,
    application: str, size_mib: int, rounds: int, *, judged: bool,
) -> list[str]:  # fmt: skip
    """Download a file of the environment's home with curl, directly from the application and through
    the proxy, ``rounds`` times each way; the best of each counts."""
    size = size_mib * MIB
    env_id = client.post("/api/v1/environments", headers=headers, json={"application": application}).json()["id"]
    running = wait_running(client, headers, env_id)
    big = data / "homes" / env_id / "big.bin"
    with open(big, "wb") as out:
        block = random.Random(7).randbytes(MIB)
        for _ in range(size_mib):
            out.write(block)
    upstream = compute.upstream(env_id)
    assert upstream is not None
    path = "files/big.bin" if application == "jupyterlab" else "big.bin"  # JupyterLab's own download URL
    direct_url = (
        f"{upstream.url}{'' if upstream.strip_prefix else running['url']}{'/' if upstream.strip_prefix else ''}{path}"
    )
    proxied_url = f"{server.url}{running['url']}{path}"
    deadline = time.monotonic() + 60
    while (
        httpx.head(proxied_url, headers=headers).status_code != 200
    ):  # JupyterLab serves a moment after its port opens
        assert time.monotonic() < deadline, f"{proxied_url} does not answer"
        time.sleep(0.2)
    baseline = rss_bytes(server.process.pid)
    direct_times, proxied_times, peaks = [], [], []
    for _ in range(rounds):
        direct_times.append(curl_download(direct_url, dict(upstream.headers), size, upstream.unix_socket))
        with RssSampler(server.process.pid) as sampler:
            proxied_times.append(curl_download(proxied_url, headers, size))
        peaks.append(sampler.peak)
    direct, proxied = size / min(direct_times) / MIB, size / min(proxied_times) / MIB
    growth = (max(peaks) - baseline) / MIB
    ratio = proxied / direct
    where = "its Unix socket" if upstream.unix_socket else "its loopback port"
    print(f"download of {size_mib} MiB from a {application} environment (curl, best of {rounds}):")
    print(f"  direct to the application ({where}): {direct:8.0f} MiB/s")
    target = f" (target >= {TARGET_RATIO})" if judged else " (for information: no target)"
    print(f"  through the control plane's proxy: {proxied:8.0f} MiB/s  ratio {ratio:.2f}{target}")
    print(f"  server RSS {baseline / MIB:.0f} MiB before, peak growth {growth:.1f} MiB "
          f"(target <= {TARGET_RSS_GROWTH_MIB})")  # fmt: skip
    big.unlink()
    client.delete(f"/api/v1/environments/{env_id}", headers=headers)
    missed = []
    if judged and ratio < TARGET_RATIO:
        missed.append(f"{application} download ratio {ratio:.2f} < {TARGET_RATIO}")
    if growth > TARGET_RSS_GROWTH_MIB:
        missed.append(f"RSS growth {growth:.1f} MiB > {TARGET_RSS_GROWTH_MIB}")
    return missed


def bench_websocket(
    server: ServeProcess, client: httpx.Client, headers: dict[str, str], root: Path, compute: LocalProcessCompute,
    sessions: int, messages: int,
) -> list[str]:  # fmt: skip
    script = root / "echo_app.py"
    script.write_text(ECHO_APP)
    made = client.post("/api/v1/applications", headers=headers, json={
        "slug": "echo", "name": "Echo", "image": "x", "command": [sys.executable, str(script), "{port}"],
    })  # fmt: skip
    assert made.status_code == 201, made.text
    echo_id = client.post("/api/v1/environments", headers=headers, json={"application": "echo"}).json()["id"]
    echo = wait_running(client, headers, echo_id)
    upstream = compute.upstream(echo_id)
    assert upstream is not None
    time.sleep(0.5)
    direct_url = upstream.url.replace("http://", "ws://") + "/"
    through_url = server.url.replace("http://", "ws://") + str(echo["url"])
    direct_rtt = asyncio.run(echo_sessions(direct_url, {}, sessions, messages))
    proxied_rtt = asyncio.run(echo_sessions(through_url, headers, sessions, messages))
    print(f"{sessions} concurrent WebSocket echo sessions, {messages} round trips each once all are open, "
          "one message per 100 ms per session:")  # fmt: skip
    for label, rtts in (("direct to the application", direct_rtt), ("through the proxy", proxied_rtt)):
        ms = [r * 1000 for r in rtts]
        print(f"  {label:27s} p50 {statistics.median(ms):6.2f} ms  p99 {percentile(ms, 0.99):6.2f} ms  "
              f"max {max(ms):6.2f} ms  ({len(ms)} round trips)")  # fmt: skip
    p99 = percentile([r * 1000 for r in proxied_rtt], 0.99)
    print(f"  target: p99 through the proxy <= {TARGET_P99_MS} ms")
    client.delete(f"/api/v1/environments/{echo_id}", headers=headers)
    return [f"WebSocket p99 {p99:.2f} ms > {TARGET_P99_MS}"] if p99 > TARGET_P99_MS else []


def bench_small_requests(
    server: ServeProcess, client: httpx.Client, headers: dict[str, str], seconds: float
) -> list[str]:
    """wrk against a small page of an environment, through the proxy: every request is signed in,
    checked against the environment's owner and status, and forwarded."""
    if shutil.which("wrk") is None:
        print("small requests through the proxy: skipped, wrk is not installed (apt-get install wrk)")
        return []
    env_id = client.post("/api/v1/environments", headers=headers, json={"application": "files"}).json()["id"]
    url = f"{server.url}{wait_running(client, headers, env_id)['url']}"
    assert client.get(url, headers=headers).status_code == 200
    result = run_wrk(url, server_pid=server.process.pid, connections=8, seconds=seconds,
                     options=["-H", f"Authorization: {headers['Authorization']}"])  # fmt: skip
    print(f"small requests through the proxy (the Files application's listing, wrk, 8 connections, {seconds:g} s):")
    client.delete(f"/api/v1/environments/{env_id}", headers=headers)
    if result.errors:  # refusals and errors are cheaper than answers: no figure from them
        print(f"  {result.errors} of {result.requests} requests were not answered 2xx or 3xx: no figure")
        return [f"small requests: {result.errors} not answered 2xx or 3xx"]
    print(f"  {result.rps:.0f} requests/s, the control plane's CPU {result.cpu_us_per_request:.0f} us a request "
          "(figures only: no target)")  # fmt: skip
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the downloaded file (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="downloads each way; the best counts")
    parser.add_argument("--sessions", type=int, default=200, help="concurrent WebSocket sessions")
    parser.add_argument("--messages", type=int, default=20, help="round trips per session")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long wrk sends small requests")
    parser.add_argument("--only", choices=("download", "websocket", "small"), help="run one part only")
    args, _ = parser.parse_known_args()  # `nox -s benchmark -- ...` passes the same arguments to every script
    missed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        root = Path(tmp)
        data = root / "data"
        env = clean_environ({"CMBCLUSTER_DATA_DIR": str(data), "CMBCLUSTER_LOG_LEVEL": "warning"})
        compute = LocalProcessCompute(data / "compute")
        try:
            with ServeProcess(env, root) as server, httpx.Client(base_url=server.url, timeout=60) as client:
                server.wait_ready("/readyz")
                headers = dev_sign_in(client, "bench@example.org")
                if args.only in (None, "download"):
                    for application, judged in (("jupyterlab", True), ("files", False)):
                        missed += bench_download(server, client, headers, data, compute, application, args.size_mib,
                                                 args.rounds, judged=judged)  # fmt: skip
                if args.only in (None, "websocket"):
                    missed += bench_websocket(server, client, headers, root, compute, args.sessions, args.messages)
                if args.only in (None, "small"):
                    missed += bench_small_requests(server, client, headers, args.seconds)
        finally:
            for status in compute.list_managed():
                compute.delete(status.environment_id)
    if missed:
        print("MISSED: " + "; ".join(missed))
        return 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
