"""Local compute: real processes in their own home folders, adopted after a control-plane restart."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
                "cwd": os.getcwd(), "home": os.environ.get("HOME"), "greeting": os.environ.get("GREETING"),
                "secret": pathlib.Path(secrets, "token.txt").read_text() if secrets else None,
                "secret_mode": oct(os.stat(pathlib.Path(secrets, "token.txt")).st_mode & 0o777) if secrets else None,
                "leaked": os.environ.get("CMBCLUSTER_SECRET_KEY"),
                "variables": {k: v for k, v in os.environ.items() if k.startswith(("CMBCLUSTER_", "PORT", "HOST"))},
            }).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        else:
            super().do_GET()
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture
def compute(tmp_path: Path) -> Iterator[LocalProcessCompute]:
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


def spec_for(
    tmp_path: Path, workdir: Path | None = None, *, mounts: dict[str, Path] | None = None, **extra: object
) -> EnvironmentSpec:
    script = tmp_path / "app.py"
    script.write_text(APP)
    chosen = {"/home/user/data": workdir} if workdir else dict(mounts or {})
    volumes = tuple(
        MountedVolume(mount_path=path, spec=VolumeSpec(local_path=folder)) for path, folder in chosen.items()
    )
    return EnvironmentSpec(
        environment_id=uuid.uuid4().hex, user=UserRef(id="u1"), image="local",
        command=(sys.executable, str(script), "{port}"), volumes=volumes, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def direct(compute: LocalProcessCompute, env_id: str) -> str:
    """The application's own address, bypassing the control plane (what the proxy connects to)."""
    upstream = compute.upstream(env_id)
    assert upstream is not None and upstream.unix_socket is None
    return upstream.url + "/"


def test_environment_runs_in_its_home_with_buckets_at_their_mount_paths_env_and_secrets(
    compute: LocalProcessCompute, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CMBCLUSTER_SECRET_KEY", "the control plane's own secret must not leak")
    data, maps = tmp_path / "bucket-data", tmp_path / "bucket-maps"
    for bucket in (data, maps):
        bucket.mkdir()
    (data / "hello.txt").write_text("from the bucket")
    (maps / "sky.fits").write_text("a map")
    spec = spec_for(
        tmp_path, mounts={"/home/user/data": data, "/srv/maps": maps}, env={"GREETING": "hi"},
        secret_files={"token.txt": b"s3cr3t"},
    )  # fmt: skip
    started = compute.start(spec)
    assert started.phase in (EnvironmentPhase.STARTING, EnvironmentPhase.RUNNING)
    status = wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)
    # users reach it through the control plane, never at its port
    assert status.url == f"/environments/{spec.environment_id}/"
    url = direct(compute, spec.environment_id)
    home = tmp_path / "homes" / spec.environment_id
    who = httpx.get(url + "whoami").json()
    assert who["cwd"] == str(home) and who["home"] == str(home)
    # /home/user/data is ~/data; a path outside /home/<name>/ keeps its whole path under the home
    assert httpx.get(url + "data/hello.txt").text == "from the bucket"
    assert httpx.get(url + "srv/maps/sky.fits").text == "a map"
    assert (home / "data").resolve() == data.resolve() and (home / "srv" / "maps").resolve() == maps.resolve()
    # the variables a pod gets
    variables = who["variables"]
    assert variables["CMBCLUSTER_ENVIRONMENT_ID"] == spec.environment_id
    assert variables["CMBCLUSTER_BASE_PATH"] == f"/environments/{spec.environment_id}/"
    assert variables["HOST"] == "127.0.0.1" and variables["PORT"] == url.rsplit(":", 1)[1].strip("/")
    assert who["greeting"] == "hi"
    assert who["secret"] == "s3cr3t" and who["secret_mode"] == "0o600"
    assert who["leaked"] is None


def test_deleting_an_environment_removes_its_home_but_never_what_its_links_point_to(
    compute: LocalProcessCompute, tmp_path: Path
) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / "keep.txt").write_text("data outlives environments")
    spec = spec_for(tmp_path, bucket)
    compute.start(spec)
    wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)
    home = tmp_path / "homes" / spec.environment_id
    (home / "notes.txt").write_text("the environment's own disk")
    compute.stop(spec.environment_id)
    assert (home / "notes.txt").exists(), "a stop keeps the home"
    compute.start(spec)  # a start again links the bucket again (the old link is replaced)
    wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)
    compute.delete(spec.environment_id)
    assert not home.exists()
    assert (bucket / "keep.txt").read_text() == "data outlives environments"


