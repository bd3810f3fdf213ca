"""/environments/<id>/: every environment's traffic through the control plane, for its owner only.

The environment here is a real process: a small Starlette application that checks the token the
proxy must send, streams, echoes what reaches it and speaks WebSocket.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect
from test_environments_api import create_env, make_bucket, wait_status

from cmbcluster.services.environments import ACTIVITY_WRITE_INTERVAL
from cmbcluster.testing.api import LOCAL

APPLICATION = r"""
import hashlib, json, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute

port, token, base = int(sys.argv[1]), sys.argv[2], sys.argv[3]
print("listening on port", port, "with token", token, flush=True)


def authorized(conn):
    return conn.headers.get("authorization") == "token " + token


async def echo(request):
    if not authorized(request):
        return Response("no token", status_code=403)
    body = await request.body()
    return JSONResponse({
        "method": request.method, "path": request.url.path, "raw_path": request.scope["raw_path"].decode(),
        "query": request.url.query, "cookies": request.cookies, "body": body.decode(),
        "headers": {k: v for k, v in request.headers.items() if k != "authorization"},
    })


async def download(request):
    size = int(request.query_params["bytes"])
    block = bytes(range(256)) * 256

    async def chunks():
        sent = 0
        while sent < size:
            part = block[: min(len(block), size - sent)]
            sent += len(part)
            yield part

    return StreamingResponse(chunks(), headers={"content-length": str(size)})


async def upload(request):
    digest, size = hashlib.sha256(), 0
    async for part in request.stream():
        digest.update(part)
        size += len(part)
    return JSONResponse({"size": size, "sha256": digest.hexdigest()})


async def cookies(request):
    response = JSONResponse({})
    response.set_cookie("cmbcluster_session", "planted-by-the-application")
    response.headers.append("set-cookie", "CMBCLUSTER_SESSION=planted-in-capitals; Path=/")
    response.headers.append("set-cookie", "=cmbcluster_session=planted-nameless; Path=/")
    response.set_cookie("app_state", "kept")
    # headers whose effect would reach the whole origin: a service worker over every path, sign-out
    response.headers["service-worker-allowed"] = "/"
    response.headers["clear-site-data"] = '"cookies"'
    response.headers["x-app"] = "kept"
    return response


async def moved(request):
    return RedirectResponse(base + "echo", status_code=302)


async def socket(websocket):
    if not authorized(websocket):
        await websocket.close(code=1008)
        return
    offered = websocket.scope.get("subprotocols") or [None]
    await websocket.accept(subprotocol=offered[0])
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "headers":
            await websocket.send_text(json.dumps(dict(websocket.headers)))
            continue
        if message.get("text") == "bye":
            await websocket.close(code=4001)
            return
        if message.get("text") is not None:
            await websocket.send_text("echo:" + message["text"])
        else:
            await websocket.send_bytes(message["bytes"][::-1])


app = Starlette(routes=[
    Route(base + "echo", echo, methods=["GET", "POST", "PUT", "DELETE"]),
    Route(base + "files/{name:path}", echo),
    Route(base + "download", download),
    Route(base + "upload", upload, methods=["PUT", "POST"]),
    Route(base + "cookies", cookies),
    Route(base + "moved", moved),
    WebSocketRoute(base + "socket", socket),
])
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


@pytest.fixture
def echo_app(client: TestClient, admin: dict[str, str], tmp_path: Path) -> str:
    """A catalog application that knows its base path and checks the token (both on its command line)."""
    script = tmp_path / "echo_app.py"
    script.write_text(APPLICATION)
    response = client.post(
        "/api/v1/applications",
        headers=admin,
        json={
            "slug": "echo", "name": "Echo", "image": "python:3.11-slim",
            "command": [sys.executable, str(script), "{port}", "{token}", "{base_url}"], "default_preset": "light",
        },
    )  # fmt: skip
    assert response.status_code == 201, response.text
    return "echo"


