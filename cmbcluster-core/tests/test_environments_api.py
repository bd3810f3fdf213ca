"""Environments through the API on the embedded default: real processes, real buckets."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import functools
import itertools
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError
from waiting import wait_until_no_connection_is_out

from cmbcluster.app import create_app
from cmbcluster.context import AppContext
from cmbcluster.db.models import Environment, StartSlot, UsageInterval, User, utcnow
from cmbcluster.errors import Conflict
from cmbcluster.interfaces import EnvironmentPhase, EnvironmentSpec, EnvironmentStatus, UserRef
from cmbcluster.services import environments
from cmbcluster.services.reconcile import Reconciler
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in

# An application that writes what it sees into the bucket mounted at /data (~/data in its home, its
# working directory), then serves its home.
PROBE_APP = r"""
import http.server, json, os, pathlib, sys
secrets = os.environ.get("CMBCLUSTER_SECRETS_DIR")
seen = {
    "cwd": os.getcwd(),
    "PROJECT": os.environ.get("PROJECT"), "RUN_LABEL": os.environ.get("RUN_LABEL"),
    "secret": pathlib.Path(secrets, "token.txt").read_text() if secrets else None,
}
pathlib.Path("data", "seen.json").write_text(json.dumps(seen))
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""

SLOW_APP = r"""
import http.server, sys, time
time.sleep(float(sys.argv[2]))
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def make_app(client: TestClient, admin: dict[str, str], slug: str, script: str, *args: str) -> str:
    response = client.post(
        "/api/v1/applications",
        headers=admin,
        json={
            "slug": slug, "name": slug.title(), "image": "python:3.11-slim",
            "command": [sys.executable, "-c", script, "{port}", *args], "port": 8080, "default_preset": "light",
        },
    )  # fmt: skip
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


_BUCKETS = itertools.count(1)


def make_bucket(client: TestClient, headers: dict[str, str], files: dict[str, bytes] | None = None) -> str:
    response = client.post("/api/v1/storages", headers=headers, json={"display_name": f"data {next(_BUCKETS)}"})
    assert response.status_code == 201, response.text
    storage_id = str(response.json()["id"])
    for key, content in (files or {}).items():
        assert client.put(
            f"/api/v1/storages/{storage_id}/objects/{key}", headers=headers, content=content
        ).status_code in (
            200,
            201,
        )
    return storage_id


def wait_status(client: TestClient, headers: dict[str, str], env_id: str, status: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/environments/{env_id}", headers=headers).json()
        if body["status"] == status:
            return body
        time.sleep(0.1)
    raise AssertionError(f"{env_id} is {body and body['status']}, not {status}: {body}")


def create_env(client: TestClient, headers: dict[str, str], **body: Any) -> Any:
    response = client.post("/api/v1/environments", headers=headers, json={"application": "files", **body})
    assert response.status_code == 201, response.text
    return response.json()


@contextlib.contextmanager
def serving(app: Any) -> Iterator[TestClient]:
    """A client for an app made in the test; its environments are removed however the test ends."""
    with TestClient(app, base_url=LOCAL) as client:
        try:
            yield client
        finally:
            for status in app.state.context.compute.list_managed():
                app.state.context.compute.delete(status.environment_id)


@pytest.fixture
def cleanup(client: TestClient) -> Iterator[None]:
    yield
    context = client.app.state.context  # type: ignore[attr-defined]
    for status in context.compute.list_managed():
        context.compute.delete(status.environment_id)


def test_files_app_serves_the_mounted_bucket(client: TestClient, alice: dict[str, str], cleanup: None) -> None:
    storage_id = make_bucket(client, alice, {"maps/planck.txt": b"CMB temperature map"})
    env = create_env(client, alice, mounts=[{"storage_id": storage_id, "mount_path": "/home/user/data"}])
    assert env["status"] in ("pending", "starting", "running")
    assert env["application"]["slug"] == "files" and env["preset"] == "light"
    assert env["mounts"][0]["display_name"].startswith("data ")
    running = wait_status(client, alice, env["id"], "running")
    assert client.get(running["url"] + "data/maps/planck.txt", headers=alice).text == "CMB temperature map"
    assert running["shutdown_at"] is not None and running["shutdown_warning"] is False


def test_progress_stream_reaches_running(client: TestClient, alice: dict[str, str], cleanup: None) -> None:
    env = create_env(client, alice)
    events = []
    with client.stream("GET", f"/api/v1/environments/{env['id']}/events", headers=alice) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    assert events[-1]["status"] == "running" and events[-1]["progress"] == 100 and events[-1]["url"]
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress)


CHATTY_APP = r"""
import http.server, sys, time
for step in ("loading the maps", "building the index", "almost there"):
    print(step, flush=True)
    time.sleep(0.2)
time.sleep(3.5)  # longer than the progress hub's longest pause plus its output refresh
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""

FAILING_APP = r"""
import sys
for i in range(60):
    print(f"checking configuration item {i}")
raise SystemExit("config error: no such catalog file /data/planck.fits")
"""


def events_of(client: TestClient, headers: dict[str, str], env_id: str) -> list[dict[str, Any]]:
    with client.stream("GET", f"/api/v1/environments/{env_id}/events", headers=headers) as stream:
        return [json.loads(line.removeprefix("data: ")) for line in stream.iter_lines() if line.startswith("data: ")]


def test_progress_carries_the_applications_output_while_it_starts_and_its_fatal_line_when_it_fails(
    client: TestClient, admin: dict[str, str], alice: dict[str, str], cleanup: None
) -> None:
    chatty = make_app(client, admin, "chatty", CHATTY_APP)
    events = events_of(client, alice, create_env(client, alice, application=chatty)["id"])
    assert events[-1]["status"] == "running" and events[-1]["log"] == []
    starting_output = [line for e in events if e["status"] == "starting" for line in e["log"]]
    assert "loading the maps" in starting_output and "almost there" in starting_output

    failing = make_app(client, admin, "failing", FAILING_APP)
    env_id = create_env(client, alice, application=failing)["id"]
    last = events_of(client, alice, env_id)[-1]
    assert last["status"] == "failed"
    assert last["message"].endswith("config error: no such catalog file /data/planck.fits")  # the fatal line
    assert last["log"][-1] == "config error: no such catalog file /data/planck.fits"
    assert "checking configuration item 59" in last["log"] and len(last["log"]) <= 15
    assert client.get(f"/api/v1/environments/{env_id}", headers=alice).json()["status_message"] == last["message"]


def test_a_slow_output_read_never_holds_back_progress(
    client: TestClient, admin: dict[str, str], alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading an application's output goes through the kubelet, which may take seconds to answer:
    the stream still reports the start as it happens, and the output once it was read."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    read_logs = context.compute.logs

    def slow_logs(environment_id: str, *, tail: int = 200) -> str:
        time.sleep(6)
        return read_logs(environment_id, tail=tail)

    monkeypatch.setattr(context.compute, "logs", slow_logs)
    slow = make_app(client, admin, "slow", SLOW_APP, "1")
    began = time.monotonic()
    events = events_of(client, alice, create_env(client, alice, application=slow)["id"])
    assert events[-1]["status"] == "running"
    assert time.monotonic() - began < 5.5, [(e["status"], e["at"]) for e in events]  # not after a 6 s read


FAILS_WHEN_ASKED_APP = r"""
import http.server, os, sys, time
if os.environ.get("FAIL") == "1":
    raise SystemExit("asked to fail")
time.sleep(1.5)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def test_streams_opened_as_a_failed_environment_starts_again_follow_the_new_run(
    client: TestClient, admin: dict[str, str], alice: dict[str, str], cleanup: None
) -> None:
    """An outsider's trial once saw streams opened just after a failed environment was started again
    end while it said `starting`. Every stream opened then sees the new run through to `running`,
    none the earlier run's failure."""
    app = make_app(client, admin, "fails-when-asked", FAILS_WHEN_ASKED_APP)
    env = create_env(client, alice, application=app, env={"FAIL": "1"})
    assert events_of(client, alice, env["id"])[-1]["status"] == "failed"
    url = f"/api/v1/environments/{env['id']}"
    assert client.patch(url, headers=alice, json={"env": {"FAIL": "0"}}).status_code == 200
    assert client.post(f"{url}/start", headers=alice).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streams = list(pool.map(lambda _: events_of(client, alice, env["id"]), range(8)))
    for events in streams:
        assert [e["status"] for e in events if e["status"] in ("failed", "stopped")] == [], events
        assert events[-1]["status"] == "running", events


def test_stop_start_restart_keep_every_choice(
    client: TestClient, admin: dict[str, str], alice: dict[str, str], cleanup: None
) -> None:
    probe = make_app(client, admin, "probe", PROBE_APP)
    storage_id = make_bucket(client, alice)
    assert client.put("/api/v1/settings/env-vars/PROJECT", headers=alice, json={"value": "litebird"}).status_code in (
        200,
        201,
    )
    assert client.put(
        "/api/v1/settings/secret-files/token.txt", headers=alice, content=b"s3cr3t",
        params={},
    ).status_code in (200, 201)  # fmt: skip
    env = create_env(
        client, alice, application=probe, preset="standard", env={"RUN_LABEL": "first"},
        mounts=[{"storage_id": storage_id, "mount_path": "/data"}],
    )  # fmt: skip
    running = wait_status(client, alice, env["id"], "running")
    seen = client.get(running["url"] + "data/seen.json", headers=alice).json()
    assert seen["PROJECT"] == "litebird" and seen["RUN_LABEL"] == "first" and seen["secret"] == "s3cr3t"
    # the bucket really is at its mount path: the file is an object of the bucket
    objects = client.get(f"/api/v1/storages/{storage_id}/objects", headers=alice).json()["objects"]
    assert [o["key"] for o in objects] == ["seen.json"]

    stopped = client.post(f"/api/v1/environments/{env['id']}/stop", headers=alice).json()
    assert stopped["status"] == "stopped" and stopped["url"] is None
    assert client.get(running["url"], headers=alice).status_code == 404

    started = client.post(f"/api/v1/environments/{env['id']}/start", headers=alice)
    assert started.status_code == 200, started.text
    again = wait_status(client, alice, env["id"], "running")
    restarted = client.post(f"/api/v1/environments/{env['id']}/restart", headers=alice).json()
    assert restarted["id"] == env["id"]
    after = wait_status(client, alice, env["id"], "running")
    for choice in ("preset", "cpu", "memory_mib", "mounts", "env", "application"):
        assert after[choice] == again[choice] == running[choice], choice
    assert client.get(after["url"] + "data/seen.json", headers=alice).json()["RUN_LABEL"] == "first"


def test_delete_removes_the_process_but_keeps_the_bucket(
    client: TestClient, alice: dict[str, str], cleanup: None
) -> None:
    storage_id = make_bucket(client, alice, {"keep.txt": b"data"})
    env = create_env(client, alice, mounts=[{"storage_id": storage_id, "mount_path": "/data"}])
    url = wait_status(client, alice, env["id"], "running")["url"]
    assert client.delete(f"/api/v1/environments/{env['id']}", headers=alice).status_code == 204
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).status_code == 404
    assert client.get(url, headers=alice).status_code == 404
    assert client.get(f"/api/v1/storages/{storage_id}/objects/keep.txt", headers=alice).content == b"data"