def test_a_bucket_this_backend_cannot_mount_is_a_clear_error_not_a_missing_folder(
    compute: LocalProcessCompute, tmp_path: Path
) -> None:
    """A storage backend that mounts buckets only in pods (S3, GCS through CSI) gives no local folder:
    the start is refused saying so, instead of an environment without the folder its user chose."""
    pod_only = VolumeSpec(volume={"name": "data", "csi": {"driver": "s3.csi.aws.com"}}, mount={"name": "data"})
    spec = dataclasses.replace(
        spec_for(tmp_path), volumes=(MountedVolume(mount_path="/home/user/data", spec=pod_only, bucket="cmb-u1"),)
    )
    with pytest.raises(InvalidRequest, match="the bucket for /home/user/data cannot be mounted here"):
        compute.start(spec)
    assert compute.status(spec.environment_id).phase == EnvironmentPhase.MISSING  # nothing started
    assert not (tmp_path / "homes" / spec.environment_id).exists()


def test_mount_paths_that_cannot_be_honoured_are_clear_errors(compute: LocalProcessCompute, tmp_path: Path) -> None:
    outer, inner = tmp_path / "outer", tmp_path / "inner"
    outer.mkdir()
    inner.mkdir()
    nested = spec_for(tmp_path, mounts={"/home/user/data": outer, "/home/user/data/more": inner})
    with pytest.raises(InvalidRequest, match="inside another mounted bucket"):
        compute.start(nested)
    assert not any(outer.iterdir()), "nothing was created inside the outer bucket"
    taken = spec_for(tmp_path, mounts={"/home/user/results": outer})
    home = tmp_path / "homes" / taken.environment_id
    (home / "results").mkdir(parents=True)
    (home / "results" / "mine.txt").write_text("the user's own files")
    with pytest.raises(InvalidRequest, match="already exists in the environment's home"):
        compute.start(taken)
    assert (home / "results" / "mine.txt").read_text() == "the user's own files"


@pytest.mark.parametrize(
    ("mount_path", "in_home"),
    [("/home/user/data", "data"), ("/home/jovyan/work/maps", "work/maps"), ("/data", "data"),
     ("/home/user", "home/user"), ("/mnt/planck/", "mnt/planck")],
)  # fmt: skip
def test_mount_paths_map_into_the_home_as_documented(mount_path: str, in_home: str) -> None:
    from cmbcluster.local.compute import home_path

    assert str(home_path(mount_path)) == in_home


def test_the_url_is_the_control_planes_public_one(tmp_path: Path) -> None:
    backend = LocalProcessCompute(tmp_path / "compute", public_url="https://lab.example.org/")
    spec = spec_for(tmp_path)
    try:
        backend.start(spec)
        status = wait_for(backend, spec.environment_id, EnvironmentPhase.RUNNING)
        assert status.url == f"https://lab.example.org/environments/{spec.environment_id}/"
    finally:
        backend.delete(spec.environment_id)


def test_start_is_idempotent_and_stop_ends_the_process(compute: LocalProcessCompute, tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    compute.start(spec)
    wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)
    first = direct(compute, spec.environment_id)
    compute.start(spec)
    assert direct(compute, spec.environment_id) == first  # adopted, not a second process
    pid = json.loads((tmp_path / "compute" / f"{spec.environment_id}.json").read_text())["pid"]
    compute.stop(spec.environment_id)
    assert compute.status(spec.environment_id).phase == EnvironmentPhase.STOPPED
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    compute.start(spec)  # start again after a stop
    wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)