@pytest.fixture
def running(client: TestClient, alice: dict[str, str], echo_app: str) -> Iterator[dict[str, Any]]:
    env = create_env(client, alice, application=echo_app)
    body = wait_status(client, alice, env["id"], "running")
    for _ in range(100):  # running once its port accepts; uvicorn answers a moment later
        if client.get(f"{body['url']}echo", headers=alice).status_code == 200:
            break
        time.sleep(0.05)
    yield body


def app_token(client: TestClient, environment_id: str) -> str:
    upstream = client.app.state.context.compute.upstream(environment_id)  # type: ignore[attr-defined]
    assert upstream is not None
    return str(dict(upstream.headers)["Authorization"]).split(" ", 1)[1]


def test_the_owner_reaches_the_application_with_its_token_and_nothing_of_the_control_plane(
    client: TestClient, alice: dict[str, str], running: dict[str, Any]
) -> None:
    env_id = running["id"]
    assert running["url"] == f"/environments/{env_id}/"
    session = alice["Authorization"].removeprefix("Bearer ")
    client.cookies.set("cmbcluster_session", session)
    client.cookies.set("_xsrf", "the-applications-own")
    try:
        answer = client.post(
            f"/environments/{env_id}/echo?x=1&y=a%2Fb", content=b"hello", headers={"Authorization": f"Bearer {session}"}
        )
    finally:
        client.cookies.clear()
    assert answer.status_code == 200, answer.text  # the application saw its token: the proxy sent it
    seen = answer.json()
    assert seen["method"] == "POST" and seen["body"] == "hello"
    assert seen["path"] == f"/environments/{env_id}/echo" and seen["query"] == "x=1&y=a%2Fb"
    # a token in the address (a bookmark of an earlier start) is left out: JupyterLab reads it before
    # the proxy's header and refused the request (an outsider's trial)
    bookmarked = client.get(f"/environments/{env_id}/echo?token=earlier&x=1&tokens=2&tok%65n=old", headers=alice)
    assert bookmarked.status_code == 200 and bookmarked.json()["query"] == "x=1&tokens=2", bookmarked.text
    assert seen["cookies"] == {"_xsrf": "the-applications-own"}  # never the session cookie
    assert seen["headers"]["host"] == "127.0.0.1" and seen["headers"]["x-forwarded-proto"] == "http"
    assert session not in json.dumps(seen)
    # percent-encoding reaches the application as sent (JupyterLab's file paths hold %2F)
    encoded = client.get(f"/environments/{env_id}/files/a%2Fb%20c.ipynb", headers=alice).json()
    assert encoded["raw_path"] == f"/environments/{env_id}/files/a%2Fb%20c.ipynb"
    # the address without its final slash leads to it
    bare = client.get(f"/environments/{env_id}?next=1", headers=alice, follow_redirects=False)
    assert bare.status_code == 307 and bare.headers["location"] == f"/environments/{env_id}/?next=1"
    # an application cannot replace the control plane's session cookie
    planted = client.get(f"/environments/{env_id}/cookies", headers=alice)
    assert planted.status_code == 200
    set_cookies = planted.headers.get_list("set-cookie")
    assert [c.split(";")[0] for c in set_cookies] == ["app_state=kept"], set_cookies
    # nor reach past its own path: no service worker over the whole site, no clearing it (found by an
    # outsider's trial: a worker registered from an environment read the next user's answers)
    assert "service-worker-allowed" not in planted.headers and "clear-site-data" not in planted.headers
    assert planted.headers["x-app"] == "kept"
    # redirects come back as the application made them (it knows its base path)
    moved = client.get(f"/environments/{env_id}/moved", headers=alice, follow_redirects=False)
    assert moved.status_code == 302 and moved.headers["location"] == f"/environments/{env_id}/echo"


