"""The harness check: a test session that leaves a process running fails, and the process is stopped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cmbcluster.testing.process import clean_environ

ORPHANING_TEST = r"""
import os, subprocess, sys

def test_starts_a_daemon_and_forgets_it(tmp_path):
    # a grandchild whose parent exits at once: re-parented, as an environment of a stopped server was
    launcher = subprocess.run(
        [sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
         "'import time; time.sleep(120)'], start_new_session=True, stdout=subprocess.DEVNULL, "
         "stderr=subprocess.DEVNULL); print(p.pid)"],
        capture_output=True, text=True, check=True,
    )
    (tmp_path.parent.parent / "orphan.pid").write_text(launcher.stdout.strip())
"""

TIDY_TEST = r"""
import subprocess, sys

def test_starts_and_stops_a_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    process.terminate()
    process.wait()
"""


def run_session(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_session.py").write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "cmbcluster.testing.leftovers", "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'base'}", str(tmp_path / "test_session.py")],
        cwd=tmp_path, env=clean_environ(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_a_session_that_leaves_a_process_behind_fails_and_the_process_is_stopped(tmp_path: Path) -> None:
    result = run_session(tmp_path, ORPHANING_TEST)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed" in result.stdout  # the test itself passed: the session fails for what it left
    pid = int((tmp_path / "orphan.pid").read_text())
    assert "processes left behind" in result.stdout and f"pid {pid}: " in result.stdout
    assert "time.sleep(120)" in result.stdout
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", "the orphan still runs"


def test_a_tidy_session_passes(tmp_path: Path) -> None:
    result = run_session(tmp_path, TIDY_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "left behind" not in result.stdout
    assert os.getpid() > 0