def test_environments_are_private(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], cleanup: None
) -> None:
    env = create_env(client, alice)
    wait_status(client, alice, env["id"], "running")
    assert client.get("/api/v1/environments", headers=bob).json()["items"] == []
    for method, suffix in (("GET", ""), ("POST", "/stop"), ("POST", "/start"), ("POST", "/restart"),
                           ("DELETE", ""), ("POST", "/activity"), ("GET", "/logs"), ("GET", "/events")):  # fmt: skip
        response = client.request(method, f"/api/v1/environments/{env['id']}{suffix}", headers=bob)
        assert response.status_code == 404, (method, suffix, response.text)
    assert client.get(f"/api/v1/environments/authorize?environment_id={env['id']}", headers=bob).status_code == 404
    assert client.get(f"/api/v1/environments/authorize?environment_id={env['id']}", headers=alice).status_code == 204
    assert client.get(f"/api/v1/environments/authorize?environment_id={env['id']}").status_code == 401
    # and alice's environment still runs
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["status"] == "running"


def test_the_ingress_check_gives_the_environment_the_request_without_the_control_planes_credentials(
    client: TestClient, alice: dict[str, str], cleanup: None
) -> None:
    """Behind ingress-nginx (`auth-response-headers: Cookie,Authorization`), the check's answer
    replaces the request's own headers on their way to the pod: the application (and any package in
    it) never sees its owner's session or tokens, which would act on everything of theirs (and, for
    an administrator, on everyone's), as the control plane's own proxy never shows them."""
    env = create_env(client, alice)
    wait_status(client, alice, env["id"], "running")
    url = f"/api/v1/environments/authorize?environment_id={env['id']}"
    session = alice["Authorization"].removeprefix("Bearer ")
    by_cookie = client.get(url, headers={"Cookie": f"_xsrf=2|abc; cmbcluster_session={session}; theme=dark"})
    assert by_cookie.status_code == 204, by_cookie.text
    assert by_cookie.headers["cookie"] == "_xsrf=2|abc; theme=dark" and by_cookie.headers["authorization"] == ""
    by_token = client.get(url, headers=alice)
    assert by_token.status_code == 204 and by_token.headers["authorization"] == ""
    assert session not in str(by_token.headers)


