"""A pytest plugin: a test session leaves no process behind (``-p cmbcluster.testing.leftovers``).

Tests here start real servers and environments. At the start, the session makes itself the
*child subreaper* of everything it starts (Linux ``prctl``): a process whose parent exits (an
environment started by a ``cmbcluster serve`` that a test stopped, a daemon a script started)
is re-parented to the session instead of to PID 1, where it would be out of sight. At the end,
after every fixture was torn down, any such descendant still alive after a short grace fails the
session: each is listed with its command line, then stopped by its PID.

Plugin authors can use it too: add ``-p cmbcluster.testing.leftovers`` to their pytest options.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import pytest

PR_SET_CHILD_SUBREAPER = 36
#: How long processes being stopped by the last fixtures get to exit before they count as left behind.
GRACE_SECONDS = 5.0
_BEFORE = pytest.StashKey[set[int]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_BEFORE] = descendants(os.getpid())  # whatever ran before the session is not its doing
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_BEFORE, set())
    deadline = time.monotonic() + GRACE_SECONDS
    while True:
        _reap()
        left = descendants(os.getpid()) - before
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not left:
        return
    described = [f"  pid {pid}: {_command_line(pid)}" for pid in sorted(left)]
    message = "\n".join(
        [f"the test session left {len(left)} process(es) running (stopped now; a test or fixture must stop them):",
         *described]
    )  # fmt: skip
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", "processes left behind", red=True)
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    _stop(left)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def descendants(root: int) -> set[int]:
    """Every live (not zombie) process below ``root``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _reap() -> None:
    """Collect exited children (orphans re-parented to the session become its zombies)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "(gone)"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)[:300] or "(no command line)"


def _stop(pids: set[int]) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap()
            pids = pids & descendants(os.getpid())
            if not pids:
                return
            time.sleep(0.05)