def test_the_application_sees_the_proxys_forwarding_facts_never_the_clients_claims(
    client: TestClient, alice: dict[str, str], running: dict[str, Any]
) -> None:
    """An application that reads Forwarded or X-Real-IP believed what the client said (found by an
    outsider); a WebSocket's X-Forwarded-* passed as the client sent them."""
    claims = {
        "Forwarded": "for=203.0.113.9;proto=https;host=bank.example", "X-Real-IP": "203.0.113.9",
        "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "bank.example",
        "X-Forwarded-Port": "443",
    }  # fmt: skip
    facts = {"x-forwarded-for": "testclient", "x-forwarded-proto": "http"}
    seen = client.get(f"{running['url']}echo", headers={**alice, **claims}).json()["headers"]
    assert "forwarded" not in seen and "x-real-ip" not in seen and "x-forwarded-port" not in seen
    assert {k: seen[k] for k in facts} == facts and seen["x-forwarded-host"] == "127.0.0.1"
    # (TestClient opens every WebSocket at ws://testserver, whatever its base URL)
    with client.websocket_connect(f"{running['url']}socket", headers={**alice, **claims}) as socket:
        socket.send_text("headers")
        handshake = json.loads(socket.receive_text())
    assert "forwarded" not in handshake and "x-real-ip" not in handshake and "x-forwarded-port" not in handshake
    assert {k: handshake[k] for k in facts} == facts and handshake["x-forwarded-host"] == "testserver"


def test_an_applications_cookies_reach_no_other_environment(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], echo_app: str, running: dict[str, Any]
) -> None:
    """The proxy keeps no cookies: what Alice's application sets goes to Alice's browser only, never
    along with Bob's requests to his own application (every loopback port is the same cookie host)."""
    bobs = wait_status(client, bob, create_env(client, bob, application=echo_app)["id"], "running")
    for _ in range(100):  # running once its port accepts; uvicorn answers a moment later
        if client.get(f"{bobs['url']}echo", headers=bob).status_code == 200:
            break
        time.sleep(0.05)
    set_by_alices = client.get(f"{running['url']}cookies", headers=alice)
    assert set_by_alices.status_code == 200 and "app_state=kept" in set_by_alices.headers["set-cookie"]
    client.cookies.clear()  # the test client is a browser too: it would send the cookie itself
    for url, headers in ((bobs["url"], bob), (running["url"], alice)):
        seen = client.get(f"{url}echo", headers=headers)
        assert seen.status_code == 200, seen.text
        assert seen.json()["cookies"] == {}  # only what each browser sends itself


