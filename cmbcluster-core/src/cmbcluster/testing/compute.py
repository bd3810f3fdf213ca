"""The compute contract: what every :class:`~cmbcluster.interfaces.ComputeBackend` must do.

Provide two fixtures in a subclass:

- ``compute_backend``: a backend of your kind (a fresh one per test is simplest: the suite
  registers status listeners on it), closed by your fixture;
- ``environment_spec``: a callable ``environment_spec(environment_id, user, python_arguments)``
  returning an :class:`~cmbcluster.interfaces.EnvironmentSpec` of ``user`` whose command runs
  Python 3.11 or newer (its standard library is all the programs need) with
  ``python_arguments`` (``("-c", source, ...)``, placeholders such as ``{host}`` and ``{port}``
  among them) in your environments: ``command=("python", *python_arguments)`` and an image
  with Python in it, plus whatever else your backend needs (resources, labels). The suite adds
  its own ``env`` and ``secret_files`` to what you return.

The applications are the suite's: one serves HTTP on ``{host}:{port}`` and answers what it sees
(its variables, the files in ``$CMBCLUSTER_SECRETS_DIR``, an id of its run); one exits at once.
Set ``runs_applications = True`` when your backend really runs them where the suite can reach
them (the tests that need a running application then check it); a backend tested against a
cluster whose nodes run nothing (a fake kubelet) leaves it False. The suite reaches an
application at :meth:`ComputeBackendContract.application_address`, by default the backend's own
``upstream``; override it when your environments are served another way (an ingress).

Every test deletes the environments it started, also when it fails.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import httpx
import pytest

from cmbcluster.interfaces import (
    ComputeBackend,
    EnvironmentPhase,
    EnvironmentSpec,
    EnvironmentStatus,
    ResourceUse,
    Upstream,
    UserRef,
)

#: ``environment_spec(environment_id, user, python_arguments)``: see the module's documentation.
SpecFactory = Callable[[str, UserRef, Sequence[str]], EnvironmentSpec]

#: Serves on argv[1]:argv[2] after argv[3] seconds; answers every GET with what it sees (JSON).
#: Given a token (argv[4]), it prints it, as JupyterLab prints its URL, and answers only requests
#: with ``Authorization: token <token>`` (JupyterLab's rule), others 403.
SERVES = """\
import http.server, json, os, sys, time, uuid
RUN = uuid.uuid4().hex
TOKEN = sys.argv[4] if len(sys.argv) > 4 else ""
time.sleep(float(sys.argv[3]))
folder = os.environ.get("CMBCLUSTER_SECRETS_DIR")

def secret_files():
    if not folder or not os.path.isdir(folder):
        return {}
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.startswith(".") and os.path.isfile(path):
            with open(path, "rb") as f:
                found[name] = f.read().hex()
    return found

