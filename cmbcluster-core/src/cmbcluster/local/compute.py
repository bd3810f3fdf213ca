"""Local compute: each environment is a process group on this machine, on a loopback port.

State lives in ``<data dir>/compute/<environment id>.json``, so a restarted control plane adopts
processes that still run and cleans up after those that do not. A process is recognised by its
PID *and* its start time, so a recycled PID is never mistaken for ours. Every process also
carries its environment id and this backend's state folder in its environment variables: a
process started just before a crash, whose state file was never written, is still found
(``list_managed``) and can be removed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from cmbcluster.errors import InvalidRequest
from cmbcluster.interfaces import ComputeBackend, EnvironmentPhase, EnvironmentSpec, EnvironmentStatus

STOP_GRACE_SECONDS = 5.0
#: The variable that marks a process as started by the backend owning this state folder.
STATE_MARKER = "CMBCLUSTER_COMPUTE_DIR"
#: Variables of the control plane's own environment that an environment inherits.
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")


class LocalProcessCompute(ComputeBackend):
    def __init__(self, state_dir: Path, *, host: str = "127.0.0.1") -> None:
        self.state_dir = state_dir
        self.host = host
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._sweep_secrets()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        current = self.status(spec.environment_id)
        if current.phase in (EnvironmentPhase.STARTING, EnvironmentPhase.RUNNING):
            return current  # idempotent: adopt what runs
        if not spec.command:
            raise InvalidRequest("the local compute backend needs the application's command")
        port = _free_port(self.host)
        workdir = self._working_dir(spec)
        env = self._environment(spec, port)
        command = [part.replace("{port}", str(port)).replace("{host}", self.host) for part in spec.command]
        log_path = self._path(spec.environment_id, ".log")
        with open(log_path, "ab") as log:
            try:
                process = subprocess.Popen(
                    command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise InvalidRequest(f"cannot start {shlex.join(command)}: {exc.strerror}") from None
        self._children[spec.environment_id] = process
        state = {
            "environment_id": spec.environment_id, "user_id": spec.user.id, "pid": process.pid,
            "start_ticks": _start_ticks(process.pid), "port": port, "command": command,
            "started_at": dt.datetime.now(dt.UTC).isoformat(), "stopped": False,
        }  # fmt: skip
        self._write_state(spec.environment_id, state)
        return self._status_from(state)

    def stop(self, environment_id: str) -> None:
        state = self._read_state(environment_id)
        if state is None:
            self._terminate_unrecorded(environment_id)
            return
        self._terminate(state)
        state["stopped"] = True
        self._write_state(environment_id, state)
        self._remove_secrets(environment_id)

    def delete(self, environment_id: str) -> None:
        state = self._read_state(environment_id)
        if state is not None:
            self._terminate(state)
        else:
            self._terminate_unrecorded(environment_id)
        for suffix in (".json", ".log"):
            self._path(environment_id, suffix).unlink(missing_ok=True)
        self._remove_secrets(environment_id)

    # Plaintext copies of secret files exist only while their environment runs.
    def _remove_secrets(self, environment_id: str) -> None:
        shutil.rmtree(self.state_dir / f"{environment_id}.secrets", ignore_errors=True)

    def _sweep_secrets(self) -> None:
        for folder in self.state_dir.glob("*.secrets"):
            state = self._read_state(folder.stem)
            if state is None or state.get("stopped") or not _alive(int(state["pid"]), state.get("start_ticks")):
                self._remove_secrets(folder.stem)

    def status(self, environment_id: str) -> EnvironmentStatus:
        state = self._read_state(environment_id)
        if state is None:
            return EnvironmentStatus(environment_id=environment_id, phase=EnvironmentPhase.MISSING)
        return self._status_from(state)

    def list_managed(self) -> list[EnvironmentStatus]:
        statuses = []
        recorded = set()
        for path in sorted(self.state_dir.glob("*.json")):
            state = self._read_state(path.stem)
            if state is not None:
                recorded.add(path.stem)
                statuses.append(self._status_from(state))
        for env_id in sorted(set(self._unrecorded_groups()) - recorded):
            # started just before a crash: it runs, but nobody knows its port; reconcile stops it
            statuses.append(
                EnvironmentStatus(
                    environment_id=env_id, phase=EnvironmentPhase.FAILED,
                    message="interrupted while starting; start it again",
                )
            )  # fmt: skip
        return statuses

    def _terminate_unrecorded(self, environment_id: str) -> None:
        pgid = self._unrecorded_groups().get(environment_id)
        if pgid is not None:
            self._terminate({"environment_id": environment_id, "pid": pgid, "start_ticks": _start_ticks(pgid)})

    def _unrecorded_groups(self) -> dict[str, int]:
        """Process groups started by this backend, by environment id, found through /proc."""
        marker = f"{STATE_MARKER}={self.state_dir}".encode()
        found: dict[str, int] = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                variables = (proc / "environ").read_bytes().split(b"\0")
                pgid = os.getpgid(int(proc.name))
            except (OSError, ProcessLookupError):
                continue  # gone, or another user's
            if marker in variables and pgid == int(proc.name):
                for item in variables:
                    if item.startswith(b"CMBCLUSTER_ENVIRONMENT_ID="):
                        found[item.split(b"=", 1)[1].decode()] = pgid
        return found

    def logs(self, environment_id: str, *, tail: int = 200) -> str:
        path = self._path(environment_id, ".log")
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-tail:])

    def close(self) -> None:
        # Environments outlive the control plane on purpose; only reap finished children.
        for process in self._children.values():
            process.poll()

    # -- helpers -----------------------------------------------------------------------------
    def _status_from(self, state: dict[str, Any]) -> EnvironmentStatus:
        env_id = str(state["environment_id"])
        started = dt.datetime.fromisoformat(state["started_at"]) if state.get("started_at") else None
        base: dict[str, Any] = {"environment_id": env_id, "user_id": state.get("user_id"), "started_at": started}
        if state.get("stopped"):
            return EnvironmentStatus(phase=EnvironmentPhase.STOPPED, **base)
        child = self._children.get(env_id)
        if child is not None and child.poll() is not None:
            self._remove_secrets(env_id)
            return EnvironmentStatus(
                phase=EnvironmentPhase.FAILED, message=f"the process exited with code {child.returncode}", **base
            )
        if not _alive(int(state["pid"]), state.get("start_ticks")):
            self._remove_secrets(env_id)
            return EnvironmentStatus(phase=EnvironmentPhase.FAILED, message="the process is gone", **base)
        url = f"http://{self.host}:{state['port']}/"
        if _port_open(self.host, int(state["port"])):
            return EnvironmentStatus(phase=EnvironmentPhase.RUNNING, url=url, **base)
        return EnvironmentStatus(phase=EnvironmentPhase.STARTING, url=url, message="waiting for the port", **base)

    def _terminate(self, state: dict[str, Any]) -> None:
        pid = int(state["pid"])
        child = self._children.pop(str(state["environment_id"]), None)
        try:
            if not _alive(pid, state.get("start_ticks")):
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            while time.monotonic() < deadline:
                if not _alive(pid, state.get("start_ticks")):
                    return
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        finally:
            if child is not None:  # our own child: reap it, so no zombie keeps its PID
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=STOP_GRACE_SECONDS)

    def _working_dir(self, spec: EnvironmentSpec) -> Path:
        for volume in spec.volumes:
            if volume.spec.local_path is not None:
                return volume.spec.local_path
        workdir = self.state_dir / f"{spec.environment_id}.home"
        workdir.mkdir(exist_ok=True)
        return workdir

    def _environment(self, spec: EnvironmentSpec, port: int) -> dict[str, str]:
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        env.update(spec.env)
        env.update({"PORT": str(port), "HOST": self.host, "CMBCLUSTER_ENVIRONMENT_ID": spec.environment_id})
        env[STATE_MARKER] = str(self.state_dir)
        if spec.secret_files:
            secrets_dir = self.state_dir / f"{spec.environment_id}.secrets"
            secrets_dir.mkdir(mode=0o700, exist_ok=True)
            for name, content in spec.secret_files.items():
                path = secrets_dir / Path(name).name
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(content)
            env["CMBCLUSTER_SECRETS_DIR"] = str(secrets_dir)
        return env

    def _path(self, environment_id: str, suffix: str) -> Path:
        if not environment_id.isalnum():
            raise InvalidRequest("invalid environment id")
        return self.state_dir / f"{environment_id}{suffix}"

    def _read_state(self, environment_id: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._path(environment_id, ".json").read_text())
            return data
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write_state(self, environment_id: str, state: dict[str, Any]) -> None:
        path = self._path(environment_id, ".json")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)


#: Environments listen below Linux's ephemeral range (32768-60999): a port the kernel hands out
#: for outgoing connections can be taken by one between our check and the application's bind.
ENVIRONMENT_PORTS = range(20000, 32000)


def _free_port(host: str) -> int:
    """A port free on ``host`` now, outside the ephemeral range (the kernel's choice as a last resort)."""
    for port in random.sample(ENVIRONMENT_PORTS, 64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        chosen: int = s.getsockname()[1]
        return chosen


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot (Linux), to tell PIDs apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: fields start after the last ')'
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def _alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # a process of another user reusing the PID is not ours
    status = Path(f"/proc/{pid}/stat")
    if status.exists():
        text = status.read_text()
        if text.rsplit(")", 1)[1].split()[0] == "Z":
            return False  # a zombie has exited
    return start_ticks is None or _start_ticks(pid) == start_ticks
