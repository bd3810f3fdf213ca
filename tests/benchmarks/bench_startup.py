"""Start-up time: process start to the first `/readyz` 200 of `cmbcluster serve`.

Compared, in the same run and on the same machine, with a bare FastAPI app under uvicorn
answering the same path. Both cloud plugins are installed in the measured environment.
Target (issue 2): ratio <= 2.0. Prints the figures; exits 1 when the target is missed.

    python tests/benchmarks/bench_startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path

import httpx

from cmbcluster.testing.process import clean_environ, free_port

TARGET_RATIO = 2.0
BARE_APP = """
from fastapi import FastAPI
app = FastAPI()

@app.get("/readyz")
def readyz():
    return {"status": "ready"}
"""


def time_to_ready(command: list[str], port: int, env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with httpx.Client(timeout=1) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{command[:4]} exited: {process.stderr.read().decode() if process.stderr else ''}"
                    )
                try:
                    if client.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        return time.perf_counter() - start
                except httpx.TransportError:
                    pass
                time.sleep(0.005)
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    plugins = sorted(ep.name for ep in entry_points(group="cmbcluster"))
    assert {"aws", "gcp"} <= set(plugins), f"both cloud plugins must be installed, found {plugins}"
    first: list[float] = []
    again: list[float] = []
    bare: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bare_app.py").write_text(BARE_APP)
        for run in range(args.runs):
            env = clean_environ({"CMBCLUSTER_DATA_DIR": str(root / f"data-{run}")})
            for series in (first, again):  # a fresh data directory, then a restart on it
                port = free_port()
                serve = [sys.executable, "-m", "cmbcluster.cli", "serve", "--port", str(port)]
                series.append(time_to_ready(serve, port, env, root))
            port = free_port()
            bare_cmd = [sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port), "--log-level", "warning"]
            bare.append(time_to_ready(bare_cmd, port, clean_environ(), root))
    print(f"plugins installed: {', '.join(plugins)}; {args.runs} runs each")
    bare_median = statistics.median(bare)
    report("bare FastAPI + uvicorn", bare)
    worst = 0.0
    for label, series in (("cmbcluster serve, first start", first), ("cmbcluster serve, restart", again)):
        ratio = statistics.median(series) / bare_median
        worst = max(worst, ratio)
        report(label, series, f"ratio {ratio:.2f}")
    verdict = "meets" if worst <= TARGET_RATIO else "MISSES"
    print(f"worst ratio {worst:.2f} ({verdict} the target <= {TARGET_RATIO})")
    return 0 if worst <= TARGET_RATIO else 1


def report(label: str, series: list[float], extra: str = "") -> None:
    ms = [s * 1000 for s in series]
    print(
        f"{label:32} process start -> /readyz 200: median {statistics.median(ms):5.0f} ms "
        f"(min {min(ms):.0f}, max {max(ms):.0f}) {extra}"
    )


if __name__ == "__main__":
    sys.exit(main())
