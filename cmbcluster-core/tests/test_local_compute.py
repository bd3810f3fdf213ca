"""Local compute: real processes on loopback ports, adopted after a control-plane restart."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cmbcluster.errors import InvalidRequest
from cmbcluster.interfaces import (
    EnvironmentPhase,
    EnvironmentSpec,
    EnvironmentStatus,
    MountedVolume,
    UserRef,
    VolumeSpec,
)
from cmbcluster.local.compute import LocalProcessCompute

# A tiny application: serves the working directory and answers with the env and secrets it sees.
APP = r"""
import http.server, json, os, pathlib, sys
class H(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/whoami":
            secrets = os.environ.get("CMBCLUSTER_SECRETS_DIR")
            body = json.dumps({
                "cwd": os.getcwd(), "greeting": os.environ.get("GREETING"),
                "secret": pathlib.Path(secrets, "token.txt").read_text() if secrets else None,
                "secret_mode": oct(os.stat(pathlib.Path(secrets, "token.txt")).st_mode & 0o777) if secrets else None,
                "leaked": os.environ.get("CMBCLUSTER_SECRET_KEY"),
            }).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        else:
            super().do_GET()
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture
def compute(tmp_path: Path) -> LocalProcessCompute:
    backend = LocalProcessCompute(tmp_path / "compute")
    yield backend
    for status in backend.list_managed():
        backend.delete(status.environment_id)


def wait_for(
    compute: LocalProcessCompute, env_id: str, phase: EnvironmentPhase, timeout: float = 15
) -> EnvironmentStatus:
    deadline = time.monotonic() + timeout
    status = compute.status(env_id)
    while time.monotonic() < deadline:
        status = compute.status(env_id)
        if status.phase == phase:
            return status
        time.sleep(0.05)
    raise AssertionError(f"{env_id} stayed {status.phase}: {status.message}\n{compute.logs(env_id)}")


def spec_for(tmp_path: Path, workdir: Path | None = None, **extra: object) -> EnvironmentSpec:
    script = tmp_path / "app.py"
    script.write_text(APP)
    volumes = (MountedVolume(mount_path="/data", spec=VolumeSpec(local_path=workdir)),) if workdir else ()
    return EnvironmentSpec(
        environment_id=uuid.uuid4().hex, user=UserRef(id="u1"), image="local",
        command=(sys.executable, str(script), "{port}"), volumes=volumes, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def test_environment_runs_in_the_bucket_folder_with_env_and_secrets(
    compute: LocalProcessCompute, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CMBCLUSTER_SECRET_KEY", "the control plane's own secret must not leak")
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / "hello.txt").write_text("from the bucket")
    spec = spec_for(tmp_path, bucket, env={"GREETING": "hi"}, secret_files={"token.txt": b"s3cr3t"})
    started = compute.start(spec)
    assert started.phase in (EnvironmentPhase.STARTING, EnvironmentPhase.RUNNING)
    status = wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)
    assert status.url is not None and status.url.startswith("http://127.0.0.1:")
    assert httpx.get(status.url + "hello.txt").text == "from the bucket"
    who = httpx.get(status.url + "whoami").json()
    assert who["cwd"] == str(bucket)
    assert who["greeting"] == "hi"
    assert who["secret"] == "s3cr3t" and who["secret_mode"] == "0o600"
    assert who["leaked"] is None


def test_start_is_idempotent_and_stop_ends_the_process(compute: LocalProcessCompute, tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    compute.start(spec)
    first = wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)
    again = compute.start(spec)
    assert again.url == first.url  # adopted, not a second process
    pid = json.loads((tmp_path / "compute" / f"{spec.environment_id}.json").read_text())["pid"]
    compute.stop(spec.environment_id)
    assert compute.status(spec.environment_id).phase == EnvironmentPhase.STOPPED
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    compute.start(spec)  # start again after a stop
    wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)


