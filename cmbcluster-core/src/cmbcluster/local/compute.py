"""Local compute: each environment is a process group on this machine, served through the control plane.

Each environment has its own home folder (``<data dir>/homes/<id>``, its working folder and
``HOME``), with every mounted bucket linked at its requested mount path: a mount path under
``/home/<name>/`` lands at the same place under the home (``/home/user/data`` is ``~/data``), any
other path ``P`` at ``~/P``. The application listens on a loopback port with a random token that
only the control plane's proxy sends, or on a Unix socket only this user can open when its command
asks for one (``{socket}``); users reach it at ``/environments/<id>/`` on the control plane (see
:mod:`cmbcluster.compute.command` for the command's placeholders).

State lives in ``<data dir>/compute/<environment id>.json``, so a restarted control plane adopts
processes that still run and cleans up after those that do not. A process is recognised by its
PID *and* its start time, so a recycled PID is never mistaken for ours. Every process also
carries its environment id and this backend's state folder in its environment variables: a
process started just before a crash, whose state file was never written, is still found
(``list_managed``) and can be removed; one that ``start`` is recording at that moment is not
mistaken for it (the reconcile loop lists environments while requests start them).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from cmbcluster.compute.command import (
    REDACTED,
    LaunchValues,
    environment_path,
    missing_program,
    placeholders_in,
    program_search_path,
    render_command,
    root_arguments,
    standard_variables,
    takes_token,
    token_headers,
)
from cmbcluster.errors import InvalidRequest
from cmbcluster.interfaces import (
    ComputeBackend,
    EnvironmentPhase,
    EnvironmentSpec,
    EnvironmentStatus,
    MountedVolume,
    ResourceUse,
    Upstream,
)

log = logging.getLogger(__name__)
STOP_GRACE_SECONDS = 5.0
#: The variable that marks a process as started by the backend owning this state folder.
STATE_MARKER = "CMBCLUSTER_COMPUTE_DIR"
#: Variables of the control plane's own environment that an environment inherits (HOME is its own).
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")
#: A Jupyter configuration folder every environment gets on its config path: JupyterLab's defaults
#: for a server its users do not administer (no question about Jupyter's news feed at first open, no
#: update checks: this Python is the operator's to upgrade). Users' own settings still win. The
#: environment image carries the same file (helm/images/environment/Dockerfile; a test compares them).
JUPYTER_DEFAULTS = Path(__file__).resolve().parent / "jupyter_config"
#: The folders the home's bucket links lead to, for an application serving files through them (the
#: embedded default mounts a bucket as a link: jupyter_config/jupyter_server_config.py).
BUCKET_FOLDERS = "CMBCLUSTER_BUCKET_FOLDERS"
#: The longest Unix socket path Linux accepts is 107 bytes; past this one, sockets go to a private temporary folder.
MAX_SOCKET_PATH = 100


class LocalProcessCompute(ComputeBackend):
    def __init__(
        self, state_dir: Path, *, homes_dir: Path | None = None, host: str = "127.0.0.1", public_url: str | None = None
    ) -> None:
        self.state_dir = state_dir
        self.homes_dir = homes_dir or state_dir.parent / "homes"
        self.host = host
        self.public_url = public_url.rstrip("/") if public_url else ""
        # the state holds each application's token: only this user reads it
        for folder in (self.state_dir, self.homes_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        # Environments whose process this backend has started and not yet recorded: list_managed
        # (the reconcile loop, in another thread) must not take them for a crash's leftovers.
        self._recording: set[str] = set()
        self._recording_lock = threading.Lock()
        #: state files as last read, by environment id: (inode, mtime, size) of the file, and its content
        self._states: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        # One start, stop or delete of an environment at a time (requests race: a stop sent while
        # the start still launches the process must find its record, not miss it).
        self._environment_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._meter = ProcessTreeMeter()
        self._sweep_secrets()

    # -- lifecycle -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _one_at_a_time(self, environment_id: str) -> Iterator[None]:
        with self._locks_lock:
            lock = self._environment_locks.setdefault(environment_id, threading.Lock())
        with lock:
            yield

    def start(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        with self._one_at_a_time(spec.environment_id):
            return self._start(spec)

    def _start(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        current = self.status(spec.environment_id)
        if current.phase in (EnvironmentPhase.STARTING, EnvironmentPhase.RUNNING):
            return current  # idempotent: adopt what runs
        if not spec.command:
            raise InvalidRequest("the local compute backend needs the application's command")
        problem = self.check_command(spec.command)
        if problem is not None:
            raise InvalidRequest(problem)
        env_id = spec.environment_id
        home = self._prepare_home(env_id, spec.volumes)
        uses_socket = "socket" in placeholders_in(spec.command)
        socket_path = self._socket_path(env_id) if uses_socket else None
        if socket_path is not None:
            Path(socket_path).unlink(missing_ok=True)
        values = LaunchValues(
            environment_id=env_id, host=self.host, port=None if uses_socket else _free_port(self.host),
            base_url=environment_path(env_id), token=secrets.token_urlsafe(32) if takes_token(spec.command) else "",
            socket=socket_path,
        )  # fmt: skip
        command = render_command(spec.command, values)
        if os.geteuid() == 0:
            command += root_arguments(spec.command)
        env = self._environment(spec, values, home)
        log_path = self._path(env_id, ".log")
        with self._recording_lock:
            self._recording.add(env_id)
        try:
            with open(log_path, "ab") as log:
                try:
                    process = subprocess.Popen(
                        command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, start_new_session=True,
                    )  # fmt: skip
                except OSError as exc:
                    self._remove_secrets(env_id)  # written for it above: no plaintext copy outlives a failed start
                    if exc.errno == errno.E2BIG:
                        size = sum(len(k) + len(v) + 2 for k, v in env.items())
                        raise InvalidRequest(
                            f"the environment's variables are too large to start a program ({size // 1024} KiB; "
                            "Linux allows about 2 MiB with the command): remove or shorten variables in "
                            "Settings or in the environment"
                        ) from None
                    shown = shlex.join(command).replace(values.token, REDACTED) if values.token else shlex.join(command)
                    raise InvalidRequest(f"cannot start {shown}: {exc.strerror}") from None
            self._children[env_id] = process
            state = {
                "environment_id": env_id, "user_id": spec.user.id, "pid": process.pid,
                "start_ticks": _start_ticks(process.pid), "port": values.port, "socket": socket_path,
                "token": values.token, "strip_prefix": "base_url" not in placeholders_in(spec.command),
                "home": str(home), "started_at": dt.datetime.now(dt.UTC).isoformat(), "stopped": False,
            }  # fmt: skip
            self._write_state(env_id, state)
        finally:
            with self._recording_lock:
                self._recording.discard(env_id)
        return self._status_from(state)

    def check_command(self, command: Sequence[str]) -> str | None:
        return missing_program(command)

    def resource_use(self, environment_ids: Sequence[str]) -> Mapping[str, ResourceUse] | None:
        """From the environment's process tree (psutil): resident memory of every process in it, and
        CPU as the tree's CPU time over the wall time since the last reading (the first reading of
        an environment waits a tenth of a second for a second sample)."""
        roots: dict[str, int] = {}
        for env_id in environment_ids:
            state = self._read_state(env_id) if env_id.isalnum() else None
            if state is not None and not state.get("stopped") and _alive(int(state["pid"]), state.get("start_ticks")):
                roots[env_id] = int(state["pid"])
        return self._meter.measure(roots)

    @property
    def stops_with_control_plane(self) -> bool:
        return True

    def upstream(self, environment_id: str) -> Upstream | None:
        state = self._read_state(environment_id)
        if state is None or state.get("stopped") or not _alive(int(state["pid"]), state.get("start_ticks")):
            return None
        headers = token_headers(str(state.get("token") or ""))
        strip = bool(state.get("strip_prefix"))
        if state.get("socket"):
            return Upstream(url="http://localhost", unix_socket=state["socket"], headers=headers, strip_prefix=strip)
        return Upstream(url=f"http://{self.host}:{state['port']}", headers=headers, strip_prefix=strip)

    def stop(self, environment_id: str) -> None:
        with self._one_at_a_time(environment_id):
            self._stop(environment_id)

    def _stop(self, environment_id: str) -> None:
        state = self._read_state(environment_id)
        if state is None:
            self._terminate_unrecorded(environment_id)
            return
        self._terminate(state)
        state["stopped"] = True
        self._write_state(environment_id, state)
        self._remove_secrets(environment_id)

    def delete(self, environment_id: str) -> None:
        with self._one_at_a_time(environment_id):  # its lock stays: a call may be waiting on it
            self._delete(environment_id)

    def remove_unrecorded(self, environment_id: str) -> None:
        # Its home folder stays: a database restored from before the environment, or a new
        # database on this data directory, had the reconcile loop delete every such user's files.
        with self._one_at_a_time(environment_id):
            self._delete(environment_id, keep_home=True)
        home = self.homes_dir / environment_id
        if home.is_dir():
            log.warning("the home folder of environment %s, which has no record, is kept: %s", environment_id, home)

    def _delete(self, environment_id: str, *, keep_home: bool = False) -> None:
        state = self._read_state(environment_id)
        if state is not None:
            self._terminate(state)
        else:
            self._terminate_unrecorded(environment_id)
        for suffix in (".json", ".log"):
            self._path(environment_id, suffix).unlink(missing_ok=True)
        self._states.pop(environment_id, None)  # its token with it: nothing reads this id again
        self._remove_secrets(environment_id)
        with contextlib.suppress(OSError):
            Path(self._socket_path(environment_id)).unlink(missing_ok=True)
        if not keep_home:  # the environment's own disk goes with it (links into buckets are removed, never followed)
            shutil.rmtree(self.homes_dir / environment_id, ignore_errors=True)

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
            # Started since the state files were read, not before a crash: start() is between the
            # process and its record, or has written the record (before leaving the set) by now.
            with self._recording_lock:
                being_recorded = env_id in self._recording
            if being_recorded:
                continue
            state = self._read_state(env_id)
            if state is not None:
                statuses.append(self._status_from(state))
                continue
            # started just before a crash: it runs, but nobody knows its port; reconcile stops it
            statuses.append(
                EnvironmentStatus(
                    environment_id=env_id, phase=EnvironmentPhase.FAILED,
                    message="interrupted while starting; start it again",
                )
            )  # fmt: skip
        # Recorded since the state files were read: its process may not show its environment in /proc
        # yet (the kernel sets it up after the exec that Popen waits for), but its record is there.
        listed = {status.environment_id for status in statuses}
        for path in sorted(self.state_dir.glob("*.json")):
            if path.stem not in listed and (state := self._read_state(path.stem)) is not None:
                statuses.append(self._status_from(state))
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
            text = f.read().decode("utf-8", "replace")
        state = self._read_state(environment_id)
        if state is not None and state.get("token"):
            text = text.replace(str(state["token"]), REDACTED)  # applications print their URL with it
        return "\n".join(text.splitlines()[-tail:])

    def _last_line(self, environment_id: str) -> str:
        """The application's last words: what a failure message quotes (a traceback's last line)."""
        for line in reversed(self.logs(environment_id, tail=20).splitlines()):
            if line.strip():
                return line.strip()[:300]
        return ""

    def close(self) -> None:
        # The control plane stops environments before closing (stops_with_control_plane); after a
        # crash, the next one adopts what still runs. Here, only reap finished children.
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
                phase=EnvironmentPhase.FAILED, message=_exited(f"code {child.returncode}", self._last_line(env_id)),
                **base,
            )  # fmt: skip
        # Our own child, not yet reaped, is alive and keeps its PID (poll() said so); only one
        # adopted from an earlier server is looked up in /proc (the hub asks every start it follows).
        if child is None and not _alive(int(state["pid"]), state.get("start_ticks")):
            self._remove_secrets(env_id)
            message = _exited("", self._last_line(env_id))
            return EnvironmentStatus(phase=EnvironmentPhase.FAILED, message=message, **base)
        url = f"{self.public_url}{environment_path(env_id)}"
        if state.get("socket"):
            listening, waiting = _socket_open(str(state["socket"])), "waiting for the application's socket"
        else:
            listening, waiting = _port_open(self.host, int(state["port"])), "waiting for the application's port"
        if listening:
            return EnvironmentStatus(phase=EnvironmentPhase.RUNNING, url=url, **base)
        return EnvironmentStatus(phase=EnvironmentPhase.STARTING, url=url, message=waiting, **base)

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

    def _prepare_home(self, environment_id: str, volumes: Sequence[MountedVolume]) -> Path:
        """The environment's home folder, each mounted bucket linked at its mount path in it."""
        unmountable = [v.mount_path for v in volumes if v.spec.local_path is None]
        if unmountable:
            # Skipped, the environment would start without the folder its user asked for.
            raise InvalidRequest(
                f"the bucket for {unmountable[0]} cannot be mounted here: the embedded default runs environments "
                "as processes on this machine, which mount only buckets kept in a folder on it (local storage), "
                "and this server's storage backend mounts buckets in Kubernetes pods; start it without that "
                "bucket (its files stay in Storage), or run environments on Kubernetes"
            )
        home = self.homes_dir / self._path(environment_id, "").name
        home.mkdir(mode=0o700, exist_ok=True)
        for volume in sorted(volumes, key=lambda v: v.mount_path):
            assert volume.spec.local_path is not None  # checked above
            relative = home_path(volume.mount_path)
            link = home / relative
            for parent in reversed(link.relative_to(home).parents[:-1]):
                if (home / parent).is_symlink():
                    raise InvalidRequest(
                        f"{volume.mount_path} is inside another mounted bucket: the embedded default mounts "
                        "buckets side by side, not one inside another"
                    )
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            elif link.is_dir() and not any(link.iterdir()):
                link.rmdir()
            elif link.exists():
                raise InvalidRequest(
                    f"~/{relative} already exists in the environment's home and is not a bucket: move it away "
                    f"to mount the bucket at {volume.mount_path}"
                )
            link.symlink_to(volume.spec.local_path, target_is_directory=True)
        return home

    def _socket_path(self, environment_id: str) -> str:
        """Where an application that listens on a Unix socket does: beside the state when the path is
        short enough for the kernel, else in a private temporary folder of this user."""
        near = self.state_dir / f"{self._path(environment_id, '').name}.sock"
        if len(os.fsencode(near)) <= MAX_SOCKET_PATH:
            return str(near)
        folder = Path(tempfile.gettempdir()) / f"cmbcluster-{os.geteuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
        if not folder.is_dir() or folder.is_symlink() or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise InvalidRequest(f"{folder} is not a private folder of this user: remove it")
        digest = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:12]
        return str(folder / f"{digest}-{environment_id}.sock")

    def _environment(self, spec: EnvironmentSpec, values: LaunchValues, home: Path) -> dict[str, str]:
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        env["PATH"] = program_search_path()
        env["PYTHONUNBUFFERED"] = "1"  # Python applications' output reaches the log (and the user) as it is written
        env.update(spec.env)
        env.update(standard_variables(values, spec.command))
        env["HOME"] = str(home)
        env[STATE_MARKER] = str(self.state_dir)
        own_config = env.get("JUPYTER_CONFIG_PATH")  # the user's own comes first
        env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(filter(None, (own_config, str(JUPYTER_DEFAULTS))))
        # where the home's links to buckets lead (JupyterLab serves files there: jupyter_config)
        env[BUCKET_FOLDERS] = os.pathsep.join(str(v.spec.local_path) for v in spec.volumes if v.spec.local_path)
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
        """The environment's state file (a copy of it: callers change it to write it), read again
        only when it changed. Every request of an environment's traffic asks (its upstream), and the
        progress hub asks for each start it follows: one stat, not an open, a read and a parse.
        A write replaces the file (:meth:`_write_state`): a new inode, whatever the clock says (an
        inode number may be reused, so this process's own writes also drop what was kept)."""
        path = self._path(environment_id, ".json")
        try:
            found = os.stat(path)
        except FileNotFoundError:
            self._states.pop(environment_id, None)
            return None
        version = (found.st_ino, found.st_mtime_ns, found.st_size)
        cached = self._states.get(environment_id)
        if cached is None or cached[0] != version:
            try:
                data: dict[str, Any] = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return None
            # (replaced between the stat and the read: kept under the old version, read again next time)
            cached = self._states[environment_id] = (version, data)
        return dict(cached[1])

    def _write_state(self, environment_id: str, state: dict[str, Any]) -> None:
        path = self._path(environment_id, ".json")
        # a temporary file of this write's own (mode 0600: it holds the application's token), then
        # renamed over the record: a reader sees the old record or the new one, never half of one
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=f"{environment_id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(state))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self._states.pop(environment_id, None)  # read anew: an inode number may be reused