def test_starts_and_stops_sent_at_once_never_fail_and_leave_what_came_last(
    compute: LocalProcessCompute, tmp_path: Path
) -> None:
    """Requests race (a stop sent while the start launches the process): each call finishes whole
    before the next of the same environment, and none fails over the other's half-written record."""
    spec = spec_for(tmp_path)
    errors: list[BaseException] = []

    def call(fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    for _ in range(10):
        threads = [threading.Thread(target=call, args=(fn,)) for fn in
                   (lambda: compute.start(spec), lambda: compute.stop(spec.environment_id),
                    lambda: compute.start(spec), lambda: compute.stop(spec.environment_id))]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        compute.stop(spec.environment_id)
        assert compute.status(spec.environment_id).phase == EnvironmentPhase.STOPPED
        assert compute.upstream(spec.environment_id) is None
    assert not list((tmp_path / "compute").glob("*.tmp"))  # no write left a temporary file behind


def test_restarted_control_plane_adopts_running_processes(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    before = LocalProcessCompute(tmp_path / "compute")
    before.start(spec)
    wait_for(before, spec.environment_id, EnvironmentPhase.RUNNING)
    upstream = before.upstream(spec.environment_id)
    after = LocalProcessCompute(tmp_path / "compute")  # a new control plane on the same data directory
    try:
        managed = {s.environment_id: s for s in after.list_managed()}
        assert managed[spec.environment_id].phase == EnvironmentPhase.RUNNING
        assert after.upstream(spec.environment_id) == upstream
        after.delete(spec.environment_id)
        assert after.status(spec.environment_id).phase == EnvironmentPhase.MISSING
        assert after.list_managed() == []
    finally:
        after.delete(spec.environment_id)


def test_a_state_file_another_process_replaced_is_read_anew_even_with_the_same_time_and_size(
    tmp_path: Path,
) -> None:
    """The state files are read again only when they change (the proxy asks for every request): a
    second control plane on the same data directory (a CLI command, another replica) that stops the
    environment replaces the file, and this one sees it, whatever the file's time and size say."""
    spec = spec_for(tmp_path)
    ours = LocalProcessCompute(tmp_path / "compute")
    other = LocalProcessCompute(tmp_path / "compute")
    ours.start(spec)
    try:
        wait_for(ours, spec.environment_id, EnvironmentPhase.RUNNING)
        assert ours.upstream(spec.environment_id) is not None  # read, and kept
        path = tmp_path / "compute" / f"{spec.environment_id}.json"
        before = path.stat()
        state = json.loads(path.read_text())
        state["stopped"] = True
        replacement = tmp_path / "replacement.json"
        replacement.write_text(json.dumps(state)[: before.st_size].ljust(before.st_size))
        os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(replacement, path)  # as _write_state does: same size and time, a new file
        assert json.loads(path.read_text())["stopped"] is True  # (the padding kept it whole)
        assert ours.upstream(spec.environment_id) is None
        assert ours.status(spec.environment_id).phase == EnvironmentPhase.STOPPED
    finally:
        other.delete(spec.environment_id)


def test_process_that_exits_is_failed_with_its_exit_code_and_its_fatal_line(
    compute: LocalProcessCompute, tmp_path: Path
) -> None:
    spec = EnvironmentSpec(
        environment_id=uuid.uuid4().hex, user=UserRef(id="u1"), image="local",
        command=(sys.executable, "-c", "print('reading the config'); import sys; print('bad config'); sys.exit(3)"),
    )  # fmt: skip
    compute.start(spec)
    status = wait_for(compute, spec.environment_id, EnvironmentPhase.FAILED)
    assert status.message == "the application exited with code 3: bad config"
    assert "reading the config" in compute.logs(spec.environment_id)
    crash = EnvironmentSpec(
        environment_id=uuid.uuid4().hex, user=UserRef(id="u1"), image="local",
        command=(sys.executable, "-c", "print('\\n'.join(f'line {i}' for i in range(80))); import no_such_module"),
    )  # fmt: skip
    compute.start(crash)
    status = wait_for(compute, crash.environment_id, EnvironmentPhase.FAILED)
    # the traceback's last line, not the first lines of output
    assert status.message.endswith("ModuleNotFoundError: No module named 'no_such_module'"), status.message


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


def test_bad_commands_are_clear_errors(compute: LocalProcessCompute, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="/nonexistent/app is not installed on this server"):
        compute.start(
            EnvironmentSpec(
                environment_id=uuid.uuid4().hex, user=UserRef(id="u"), image="x", command=("/nonexistent/app",)
            )
        )
    not_runnable = tmp_path / "app.sh"
    not_runnable.write_text("#!/nonexistent/interpreter\n")
    not_runnable.chmod(0o755)
    with pytest.raises(InvalidRequest, match="cannot start"):
        compute.start(
            EnvironmentSpec(
                environment_id=uuid.uuid4().hex, user=UserRef(id="u"), image="x", command=(str(not_runnable),)
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


def test_a_start_the_reconcile_loop_sees_halfway_is_not_taken_for_a_crashs_leftover(
    compute: LocalProcessCompute, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconcile loop lists environments (another thread) while a request starts one: between the
    process starting and its state file being written, it must not read as "interrupted while
    starting" (the loop then marks it failed and stops it: in the browser tests under load, an
    environment launched from the dialog ended failed)."""
    seen: list[EnvironmentStatus] = []
    write_state = compute._write_state

    def listed_meanwhile(environment_id: str, state: dict[str, object]) -> None:
        reconcile = threading.Thread(target=lambda: seen.extend(compute.list_managed()))
        reconcile.start()
        reconcile.join()
        write_state(environment_id, state)

    spec = spec_for(tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(compute, "_write_state", listed_meanwhile)
        compute.start(spec)
    assert seen == []  # started, not yet recorded: not listed (the loop gives a start in flight time)
    wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)


def test_a_start_recorded_while_the_state_files_are_being_read_is_listed_as_it_is(
    compute: LocalProcessCompute, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: the state files were read before the start, the running processes after it.
    (Under load the new process's environment may not show in /proc yet when Popen returns: the
    kernel sets it up after the exec; two fresh-clone runs failed so. Its record is there by then.)"""
    # A process that cannot end by itself: the test app ended before the scan once in a fresh-clone run
    # under three test workers (then, rightly, nothing is listed); a port taken by a parallel test's
    # process is the likeliest way. What is tested is the listing, not the app.
    spec = dataclasses.replace(spec_for(tmp_path), command=(shutil.which("sleep") or "sleep", "600"))
    unrecorded_groups = compute._unrecorded_groups

    def started_meanwhile() -> dict[str, int]:
        compute.start(spec)
        return unrecorded_groups()

    with monkeypatch.context() as patched:
        patched.setattr(compute, "_unrecorded_groups", started_meanwhile)
        (listed,) = compute.list_managed()
    assert listed.environment_id == spec.environment_id
    assert listed.phase in (EnvironmentPhase.STARTING, EnvironmentPhase.RUNNING), listed


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

    # a start the kernel refuses (variables within their limits, together past Linux's ~2 MiB: found
    # by an outsider's trial) says why, and leaves no copy behind
    too_big = dataclasses.replace(
        spec_for(tmp_path, secret_files={"token.txt": b"s3cr3t"}),
        env={f"V{i}": "x" * 32768 for i in range(90)},
    )
    with pytest.raises(InvalidRequest, match="the environment's variables are too large to start a program"):
        compute.start(too_big)
    assert not (secrets / f"{too_big.environment_id}.secrets").exists()

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


# An application that checks the token the proxy sends, prints its URL with the token the way
# JupyterLab does, and reports its arguments and token variable.
TOKEN_APP = r"""
import http.server, json, os, sys
token = sys.argv[2]
print(f"serving at http://127.0.0.1:{sys.argv[1]}/lab?token={token}", flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Authorization") != f"token {token}":
            self.send_response(403); self.end_headers(); return
        body = json.dumps({"argv": sys.argv[3:], "JUPYTER_TOKEN": os.environ.get("JUPYTER_TOKEN")}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_an_application_with_a_token_accepts_only_the_proxys_requests_and_its_output_hides_it(
    compute: LocalProcessCompute, tmp_path: Path
) -> None:
    script = tmp_path / "token_app.py"
    script.write_text(TOKEN_APP)
    spec = EnvironmentSpec(
        environment_id=uuid.uuid4().hex, user=UserRef(id="u1"), image="local",
        command=(sys.executable, str(script), "{port}", "{token}", "--base={base_url}", "{literal}", '{"json": 1}'),
    )  # fmt: skip
    compute.start(spec)
    wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)
    upstream = compute.upstream(spec.environment_id)
    assert upstream is not None and not upstream.strip_prefix  # it knows its base path
    assert httpx.get(upstream.url + "/").status_code == 403  # anyone else on the machine: refused
    answer = httpx.get(upstream.url + "/", headers=dict(upstream.headers)).json()
    assert answer["argv"] == [f"--base=/environments/{spec.environment_id}/", "{literal}", '{"json": 1}']
    token = dict(upstream.headers)["Authorization"].split(" ", 1)[1]
    assert len(token) >= 40
    logs = compute.logs(spec.environment_id)
    assert "lab?token=[token]" in logs and token not in logs
    assert token not in repr(upstream)
    # a new start, a new token
    compute.stop(spec.environment_id)
    compute.start(spec)
    wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)
    again = compute.upstream(spec.environment_id)
    assert again is not None and dict(again.headers) != dict(upstream.headers)


def test_jupyterlab_gets_its_token_by_variable_and_allow_root_only_as_root(
    compute: LocalProcessCompute, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Known programs are recognised by name: a stand-in called jupyter-lab is treated as JupyterLab."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "jupyter-lab"
    fake.write_text(
        f"#!{sys.executable}\n"
        + TOKEN_APP.replace("token = sys.argv[2]", "token = os.environ['JUPYTER_TOKEN']; sys.argv.insert(2, token)")
    )
    fake.chmod(0o755)
    for uid, extra in ((1000, []), (0, ["--allow-root"])):
        monkeypatch.setattr("cmbcluster.local.compute.os.geteuid", lambda uid=uid: uid)
        spec = EnvironmentSpec(
            environment_id=uuid.uuid4().hex, user=UserRef(id="u1"), image="local",
            command=(str(fake), "{port}", "--ServerApp.base_url={base_url}"),
        )  # fmt: skip
        compute.start(spec)
        wait_for(compute, spec.environment_id, EnvironmentPhase.RUNNING)
        upstream = compute.upstream(spec.environment_id)
        assert upstream is not None
        answer = httpx.get(upstream.url + "/", headers=dict(upstream.headers)).json()
        assert answer["argv"] == [f"--ServerApp.base_url=/environments/{spec.environment_id}/", *extra]
        assert answer["JUPYTER_TOKEN"], "the token reaches JupyterLab by its variable, never on the command line"
        state = json.loads((tmp_path / "compute" / f"{spec.environment_id}.json").read_text())
        assert oct((tmp_path / "compute" / f"{spec.environment_id}.json").stat().st_mode & 0o777) == "0o600"
        assert state["token"] not in Path(f"/proc/{state['pid']}/cmdline").read_text()


# Serves its working folder on a Unix socket, as an application that takes no token should.
SOCKET_APP = r"""
import http.server, os, socketserver, sys
path = sys.argv[1]
class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
class H(http.server.SimpleHTTPRequestHandler):
    def address_string(self):
        return "local"
os.umask(0o077)
Server(path, H).serve_forever()
"""


@pytest.mark.parametrize("long_data_dir", [False, True])
def test_an_application_can_listen_on_a_unix_socket_only_this_user_opens(tmp_path: Path, long_data_dir: bool) -> None:
    state_dir = (tmp_path / ("a-very-long-folder-name" * 5 if long_data_dir else "d")) / "compute"
    backend = LocalProcessCompute(state_dir)
    script = tmp_path / "socket_app.py"
    script.write_text(SOCKET_APP)
    spec = EnvironmentSpec(
        environment_id=uuid.uuid4().hex, user=UserRef(id="u1"), image="local",
        command=(sys.executable, str(script), "{socket}"),
    )  # fmt: skip
    try:
        backend.start(spec)
        (state_dir.parent / "homes" / spec.environment_id / "hello.txt").write_text("over a socket")
        wait_for(backend, spec.environment_id, EnvironmentPhase.RUNNING)
        upstream = backend.upstream(spec.environment_id)
        assert upstream is not None and upstream.unix_socket is not None and upstream.strip_prefix
        assert len(upstream.unix_socket.encode()) <= 100
        socket_file = Path(upstream.unix_socket)
        assert socket_file.stat().st_mode & 0o077 == 0
        with httpx.Client(transport=httpx.HTTPTransport(uds=upstream.unix_socket)) as client:
            assert client.get("http://localhost/hello.txt").text == "over a socket"
        assert upstream.headers == {}  # no token: the socket's permissions keep others out
    finally:
        backend.delete(spec.environment_id)
    assert not socket_file.exists()