def test_bodies_stream_both_ways(client: TestClient, alice: dict[str, str], running: dict[str, Any]) -> None:
    url = running["url"]
    size = 24 * 1024 * 1024 + 7
    digest = hashlib.sha256()
    received = 0
    with client.stream("GET", f"{url}download?bytes={size}", headers=alice) as response:
        assert response.status_code == 200 and response.headers["content-length"] == str(size)
        for chunk in response.iter_raw():
            digest.update(chunk)
            received += len(chunk)
    block = bytes(range(256)) * 256
    expected = hashlib.sha256((block * (size // len(block) + 1))[:size]).hexdigest()
    assert received == size and digest.hexdigest() == expected

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for _ in range(40):
            yield b"m" * 500_000

    uploaded = client.put(f"{url}upload", headers=alice, content=chunks())
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json() == {"size": 20_000_000, "sha256": hashlib.sha256(b"m" * 20_000_000).hexdigest()}
    # bodies are the application's business: no API body limit applies (2 MiB JSON)
    big = client.put(f"{url}upload", headers={**alice, "content-type": "application/json"}, content=b"1" * (2 << 20))
    assert big.status_code == 200 and big.json()["size"] == 2 << 20
    # and any media type, untouched (the API's JSON routes alone answer another one 415)
    for media_type in ("text/plain; charset=latin-1", "application/x-www-form-urlencoded", "application/x-anything"):
        typed = client.post(f"{url}echo", headers={**alice, "Content-Type": media_type}, content=b"a=1")
        assert typed.status_code == 200, (media_type, typed.text)
        assert typed.json()["headers"]["content-type"] == media_type and typed.json()["body"] == "a=1"


def test_websockets_pass_both_ways_with_the_subprotocol_and_close_code(
    client: TestClient, alice: dict[str, str], running: dict[str, Any]
) -> None:
    with client.websocket_connect(
        f"{running['url']}socket", headers=alice, subprotocols=["v1.kernel.websocket.jupyter.org"]
    ) as socket:
        accepted: object = socket.accepted_subprotocol
        assert accepted == "v1.kernel.websocket.jupyter.org"
        for i in range(20):
            socket.send_text(f"message {i}")
            assert socket.receive_text() == f"echo:message {i}"
        socket.send_bytes(b"\x00\x01\x02" * 1000)
        assert socket.receive_bytes() == (b"\x00\x01\x02" * 1000)[::-1]
        socket.send_text("bye")
        with pytest.raises(WebSocketDisconnect) as closed:
            socket.receive_text()
        assert closed.value.code == 4001  # the application's own close code


def test_nobody_else_gets_anything_but_404(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], admin: dict[str, str], running: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from cmbcluster import webui

    url = running["url"]
    for headers in (bob, admin):  # another user, even an administrator: exactly as for an unknown id
        other = client.get(f"{url}echo", headers=headers)
        assert other.status_code == 404 and other.json()["error"] == "not_found"
        with pytest.raises(WebSocketDenialResponse) as denied:
            with client.websocket_connect(f"{url}socket", headers=headers):
                pass
        assert denied.value.status_code == 404
    unknown = client.get(f"/environments/{'0' * 32}/echo", headers=alice)
    assert unknown.status_code == 404
    unsigned = client.get(f"{url}echo")
    assert unsigned.status_code == 401  # not signed in
    assert unsigned.json()["message"] == "sign in first: no session cookie or bearer token"
    assert client.get(f"{url}echo", headers={"Authorization": "Bearer cmbs_forged"}).status_code == 401
    garbage = client.get(f"{url}echo", headers={"Authorization": "Bearer garbage"})  # said as the API says it
    assert garbage.status_code == 401
    assert garbage.json()["message"].startswith("sign in first: the bearer token is not a CMBCluster session")
    with pytest.raises(WebSocketDenialResponse) as anonymous:
        with client.websocket_connect(f"{url}socket"):
            pass
    assert anonymous.value.status_code == 401
    # a page of another site cannot open a WebSocket with the owner's cookie
    client.cookies.set("cmbcluster_session", alice["Authorization"].removeprefix("Bearer "))
    try:
        with pytest.raises(WebSocketDenialResponse) as cross_site:
            with client.websocket_connect(f"{url}socket", headers={"Origin": "http://127.0.0.1:9999"}):
                pass
        assert cross_site.value.status_code == 403
        with pytest.raises(WebSocketDenialResponse) as unheaded_socket:  # no Origin: from no browser's page
            with client.websocket_connect(f"{url}socket"):
                pass
        assert unheaded_socket.value.status_code == 403
        # (TestClient opens every WebSocket at ws://testserver, whatever its base URL)
        with client.websocket_connect(f"{url}socket", headers={"Origin": "http://testserver"}) as socket:
            socket.send_text("same site")
            assert socket.receive_text() == "echo:same site"
        changed = client.post(f"{url}echo", headers={"Origin": "http://evil.example"}, content=b"x")
        assert changed.status_code == 403
        unheaded = client.post(f"{url}echo", content=b"x")  # neither Origin nor Referer: no page of ours
        assert unheaded.status_code == 403 and "neither Origin nor Referer" in unheaded.json()["message"]
        assert client.post(f"{url}echo", headers={"Origin": LOCAL}, content=b"x").status_code == 200
    finally:
        client.cookies.clear()
    # stopped: 404 for its owner too, HTTP and WebSocket
    assert client.post(f"/api/v1/environments/{running['id']}/stop", headers=alice).status_code == 200
    assert client.get(f"{url}echo", headers=alice).status_code == 404
    # a browser opening a bookmark of it goes to the web UI, which offers to start it and then opens
    # the page asked for; so for any other id (the web UI finds no such environment of theirs)
    monkeypatch.setattr(webui, "ui_available", lambda: True)
    page = {"Accept": "text/html,application/xhtml+xml"}
    for environment_id in (running["id"], "0" * 32):
        notebook = f"/environments/{environment_id}/lab/tree/maps/planck.ipynb?reset&a=1"
        opened = client.get(notebook, headers={**alice, **page}, follow_redirects=False)
        assert opened.status_code == 303
        resume = f"/environments/?resume={environment_id}&next={quote(notebook, safe='')}"
        assert opened.headers["location"] == resume
    # the address as the browser sent it, escapes and bytes that are no UTF-8 included (an outsider's trial)
    odd = f"/environments/{running['id']}/caf%C3%A9%20%ff/x"
    opened = client.get(odd, headers={**alice, **page}, follow_redirects=False)
    assert opened.headers["location"] == f"/environments/?resume={running['id']}&next={quote(odd, safe='')}"
    with pytest.raises(WebSocketDenialResponse) as stopped:
        with client.websocket_connect(f"{url}socket", headers=alice):
            pass
    assert stopped.value.status_code == 404


def test_over_https_a_websocket_signs_in_with_the_secure_session_cookie(
    client: TestClient, alice: dict[str, str], running: dict[str, Any]
) -> None:
    """Behind a proxy that ends TLS (the request's scheme from X-Forwarded-Proto, no public URL set),
    a browser holds the __Host- session cookie alone; JupyterLab's kernels are WebSockets (wss), and
    the check of which cookie counts read a WebSocket's address (wss://) as not https."""
    token = alice["Authorization"].removeprefix("Bearer ")
    client.cookies.set("__Host-cmbcluster_session", token)
    try:
        secure = f"wss://testserver{running['url']}socket"
        with client.websocket_connect(secure, headers={"Origin": "https://testserver"}) as socket:
            socket.send_text("over tls")
            assert socket.receive_text() == "echo:over tls"
        with pytest.raises(WebSocketDenialResponse) as plain:  # the __Host- cookie means nothing over ws://
            with client.websocket_connect(f"{running['url']}socket", headers={"Origin": "http://testserver"}):
                pass
        assert plain.value.status_code == 401
    finally:
        client.cookies.clear()


def test_a_script_reaches_its_environment_with_an_api_token_and_its_use_is_recorded(
    client: TestClient, alice: dict[str, str], running: dict[str, Any]
) -> None:
    """An API token signs in through the proxy as through the API: its use is recorded (at most once a
    minute, in the same transaction as the environment's activity), and the request goes through."""
    from cmbcluster.db.models import ApiToken, Environment

    made = client.post("/api/v1/settings/tokens", headers=alice, json={"name": "notebook script"})
    assert made.status_code == 201, made.text
    script = {"Authorization": f"Bearer {made.json()['token']}"}
    context = client.app.state.context  # type: ignore[attr-defined]
    with context.sessions() as db:  # both writes due: the token never used, the activity long ago
        env = db.get(Environment, running["id"])
        env.last_activity_at -= ACTIVITY_WRITE_INTERVAL * 2
        before = env.last_activity_at
        db.commit()
    for _ in range(3):
        answer = client.get(f"{running['url']}echo", headers=script)
        assert answer.status_code == 200, answer.text
    with context.sessions() as db:
        assert db.get(ApiToken, made.json()["id"]).last_used_at is not None
        assert db.get(Environment, running["id"]).last_activity_at > before


def test_the_applications_token_is_never_shown(
    client: TestClient, alice: dict[str, str], running: dict[str, Any]
) -> None:
    env_id = running["id"]
    token = app_token(client, env_id)
    shown = [
        client.get("/api/v1/environments", headers=alice).text,
        client.get(f"/api/v1/environments/{env_id}", headers=alice).text,
        client.get(f"/api/v1/environments/{env_id}/logs", headers=alice).text,
        client.get(f"/api/v1/environments/{env_id}/events", headers=alice).text,
    ]
    answer = client.get(f"{running['url']}echo", headers=alice)
    shown += [answer.text, json.dumps(dict(answer.headers))]
    assert all(token not in text for text in shown)
    assert "with token [token]" in shown[2]  # the application printed it: the output hides it


def test_traffic_counts_as_activity(client: TestClient, alice: dict[str, str], running: dict[str, Any]) -> None:
    from cmbcluster.db.models import Environment

    context = client.app.state.context  # type: ignore[attr-defined]
    with context.sessions() as db:
        env = db.get(Environment, running["id"])
        env.last_activity_at -= ACTIVITY_WRITE_INTERVAL * 2
        before = env.last_activity_at
        db.commit()
    assert client.get(f"{running['url']}echo", headers=alice).status_code == 200
    with context.sessions() as db:
        assert db.get(Environment, running["id"]).last_activity_at > before


def test_an_application_that_died_is_a_clear_502(
    client: TestClient, alice: dict[str, str], running: dict[str, Any]
) -> None:
    context = client.app.state.context  # type: ignore[attr-defined]
    state = json.loads((context.config.core.data_dir / "compute" / f"{running['id']}.json").read_text())
    upstream = context.compute.upstream(running["id"])
    os.killpg(int(state["pid"]), 9)
    time.sleep(0.2)
    context.compute.upstream = lambda environment_id: upstream  # as if the database had not noticed yet
    answer = client.get(f"{running['url']}echo", headers=alice)
    assert answer.status_code == 502 and answer.json()["error"] == "bad_gateway"
    with pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect(f"{running['url']}socket", headers=alice):
            pass
    assert denied.value.status_code == 502


def test_an_application_unaware_of_its_base_path_is_served_at_its_root(
    client: TestClient, alice: dict[str, str], tmp_path: Path
) -> None:
    """The Files application (Python's web server) knows nothing of /environments/<id>/: the proxy
    removes the prefix, and puts it back in its redirects."""
    storage_id = make_bucket(client, alice, {"maps/planck.txt": b"CMB temperature map"})
    env = create_env(client, alice, mounts=[{"storage_id": storage_id, "mount_path": "/home/user/data"}])
    url = wait_status(client, alice, env["id"], "running")["url"]
    assert client.get(f"{url}data/maps/planck.txt", headers=alice).text == "CMB temperature map"
    listing = client.get(url, headers=alice)
    assert listing.status_code == 200 and 'href="data/"' in listing.text
    moved = client.get(f"{url}data", headers=alice, follow_redirects=False)
    assert moved.status_code == 301 and moved.headers["location"] == f"/environments/{env['id']}/data/"


def test_a_request_the_proxy_cannot_pass_on_is_a_clear_400(
    client: TestClient, alice: dict[str, str], running: dict[str, Any]
) -> None:
    """Bad addresses and headers are the caller's mistake, said as such: never a 500, nor a 502 that
    blames the environment."""
    files = wait_status(client, alice, create_env(client, alice)["id"], "running")  # served at its root
    for env_id in (files["id"], running["id"]):
        # the id percent-encoded: routed by the decoded path, but the address as sent is not its prefix
        encoded = client.get(f"/environments/{env_id}%2f..%2f{'0' * 32}/", headers=alice)
        assert encoded.status_code == 400, encoded.text
        assert "percent-encoded" in encoded.json()["message"]
    twice = client.get(f"{running['url']}echo", headers=[*alice.items(), ("host", "a.example"), ("host", "b.example")])
    assert twice.status_code == 400 and twice.json()["error"] == "invalid_request", twice.text
    assert client.get(f"{running['url']}echo", headers=alice).status_code == 200  # the environment is fine


def test_paths_that_are_not_environments_stay_the_web_uis(client: TestClient) -> None:
    for path in ("/environments/", "/environments/index.txt", "/environments/not-an-id/x"):
        answer = client.get(path)
        assert answer.status_code != 401, path  # not taken by the proxy (which needs a signed-in caller)
