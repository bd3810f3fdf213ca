"""`./run serve` as the README starts it, for the tests that check what a newcomer sees
(tests/test_newcomer.py, tests/browser/test_notebook.py). Import as ``tests.run_serve`` (run pytest
with ``python -m pytest`` from the repository root)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cmbcluster.testing.leftovers import descendants
from cmbcluster.testing.process import clean_environ, free_port

ROOT = Path(__file__).resolve().parents[1]
FIRST_START_SECONDS = 900  # a first run sets up nox's serve session and may build the UI


class RunServe:
    """`./run serve --port P` in its own process group, as a terminal runs it."""

    def __init__(self, tmp_path: Path, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"run-serve-{self.port}.log"
        # ./run takes python3 from PATH: the interpreter of this session's environment, not the environment
        path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(sys.prefix))
        env = clean_environ(
            {
                "CMBCLUSTER_DATA_DIR": str(data_dir),
                "PYTHON": getattr(sys, "_base_executable", sys.executable),
                "PATH": path,
            }
        )
        env.pop("VIRTUAL_ENV", None)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(ROOT / "run"), "serve", "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"./run serve exited with {self.process.returncode}:\n{self.output()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"./run serve did not answer within {timeout}s:\n{self.output()}")

    def group(self) -> set[int]:
        """Every process of its group still alive (the script, nox, the server, environments)."""
        return {self.process.pid, *descendants(self.process.pid)} if self.process.poll() is None else set()

    def wait_gone(self, timeout: float) -> None:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"./run serve still runs {timeout}s after the signal:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to ./run, as a supervisor sends it, and wait until it is gone."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            self.wait_gone(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