class Seen(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if TOKEN and self.headers.get("Authorization") != "token " + TOKEN:
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"run": RUN, "env": dict(os.environ), "files": secret_files(), "token": TOKEN}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Seen)
print("cmbcluster contract: serving" + (" at /?token=" + TOKEN if TOKEN else ""), flush=True)
server.serve_forever()
"""

#: Exits at once with the status argv[1].
EXITS = 'import sys; print("cmbcluster contract: exiting", flush=True); sys.exit(int(sys.argv[1]))'

#: Phases of an environment that runs, or is on its way to (what reconcile keeps stopping once stopped).
LIVE = (EnvironmentPhase.PENDING, EnvironmentPhase.STARTING, EnvironmentPhase.RUNNING)
#: Phases an environment ends in by itself.
ENDED = (EnvironmentPhase.STOPPED, EnvironmentPhase.FAILED)


def serving(delay: float = 0.0, *, token: bool = False) -> tuple[str, ...]:
    """Python arguments of the application that listens on its port (after ``delay`` seconds); with
    ``token``, one that is given ``{token}`` and answers only requests that carry it."""
    return ("-c", SERVES, "{host}", "{port}", str(delay), *(("{token}",) if token else ()))


def exiting(code: int) -> tuple[str, ...]:
    """Python arguments of the application that exits at once with ``code``."""
    return ("-c", EXITS, str(code))


class Started:
    """The environments a test started, deleted at its end."""

    def __init__(self, backend: ComputeBackend) -> None:
        self.backend = backend
        self.ids: list[str] = []

    def start(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        if spec.environment_id not in self.ids:
            self.ids.append(spec.environment_id)
        return self.backend.start(spec)

    def delete_all(self) -> None:
        for environment_id in self.ids:
            self.backend.delete(environment_id)


def wait_for_phase(
    backend: ComputeBackend, environment_id: str, phases: Sequence[EnvironmentPhase], timeout: float
) -> EnvironmentStatus:
    """The environment's status once its phase is one of ``phases``; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        status = backend.status(environment_id)
        assert status.environment_id == environment_id, status
        if status.phase in phases:
            return status
        if time.monotonic() > deadline:
            wanted = " or ".join(p.value for p in phases)
            raise AssertionError(f"{environment_id} not {wanted} after {timeout:.0f}s: {status}")
        time.sleep(0.1)


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """``check()`` once it is truthy; AssertionError saying ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)
    return value


def listed(backend: ComputeBackend, environment_id: str) -> list[EnvironmentStatus]:
    return [s for s in backend.list_managed() if s.environment_id == environment_id]


def get(address: Upstream, *, headers: Mapping[str, str], timeout: float = 5.0) -> httpx.Response:
    """GET ``/`` of the application at ``address`` with ``headers``."""
    transport = httpx.HTTPTransport(uds=address.unix_socket) if address.unix_socket else None
    with httpx.Client(transport=transport, headers=dict(headers), timeout=timeout) as client:
        return client.get(address.url.rstrip("/") + "/")


def fetch(address: Upstream, timeout: float = 5.0) -> dict[str, Any]:
    """What the serving application answers at ``address`` (as the control plane's proxy asks)."""
    response = get(address, headers=address.headers, timeout=timeout)
    assert response.status_code == 200, response.text
    seen: dict[str, Any] = response.json()
    return seen


def answers(address: Upstream) -> bool:
    try:
        fetch(address, timeout=2.0)
    except httpx.TransportError:
        return False
    return True


class ComputeBackendContract:
    """Subclass and provide ``compute_backend`` and ``environment_spec`` (see the module)."""

    #: Whether started applications really run where :meth:`application_address` reaches them:
    #: then the suite also checks what they see and that they stop.
    runs_applications: bool = False
    #: Whether the backend calls ``on_status_change`` listeners (else it must leave that method
    #: as the base class has it: core then polls).
    notifies_status_changes: bool = False

    @pytest.fixture
    def compute_backend(self) -> ComputeBackend:
        raise NotImplementedError("provide a compute_backend fixture in your subclass")

    @pytest.fixture
    def environment_spec(self) -> SpecFactory:
        raise NotImplementedError(
            "provide an environment_spec fixture: environment_spec(environment_id, user, python_arguments)"
        )

    @pytest.fixture
    def start_timeout(self) -> float:
        """Seconds an environment may take to run, and to be gone once stopped or deleted."""
        return 60.0

    @pytest.fixture
    def owner(self) -> UserRef:
        return UserRef(id=uuid.uuid4().hex, email="ada.lovelace@example.org")

    @pytest.fixture
    def started(self, compute_backend: ComputeBackend) -> Iterator[Started]:
        environments = Started(compute_backend)
        yield environments
        environments.delete_all()

    def application_address(self, compute_backend: ComputeBackend, environment_id: str) -> Upstream:
        """Where the suite reaches a running application; by default the backend's ``upstream``.
        Override it when your environments are served another way (an ingress)."""
        address = compute_backend.upstream(environment_id)
        assert address is not None, (
            "upstream() is None for a running environment: override application_address in your "
            "subclass to say where the suite reaches your environments' applications"
        )
        return address

    def needs_applications(self) -> None:
        if not self.runs_applications:
            pytest.skip("needs an application that really runs (runs_applications = True)")

    def spec(
        self, environment_spec: SpecFactory, user: UserRef, python_arguments: Sequence[str], **extra: Any
    ) -> EnvironmentSpec:
        """A new environment's spec from the fixture, with the suite's ``env`` and ``secret_files``."""
        spec = environment_spec(uuid.uuid4().hex, user, tuple(python_arguments))
        env = {**spec.env, **extra.pop("env", {})}
        files = {**spec.secret_files, **extra.pop("secret_files", {})}
        return dataclasses.replace(spec, env=env, secret_files=files, **extra)

    def serving_one(
        self, environment_spec: SpecFactory, owner: UserRef, started: Started, start_timeout: float
    ) -> EnvironmentSpec:
        """A new environment whose application serves, started and running."""
        spec = self.spec(environment_spec, owner, serving())
        started.start(spec)
        wait_for_phase(started.backend, spec.environment_id, [EnvironmentPhase.RUNNING], start_timeout)
        return spec

    # -- unknown ids ---------------------------------------------------------------------------
    def test_an_unknown_environment_is_missing(self, compute_backend: ComputeBackend) -> None:
        unknown = uuid.uuid4().hex
        status = compute_backend.status(unknown)
        assert (status.environment_id, status.phase) == (unknown, EnvironmentPhase.MISSING)
        assert listed(compute_backend, unknown) == []

    def test_stop_and_delete_of_unknown_ids_do_nothing(self, compute_backend: ComputeBackend) -> None:
        # the reconcile loop and a repeated request stop and delete what may be gone already
        unknown = uuid.uuid4().hex
        compute_backend.stop(unknown)
        compute_backend.delete(unknown)
        compute_backend.delete(unknown)
        assert compute_backend.status(unknown).phase == EnvironmentPhase.MISSING
        assert listed(compute_backend, unknown) == []
        assert compute_backend.upstream(unknown) is None  # the proxy reaches nothing of it
        assert isinstance(compute_backend.logs(unknown), str)  # progress streams read it for ids just gone

    # -- starting ------------------------------------------------------------------------------
    def test_start_returns_promptly_with_a_status_of_that_environment(
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, started: Started,
        start_timeout: float,
    ) -> None:  # fmt: skip
        delay = 5.0  # the application listens only after this: a start must not wait for it
        spec = self.spec(environment_spec, owner, serving(delay))
        began = time.monotonic()
        status = started.start(spec)
        took = time.monotonic() - began
        assert status.environment_id == spec.environment_id
        assert status.phase in LIVE, status
        if self.runs_applications:
            assert took < delay, f"start took {took:.1f}s: it waited for the application"
            assert status.phase != EnvironmentPhase.RUNNING, "RUNNING before the application listens"
        running = wait_for_phase(compute_backend, spec.environment_id, [EnvironmentPhase.RUNNING],
                                 start_timeout + delay)  # fmt: skip
        assert running.url, "a running environment's status gives the URL users open"

    def test_a_started_environment_runs_and_answers(
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, started: Started,
        start_timeout: float,
    ) -> None:  # fmt: skip
        spec = self.spec(environment_spec, owner, serving())
        assert compute_backend.check_command(spec.command) is None  # core refuses a start it objects to
        started.start(spec)
        status = wait_for_phase(compute_backend, spec.environment_id, [EnvironmentPhase.RUNNING], start_timeout)
        assert status.user_id in (None, owner.id), status
        address = compute_backend.upstream(spec.environment_id)
        assert address is None or isinstance(address, Upstream)
        if address is not None:
            assert address.url.startswith(("http://", "https://")), address
        if self.runs_applications:  # RUNNING means the application answers (the URL opens)
            assert fetch(self.application_address(compute_backend, spec.environment_id))["run"]

    def test_start_is_idempotent(
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, started: Started,
        start_timeout: float,
    ) -> None:  # fmt: skip
        # a start sent again (a retry, a request interrupted) adopts what the first one began
        spec = self.spec(environment_spec, owner, serving())
        first = started.start(spec)
        again = started.start(spec)
        assert first.environment_id == again.environment_id == spec.environment_id
        assert again.phase in LIVE, again
        wait_for_phase(compute_backend, spec.environment_id, [EnvironmentPhase.RUNNING], start_timeout)
        assert len(listed(compute_backend, spec.environment_id)) == 1
        if not self.runs_applications:
            return
        run = fetch(self.application_address(compute_backend, spec.environment_id))["run"]
        third = started.start(spec)
        assert third.phase in LIVE, third
        assert fetch(self.application_address(compute_backend, spec.environment_id))["run"] == run, (
            "a start of a running environment started its application again"
        )
        assert len(listed(compute_backend, spec.environment_id)) == 1

    def test_list_managed_has_started_environments_and_not_deleted_ones(
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, started: Started,
        start_timeout: float,
    ) -> None:  # fmt: skip
        # the reconcile loop deletes what it lists and has no record of, and marks gone what it misses
        other = UserRef(id=uuid.uuid4().hex, email="grace.hopper@example.org")
        kept = self.spec(environment_spec, owner, serving())
        deleted = self.spec(environment_spec, other, serving())
        for spec in (kept, deleted):
            started.start(spec)
        for spec in (kept, deleted):
            [status] = wait_until(functools.partial(listed, compute_backend, spec.environment_id), start_timeout,
                                  f"{spec.environment_id} listed")  # fmt: skip
            assert status.user_id in (None, spec.user.id), status
            assert status.phase in LIVE, status
        compute_backend.delete(deleted.environment_id)
        gone = deleted.environment_id
        try:
            wait_until(lambda: not listed(compute_backend, gone), start_timeout, "the deleted one unlisted")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {listed(compute_backend, gone)}") from None
        assert len(listed(compute_backend, kept.environment_id)) == 1

    # -- stopping and deleting -----------------------------------------------------------------
    def test_stop_leaves_nothing_running_and_a_start_runs_it_again(
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, started: Started,
        start_timeout: float,
    ) -> None:  # fmt: skip
        spec = self.serving_one(environment_spec, owner, started, start_timeout)
        address = self.application_address(compute_backend, spec.environment_id) if self.runs_applications else None
        run = fetch(address)["run"] if address is not None else None
        compute_backend.stop(spec.environment_id)
        compute_backend.stop(spec.environment_id)  # twice: the reconcile loop finishes interrupted stops
        phases = [EnvironmentPhase.STOPPED, EnvironmentPhase.MISSING]
        wait_for_phase(compute_backend, spec.environment_id, phases, start_timeout)
        # listed as running, it would be stopped again and again by the reconcile loop
        assert all(s.phase not in LIVE for s in listed(compute_backend, spec.environment_id))
        assert compute_backend.upstream(spec.environment_id) is None  # the proxy no longer sends to it
        if address is not None:
            assert not answers(address), "the application still answers after stop"
        # core's restart: the same environment starts anew
        started.start(spec)
        wait_for_phase(compute_backend, spec.environment_id, [EnvironmentPhase.RUNNING], start_timeout)
        if address is not None:
            assert fetch(self.application_address(compute_backend, spec.environment_id))["run"] != run

    def test_delete_leaves_it_missing(
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, started: Started,
        start_timeout: float,
    ) -> None:  # fmt: skip
        spec = self.spec(environment_spec, owner, serving(), secret_files={"key.txt": b"secret"})
        started.start(spec)
        wait_for_phase(compute_backend, spec.environment_id, [EnvironmentPhase.RUNNING], start_timeout)
        address = self.application_address(compute_backend, spec.environment_id) if self.runs_applications else None
        compute_backend.delete(spec.environment_id)
        wait_for_phase(compute_backend, spec.environment_id, [EnvironmentPhase.MISSING], start_timeout)
        wait_until(lambda: not listed(compute_backend, spec.environment_id), start_timeout, "it unlisted")
        if address is not None:
            assert not answers(address), "the application still answers after delete"
        compute_backend.delete(spec.environment_id)  # twice: the reconcile loop deletes orphans again
        assert compute_backend.status(spec.environment_id).phase == EnvironmentPhase.MISSING

    # -- applications ------------------------------------------------------------------------
    @pytest.mark.parametrize("code", [0, 3])
    def test_an_application_that_exits_at_once_ends_and_a_start_after_runs_anew(
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, started: Started,
        start_timeout: float, code: int,
    ) -> None:  # fmt: skip
        # a start then ends (core records it, frees the start slot); never RUNNING, nor starting until
        # core's start timeout (ten minutes by default) fails it
        self.needs_applications()
        spec = self.spec(environment_spec, owner, exiting(code))
        started.start(spec)
        seen: list[EnvironmentPhase] = []

        def ended() -> bool:
            seen.append(compute_backend.status(spec.environment_id).phase)
            return seen[-1] in ENDED

        try:
            wait_until(ended, start_timeout, f"an application that exited with {code} to end")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it was {', '.join(dict.fromkeys(seen))}") from None
        assert EnvironmentPhase.RUNNING not in seen, seen
        # core starts it again as launch does: a stop first (its status is not MISSING), then a start,
        # which must run the new command, not adopt what ended
        compute_backend.stop(spec.environment_id)
        again = dataclasses.replace(spec, command=environment_spec(spec.environment_id, owner, serving()).command)
        started.start(again)
        wait_for_phase(compute_backend, spec.environment_id, [EnvironmentPhase.RUNNING], start_timeout)
        assert fetch(self.application_address(compute_backend, spec.environment_id))["run"]

    def test_variables_reach_the_application(
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, started: Started,
        start_timeout: float,
    ) -> None:  # fmt: skip
        self.needs_applications()
        variables = {"CMB_GREETING": "hello, Planck", "CMB_EMPTY": "", "CMB_QUOTED": 'it\'s $HOME "and" {port}'}
        spec = self.spec(environment_spec, owner, serving(), env=variables)
        started.start(spec)
        wait_for_phase(compute_backend, spec.environment_id, [EnvironmentPhase.RUNNING], start_timeout)
        seen = fetch(self.application_address(compute_backend, spec.environment_id))["env"]
        assert {name: seen.get(name) for name in variables} == variables
        assert seen.get("CMBCLUSTER_ENVIRONMENT_ID") == spec.environment_id

    def test_secret_files_reach_the_application(
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, started: Started,
        start_timeout: float,
    ) -> None:  # fmt: skip
        # users' guide: secret files are files in the folder $CMBCLUSTER_SECRETS_DIR names
        self.needs_applications()
        files = {"gcloud.json": b'{"type": "service_account"}\n', "raw.bin": bytes(range(256))}
        spec = self.spec(environment_spec, owner, serving(), secret_files=files)
        started.start(spec)
        wait_for_phase(compute_backend, spec.environment_id, [EnvironmentPhase.RUNNING], start_timeout)
        seen = fetch(self.application_address(compute_backend, spec.environment_id))
        assert seen["env"].get("CMBCLUSTER_SECRETS_DIR"), "no CMBCLUSTER_SECRETS_DIR"
        assert {name: bytes.fromhex(data) for name, data in seen["files"].items()} == files

    # -- what else core asks ---------------------------------------------------------------------
    def test_status_listeners_hear_of_changes(
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, started: Started,
        start_timeout: float,
    ) -> None:  # fmt: skip
        offers = type(compute_backend).on_status_change is not ComputeBackend.on_status_change
        if not self.notifies_status_changes:
            assert not offers, "the backend has on_status_change: set notifies_status_changes so the suite checks it"
            return
        assert offers, "notifies_status_changes is set but the backend keeps the base class's on_status_change"
        heard: list[str] = []

        def broken(environment_id: str) -> None:
            raise RuntimeError("a listener's bug")

        compute_backend.on_status_change(broken)  # first: it must stop neither the backend nor the others
        compute_backend.on_status_change(heard.append)
        spec = self.serving_one(environment_spec, owner, started, start_timeout)
        wait_until(lambda: spec.environment_id in heard, start_timeout, "a listener to hear of the start")
        heard.clear()
        compute_backend.stop(spec.environment_id)
        wait_until(lambda: spec.environment_id in heard, start_timeout, "a listener to hear of the stop")

    def test_the_token_of_a_start_is_needed_to_reach_its_application_and_never_shown(
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, started: Started,
        start_timeout: float,
    ) -> None:  # fmt: skip
        """``{token}`` is a random token of this start: the application answers only requests with
        ``Authorization: token <token>``, which what serves it sends (:meth:`application_address`:
        the ``upstream`` headers the control plane's proxy sends), so that nobody else who reaches
        the application (another user's program on the same machine or network) can use it, or
        ``application_headers`` (what an ingress sends it). No status, listing or log shows it (an
        application prints its URL with it)."""
        self.needs_applications()
        spec = self.spec(environment_spec, owner, serving(token=True))
        started.start(spec)
        status = wait_for_phase(compute_backend, spec.environment_id, [EnvironmentPhase.RUNNING], start_timeout)
        address = self.application_address(compute_backend, spec.environment_id)
        token = fetch(address)["token"]
        assert len(token) >= 16, f"{{token}} must be a random token of this start, not {token!r}"
        assert get(address, headers={}).status_code == 403, "reached without the token"
        # what an ingress sends the application, as core's authorize check answers it: none (the
        # upstream's headers do), or enough to reach it
        own = compute_backend.application_headers(spec.environment_id)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in own.items()), own
        assert not own or get(address, headers=own).status_code == 200, "application_headers() do not reach it"
        assert not compute_backend.application_headers(uuid.uuid4().hex), "headers for an unknown environment"
        logs = compute_backend.logs(spec.environment_id, tail=20)  # it printed the token before it listened
        for text in (repr(status), repr(listed(compute_backend, spec.environment_id)), logs):
            assert token not in text, f"the application's token is shown: {text}"
        other = self.spec(environment_spec, owner, serving(token=True))
        started.start(other)
        wait_for_phase(compute_backend, other.environment_id, [EnvironmentPhase.RUNNING], start_timeout)
        assert fetch(self.application_address(compute_backend, other.environment_id))["token"] != token

    def test_logs_resource_use_and_check_command_answer_as_core_reads_them(
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, started: Started,
        start_timeout: float,
    ) -> None:  # fmt: skip
        spec = self.serving_one(environment_spec, owner, started, start_timeout)
        assert isinstance(compute_backend.logs(spec.environment_id, tail=5), str)
        unknown = uuid.uuid4().hex
        use = compute_backend.resource_use([spec.environment_id, unknown])
        if use is not None:  # None: this backend cannot measure (the web UI hides the figures)
            assert isinstance(use, Mapping)
            assert set(use) <= {spec.environment_id}, f"figures for ids not asked or not running: {set(use)}"
            for figures in use.values():
                assert isinstance(figures, ResourceUse)
                assert figures.cpu >= 0 and figures.memory_bytes >= 0, figures
        for command in (spec.command, ("cmbcluster-no-such-program", "--version"), ("python",)):
            problem = compute_backend.check_command(command)
            assert problem is None or (isinstance(problem, str) and problem), problem
