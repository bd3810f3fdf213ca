"""Fixtures: a real GCS emulator (gcp-storage-emulator) for the session, and GcsStorage on it."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cmbcluster.testing.process import clean_environ
from cmbcluster_gcp.settings import GcpSettings
from cmbcluster_gcp.storage import GcsStorage

#: The storage SDK's own endpoint override, read outside any settings model.
_SDK_NAMES = {"API_ENDPOINT_OVERRIDE"}
PROJECT = "cmbcluster-test"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (set(os.environ) - set(clean_environ())) | (_SDK_NAMES & set(os.environ)):
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env from the developer's checkout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=0.5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _start_emulator(log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    executable = Path(sys.executable).with_name("gcp-storage-emulator")
    if not executable.exists():
        pytest.fail(f"{executable} is missing: install the test extra, pip install -e 'cmbcluster-gcp[test]'")
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = _free_port()
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [str(executable), "start", "-H", "127.0.0.1", "--port", str(port), "--in-memory", "-q"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(url):
                return process, url
            time.sleep(0.05)
        _stop(process)
    pytest.fail(f"gcp-storage-emulator did not start; see {log_path}:\n{log_path.read_text()[-2000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a gcp-storage-emulator running in memory for the whole session."""
    process, url = _start_emulator(tmp_path_factory.mktemp("gcs-emulator") / "emulator.log")
    try:
        yield url
    finally:
        _stop(process)


def _emulator_json(url: str, path: str, *, method: str = "GET", body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url + path, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


EmulatorApi = Callable[..., Any]


@pytest.fixture
def emulator_api(gcs_emulator: str) -> EmulatorApi:
    """``emulator_api(path, method=, body=)``: the emulator's JSON API, to read back what GcsStorage did."""
    return functools.partial(_emulator_json, gcs_emulator)


@pytest.fixture
def gcp_settings(gcs_emulator: str) -> Iterator[GcpSettings]:
    yield GcpSettings(
        project_id=PROJECT,
        region="europe-west1",
        storage_emulator_host=gcs_emulator,
    )
    # Start every test from an empty emulator: it cannot cancel resumable upload sessions,
    # and a cancelled one would otherwise keep its bucket from being deleted.
    with urllib.request.urlopen(gcs_emulator + "/wipe", timeout=10) as response:
        response.read()


@pytest.fixture
def gcs(gcp_settings: GcpSettings) -> Iterator[GcsStorage]:
    backend = GcsStorage(gcp_settings)
    yield backend
    backend.close()
