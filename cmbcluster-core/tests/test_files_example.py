"""The embedded default's Files application (``cmbcluster.examples.files``), as the proxy reaches it:
through its Unix socket, in a process of its own."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


@pytest.fixture
def files(tmp_path: Path) -> Iterator[httpx.Client]:
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello\n")
    socket = tmp_path / "files.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "cmbcluster.examples.files", str(socket)], cwd=folder,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not socket.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the Files app did not start"
            time.sleep(0.05)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://files") as client:
            yield client
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0]
        assert "Traceback" not in output, output


def test_files_serves_the_working_folder_and_a_nul_in_a_path_is_not_found(files: httpx.Client) -> None:
    assert files.get("/notes.txt").text == "hello\n"
    assert "notes.txt" in files.get("/").text
    # found by an outsider: the proxy answered 502, the app's thread died with a traceback
    for path in ("/%00", "/notes%00.txt", "/a/%00/"):
        assert files.get(path).status_code == 404, path
    assert files.get("/notes.txt").status_code == 200  # and it still serves