def test_the_ingress_check_answers_what_ingress_nginx_can_show_for_a_stopped_or_anothers_environment(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    """ingress-nginx takes 2xx for yes, 401 and 403 for no (401 sends the browser to enter), and shows
    any other answer as its 500 page: the owner of a stopped environment, or anyone else under path
    routing, got "Internal Server Error". Asked directly (a script), the check still answers 404."""
    env = create_env(client, alice)
    running = wait_status(client, alice, env["id"], "running")
    check = f"/api/v1/environments/authorize?environment_id={env['id']}"
    page = {"X-Original-URL": f"{LOCAL}{running['url']}", "X-Original-Method": "GET"}
    assert client.get(check, headers={**alice, **page}).status_code == 204
    assert client.get(check, headers={**bob, **page}).status_code == 401
    assert client.get(check, headers=bob).status_code == 404
    assert client.post(f"/api/v1/environments/{env['id']}/stop", headers=alice).status_code == 200
    assert client.get(check, headers={**alice, **page}).status_code == 401
    assert client.get(check, headers=alice).status_code == 404


def test_enter_sends_the_owner_to_an_environment_on_this_host_and_others_to_sign_in_or_404(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where an ingress sends a browser without access (``auth-signin``). An environment served on
    the control plane's own host needs no ticket: the session cookie reaches it."""
    from cmbcluster import webui

    env = create_env(client, alice)
    running = wait_status(client, alice, env["id"], "running")
    enter = f"/api/v1/environments/{env['id']}/enter"
    page = f"{LOCAL}{running['url']}files/?x=1&y=2"
    cookie = {"Cookie": f"cmbcluster_session={alice['Authorization'].removeprefix('Bearer ')}"}
    owner = client.get(enter, params={"next": page}, headers=cookie, follow_redirects=False)
    assert owner.status_code == 303 and owner.headers["location"] == page  # the page asked for, as it was
    elsewhere = client.get(enter, params={"next": "https://evil.example/"}, headers=cookie, follow_redirects=False)
    assert elsewhere.headers["location"] == f"{LOCAL}{running['url']}"  # never a redirect off the environment
    monkeypatch.setattr(webui, "ui_available", lambda: True)
    assert client.get(enter, params={"next": page}, follow_redirects=False).status_code == 401  # a script
    anonymous = client.get(enter, params={"next": page}, headers={"Accept": "text/html"}, follow_redirects=False)
    assert anonymous.status_code == 303  # a browser: to sign in
    back = f"{enter}?next={quote(page, safe='')}"  # the sign-in page comes back here
    assert anonymous.headers["location"] == f"/signin/?next={quote(back, safe='')}"
    bobs = {"Cookie": f"cmbcluster_session={bob['Authorization'].removeprefix('Bearer ')}"}
    assert client.get(enter, headers=bobs, follow_redirects=False).status_code == 404
    assert client.post(f"/api/v1/environments/{env['id']}/stop", headers=alice).status_code == 200
    stopped = client.get(enter, params={"next": page}, headers=cookie, follow_redirects=False)
    assert stopped.status_code == 303  # the web UI offers a start, then comes back here for the page
    assert stopped.headers["location"] == f"/environments/?resume={env['id']}&next={quote(page, safe='')}"
    monkeypatch.setattr(webui, "ui_available", lambda: False)
    no_ui = client.get(enter, headers=cookie, follow_redirects=False)
    assert no_ui.status_code == 409 and "not running" in no_ui.json()["message"]


def test_an_environments_ticket_is_for_that_environment_once_and_for_a_minute(
    client: TestClient, alice: dict[str, str]
) -> None:
    from cmbcluster.errors import AuthenticationFailed
    from cmbcluster.services import environment_entry as entry

    context = client.app.state.context  # type: ignore[attr-defined]
    tickets = context.sealer(entry.TICKET_PURPOSE)
    now = utcnow()
    with context.sessions() as db:
        ticket = entry.issue_ticket(tickets, "e1", "cmbs_token", now=now)
        for forged in (
            "",
            "x",
            ticket[:-2],
            entry.issue_ticket(context.sealer(entry.COOKIE_PURPOSE), "e1", "t", now=now),
        ):
            with pytest.raises(AuthenticationFailed, match="not valid"):
                entry.redeem_ticket(db, tickets, "e1", forged, now=now)
        with pytest.raises(AuthenticationFailed, match="not valid"):
            entry.redeem_ticket(db, tickets, "e2", ticket, now=now)  # for another environment
        with pytest.raises(AuthenticationFailed, match="expired"):
            entry.redeem_ticket(db, tickets, "e1", ticket, now=now + dt.timedelta(seconds=61))
        assert entry.redeem_ticket(db, tickets, "e1", ticket, now=now) == "cmbs_token"
        with pytest.raises(AuthenticationFailed, match="used already"):
            entry.redeem_ticket(db, tickets, "e1", ticket, now=now)
    cookies = context.sealer(entry.COOKIE_PURPOSE)
    value = entry.environment_cookie(cookies, "e1", "cmbs_token")
    assert entry.session_of_cookie(cookies, "e1", value) == "cmbs_token"
    assert entry.session_of_cookie(cookies, "e2", value) is None
    assert entry.session_of_cookie(tickets, "e1", value) is None  # a cookie is no ticket, nor the reverse
    assert entry.session_of_cookie(cookies, "e1", ticket) is None


def on_a_host_of_its_own(client: TestClient, headers: dict[str, str]) -> tuple[str, str]:
    """A running environment of ``headers``'s user, as host routing serves it: its ``url`` column set to
    ``https://env-<id>.envs.example.org/`` in the database (the local backend serves it on the control
    plane's host, which would need no ticket), so ``enter`` and the check take the cross-host branch.
    Its id and its origin."""
    env_id = create_env(client, headers)["id"]
    wait_status(client, headers, env_id, "running")
    origin = f"https://env-{env_id}.envs.example.org"
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    with context.sessions() as db:
        db.get(Environment, env_id).url = f"{origin}/"  # type: ignore[union-attr]
        db.commit()
    return env_id, origin


def as_a_browser(headers: dict[str, str]) -> dict[str, str]:
    """What a browser signed in as ``headers``'s user sends the control plane: the session cookie."""
    return {"Cookie": f"cmbcluster_session={headers['Authorization'].removeprefix('Bearer ')}"}


def environment_cookie_of(client: TestClient, headers: dict[str, str], env_id: str, origin: str) -> str:
    """The environment's cookie (``name=value``) its owner's browser gets through ``enter`` and a ticket."""
    entered = client.get(f"/api/v1/environments/{env_id}/enter", params={"next": f"{origin}/lab"},
                         headers=as_a_browser(headers), follow_redirects=False)  # fmt: skip
    assert entered.status_code == 303, entered.text
    redeemed = client.get(f"/api/v1/environments/authorize?environment_id={env_id}",
                          headers={"X-Original-URL": entered.headers["location"]})  # fmt: skip
    assert redeemed.status_code == 204, redeemed.text
    return str(redeemed.headers["set-cookie"]).split(";")[0]


def test_a_page_of_another_site_cannot_act_in_my_environment_with_my_cookie(
    client: TestClient, alice: dict[str, str], cleanup: None
) -> None:
    """The ingress's check is a GET whatever the request (``auth-method: GET``; nginx names the request's
    own method in ``X-Original-Method``), and it answers JupyterLab's own token as ``Authorization``, with
    which JupyterLab skips its XSRF and origin checks (token-authenticated requests): the check is the only
    guard. A page of another origin that the browser counts as the same site (another environment's host,
    any other host of the domain: SameSite=Lax sends the cookie) posting a form to the environment, or
    opening a WebSocket to its terminal, must be refused (403, which ingress-nginx answers), as the control
    plane's own proxy refuses them. Found by an outside tester: the check let both through (204)."""
    env_id, origin = on_a_host_of_its_own(client, alice)
    check = f"/api/v1/environments/authorize?environment_id={env_id}"
    own_cookie = environment_cookie_of(client, alice, env_id, origin)
    sibling = "https://env-0123456789abcdef0123456789abcdef.envs.example.org"
    for headers in (
        {"X-Original-Method": "POST", "Origin": sibling, "X-Original-URL": f"{origin}/api/terminals"},
        {"Origin": sibling, "X-Original-URL": f"{origin}/terminals/websocket/1"},  # a WebSocket handshake
        {"X-Original-Method": "PUT", "Origin": "null", "X-Original-URL": f"{origin}/api/contents/a.py"},
        {"X-Original-Method": "POST", "Referer": f"{sibling}/x", "X-Original-URL": f"{origin}/api/kernels"},
        # neither header: from no page (a docs-only trial), refused as the API refuses a cookie change
        {"X-Original-Method": "POST", "X-Original-URL": f"{origin}/api/kernels"},
    ):
        refused = client.get(check, headers={"Cookie": own_cookie, **headers})
        assert refused.status_code == 403, (headers, refused.status_code)
    # the environment's own pages: changes with its Origin, and navigations (no Origin) go through
    same_origin = {"X-Original-Method": "POST", "Origin": origin, "X-Original-URL": f"{origin}/api/kernels"}
    assert client.get(check, headers={"Cookie": own_cookie, **same_origin}).status_code == 204
    assert client.get(check, headers={"Cookie": own_cookie, "X-Original-URL": f"{origin}/lab"}).status_code == 204
    # a script's bearer token is sent by no browser on its own: no origin to check
    assert client.get(check, headers={**alice, "Origin": sibling, "X-Original-Method": "POST"}).status_code == 204


def test_behind_an_ingress_on_the_control_planes_host_a_page_of_another_site_cannot_act_with_my_session(
    client: TestClient, alice: dict[str, str], cleanup: None
) -> None:
    """Path routing (the environment under the control plane's own host): the same check with the session
    cookie. A form posted or a WebSocket opened by a page of another origin is refused (403)."""
    env_id = create_env(client, alice)["id"]
    running = wait_status(client, alice, env_id, "running")
    check = f"/api/v1/environments/authorize?environment_id={env_id}"
    page = f"{LOCAL}{running['url']}"
    cookie = as_a_browser(alice)
    for headers in (
        {"X-Original-Method": "POST", "Origin": "https://other.example.org", "X-Original-URL": f"{page}api/x"},
        {"Origin": "https://other.example.org", "X-Original-URL": f"{page}terminals/websocket/1"},
    ):
        assert client.get(check, headers={**cookie, **headers}).status_code == 403, headers
    ours = {"X-Original-Method": "POST", "Origin": LOCAL, "X-Original-URL": f"{page}api/x"}
    assert client.get(check, headers={**cookie, **ours}).status_code == 204


@pytest.mark.xfail(strict=True, reason="login CSRF into another's environment: left open, docs/operators/security.md")
def test_a_ticket_another_user_asked_for_does_not_sign_my_browser_in_to_their_environment(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], cleanup: None
) -> None:
    """Login CSRF: Bob asks ``enter`` for a ticket to his own environment (with his session, or his API
    token from a server of his, any number of times) and sends Alice the address with it. Her browser,
    which never went through ``enter``, then gets Bob's environment cookie: it is signed in to Bob's
    environment, where his pages run in her browser as the same site as her own environments' hosts
    (see the test above) and can pass for her own JupyterLab. A ticket must only sign in the browser that
    asked for it. NOT FIXED (found by an outside tester): binding a ticket to the browser needs something
    of that browser's on the environment's host before it goes to ``enter`` (a cookie the check sets with
    its 401), which depends on ingress-nginx passing that cookie on with its redirect to auth-signin."""
    bobs_env, bobs_origin = on_a_host_of_its_own(client, bob)
    entered = client.get(f"/api/v1/environments/{bobs_env}/enter", params={"next": f"{bobs_origin}/lab"},
                         headers=bob, follow_redirects=False)  # fmt: skip
    assert entered.status_code == 303, entered.text
    # Alice's browser follows the link: it sends the environment's host nothing (no cookie of that host)
    client.cookies.clear()
    alices_browser = client.get(f"/api/v1/environments/authorize?environment_id={bobs_env}",
                                headers={"X-Original-URL": entered.headers["location"]})  # fmt: skip
    assert alices_browser.status_code == 401 and "set-cookie" not in alices_browser.headers


@pytest.mark.parametrize(
    "next_page",
    [
        "https://[::1",  # not a URL: urlsplit raises
        "https://env.envs.example.org\uff0fevil.example/",  # a fullwidth solidus, '/' under NFKC: urlsplit raises
    ],
)
def test_enter_takes_a_malformed_page_for_the_environments_own_address(
    client: TestClient, alice: dict[str, str], next_page: str, cleanup: None
) -> None:
    """``next`` is any text (a link anyone can send): one Python cannot parse as a URL is the
    environment's own address, as one of another host is, never an internal error (it was a 500)."""
    env_id, origin = on_a_host_of_its_own(client, alice)
    entered = client.get(f"/api/v1/environments/{env_id}/enter", params={"next": next_page},
                         headers=as_a_browser(alice), follow_redirects=False)  # fmt: skip
    assert entered.status_code == 303, entered.text
    assert entered.headers["location"].startswith(f"{origin}/?cmbcluster_ticket=")


def test_the_check_takes_an_address_it_cannot_parse_for_one_without_a_ticket(
    client: TestClient, alice: dict[str, str], cleanup: None
) -> None:
    """``X-Original-URL`` carries the browser's ``Host`` as nginx got it: one Python cannot parse
    signs in with the cookie (or not at all: 401), never an internal error, which ingress-nginx
    answers 500 (it was)."""
    env_id, origin = on_a_host_of_its_own(client, alice)
    own_cookie = environment_cookie_of(client, alice, env_id, origin)
    check = f"/api/v1/environments/authorize?environment_id={env_id}"
    address = {"X-Original-URL": "https://[env/?cmbcluster_ticket=x"}
    assert client.get(check, headers={"Cookie": own_cookie, **address}).status_code == 204
    client.cookies.clear()
    assert client.get(check, headers=address).status_code == 401


def test_over_https_a_planted_plain_name_environment_cookie_signs_no_one_in(
    client: TestClient, bob: dict[str, str], cleanup: None
) -> None:
    """Over https the environment's cookie is ``__Host-cmbcluster_environment``, which only the
    environment's host can set. A cookie of the plain name can come from any host of the domain
    (``Domain=envs.example.org``): Bob plants the value his own environment's check answered him, and
    every browser that visits his environment is signed in to it as him, with no ticket to expire. Only
    the ``__Host-`` name is read there, as for the session cookie."""
    env_id, origin = on_a_host_of_its_own(client, bob)
    own_cookie = environment_cookie_of(client, bob, env_id, origin)
    assert own_cookie.startswith("__Host-cmbcluster_environment=")
    planted = own_cookie.removeprefix("__Host-")
    check = f"/api/v1/environments/authorize?environment_id={env_id}"
    client.cookies.clear()
    assert client.get(check, headers={"Cookie": planted, "X-Original-URL": f"{origin}/"}).status_code == 401
    assert client.get(check, headers={"Cookie": own_cookie, "X-Original-URL": f"{origin}/"}).status_code == 204


@pytest.mark.parametrize("escape", ["../../api/v1/auth/me", "%2e%2e/%2E%2e/signin/", "..%5c..%5capi/v1/auth/me"])
def test_enter_keeps_the_browser_inside_the_environments_prefix(
    client: TestClient, alice: dict[str, str], escape: str, cleanup: None
) -> None:
    """Path routing (the environment under the control plane's host): ``next`` starts with the
    environment's prefix, but its dot segments (``..``, also escaped or with backslashes, which
    browsers take for slashes) would take the browser out of it. Such an address is the environment's
    own (it was sent on as it was: the control plane's pages, not the environment's)."""
    env_id = create_env(client, alice)["id"]
    own = f"{LOCAL}{wait_status(client, alice, env_id, 'running')['url']}"
    entered = client.get(f"/api/v1/environments/{env_id}/enter", params={"next": f"{own}{escape}"},
                         headers=as_a_browser(alice), follow_redirects=False)  # fmt: skip
    assert entered.status_code == 303 and entered.headers["location"] == own


def test_bob_cannot_mount_alice_bucket(client: TestClient, alice: dict[str, str], bob: dict[str, str]) -> None:
    storage_id = make_bucket(client, alice)
    response = client.post(
        "/api/v1/environments", headers=bob,
        json={"application": "files", "mounts": [{"storage_id": storage_id, "mount_path": "/data"}]},
    )  # fmt: skip
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"application": "no-such-app"}, 404, "application"),
        ({"application": "files", "preset": "gigantic"}, 400, "preset"),
        ({"application": "files", "cpu": 512, "memory_mib": 1024}, 400, ""),
        ({"application": "files", "env": {"1BAD": "x"}}, 400, ""),
        ({"application": "files", "env": {"PATH": "/evil"}}, 400, "reserved"),
        ({"application": "files", "env": {"JUPYTER_TOKEN": "mine"}}, 400, "set by the application's launch"),
        ({"application": "files", "mounts": [{"storage_id": "nope", "mount_path": "/data"}]}, 404, "bucket"),
        ({"application": "files", "cpu": "lots"}, 422, ""),
        ({"application": "files", "name": "x" * 101}, 422, ""),
        # shown to administrators: an override or a control would disguise it (found by an outsider)
        ({"application": "files", "name": "a\u202eb"}, 400, "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ({"application": "files", "name": "bell\u0007"}, 400, "U+0007"),
        ({}, 422, ""),
        # a misspelt field was ignored: the environment started without the bucket, or writable (found by
        # an outsider); every other JSON body of the API refuses fields it does not know
        ({"application": "files", "mount": [{"storage_id": "x"}]}, 422, "mount: Extra inputs are not permitted"),
        ({"application": "files", "mounts": [{"storage_id": "x", "readonly": True}]}, 422, "readonly"),
        # JSON's own types only: "yes" or 1 was taken for true, true for the number 1, "2" for 2
        ({"application": "files", "start": "no"}, 422, "start: Input should be a valid boolean"),
        ({"application": "files", "mounts": [{"storage_id": "x", "read_only": 1}]}, 422, "read_only"),
        ({"application": "files", "cpu": True, "memory_mib": 1024}, 422, "cpu"),
        ({"application": "files", "cpu": "2", "memory_mib": 1024}, 422, "cpu"),
    ],
)
def test_bad_input_is_a_clear_4xx(
    client: TestClient, alice: dict[str, str], body: dict[str, Any], status: int, message: str
) -> None:
    response = client.post("/api/v1/environments", headers=alice, json=body)
    assert response.status_code == status, response.text
    assert message in response.text
    assert client.get("/api/v1/environments", headers=alice).json()["items"] == []  # nothing half-created


