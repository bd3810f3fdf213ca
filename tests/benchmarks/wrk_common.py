"""wrk, the HTTP load generator, as the benchmarks drive it: one run against a server, its figures
parsed, and the server's CPU time per request (which other work on a shared machine disturbs far
less than the throughput: the figure to compare while changing the code).

Needs wrk on PATH (Debian: ``apt-get install --no-install-recommends wrk``).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil


@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: int  #: answers other than 2xx and 3xx
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float  #: the server process's CPU time per request sent


def run_wrk(
    url: str, *, server_pid: int, connections: int, seconds: float, threads: int = 1,
    options: Sequence[str] = (), env: Mapping[str, str] | None = None,
) -> WrkResult:  # fmt: skip
    """``connections`` connections, each a closed loop, for ``seconds``; ``options``: wrk's own
    (``-H`` a header, ``-s`` a Lua script, which reads ``env``)."""
    server = psutil.Process(server_pid)
    cpu_before = sum(server.cpu_times()[:2])
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", *options, url],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    if "Requests/sec" not in out:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    requests = int(_found(r"(\d+) requests in", out))
    errors = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return WrkResult(
        rps=float(_found(r"Requests/sec:\s+([\d.]+)", out)), requests=requests, errors=errors,
        p50_ms=_latency_ms(out, "50%"), p99_ms=_latency_ms(out, "99%"),
        cpu_us_per_request=(sum(server.cpu_times()[:2]) - cpu_before) / max(requests, 1) * 1e6,
    )  # fmt: skip


def _found(pattern: str, out: str) -> str:
    match = re.search(pattern, out)
    if match is None:
        raise RuntimeError(f"wrk's output has no {pattern!r}:\n{out}")
    return match.group(1)


def _latency_ms(out: str, label: str) -> float:
    match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
    if match is None:
        raise RuntimeError(f"wrk's output has no {label} latency:\n{out}")
    return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
