"""The README's `./run serve`, as a newcomer runs it: it serves, and Ctrl-C or a SIGTERM to ./run
stops it cleanly, with the environments it started (none is left running, none is orphaned).

Runs the real script of this checkout: the first run sets up its `serve` session (and builds the
web UI when frontend/ changed), which takes a minute or two; later runs start in seconds.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cmbcluster.testing.api import dev_sign_in
from tests.run_serve import FIRST_START_SECONDS, RunServe


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[list[RunServe]]:
    started: list[RunServe] = []
    yield started
    for run in started:
        run.kill()


def start_environment(url: str) -> tuple[dict[str, str], str]:
    """Sign in, launch the Files application: the caller's headers and the environment's id."""
    with httpx.Client(base_url=url, timeout=30) as client:
        headers = dev_sign_in(client, "newcomer@example.org")
        env = client.post("/api/v1/environments", headers=headers, json={"application": "files"}).json()
        deadline = time.monotonic() + 60
        while (body := client.get(f"/api/v1/environments/{env['id']}", headers=headers).json())["status"] != "running":
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
        assert client.get(body["url"], headers=headers).status_code == 200  # through the control plane
    return headers, env["id"]


def environment_pid(data_dir: Path, environment_id: str) -> int:
    import json

    return int(json.loads((data_dir / "compute" / f"{environment_id}.json").read_text())["pid"])


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("how", ["SIGTERM to ./run", "Ctrl-C"])
def test_run_serve_stops_cleanly_with_its_environments(
    how: str, tmp_path: Path, data_dir: Path, runs: list[RunServe]
) -> None:
    run = RunServe(tmp_path, data_dir)
    runs.append(run)
    run.wait_ready(FIRST_START_SECONDS)
    # the README's first command starts without a warning (one about CLOUD_PROVIDER read as the newcomer's fault)
    assert '"level": "warning"' not in run.output(), run.output()
    headers, environment_id = start_environment(run.url)
    pid = environment_pid(data_dir, environment_id)
    assert alive(pid) and pid in run.group()
    if how == "Ctrl-C":
        os.killpg(run.process.pid, signal.SIGINT)  # a terminal sends it to the whole foreground group
    else:
        os.kill(run.process.pid, signal.SIGTERM)  # a supervisor, or `kill`, sends it to ./run alone
    run.wait_gone(60)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid), f"the environment outlived the server:\n{run.output()}"
    assert "stopped 1 environments with the server" in run.output()

    again = RunServe(tmp_path, data_dir)  # the next start knows why it stopped; nothing was adopted
    runs.append(again)
    again.wait_ready(120)
    with httpx.Client(base_url=again.url, timeout=30) as client:
        body = client.get(f"/api/v1/environments/{environment_id}", headers=headers).json()
    assert body["status"] == "stopped" and body["status_message"] == "stopped with the server; start it again"
    os.kill(again.process.pid, signal.SIGTERM)
    again.wait_gone(60)