def test_an_edit_refuses_a_variable_the_launch_sets(client: TestClient, alice: dict[str, str]) -> None:
    env = create_env(client, alice, start=False, env={"RUN_LABEL": "first"})
    for name in ("JUPYTER_TOKEN", "PORT", "CMBCLUSTER_BASE_PATH"):
        edited = client.patch(f"/api/v1/environments/{env['id']}", headers=alice, json={"env": {name: "mine"}})
        assert edited.status_code == 400, edited.text
        assert "set by the application's launch" in edited.json()["message"] and name in edited.json()["message"]
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["env"] == {"RUN_LABEL": "first"}


def test_bad_mount_paths(client: TestClient, alice: dict[str, str]) -> None:
    storage_id = make_bucket(client, alice)
    other = make_bucket(client, alice)
    for mounts in (
        [{"storage_id": storage_id, "mount_path": "/"}],
        [{"storage_id": storage_id, "mount_path": "/data/../etc"}],
        [{"storage_id": storage_id, "mount_path": "relative"}],
        [{"storage_id": storage_id, "mount_path": "/a"}, {"storage_id": other, "mount_path": "/a"}],
    ):
        response = client.post("/api/v1/environments", headers=alice, json={"application": "files", "mounts": mounts})
        assert response.status_code in (400, 422), (mounts, response.text)
    # refused when chosen, not at the start as a failed environment (found by an outsider: a NUL or a
    # 300-byte folder name failed the start; a line break or an override became a folder in the home)
    for path, reason in (
        ("/home/user/a\x00b", "U+0000"),
        ("/data\nset", "U+000A"),
        ("/home/user/maps\u202egpj.exe", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ("/data/" + "x" * 256, "255 bytes"),
    ):
        for changed in (False, True):
            mounts = [{"storage_id": storage_id, "mount_path": path}]
            if changed:
                env = create_env(client, alice, start=False)
                response = client.patch(f"/api/v1/environments/{env['id']}", headers=alice, json={"mounts": mounts})
            else:
                response = client.post(
                    "/api/v1/environments", headers=alice, json={"application": "files", "mounts": mounts}
                )
            assert response.status_code == 400 and reason in response.json()["message"], (path, response.text)
    # a folder name in any script, and as long as a file name may be, is fine
    fine = [
        {"storage_id": storage_id, "mount_path": "/home/user/\u062f\u0627\u062f\u0647\u200c\u0647\u0627/" + "y" * 255}
    ]
    assert (
        client.post(
            "/api/v1/environments", headers=alice, json={"application": "files", "start": False, "mounts": fine}
        ).status_code
        == 201
    )


def test_per_user_limit(settings: CoreSettings) -> None:
    app = create_app(settings.model_copy(update={"max_environments_per_user": 1}))
    with serving(app) as client:
        user = dev_sign_in(client, "ada@example.org")
        first = create_env(client, user)
        response = client.post("/api/v1/environments", headers=user, json={"application": "files"})
        assert response.status_code == 409 and "limit is 1" in response.json()["message"]
        assert len(client.get("/api/v1/environments", headers=user).json()["items"]) == 1  # nothing left behind
        idle = client.post("/api/v1/environments", headers=user, json={"application": "files", "start": False})
        assert idle.status_code == 201 and idle.json()["status"] == "stopped"
        assert client.post(f"/api/v1/environments/{idle.json()['id']}/start", headers=user).status_code == 409
        with app.state.context.sessions() as db:  # the refused start counts for nothing
            counted = db.execute(select(UsageInterval).where(UsageInterval.environment_id == idle.json()["id"]))
            assert counted.first() is None
        client.post(f"/api/v1/environments/{first['id']}/stop", headers=user)
        assert client.post(f"/api/v1/environments/{idle.json()['id']}/start", headers=user).status_code == 200


def test_server_wide_start_limit_is_429_with_retry_after(settings: CoreSettings) -> None:
    app = create_app(settings.model_copy(update={"max_concurrent_starts": 1}))
    with serving(app) as client:
        admin = dev_sign_in(client, "ada@example.org")
        slow = make_app(client, admin, "slow", SLOW_APP, "3")
        alice = dev_sign_in(client, "alice@example.org")
        first = create_env(client, alice, application=slow)
        assert first["status"] in ("pending", "starting")
        busy = client.post("/api/v1/environments", headers=admin, json={"application": "files"})
        assert busy.status_code == 429, busy.text
        assert int(busy.headers["retry-after"]) >= 1
        assert client.get("/api/v1/environments", headers=admin).json()["items"] == []  # nothing left behind
        wait_status(client, alice, first["id"], "running")
        assert client.post("/api/v1/environments", headers=admin, json={"application": "files"}).status_code == 201


def test_the_slots_of_starts_that_never_ended_stop_counting_once_expired(settings: CoreSettings) -> None:
    """A server that crashed while starting leaves start slots behind: once expired they count for
    nothing, neither against the server-wide limit nor against a start of their own environment."""
    app = create_app(settings.model_copy(update={"max_concurrent_starts": 1}))
    with serving(app) as client:
        ada = dev_sign_in(client, "ada@example.org")
        crashed, other = (create_env(client, ada, start=False) for _ in range(2))

        def left_behind(expired: bool) -> None:
            with app.state.context.sessions() as db:
                expires = utcnow() + dt.timedelta(minutes=-1 if expired else 10)
                db.add(StartSlot(environment_id=crashed["id"], expires_at=expires))
                db.commit()

        left_behind(expired=False)  # still within its start timeout: the server is full
        assert client.post(f"/api/v1/environments/{other['id']}/start", headers=ada).status_code == 429
        with app.state.context.sessions() as db:
            db.execute(delete(StartSlot))
            db.commit()
        left_behind(expired=True)
        assert client.post(f"/api/v1/environments/{other['id']}/start", headers=ada).status_code == 200
        wait_status(client, ada, other["id"], "running")
        client.post(f"/api/v1/environments/{other['id']}/stop", headers=ada)
        left_behind(expired=True)  # and the environment it was left by starts again
        started = client.post(f"/api/v1/environments/{crashed['id']}/start", headers=ada)
        assert started.status_code == 200, started.text
        wait_status(client, ada, crashed["id"], "running")


def test_a_request_with_a_body_signs_the_caller_in_once(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request guard signs in before reading a body; the route uses that caller (a burst of
    creates must not pay for two sign-in queries each)."""
    from cmbcluster.services import sessions

    calls: list[str] = []
    authenticate = sessions.authenticate

    def counted(db: Any, token: str, **options: Any) -> Any:
        calls.append(token)
        return authenticate(db, token, **options)

    monkeypatch.setattr(sessions, "authenticate", counted)
    created = create_env(client, alice, name="once")
    assert created["owner"]["email"] == "alice@example.org"
    assert len(calls) == 1
    renamed = client.patch(f"/api/v1/environments/{created['id']}", headers=alice, json={"name": "x"})
    assert renamed.status_code == 409 and len(calls) == 2  # running: refused, still one sign-in
    assert "before changing its name" in renamed.json()["message"]  # what was asked, not its size


def test_a_database_busy_while_signing_in_before_the_body_is_a_503_not_a_400(
    client: TestClient, alice: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request guard signs in as the route starts reading the body, inside FastAPI's body
    parsing, which answered any error there as 400 "the request body could not be read": a client
    told its valid request is malformed would never retry. A busy database is a 503 as on any
    route; anything else a 500 (logged), never a 400."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from cmbcluster.services import sessions

    def busy(db: Any, token: str, **options: Any) -> Any:
        raise OperationalError("SELECT ...", {}, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr(sessions, "authenticate", busy)
    answer = client.post("/api/v1/environments", headers=alice, json={"application": "files", "start": False})
    assert answer.status_code == 503 and answer.json()["error"] == "busy", answer.text
    assert answer.headers["retry-after"] == "2"

    def broken(db: Any, token: str, **options: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(sessions, "authenticate", broken)
    answer = client.post("/api/v1/environments", headers=alice, json={"application": "files", "start": False})
    assert answer.status_code == 500 and answer.json()["error"] == "internal_error", answer.text


def _set(client: TestClient, env_id: str, **values: Any) -> None:
    with client.app.state.context.sessions() as db:  # type: ignore[attr-defined]
        env = db.get(Environment, env_id)
        for key, value in values.items():
            setattr(env, key, value)
        db.commit()


def test_idle_environments_are_warned_then_stopped(client: TestClient, alice: dict[str, str], cleanup: None) -> None:
    context = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice)
    wait_status(client, alice, env["id"], "running")
    idle_minutes = context.config.core.idle_timeout_minutes
    # activity a little less than the idle timeout ago: within the warning window
    _set(client, env["id"], last_activity_at=utcnow() - dt.timedelta(minutes=idle_minutes - 5))
    report = Reconciler(context).reconcile()
    assert report.warned == [env["id"]]
    warned = client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()
    assert warned["shutdown_warning"] is True
    # a heartbeat postpones the stop and clears the warning
    assert client.post(f"/api/v1/environments/{env['id']}/activity", headers=alice).status_code == 204
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["shutdown_warning"] is False
    _set(client, env["id"], last_activity_at=utcnow() - dt.timedelta(minutes=idle_minutes + 1))
    report = Reconciler(context).reconcile()
    assert report.culled == [env["id"]]
    stopped = client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()
    assert stopped["status"] == "stopped" and "without activity" in stopped["status_message"]


def test_maximum_uptime_stops_the_environment(client: TestClient, alice: dict[str, str], cleanup: None) -> None:
    context = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice)
    wait_status(client, alice, env["id"], "running")
    _set(client, env["id"], shutdown_at=utcnow() - dt.timedelta(seconds=1))
    Reconciler(context).reconcile()
    stopped = client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()
    assert stopped["status"] == "stopped" and "maximum uptime" in stopped["status_message"]


def test_reconcile_marks_vanished_processes_and_removes_orphans(
    client: TestClient, alice: dict[str, str], cleanup: None
) -> None:
    context = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice)
    wait_status(client, alice, env["id"], "running")
    state = json.loads((context.config.core.data_dir / "compute" / f"{env['id']}.json").read_text())
    os.killpg(state["pid"], signal.SIGKILL)  # the process dies behind our back
    orphan = uuid.uuid4().hex
    context.compute.start(
        EnvironmentSpec(environment_id=orphan, user=UserRef(id="nobody"), image="x",
                        command=(sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"))
    )  # fmt: skip
    time.sleep(0.2)
    report = Reconciler(context).reconcile()
    assert report.orphans_removed == [orphan]
    assert env["id"] in report.marked_stopped
    ghost = client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()
    assert ghost["status"] == "failed" and "-9" in ghost["status_message"]  # killed: the exit status says so
    assert {s.environment_id for s in context.compute.list_managed()} <= {env["id"]}


def test_an_environment_stopped_by_someone_else_ends_stopped_and_starts_again(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Kubernetes a running environment's pod can be deleted by someone else (an eviction, a node
    drain, kubectl): the pass first sees it stopping, then gone. It was recorded "stopping" and
    stayed so for good, and a start was refused as "already stopping" (an outsider's trial)."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice, start=True)
    wait_status(client, alice, env["id"], "running")
    url = f"/api/v1/environments/{env['id']}"
    for reported in ([EnvironmentStatus(environment_id=env["id"], phase=EnvironmentPhase.STOPPING)], []):
        with monkeypatch.context() as patched:
            patched.setattr(context.compute, "list_managed", lambda: reported)  # noqa: B023 - called here
            Reconciler(context).reconcile()
    gone = client.get(url, headers=alice).json()
    assert gone["status"] == "stopped" and "gone" in gone["status_message"], gone
    assert client.post(f"{url}/start", headers=alice).status_code == 200
    wait_status(client, alice, env["id"], "running")


def test_a_start_during_a_reconcile_pass_is_not_stopped_by_what_it_listed_before(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass lists the backend, then reads the records: a start in between (the listing has the
    stopped run, the record a new one) was stopped and its new process killed (under load, an
    environment started again in the browser tests ended 'stopped')."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice, start=True)
    wait_status(client, alice, env["id"], "running")
    assert client.post(f"/api/v1/environments/{env['id']}/stop", headers=alice).status_code == 200
    list_managed = context.compute.list_managed

    def listed_then_started() -> Any:
        listed = list_managed()
        assert client.post(f"/api/v1/environments/{env['id']}/start", headers=alice).status_code == 200
        wait_status(client, alice, env["id"], "running")
        return listed

    with monkeypatch.context() as patched:
        patched.setattr(context.compute, "list_managed", listed_then_started)
        Reconciler(context).reconcile()
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["status"] == "running"
    assert context.compute.status(env["id"]).phase == EnvironmentPhase.RUNNING


def reserved_not_handed_over(context: AppContext, environment_id: str) -> EnvironmentSpec:
    """What reserve_start leaves before launch hands the start over: the record pending, and the
    spec launch would send."""
    with context.sessions() as db:
        row = db.get(Environment, environment_id)
        assert row is not None
        row.status, row.desired_state, row.started_at = "pending", "running", utcnow()
        db.commit()
        spec = environments.build_spec(db, context, row)
        db.commit()
    return spec


def test_the_fast_pass_takes_a_previous_runs_stop_for_no_news_of_a_start_not_yet_handed_over(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between reserving a start (the record pending) and handing it to the backend, the backend
    still reports the previous run's stop: the fast pass (every second) must not end the start."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice, start=True)
    wait_status(client, alice, env["id"], "running")
    assert client.post(f"/api/v1/environments/{env['id']}/stop", headers=alice).status_code == 200
    assert context.compute.status(env["id"]).phase == EnvironmentPhase.STOPPED
    spec = reserved_not_handed_over(context, env["id"])
    Reconciler(context).refresh_transitional()
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["status"] == "pending"
    # Nor the previous run still going away (on Kubernetes a restart's start comes while the old pod,
    # of the same name, ends): recorded "stopping", the full pass then took the new pod for a
    # leftover and deleted it, and the restart stayed "stopping" for good (an outsider's trial).
    stopping = EnvironmentStatus(environment_id=env["id"], phase=EnvironmentPhase.STOPPING)
    with monkeypatch.context() as patched:
        patched.setattr(context.compute, "status", lambda environment_id: stopping)
        Reconciler(context).refresh_transitional()
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["status"] == "pending"
    context.compute.start(spec)
    wait_status(client, alice, env["id"], "running")
    # Past the grace, a stop is news again (on Kubernetes, an application that exited on its own).
    assert client.post(f"/api/v1/environments/{env['id']}/stop", headers=alice).status_code == 200
    _set(client, env["id"], status="pending", desired_state="running", started_at=utcnow() - dt.timedelta(minutes=2))
    Reconciler(context).refresh_transitional()
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["status"] == "stopped"


def test_a_start_the_backend_takes_during_a_reconcile_pass_is_left_to_the_fast_pass(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reserved before the listing (the record pending), handed to the backend after it: the listing
    still has the previous run's end, which is no news of this start."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice, start=True)
    wait_status(client, alice, env["id"], "running")
    assert client.post(f"/api/v1/environments/{env['id']}/stop", headers=alice).status_code == 200
    spec = reserved_not_handed_over(context, env["id"])
    list_managed = context.compute.list_managed

    def listed_then_handed_over() -> Any:
        listed = list_managed()
        context.compute.start(spec)
        return listed

    with monkeypatch.context() as patched:
        patched.setattr(context.compute, "list_managed", listed_then_handed_over)
        Reconciler(context).reconcile()
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["status"] != "stopped"
    assert context.compute.status(env["id"]).phase in (EnvironmentPhase.STARTING, EnvironmentPhase.RUNNING)
    wait_status(client, alice, env["id"], "running")  # recorded by the fast pass (every second)


@contextlib.contextmanager
def start_held_in_the_backend(context: AppContext, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The backend's start waits until the test lets it go, as a slow cluster call would; yields
    the event set once a start is inside the backend. On leaving, held starts are let go."""
    entered, release = threading.Event(), threading.Event()
    start = context.compute.start

    def held(spec: EnvironmentSpec) -> EnvironmentStatus:
        entered.set()
        assert release.wait(30)
        return start(spec)

    with monkeypatch.context() as patched:
        patched.setattr(context.compute, "start", held)
        try:
            yield entered
        finally:
            release.set()


def in_thread(call: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("while_starting", ["stop", "delete"])
def test_a_stop_or_delete_sent_while_a_start_is_handed_over_is_not_lost(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch, while_starting: str
) -> None:
    """Start, then stop (or delete) before the backend has answered the start: the stop's own
    backend call finds nothing yet to stop, so the start must not go on to run unseen."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice, start=False)
    url = f"/api/v1/environments/{env['id']}"
    with start_held_in_the_backend(context, monkeypatch) as entered:
        starting, answer = in_thread(lambda: client.post(url + "/start", headers=alice))
        assert entered.wait(10)
        if while_starting == "stop":
            stopped = client.post(url + "/stop", headers=alice)
            assert stopped.status_code == 200 and stopped.json()["desired_state"] == "stopped"
        else:
            assert client.delete(url, headers=alice).status_code == 204
    starting.join(30)
    assert answer[0].status_code == (200 if while_starting == "stop" else 404), answer[0].text
    if while_starting == "stop":
        after = client.get(url, headers=alice).json()
        assert (after["status"], after["desired_state"]) == ("stopped", "stopped")
        assert context.compute.status(env["id"]).phase in (EnvironmentPhase.STOPPED, EnvironmentPhase.MISSING)
    else:
        assert env["id"] not in {status.environment_id for status in context.compute.list_managed()}


def test_a_start_sent_while_a_stop_finishes_wins_and_the_stop_answers_it(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop a stopped environment; a start (another tab) is reserved and handed over while the stop is
    still finishing. The start came later: the environment runs, its record is the start's alone (no
    stop message or stop time), and the stop answers it as it is now."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice, start=False)
    url = f"/api/v1/environments/{env['id']}"
    entered, release = threading.Event(), threading.Event()
    stop = context.compute.stop

    def stop_then_wait(environment_id: str) -> None:
        stop(environment_id)
        entered.set()
        assert release.wait(30)

    monkeypatch.setattr(context.compute, "stop", stop_then_wait)
    stopping, answer = in_thread(lambda: client.post(url + "/stop", headers=alice))
    assert entered.wait(10)
    monkeypatch.setattr(context.compute, "stop", stop)
    started = client.post(url + "/start", headers=alice)
    assert started.status_code == 200 and started.json()["desired_state"] == "running", started.text
    release.set()
    stopping.join(30)
    stopped = answer[0].json()
    assert answer[0].status_code == 200, stopped
    assert stopped["desired_state"] == "running" and stopped["status"] in environments.ACTIVE_STATUSES
    assert stopped["status_message"] != "stopped by its owner" and stopped["stopped_at"] is None
    running = wait_status(client, alice, env["id"], "running")
    assert running["stopped_at"] is None
    assert context.compute.status(env["id"]).phase == EnvironmentPhase.RUNNING


def test_a_stop_under_way_shows_as_stopping_and_a_start_meanwhile_says_so(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an outsider's trial: while an application took its seconds to exit, the list and
    the page said "running" to the user who had just pressed Stop, and Start answered "already
    running"."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice)
    wait_status(client, alice, env["id"], "running")
    url = f"/api/v1/environments/{env['id']}"
    entered, release = threading.Event(), threading.Event()
    stop = context.compute.stop

    def slow_exit(environment_id: str) -> None:
        entered.set()
        assert release.wait(30)
        stop(environment_id)

    monkeypatch.setattr(context.compute, "stop", slow_exit)
    stopping, answer = in_thread(lambda: client.post(url + "/stop", headers=alice))
    try:
        assert entered.wait(10)
        assert client.get(url, headers=alice).json()["status"] == "stopping"
        listed = {e["id"]: e for e in client.get("/api/v1/environments", headers=alice).json()["items"]}
        assert listed[env["id"]]["status"] == "stopping"
        again = client.post(url + "/start", headers=alice)
        assert again.status_code == 409
        assert again.json()["message"].endswith("is stopping: start it again once it has stopped")
    finally:
        release.set()
        stopping.join(30)
    assert answer[0].status_code == 200 and answer[0].json()["status"] == "stopped", answer[0].text


def test_a_stop_whose_environment_is_deleted_meanwhile_is_a_404_not_a_500(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop and delete at once: the delete removes the record while the stop waits on the backend."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice)
    wait_status(client, alice, env["id"], "running")
    stop = context.compute.stop

    def stop_while_deleted(environment_id: str) -> None:
        stop(environment_id)
        with context.sessions() as db:  # the delete request, done first
            db.execute(delete(Environment).where(Environment.id == environment_id))
            db.commit()

    monkeypatch.setattr(context.compute, "stop", stop_while_deleted)
    answer = client.post(f"/api/v1/environments/{env['id']}/stop", headers=alice)
    assert answer.status_code == 404 and "deleted while it was being stopped" in answer.json()["message"]


def test_a_start_taken_back_whose_record_is_deleted_meanwhile_leaves_nothing(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start; a delete records its intent (the start then takes itself back) and removes the record
    while the start stops what it started: the start answers 404, and nothing of it runs."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice, start=False)
    url = f"/api/v1/environments/{env['id']}"
    stop = context.compute.stop

    def stop_while_deleted(environment_id: str) -> None:
        stop(environment_id)
        with context.sessions() as db:
            db.execute(delete(Environment).where(Environment.id == environment_id))
            db.commit()

    with start_held_in_the_backend(context, monkeypatch) as entered:
        starting, answer = in_thread(lambda: client.post(url + "/start", headers=alice))
        assert entered.wait(10)
        _set(client, env["id"], desired_state="stopped")  # the delete's first step
        monkeypatch.setattr(context.compute, "stop", stop_while_deleted)
    starting.join(30)
    assert answer[0].status_code == 404, answer[0].text
    assert env["id"] not in {status.environment_id for status in context.compute.list_managed()}


def test_a_delete_that_commits_while_a_start_records_its_status_leaves_nothing_running(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an outsider's trial: the start found the environment still wanted running, the
    delete (whose backend call had come before the start's) then removed the record, and the start's
    status write failed on the missing row: a 409, and the application ran on, owned by nobody,
    until the next reconcile pass."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice, start=False)
    apply_status = environments.apply_status  # type: ignore[attr-defined]  # the name launch calls

    def deleted_first(db: Any, row: Environment, status: EnvironmentStatus) -> bool:
        with context.sessions() as other:  # the delete request, committed now
            other.execute(delete(Environment).where(Environment.id == env["id"]))
            other.commit()
        return apply_status(db, row, status)

    monkeypatch.setattr(environments, "apply_status", deleted_first)
    answer = client.post(f"/api/v1/environments/{env['id']}/start", headers=alice)
    assert answer.status_code == 404, answer.text
    assert env["id"] not in {status.environment_id for status in context.compute.list_managed()}


def test_an_edit_sent_while_the_environment_starts_is_used_or_refused_never_shown_unused(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an outsider's trial: the edit checked the environment was stopped, a start was
    reserved and launched with the choices of before, then the edit was written and answered 200:
    the page showed variables (and buckets) the running environment did not have."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice, start=False, env={"FOO": "before"})
    url = f"/api/v1/environments/{env['id']}"
    checked, go_on = threading.Event(), threading.Event()
    validate_env = environments._validate_env

    def slow_validation(values: dict[str, str]) -> dict[str, str]:  # after the edit's status check
        checked.set()
        assert go_on.wait(30)
        return validate_env(values)

    launched: list[EnvironmentSpec] = []
    start = context.compute.start

    def recorded(spec: EnvironmentSpec) -> EnvironmentStatus:
        launched.append(spec)
        return start(spec)

    monkeypatch.setattr(environments, "_validate_env", slow_validation)
    monkeypatch.setattr(context.compute, "start", recorded)
    editing, edited = in_thread(lambda: client.patch(url, headers=alice, json={"env": {"FOO": "patched"}}))
    assert checked.wait(10)
    starting, started = in_thread(lambda: client.post(url + "/start", headers=alice))
    time.sleep(0.5)  # the start is reserved now, unless the edit holds it back
    go_on.set()
    editing.join(30)
    starting.join(30)
    assert started[0].status_code == 200, started[0].text
    shown = client.get(url, headers=alice).json()["env"]
    assert edited[0].status_code in (200, 409), edited[0].text
    assert launched[0].env["FOO"] == shown["FOO"]  # what the page shows is what runs


def decided_in_one_batch(
    context: AppContext, calls: list[Callable[[], str]], meanwhile: Callable[[], None] = lambda: None
) -> tuple[list[str], list[int]]:
    """Run ``calls`` (each reserving one start) at once, the first holding the start writer until
    every other is queued (and ``meanwhile`` has run): the others are then written in one batch.
    Returns each call's result, in order, and the size of each batch written."""
    from cmbcluster.db.engine import GroupCommit

    holding, release = threading.Event(), threading.Event()
    batches: list[int] = []
    Write = Callable[[list[environments.Reservation]], None]

    def held(write: Write, batch: list[environments.Reservation]) -> None:
        batches.append(len(batch))
        if len(batches) == 1:
            holding.set()
            assert release.wait(30)
        write(batch)

    class Held(GroupCommit[environments.Reservation]):
        def submit(self, item: environments.Reservation, write: Write) -> None:
            super().submit(item, functools.partial(held, write))

    group = context.__dict__["start_reservations"] = Held()
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        first = pool.submit(calls[0])
        assert holding.wait(30)
        rest = [pool.submit(call) for call in calls[1:]]
        deadline = time.monotonic() + 30
        while group.queued < len(rest) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert group.queued == len(rest)
        meanwhile()
        release.set()
        return [first.result(30)] + [future.result(30) for future in rest], batches


def test_starts_reserved_together_keep_every_limit_and_leave_nothing_of_the_refused(
    settings: CoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent starts are reserved several in one transaction (a group commit). Here 13 are
    decided together, in one batch: the server's 6 slots, 3 active environments a user, one start of
    an environment at a time; a refused create leaves no environment and no audit event. (Handing
    the start to the backend is not what is tested: it is skipped.)"""
    from cmbcluster.db.models import AuditEvent
    from cmbcluster.errors import LimitExceeded

    app = create_app(settings.model_copy(update={"max_concurrent_starts": 6, "max_environments_per_user": 3}))
    monkeypatch.setattr(environments, "launch", lambda db, context, env, **_: None)
    with serving(app) as client:
        context: AppContext = app.state.context
        names = ["alice", "bob", "carol", "dave"]
        for name in names:
            dev_sign_in(client, f"{name}@example.org")
        dave_env = create_env(client, dev_sign_in(client, "dave@example.org"), start=False)["id"]

        def start(name: str) -> str:
            with context.sessions() as db:
                user = db.execute(select(User).where(User.email == f"{name}@example.org")).scalar_one()
                try:
                    if name == "dave":
                        env = db.get(Environment, dave_env)
                        assert env is not None
                        environments.start(db, context, user, env)
                    else:
                        environments.create(db, context, user, environments.EnvironmentRequest("files"), start=True)
                except LimitExceeded as exc:
                    assert exc.retry_after is not None and exc.retry_after >= 1
                    return "busy"
                except Conflict as exc:
                    return "already starting" if "already starting" in exc.message else "user limit"
            return "started"

        jobs = [name for name in names[:3] for _ in range(4)] + ["dave", "dave"]
        outcomes, batches = decided_in_one_batch(context, [functools.partial(start, name) for name in jobs])
        assert batches == [1, 13]
        assert outcomes.count("started") == 6, outcomes
        with context.sessions() as db:
            pending = db.execute(select(Environment.user_id, Environment.id).where(Environment.status == "pending"))
            by_user: dict[str, int] = {}
            for user_id, _ in pending:
                by_user[user_id] = by_user.get(user_id, 0) + 1
            assert sum(by_user.values()) == 6 and max(by_user.values()) <= 3, by_user
            assert db.execute(select(func.count()).select_from(StartSlot)).scalar_one() == 6
            made = db.execute(select(func.count()).select_from(Environment)).scalar_one()
            audited = db.execute(
                select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "environment.created")
            ).scalar_one()
        dave = outcomes[-2:]
        assert dave.count("started") <= 1 and "user limit" not in dave
        assert made == 1 + outcomes.count("started") - dave.count("started")  # dave's, and the created ones
        assert audited == made


def test_a_start_the_database_refuses_fails_alone_in_its_batch(
    settings: CoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One create of a batch mounts a bucket deleted while it waited: the database refuses its rows
    (a foreign key), and that create alone fails (409: reload); the others of the batch start."""
    from cmbcluster.db.models import Storage

    app = create_app(settings.model_copy(update={"max_environments_per_user": 10}))
    monkeypatch.setattr(environments, "launch", lambda db, context, env, **_: None)
    with serving(app) as client:
        context: AppContext = app.state.context
        alice = dev_sign_in(client, "alice@example.org")
        doomed = make_bucket(client, alice)

        def create(mounts: bool) -> str:
            with context.sessions() as db:
                user = db.execute(select(User).where(User.email == "alice@example.org")).scalar_one()
                chosen = [environments.MountChoice(doomed, "/data")] if mounts else []
                request = environments.EnvironmentRequest("files", mounts=chosen)
                try:
                    environments.create(db, context, user, request, start=True)
                except IntegrityError:
                    return "refused"
            return "started"

        def delete_the_bucket_row() -> None:
            with context.sessions() as db:
                db.execute(delete(Storage).where(Storage.id == doomed))
                db.commit()

        calls: list[Callable[[], str]] = [functools.partial(create, i == 2) for i in range(5)]
        outcomes, batches = decided_in_one_batch(context, calls, delete_the_bucket_row)
    assert batches[:2] == [1, 4]
    assert outcomes == ["started", "started", "refused", "started", "started"]


def test_two_starts_of_one_environment_at_once_are_one_start_and_a_409(
    client: TestClient, alice: dict[str, str], cleanup: None
) -> None:
    """Both requests read the environment stopped; the second to reserve finds the slot taken."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice, start=False)
    with context.sessions() as first_db, context.sessions() as second_db:
        first, second = first_db.get(Environment, env["id"]), second_db.get(Environment, env["id"])
        assert first is not None and second is not None and second.status == "stopped"
        first_user, second_user = first_db.get(User, first.user_id), second_db.get(User, second.user_id)
        assert first_user is not None and second_user is not None
        environments.reserve_start(first_db, context, first_user, first)
        with pytest.raises(Conflict, match="is already starting"):
            environments.reserve_start(second_db, context, second_user, second)


def test_a_conflicting_write_is_a_409_naming_the_race(settings: CoreSettings) -> None:
    """Whatever route two requests race on, a write the database refuses is a conflict to reload."""
    app = create_app(settings)

    def raced() -> None:
        raise StaleDataError("UPDATE statement on table 'environments' expected to update 1 row(s); 0 were matched")

    app.add_api_route("/api/v1/raced", raced)
    with TestClient(app, base_url=LOCAL) as client:
        answer = client.get("/api/v1/raced")
    assert answer.status_code == 409 and answer.json()["error"] == "conflict", answer.text
    assert "reload it and try again" in answer.json()["message"]


def test_logs(client: TestClient, alice: dict[str, str], cleanup: None) -> None:
    env = create_env(client, alice)
    running = wait_status(client, alice, env["id"], "running")
    assert client.get(running["url"], headers=alice).status_code == 200
    logs = client.get(f"/api/v1/environments/{env['id']}/logs", headers=alice, params={"tail": 5}).json()["lines"]
    assert '"GET / HTTP/1.1" 200' in logs
    assert client.get(f"/api/v1/environments/{env['id']}/logs", headers=alice, params={"tail": 0}).status_code == 422


def test_a_stop_cut_off_by_a_crash_is_finished_and_is_never_a_failure(
    client: TestClient, alice: dict[str, str], cleanup: None
) -> None:
    """The stop's intent is written before the process is stopped: a control plane that dies in
    between leaves an environment the next reconcile stops (not a ghost 'running'), and while the
    process goes away nothing reads its exit as a failure."""
    context = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice)
    wait_status(client, alice, env["id"], "running")
    with context.sessions() as db:  # what a crash right after the intent leaves behind
        row = db.get(Environment, env["id"])
        row.desired_state = "stopped"
        db.commit()
    state = json.loads((context.config.core.data_dir / "compute" / f"{env['id']}.json").read_text())
    os.killpg(state["pid"], signal.SIGTERM)  # the process going away meanwhile
    time.sleep(0.3)
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["status"] == "stopping"  # not failed
    report = Reconciler(context).reconcile()
    assert env["id"] in report.stopped_leftovers
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["status"] == "stopped"


def test_a_start_a_crash_cut_short_before_its_launch_is_said_so_at_once_on_the_next_start_up(
    client: TestClient, alice: dict[str, str], cleanup: None
) -> None:
    """Found by an outsider's trial (SIGKILL mid-burst): reserved, never handed over, over an earlier
    run the embedded default keeps as stopped. The start-up pass gave it the grace of a start in
    flight: a minute of "pending" (its start refused as "already pending"), then "stopped" with no
    message and still wanted running."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    env = create_env(client, alice)
    wait_status(client, alice, env["id"], "running")
    assert client.post(f"/api/v1/environments/{env['id']}/stop", headers=alice).status_code == 200
    _set(client, env["id"], status="pending", desired_state="running", started_at=utcnow(),
         status_message="waiting to start")  # fmt: skip  # what the crash left
    assert env["id"] in Reconciler(context).reconcile(startup=True).marked_stopped
    after = client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()
    assert (after["status"], after["desired_state"]) == ("stopped", "stopped")
    assert after["status_message"] == "its start was cut short when the control plane stopped; start it again"
    assert client.post(f"/api/v1/environments/{env['id']}/start", headers=alice).status_code == 200


STUBBORN = """
import http.server, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # exits only when killed, after the stop's grace
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.BaseHTTPRequestHandler).serve_forever()
"""


@pytest.mark.parametrize("when", ["shutdown", "start-up after a crash"])
def test_environments_stopped_together_are_stopped_at_once_not_one_grace_after_another(
    client: TestClient, admin: dict[str, str], alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:  # fmt: skip
    """Found by an outsider's trial: nine applications slow to exit made a SIGTERM take 48 s (5 s
    each, in turn), past `docker stop`'s 10 s and Kubernetes' 30 s: the server was killed halfway;
    after a crash, the next start-up served only once it had stopped them one by one (25 s)."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    stubborn = make_app(client, admin, "stubborn", STUBBORN)
    ids = [create_env(client, alice, application=stubborn)["id"] for _ in range(3)]
    for env_id in ids:
        wait_status(client, alice, env_id, "running")
    stop, in_flight, most = context.compute.stop, [0], [0]
    lock = threading.Lock()

    def counted(environment_id: str) -> None:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            stop(environment_id)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(context.compute, "stop", counted)
    if when == "shutdown":
        assert sorted(environments.stop_with_control_plane(context)) == sorted(ids)
    else:  # stops a crash cut off (their intents written), finished by the start-up pass before serving
        for env_id in ids:
            _set(client, env_id, desired_state="stopped")
        assert sorted(Reconciler(context).reconcile(startup=True).stopped_leftovers) == sorted(ids)
    assert most[0] >= len(ids)  # all at once, each ignoring SIGTERM for the whole grace
    for env_id in ids:
        after = client.get(f"/api/v1/environments/{env_id}", headers=alice).json()
        message = "stopped with the server; start it again" if when == "shutdown" else "stopped"
        assert (after["status"], after["status_message"]) == ("stopped", message)
        assert context.compute.status(env_id).phase in (EnvironmentPhase.STOPPED, EnvironmentPhase.MISSING)


def test_the_fast_pass_records_a_report_only_on_the_run_it_was_read_for(
    client: TestClient, admin: dict[str, str], alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconcile loop's fast pass asked the backend, then wrote what it heard onto the record it
    had loaded: a restart recorded in between (a new run) got the previous run's end."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    slow = make_app(client, admin, "never-ready-2", "import time\ntime.sleep(3600)\n")
    env_id = create_env(client, alice, application=slow)["id"]
    wait_status(client, alice, env_id, "starting")

    def restarted_meanwhile(environment_id: str) -> EnvironmentStatus:
        _set(client, environment_id, status="starting", started_at=utcnow() + dt.timedelta(seconds=5))
        return EnvironmentStatus(environment_id=environment_id, phase=EnvironmentPhase.STOPPED)  # the old run's

    monkeypatch.setattr(context.compute, "status", restarted_meanwhile)
    Reconciler(context).refresh_transitional()
    with context.sessions() as db:
        row = db.get(Environment, env_id)
        assert row is not None and row.status == "starting"


def test_the_fast_pass_leaves_followed_starts_to_the_progress_hub_but_still_times_them_out(
    client: TestClient, admin: dict[str, str], alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 200 launch dialogs open, the hub reads and records those starts; the reconcile loop
    reading them again every second only doubled the work. Their start timeout still applies."""
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    slow = make_app(client, admin, "never-ready", "import time\ntime.sleep(3600)\n")
    env_id = create_env(client, alice, application=slow)["id"]
    asked: list[str] = []
    status = context.compute.status

    def counted(environment_id: str) -> EnvironmentStatus:
        asked.append(environment_id)
        return status(environment_id)

    monkeypatch.setattr(context.compute, "status", counted)

    Reconciler(context).refresh_transitional(followed={env_id})
    assert asked == []
    Reconciler(context).refresh_transitional()
    assert asked == [env_id]  # nobody follows it: the loop keeps it current

    _set(client, env_id, started_at=utcnow() - dt.timedelta(seconds=context.config.core.start_timeout_seconds + 1))
    Reconciler(context).refresh_transitional(followed={env_id})
    failed = client.get(f"/api/v1/environments/{env_id}", headers=alice).json()
    assert failed["status"] == "failed" and "did not start within" in failed["status_message"]


def test_a_route_whose_worker_finished_holds_no_database_connection(client: TestClient) -> None:
    """Blocking service code runs in a worker thread, which ends the transaction the service left
    open (a read, or a failure) before handing back, not the route once the event loop resumes it:
    under load that takes a while, and other workers take connections meanwhile. (A burst with
    more workers than the pool had to spare stopped the server: the event loop waited for a
    connection that only it could give back.)"""
    import anyio

    from cmbcluster.api.routes.environments import _in_worker

    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    pool = context.engine.pool

    def read(db: Any) -> str:
        db.execute(select(User.id)).all()  # begins a transaction, left open as a service may
        return "read"

    def fail(db: Any) -> None:
        db.execute(select(User.id)).all()
        raise Conflict("refused")

    async def routes() -> None:
        with context.sessions() as db:
            assert await _in_worker(db, context, read, db) == "read"
            assert not db.in_transaction() and wait_until_no_connection_is_out(pool) == 0
            with pytest.raises(Conflict):
                await _in_worker(db, context, fail, db)
            assert not db.in_transaction() and wait_until_no_connection_is_out(pool) == 0

    anyio.run(routes)


def test_reading_an_environment_while_another_writer_records_its_start_answers_what_was_recorded(
    client: TestClient, alice: dict[str, str], cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read records what the backend reports (the environment's page polls it). The progress hub,
    the reconcile loop or another replica may record the same change at the same moment: the
    second to open the usage interval was refused by the database, and the read answered 409
    (found in a fresh-clone run). It answers what was recorded."""
    import sqlite3

    from sqlalchemy import event

    env = create_env(client, alice)
    wait_status(client, alice, env["id"], "running")
    engine = client.app.state.context.engine  # type: ignore[attr-defined]
    database = engine.url.database
    with sqlite3.connect(database) as other:  # as recorded before the start was seen running
        interval = other.execute(
            "SELECT * FROM usage_intervals WHERE environment_id = ? AND end_s IS NULL", (env["id"],)
        ).fetchone()
        other.execute("DELETE FROM usage_intervals WHERE environment_id = ? AND end_s IS NULL", (env["id"],))
        other.execute("UPDATE environments SET status = 'pending' WHERE id = ?", (env["id"],))
    compute = client.app.state.context.compute  # type: ignore[attr-defined]
    starting = EnvironmentStatus(environment_id=env["id"], phase=EnvironmentPhase.STARTING, message="starting")
    monkeypatch.setattr(compute, "status", lambda environment_id: starting)
    fired: list[str] = []

    def other_writer_first(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # another writer records the same start between the read's check for an open interval and its own
        if statement.startswith("INSERT INTO usage_intervals") and not fired:
            fired.append(statement)
            with sqlite3.connect(database) as other:
                placeholders = ", ".join("?" * len(interval))
                other.execute(f"INSERT INTO usage_intervals VALUES ({placeholders})", interval)

    event.listen(engine, "before_cursor_execute", other_writer_first)
    try:
        answer = client.get(f"/api/v1/environments/{env['id']}", headers=alice)
    finally:
        event.remove(engine, "before_cursor_execute", other_writer_first)
    assert fired, "the read did not record the start: nothing raced"
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "pending"  # as recorded: the other writer's record is a test's
    with sqlite3.connect(database) as other:
        assert other.execute(
            "SELECT count(*) FROM usage_intervals WHERE environment_id = ? AND end_s IS NULL", (env["id"],)
        ).fetchone() == (1,)  # counted once