class ProcessTreeMeter:
    """CPU and memory of process trees, by psutil. CPU is a rate: the tree's CPU time between two
    readings over the time between them, so each reading is kept for the next one."""

    #: Without a reading this recent, a first pair of samples is taken this far apart.
    FIRST_SAMPLE_SECONDS = 0.1
    MAX_AGE_SECONDS = 120.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[int, tuple[float, float]] = {}  # root pid -> (monotonic time, CPU seconds)

    def measure(self, roots: Mapping[str, int]) -> dict[str, ResourceUse]:
        import psutil  # imported on first use: only the environments page asks

        now = time.monotonic()
        samples = {key: _tree_sample(psutil, pid) for key, pid in roots.items()}
        with self._lock:
            fresh = {pid: seen for pid, seen in self._last.items() if now - seen[0] < self.MAX_AGE_SECONDS}
        if any(pid not in fresh for pid in roots.values()):
            time.sleep(self.FIRST_SAMPLE_SECONDS)
            for key, pid in roots.items():
                if pid not in fresh and samples[key] is not None:
                    sample = samples[key]
                    assert sample is not None
                    fresh[pid] = (now, sample[0])
            now = time.monotonic()
            samples = {key: _tree_sample(psutil, pid) for key, pid in roots.items()}
        found: dict[str, ResourceUse] = {}
        for key, pid in roots.items():
            sample = samples[key]
            if sample is None:
                continue
            cpu_seconds, memory = sample
            before = fresh.get(pid)
            rate = 0.0
            if before is not None and now > before[0]:
                rate = max(0.0, (cpu_seconds - before[1]) / (now - before[0]))
            fresh[pid] = (now, cpu_seconds)
            found[key] = ResourceUse(cpu=round(rate, 3), memory_bytes=memory)
        with self._lock:
            self._last = fresh
        return found