def test_restarted_control_plane_adopts_running_processes(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    before = LocalProcessCompute(tmp_path / "compute")
    before.start(spec)
    url = wait_for(before, spec.environment_id, EnvironmentPhase.RUNNING).url
    after = LocalProcessCompute(tmp_path / "compute")  # a new control plane on the same data directory
    try:
        managed = {s.environment_id: s for s in after.list_managed()}
        assert managed[spec.environment_id].phase == EnvironmentPhase.RUNNING
        assert managed[spec.environment_id].url == url
        after.delete(spec.environment_id)
        assert after.status(spec.environment_id).phase == EnvironmentPhase.MISSING
        assert after.list_managed() == []
    finally:
        after.delete(spec.environment_id)


def test_process_that_exits_is_failed_with_its_exit_code(compute: LocalProcessCompute, tmp_path: Path) -> None:
    spec = EnvironmentSpec(
        environment_id=uuid.uuid4().hex, user=UserRef(id="u1"), image="local",
        command=(sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"),
    )  # fmt: skip
    compute.start(spec)
    status = wait_for(compute, spec.environment_id, EnvironmentPhase.FAILED)
    assert "3" in status.message
    assert "bad config" in compute.logs(spec.environment_id)


def test_recycled_pid_is_not_mistaken_for_ours(compute: LocalProcessCompute, tmp_path: Path) -> None:
    env_id = uuid.uuid4().hex
    state = {
        "environment_id": env_id, "user_id": "u1", "pid": os.getpid(), "start_ticks": 1, "port": 1,
        "command": ["x"], "started_at": "2026-01-01T00:00:00+00:00", "stopped": False,
    }  # fmt: skip
    (tmp_path / "compute" / f"{env_id}.json").write_text(json.dumps(state))
    assert compute.status(env_id).phase == EnvironmentPhase.FAILED
    compute.delete(env_id)  # must not signal this test process
    assert compute.status(env_id).phase == EnvironmentPhase.MISSING


def test_bad_commands_are_clear_errors(compute: LocalProcessCompute) -> None:
    with pytest.raises(InvalidRequest, match="cannot start"):
        compute.start(
            EnvironmentSpec(
                environment_id=uuid.uuid4().hex, user=UserRef(id="u"), image="x", command=("/nonexistent/app",)
            )
        )
    with pytest.raises(InvalidRequest, match="needs the application's command"):
        compute.start(EnvironmentSpec(environment_id=uuid.uuid4().hex, user=UserRef(id="u"), image="x"))
    with pytest.raises(InvalidRequest):
        compute.status("../../etc/passwd")


def test_process_without_a_state_file_is_found_and_removed(compute: LocalProcessCompute, tmp_path: Path) -> None:
    """A crash between starting the process and recording it must not leave an invisible orphan."""
    spec = spec_for(tmp_path)
    compute.start(spec)
    wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)
    state_file = tmp_path / "compute" / f"{spec.environment_id}.json"
    pid = json.loads(state_file.read_text())["pid"]
    state_file.unlink()  # as if the control plane died before writing it
    fresh = LocalProcessCompute(tmp_path / "compute")
    found = {s.environment_id: s for s in fresh.list_managed()}
    assert found[spec.environment_id].phase == EnvironmentPhase.FAILED  # it runs, but its port is unknown
    fresh.stop(spec.environment_id)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the unrecorded process survived delete()")
    assert spec.environment_id not in {s.environment_id for s in fresh.list_managed()}


def test_environment_ports_avoid_the_kernels_ephemeral_range(tmp_path: Path) -> None:
    """Outgoing connections take ephemeral ports at any moment; an environment's port is chosen
    outside that range so none can take it between the check and the application's bind."""
    from cmbcluster.local.compute import ENVIRONMENT_PORTS, _free_port

    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {_free_port("127.0.0.1") for _ in range(50)}
    assert all(port in ENVIRONMENT_PORTS for port in ports)
    assert not any(low <= port <= high for port in ports)
    assert len(ports) > 40  # spread out, so concurrent starts rarely even try the same one


def test_plaintext_secret_copies_live_only_while_the_environment_runs(
    compute: LocalProcessCompute, tmp_path: Path
) -> None:
    secrets = tmp_path / "compute"
    running = spec_for(tmp_path, secret_files={"token.txt": b"s3cr3t"})
    compute.start(running)
    wait_for(compute, running.environment_id, EnvironmentPhase.RUNNING)
    assert (secrets / f"{running.environment_id}.secrets" / "token.txt").read_bytes() == b"s3cr3t"
    compute.stop(running.environment_id)
    assert not (secrets / f"{running.environment_id}.secrets").exists()

    failing = EnvironmentSpec(
        environment_id=uuid.uuid4().hex, user=UserRef(id="u1"), image="local",
        command=(sys.executable, "-c", "raise SystemExit(3)"), secret_files={"token.txt": b"s3cr3t"},
    )  # fmt: skip
    compute.start(failing)
    wait_for(compute, failing.environment_id, EnvironmentPhase.FAILED)
    assert not (secrets / f"{failing.environment_id}.secrets").exists()

    # what a control plane killed before it noticed leaves behind is swept when the next one starts
    leftover = secrets / f"{uuid.uuid4().hex}.secrets"
    leftover.mkdir()
    (leftover / "token.txt").write_bytes(b"s3cr3t")
    still_running = spec_for(tmp_path, secret_files={"token.txt": b"kept"})
    compute.start(still_running)
    wait_for(compute, still_running.environment_id, EnvironmentPhase.RUNNING)
    LocalProcessCompute(secrets)
    assert not leftover.exists()
    assert (secrets / f"{still_running.environment_id}.secrets" / "token.txt").read_bytes() == b"kept"
