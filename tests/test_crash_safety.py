"""The control plane is killed (SIGKILL) while environments start; after a restart the database
and the running processes agree: no orphan process, no ghost record. Repeated several times."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx

from cmbcluster.interfaces import EnvironmentPhase
from cmbcluster.local.compute import LocalProcessCompute
from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ

#: Kill once this many creates have been answered, so others are mid-flight whatever the machine's speed.
KILL_AFTER_ANSWERS = (1, 2, 3, 4, 5, 1)
CREATES_PER_ROUND = 8


def _create(url: str, headers: dict[str, str]) -> int:
    try:
        response = httpx.post(f"{url}/api/v1/environments", headers=headers, json={"application": "files"}, timeout=10)
        return response.status_code
    except httpx.TransportError:
        return -1  # the server died under this request: expected here


def test_sigkill_during_starts_leaves_no_orphans_and_no_ghosts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_environ({"CMBCLUSTER_DATA_DIR": str(data), "CMBCLUSTER_MAX_ENVIRONMENTS_PER_USER": "100"})
    compute = LocalProcessCompute(data / "compute")
    answered: list[int] = []
    try:
        for answers in KILL_AFTER_ANSWERS:
            server = ServeProcess(env, tmp_path)
            assert server.wait_ready("/readyz").status_code == 200, server.output()
            with httpx.Client(base_url=server.url) as client:
                headers = dev_sign_in(client, "ada@example.org")
            with ThreadPoolExecutor(CREATES_PER_ROUND) as pool:
                futures = [pool.submit(_create, server.url, headers) for _ in range(CREATES_PER_ROUND)]
                for done, _ in enumerate(as_completed(futures), start=1):
                    if done >= answers:
                        break
                os.kill(server.process.pid, signal.SIGKILL)
                server.process.wait()
                statuses = [f.result() for f in futures]
            assert all(s in (201, -1) for s in statuses), statuses
            answered.extend(statuses)

        with ServeProcess(env, tmp_path) as server:
            assert server.wait_ready("/readyz").status_code == 200, server.output()
            with httpx.Client(base_url=server.url) as client:
                headers = dev_sign_in(client, "ada@example.org")
                deadline = time.monotonic() + 30
                while True:  # let the environments that were starting finish starting
                    rows = client.get("/api/v1/environments", headers=headers).json()["items"]
                    if not any(r["status"] in ("pending", "starting") for r in rows) or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                managed = {s.environment_id: s for s in compute.list_managed()}
                recorded = {r["id"]: r for r in rows}
                running = {i for i, s in managed.items() if s.phase == EnvironmentPhase.RUNNING}
                active_rows = {i for i, r in recorded.items() if r["status"] in ("pending", "starting", "running")}

                # the kills really landed mid-flight: some creates were answered, some were cut off
                assert 201 in answered and -1 in answered, answered
                assert set(managed) <= set(recorded), f"orphan processes: {set(managed) - set(recorded)}"
                assert active_rows <= running, f"ghost records: {active_rows - running}"
                for env_id in running:  # whatever runs is really serving, through the restarted control plane
                    assert recorded[env_id]["status"] == "running"
                    assert client.get(str(recorded[env_id]["url"]), headers=headers, timeout=5).status_code == 200
    finally:
        for status in compute.list_managed():
            compute.delete(status.environment_id)