def _tree_sample(psutil: Any, pid: int) -> tuple[float, int] | None:
    """(CPU seconds, resident bytes) of a process and its descendants; None when it is gone."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    cpu, memory = 0.0, 0
    for process in processes:
        try:
            with process.oneshot():
                times = process.cpu_times()
                cpu += times.user + times.system
                memory += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return cpu, memory


def home_path(mount_path: str) -> PurePosixPath:
    """Where a bucket mounted at ``mount_path`` in a container appears in a local environment's home:
    ``/home/<name>/rest`` at ``rest`` (``/home/user/data`` is ``~/data``), any other path ``P`` at ``P``
    without its leading slash (``/data`` is ``~/data``, ``/home/user`` is ``~/home/user``)."""
    parts = PurePosixPath(mount_path).parts[1:]
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise InvalidRequest(f"mount path {mount_path!r} must be an absolute folder other than /")
    if len(parts) > 2 and parts[0] == "home":
        parts = parts[2:]
    return PurePosixPath(*parts)


def _exited(code: str, last_line: str) -> str:
    """A failure message that quotes the application's last line (the fatal one, for a traceback)."""
    what = f"the application exited with {code}" if code else "the application's process is gone"
    return f"{what}: {last_line}" if last_line else what


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


def _socket_open(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def _port_open(host: str, port: int) -> bool:
    # Asked of every starting environment on each of the progress hub's passes: one socket, no
    # Python-level name lookup (create_connection's cost twice over); the host is IPv4 (_free_port).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        try:
            return s.connect_ex((host, port)) == 0
        except OSError:  # a name that does not resolve
            return False


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (Linux), from the state on; None when
    the process is gone. The command name may contain spaces and parentheses: they follow its last ')'."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot (Linux), to tell PIDs apart."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def _alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # a process of another user reusing the PID is not ours
    fields = _stat_fields(pid)  # one read for the state and the start time (the progress hub asks often)
    if fields is None or fields[0] == "Z":
        return False  # gone between the signal and the read, or a zombie: it has exited
    return start_ticks is None or int(fields[19]) == start_ticks
