"""An outside attack run, each case a test: unverified addresses, replays, cross-site requests,
links planted in buckets, oversized bodies and headers, odd paths, error shapes, secrets at rest.

The token matrix itself is `cmbcluster.testing.auth.AuthProviderContract` (see test_oidc.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from cmbcluster.app import create_app
from cmbcluster.context import AppContext
from cmbcluster.db.models import AuditEvent, EnvVar, User, new_id
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in
from cmbcluster.testing.oidc import KeyServer
from cmbcluster.testing.process import ServeProcess, clean_environ, run_cli
from cmbcluster.text import shown_name

CLIENT_ID = "cmbcluster-attack"
ADMIN = "boss@example.org"


# -- an issuer that mints whatever the attacker wants ------------------------------------------------
@pytest.fixture
def keys() -> Iterator[KeyServer]:
    with KeyServer() as server:
        yield server


def oidc_app(settings: CoreSettings, keys: KeyServer, monkeypatch: pytest.MonkeyPatch, **env: str) -> FastAPI:
    monkeypatch.setenv("CMBCLUSTER_OIDC_ISSUER", keys.issuer)
    monkeypatch.setenv("CMBCLUSTER_OIDC_CLIENT_ID", CLIENT_ID)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return create_app(settings.model_copy(update={"auth_providers": ["oidc", "local"], "admin_emails": [ADMIN]}))


def exchange(client: TestClient, keys: KeyServer, sub: str, email: str, verified: bool) -> httpx.Response:
    token = keys.sign({"sub": sub, "aud": CLIENT_ID, "email": email, "email_verified": verified})
    response: httpx.Response = client.post("/api/v1/auth/exchange", json={"provider": "oidc", "token": token})
    return response


def test_an_unverified_admin_address_is_refused_by_default(
    settings: CoreSettings, keys: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(oidc_app(settings, keys, monkeypatch), base_url=LOCAL) as client:
        dev_sign_in(client, "first@example.org")  # the first user is the admin; the next is not
        refused = exchange(client, keys, "attacker", ADMIN, verified=False)
        assert refused.status_code == 401 and "not verified" in refused.json()["message"]
        assert exchange(client, keys, "boss", ADMIN, verified=True).json()["user"]["role"] == "admin"


def test_with_the_opt_out_an_unverified_address_signs_in_but_grants_nothing(
    settings: CoreSettings, keys: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = oidc_app(settings, keys, monkeypatch, CMBCLUSTER_OIDC_REQUIRE_VERIFIED_EMAIL="false")
    with TestClient(app, base_url=LOCAL) as client:
        dev_sign_in(client, "first@example.org")
        new = exchange(client, keys, "attacker", ADMIN, verified=False)
        assert new.status_code == 200 and new.json()["user"]["role"] == "user"
        # nor does it link to an existing account with that address
        dev_sign_in(client, "victim@example.org")
        linked = exchange(client, keys, "attacker-2", "victim@example.org", verified=False)
        assert linked.status_code == 409
        # and a verified sign-in is not linked to an account whose address was never verified
        squatted = exchange(client, keys, "real-boss", ADMIN, verified=True)
        assert squatted.status_code == 409 and "never verified" in squatted.json()["message"]


def test_the_generic_provider_trusts_only_the_claim_the_operator_names(
    settings: CoreSettings, keys: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Entra ID tenant through the generic provider: the address is in ``upn``, vouched for by
    ``xms_edov``; a token carrying ``email_verified: true`` (which Entra never vouches with) is no proof."""
    app = oidc_app(
        settings, keys, monkeypatch, CMBCLUSTER_OIDC_EMAIL_CLAIM="upn", CMBCLUSTER_OIDC_EMAIL_VERIFIED_CLAIM="xms_edov",
        CMBCLUSTER_OIDC_GROUPS_CLAIM="wids",
    )  # fmt: skip
    with TestClient(app, base_url=LOCAL) as client:
        dev_sign_in(client, "first@example.org")

        def sign_in(sub: str, **claims: object) -> httpx.Response:
            token = keys.sign({"sub": sub, "aud": CLIENT_ID, **claims})
            response: httpx.Response = client.post("/api/v1/auth/exchange", json={"provider": "oidc", "token": token})
            return response

        forged = sign_in("attacker", upn=ADMIN, email_verified=True)
        assert forged.status_code == 401 and "not verified" in forged.json()["message"]
        boss = sign_in("boss", upn=ADMIN, xms_edov=True)
        assert boss.status_code == 200 and boss.json()["user"]["email"] == ADMIN
        assert boss.json()["user"]["role"] == "admin"
        member = sign_in("member", upn="lin@example.org", xms_edov="true", wids=["cmbcluster-admins"])
        assert member.json()["user"]["role"] == "admin"  # groups read from the claim named


def test_an_issuer_that_never_vouches_must_not_be_required_to(tmp_path: Path) -> None:
    """No claim to vouch with, and verified addresses required: nobody could sign in. ``config check``
    says so, naming both variables, instead of a server that refuses everyone."""
    env = {
        **clean_environ(), "CMBCLUSTER_DATA_DIR": str(tmp_path / "data"), "CMBCLUSTER_AUTH_PROVIDERS": "oidc",
        "CMBCLUSTER_OIDC_ISSUER": "https://login.example.org", "CMBCLUSTER_OIDC_CLIENT_ID": CLIENT_ID,
        "CMBCLUSTER_OIDC_EMAIL_VERIFIED_CLAIM": "",
    }  # fmt: skip
    refused = run_cli("config", "check", env=env, cwd=tmp_path)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    said = refused.stdout + refused.stderr
    assert "CMBCLUSTER_OIDC_EMAIL_VERIFIED_CLAIM is empty" in said and "Traceback" not in said
    assert "CMBCLUSTER_OIDC_REQUIRE_VERIFIED_EMAIL=false" in said
    opted_out = run_cli("config", "check", env={**env, "CMBCLUSTER_OIDC_REQUIRE_VERIFIED_EMAIL": "false"}, cwd=tmp_path)
    assert opted_out.returncode == 0, opted_out.stdout + opted_out.stderr
    for name, value, said in (
        ("CMBCLUSTER_OIDC_ISSUER", "", "CMBCLUSTER_OIDC_ISSUER must be the issuer's URL"),
        ("CMBCLUSTER_OIDC_ISSUER", "login.microsoftonline.com", "CMBCLUSTER_OIDC_ISSUER must be the issuer's URL"),
        ("CMBCLUSTER_OIDC_CLIENT_ID", " ", "CMBCLUSTER_OIDC_CLIENT_ID is empty"),
    ):  # blank or not a URL: said at once, not as a failed discovery at the first sign-in
        wrong = run_cli("config", "check", env={**env, "CMBCLUSTER_OIDC_REQUIRE_VERIFIED_EMAIL": "false", name: value},
                        cwd=tmp_path)  # fmt: skip
        assert wrong.returncode == 1 and said in wrong.stdout + wrong.stderr, wrong.stdout + wrong.stderr


def test_a_changed_address_changes_no_role_and_is_audited(
    settings: CoreSettings, keys: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(oidc_app(settings, keys, monkeypatch), base_url=LOCAL) as client:
        dev_sign_in(client, "first@example.org")
        assert exchange(client, keys, "lin", "lin@example.org", verified=True).json()["user"]["role"] == "user"
        changed = exchange(client, keys, "lin", ADMIN, verified=True)  # the same account, another address
        assert changed.status_code == 200 and changed.json()["user"]["role"] == "user"
        context: AppContext = client.app.state.context  # type: ignore[attr-defined]
        with context.sessions() as db:
            event = db.execute(select(AuditEvent).where(AuditEvent.action == "user.email_changed")).scalar_one()
            assert event.detail["previous"] == "lin@example.org" and event.detail["reported"] == ADMIN


def test_a_sign_in_state_completes_one_sign_in_only(client: TestClient) -> None:
    """Replaying the callback with the login cookie (both captured) does not sign in twice, even
    though the development provider would accept its code again within two minutes."""
    login = client.get("/api/v1/auth/local/login", follow_redirects=False)
    fields = {k: v[0] for k, v in parse_qs(urlsplit(login.headers["location"]).query).items()}
    login_cookie = client.cookies.get("cmbcluster_login")
    submitted = client.post(
        "/api/v1/auth/local/form",
        data={**{k: fields[k] for k in ("redirect_uri", "state", "nonce", "code_challenge")}, "email": "a@b.org"},
        follow_redirects=False,
    )
    callback = urlsplit(submitted.headers["location"])
    first = client.get(f"{callback.path}?{callback.query}", follow_redirects=False)
    assert first.status_code == 303
    client.cookies.clear()
    client.cookies.set("cmbcluster_login", login_cookie or "", path="/api/v1/auth")
    replay = client.get(f"{callback.path}?{callback.query}", follow_redirects=False)
    assert replay.status_code == 401 and "already" in replay.json()["message"]


def test_an_id_token_buys_one_session(settings: CoreSettings, keys: KeyServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(oidc_app(settings, keys, monkeypatch), base_url=LOCAL) as client:
        extras: list[dict[str, object]] = [{"jti": "token-1"}, {}]
        for extra in extras:  # with a token id, and without (then its hash)
            claims = {"sub": "s", "aud": CLIENT_ID, "email": "s@example.org", "email_verified": True, **extra}
            token = keys.sign(claims)
            body = {"provider": "oidc", "token": token}
            assert client.post("/api/v1/auth/exchange", json=body).status_code == 200
            again = client.post("/api/v1/auth/exchange", json=body)
            assert again.status_code == 401 and "already" in again.json()["message"]


def test_the_same_origin_check_compares_the_scheme(client: TestClient, alice: dict[str, str]) -> None:
    client.cookies.set("cmbcluster_session", alice["Authorization"].removeprefix("Bearer "))
    # an address Python cannot parse (an unclosed IPv6 bracket) is no page of ours either: it was a 500
    for origin in (
        "https://127.0.0.1",
        "http://127.0.0.1:8443",
        "null",
        "http://evil.example",
        "http://[",
        "http://[::1",
    ):
        refused = client.post("/api/v1/storages", json={"display_name": "x"}, headers={"Origin": origin})
        assert refused.status_code == 403, origin
    by_referer = client.post("/api/v1/storages", json={"display_name": "x"}, headers={"Referer": "http://[/storage/"})
    assert by_referer.status_code == 403
    same_site = client.post("/api/v1/storages", json={"display_name": "x"}, headers={"Origin": LOCAL})
    assert same_site.status_code == 201


def test_a_cookie_change_without_origin_or_referer_is_refused(client: TestClient, alice: dict[str, str]) -> None:
    """Browsers send Origin with every POST, PUT, PATCH and DELETE; a request carrying the session cookie
    and neither header is no page of ours (scripts use bearer tokens), so it changes nothing."""
    scripted = client.post("/api/v1/storages", json={"display_name": "data"}, headers=alice)  # a script: no Origin
    assert scripted.status_code == 201
    bucket = f"/api/v1/storages/{scripted.json()['id']}"
    client.cookies.set("cmbcluster_session", alice["Authorization"].removeprefix("Bearer "))
    for method, path, body in (
        ("POST", "/api/v1/storages", {"json": {"display_name": "x"}}),
        ("PUT", f"{bucket}/objects/notes.txt", {"content": b"hello"}),
        ("PATCH", "/api/v1/admin/users/x", {"json": {"role": "admin"}}),  # refused before the route looks
        ("DELETE", bucket, {}),
    ):
        refused = client.request(method, path, **body)
        assert refused.status_code == 403, (method, refused.text)
        message = refused.json()["message"]
        assert "neither Origin nor Referer" in message and "bearer token" in message, message
    (kept,) = client.get("/api/v1/storages").json()["storages"]  # reading needs no Origin
    assert kept["display_name"] == "data" and kept["object_count"] == 0
    by_referer = client.post("/api/v1/storages", json={"display_name": "x"}, headers={"Referer": f"{LOCAL}/storage/"})
    assert by_referer.status_code == 201


def test_behind_a_tls_proxy_the_public_url_scheme_is_ours(settings: CoreSettings) -> None:
    """TLS ends at the ingress: the server is reached over http, the browser's origin is https."""
    app = create_app(settings.model_copy(update={"public_url": "https://cmb.example.org"}))
    with TestClient(app, base_url="https://cmb.example.org") as browser:
        token = dev_sign_in(browser, "alice@example.org")["Authorization"].removeprefix("Bearer ")
    with TestClient(app, base_url="http://cmb.example.org") as client:
        client.cookies.set("__Host-cmbcluster_session", token)  # the browser's, from https
        ok = client.post("/api/v1/storages", json={"display_name": "x"}, headers={"Origin": "https://cmb.example.org"})
        assert ok.status_code == 201
        plain = client.post(
            "/api/v1/storages", json={"display_name": "y"}, headers={"Origin": "http://cmb.example.org"}
        )
        assert plain.status_code == 403


# -- after sign-in: only our own places ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("next_path", "expected"),
    [
        ("/storage", "/storage"),
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
        # an environment on a host of its own comes back through its enter path (a relative one)
        ("https://env-1.envs.example.org/lab", "/"),
        ("/api/v1/environments/1/enter?next=https%3A%2F%2Fenv-1.envs.example.org%2Flab",
         "/api/v1/environments/1/enter?next=https%3A%2F%2Fenv-1.envs.example.org%2Flab"),
        ("https://cmb.example.org/environments/1/", "https://cmb.example.org/environments/1/"),
        ("javascript:alert(1)", "/"),
        ("https://cmb.example.org.evil.example/", "/"),
    ],
)  # fmt: skip
def test_next_is_a_path_or_the_public_host_never_another(settings: CoreSettings, next_path: str, expected: str) -> None:
    # an old CMBCLUSTER_COOKIE_DOMAIN let any host under it be a next address
    core = settings.model_copy(update={"public_url": "https://cmb.example.org", "cookie_domain": "example.org"})
    with TestClient(create_app(core), base_url="https://cmb.example.org") as client:
        login = client.get("/api/v1/auth/local/login", params={"next": next_path}, follow_redirects=False)
        fields = {k: v[0] for k, v in parse_qs(urlsplit(login.headers["location"]).query).items()}
        submitted = client.post(
            "/api/v1/auth/local/form",
            data={**{k: fields[k] for k in ("redirect_uri", "state", "nonce", "code_challenge")}, "email": "a@b.org"},
            follow_redirects=False,
        )
        callback = urlsplit(submitted.headers["location"])
        done = client.get(f"{callback.path}?{callback.query}", follow_redirects=False)
        assert done.headers["location"] == expected


def test_the_ingress_sends_a_browser_without_access_to_the_control_planes_enter() -> None:
    """ingress-nginx adds ``next=<the address asked for>``, escaped (the address's own ``&`` and
    ``#`` cut it short when the annotation wrote ``?next=$request_uri`` itself)."""
    from cmbcluster.kubernetes.routing import Exposure

    exposure = Exposure(
        routing="ingress", public_url="https://cmb.example.org", auth_url="http://cp/api/v1/environments/authorize"
    )
    annotations = exposure.ingress("env-1", "1", {})["metadata"]["annotations"]
    assert (
        annotations["nginx.ingress.kubernetes.io/auth-signin"] == "https://cmb.example.org/api/v1/environments/1/enter"
    )
    assert annotations["nginx.ingress.kubernetes.io/auth-signin-redirect-param"] == "next"


# -- links planted in a bucket, through the API -------------------------------------------------------
def test_a_link_in_a_bucket_does_not_reach_the_servers_files(
    client: TestClient, alice: dict[str, str], settings: CoreSettings
) -> None:
    storage = client.post("/api/v1/storages", json={"display_name": "mine"}, headers=alice).json()
    folder = next(p for p in (settings.data_dir / "buckets").iterdir() if not p.name.startswith("."))
    (folder / "key").symlink_to(settings.data_dir / "secret_key")
    (folder / "data").symlink_to(settings.data_dir, target_is_directory=True)
    objects = f"/api/v1/storages/{storage['id']}/objects"
    assert client.get(f"{objects}/key", headers=alice).status_code == 404
    assert client.get(f"{objects}/data/secret_key", headers=alice).status_code == 404
    assert client.head(f"{objects}/data/secret_key", headers=alice).status_code == 404
    assert client.get(objects, headers=alice).json()["objects"] == []
    assert client.get(objects, params={"prefix": "data/"}, headers=alice).json()["objects"] == []
    assert client.put(f"{objects}/data/planted.txt", content=b"x", headers=alice).status_code == 409
    assert not (settings.data_dir / "planted.txt").exists()
    assert client.delete(f"{objects}/data/secret_key", headers=alice).status_code in (204, 404)
    assert client.post(f"{objects}/delete", json={"keys": ["data/secret_key"]}, headers=alice).status_code == 200
    assert (settings.data_dir / "secret_key").exists()


def test_a_file_name_over_255_bytes_is_a_clear_400(client: TestClient, alice: dict[str, str]) -> None:
    storage = client.post("/api/v1/storages", json={"display_name": "mine"}, headers=alice).json()
    objects = f"/api/v1/storages/{storage['id']}/objects"
    long = "é" * 128  # 256 bytes in UTF-8
    answers = [
        client.put(f"{objects}/dir/{long}", content=b"x", headers=alice),
        client.get(f"{objects}/{long}", headers=alice),
        client.head(f"{objects}/{long}/x", headers=alice),
        client.delete(f"{objects}/{long}", headers=alice),
        client.get(objects, params={"prefix": f"{long}/"}, headers=alice),
        client.post(f"{objects}/delete", json={"keys": [long]}, headers=alice),
    ]
    assert [a.status_code for a in answers] == [400] * 6
    assert "255 bytes" in answers[0].json()["message"]


# -- sizes: bodies and headers --------------------------------------------------------------------------
def test_a_json_body_over_the_limit_is_refused_at_once(client: TestClient, alice: dict[str, str]) -> None:
    big = b'{"display_name": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    answer = client.post("/api/v1/storages", content=big, headers={**alice, "Content-Type": "application/json"})
    assert answer.status_code == 413 and answer.json()["error"] == "payload_too_large"
    # no Content-Length (chunked): counted while read
    chunked = client.post(
        "/api/v1/storages",
        content=iter([big[:1024], big[1024:]]),
        headers={**alice, "Content-Type": "application/json"},
    )
    assert chunked.status_code == 413


def test_a_body_without_credentials_is_refused_before_it_is_read(client: TestClient) -> None:
    json_body = {"Content-Type": "application/json"}
    answer = client.post("/api/v1/storages", content=b'{"display_name": "x"}', headers=json_body)
    assert answer.status_code == 401 and answer.json()["error"] == "authentication_failed"


def _raw_request(port: int, head: bytes, body_part: bytes = b"") -> tuple[bytes, float]:
    """Send a request's head (and a little of its body), then read the answer: (answer, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body_part)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer, time.monotonic() - started


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, dict[str, str]]]:
    root = tmp_path_factory.mktemp("served")
    environ = clean_environ({"CMBCLUSTER_DATA_DIR": str(root / "data"), "CMBCLUSTER_REQUEST_TIMEOUT_SECONDS": "2"})
    with ServeProcess(environ, root) as server:
        assert server.wait_ready("/readyz").status_code == 200, server.output()
        with httpx.Client(base_url=server.url) as http:
            headers = dev_sign_in(http, "ada@example.org")
        yield server, headers


def test_a_huge_unauthenticated_body_costs_the_server_nothing(served: tuple[ServeProcess, dict[str, str]]) -> None:
    server, headers = served
    before = _rss_kib(server.process.pid)
    head = (
        b"POST /api/v1/environments HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 209715200\r\n\r\n"
    )
    answer, seconds = _raw_request(server.port, head, b'{"application": "' + b"x" * 65536)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert seconds < 2
    # signed in, the declared size alone is enough to refuse it
    auth = headers["Authorization"].encode()
    answer, seconds = _raw_request(server.port, head.replace(b"\r\n\r\n", b"\r\nAuthorization: " + auth + b"\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert seconds < 2
    assert _rss_kib(server.process.pid) - before < 20 * 1024


def test_oversized_headers_are_431(served: tuple[ServeProcess, dict[str, str]]) -> None:
    server, _ = served
    head = b"GET /api/v1/auth/providers HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * (1024 * 1024) + b"\r\n\r\n"
    answer, _ = _raw_request(server.port, head)
    assert answer.split(b"\r\n", 1)[0] in (b"HTTP/1.1 431 Request Header Fields Too Large",), answer[:200]
    normal = httpx.get(f"{server.url}/api/v1/auth/providers", headers={"X-Padding": "a" * 8000})
    assert normal.status_code == 200


def _read_to_end(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, answer = time.monotonic(), b""
    sock.settimeout(15)
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def _one_response(sock: socket.socket) -> bytes:
    """One whole answer (its head and its Content-Length of body) of a kept-alive connection: TCP may
    hand them over in several pieces."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536) or b"\r\n\r\n"  # closed: no more to wait for
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_client_that_stalls_holds_its_connection_no_longer_than_the_timeout(
    served: tuple[ServeProcess, dict[str, str]],
) -> None:
    """Found by an outsider's trial: a JSON body that stopped arriving was held open with no answer
    for 90 s, and uvicorn waits for a request's headers as long as the client keeps sending a byte
    now and then: a few hundred such clients hold every connection. Here the timeout is 2 s."""
    server, headers = served
    auth = headers["Authorization"].encode()

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", server.port), timeout=15)

    with connect() as silent:  # connects, sends nothing: closed, as keep-alive closes, with no answer
        answer, waited = _read_to_end(silent)
    assert answer == b"" and waited < 6

    with connect() as trickling:  # headers a byte at a time, never done: 408 at the deadline, however busy
        trickling.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        began = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - began < 10:
                trickling.sendall(b"X")
                time.sleep(0.3)
        answer, _ = _read_to_end(trickling)
        waited = time.monotonic() - began
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert waited < 6

    created = b'{"application": "files", "start": false}'
    head = (b"POST /api/v1/environments HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: " + auth + b"\r\nContent-Length: %d\r\n\r\n" % len(created))  # fmt: skip
    with connect() as stalled:  # the body's first 13 bytes, then nothing: 408, closed, and nothing created
        stalled.sendall(head + created[:13])
        answer, waited = _read_to_end(stalled)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408 ") and b"connection: close" in status.lower(), answer[:300]
    error = json.loads(body)
    assert error == {"error": "request_timeout", "message": "no byte of the request's body arrived for 2 seconds"}
    assert waited < 5  # closed with the answer, not by keep-alive's 5 s after it (at 7 s)
    assert httpx.get(f"{server.url}/api/v1/environments", headers=headers).json()["items"] == []

    with connect() as slow:  # slow but steady, over twice the timeout in all: taken
        slow.sendall(head)
        for piece in (created[i : i + 8] for i in range(0, len(created), 8)):
            time.sleep(1)
            slow.sendall(piece)
        answer = _one_response(slow)
        assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
        # The same connection, kept alive: each request's headers get their own time.
        for _ in range(2):
            time.sleep(1.5)
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _one_response(slow).startswith(b"HTTP/1.1 200 ")
    listed = httpx.get(f"{server.url}/api/v1/environments", headers=headers).json()["items"]
    assert len(listed) == 1
    httpx.delete(f"{server.url}/api/v1/environments/{listed[0]['id']}", headers=headers)


# -- one error shape -----------------------------------------------------------------------------------
def test_every_error_has_the_documented_shape(client: TestClient, alice: dict[str, str]) -> None:
    answers = {
        "unknown route": client.get("/api/v1/nothing-here", headers=alice),
        "wrong method": client.patch("/api/v1/storages", headers=alice),
        "malformed json": client.post(
            "/api/v1/storages", content=b"{not json", headers={**alice, "Content-Type": "application/json"}
        ),
        "wrong type": client.post("/api/v1/storages", json=["a list"], headers=alice),
        "no credentials": client.get("/api/v1/storages"),
    }
    for what, answer in answers.items():
        body = answer.json()
        assert set(body) >= {"error", "message"}, what
        assert "detail" not in body or isinstance(body["detail"], list), what
        assert isinstance(body["message"], str) and body["message"], what
    assert [a.status_code for a in answers.values()] == [404, 405, 422, 422, 401]


def test_a_json_route_sent_another_media_type_is_415_naming_json(client: TestClient, alice: dict[str, str]) -> None:
    """A body in another type (or in none) was refused as 422 "Input should be a valid dictionary",
    which does not say that the body itself was fine and only its Content-Type wrong."""
    body = b'{"application": "files", "start": false}'
    sent = {
        "text/plain": client.post("/api/v1/environments", content=body,
                                  headers={**alice, "Content-Type": "text/plain"}),
        "a form": client.post("/api/v1/environments", data={"application": "files"}, headers=alice),
        "no type": client.post("/api/v1/environments", content=body, headers=alice),
        "no type, chunked": client.post("/api/v1/environments", content=iter([body[:10], body[10:]]), headers=alice),
        "a public route": client.post("/api/v1/auth/refresh", content=b'{"refresh_token": "x"}',
                                      headers={"Content-Type": "text/plain; charset=utf-8"}),
    }  # fmt: skip
    for what, answer in sent.items():
        assert answer.status_code == 415, (what, answer.text)
        found = answer.json()
        assert found["error"] == "unsupported_media_type", what
        assert "Content-Type: application/json" in found["message"], (what, found["message"])
    assert "(it was text/plain)" in sent["text/plain"].json()["message"]
    assert "(it had none)" in sent["no type"].json()["message"]
    assert client.get("/api/v1/environments", headers=alice).json()["items"] == []  # nothing was made
    # a stranger learns nothing more than before: credentials come first
    assert client.post("/api/v1/environments", content=body, headers={"Content-Type": "text/plain"}).status_code == 401
    # JSON with parameters, or in a +json type, is JSON
    json_types = ("application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json")
    for n, media_type in enumerate(json_types):
        made = client.post("/api/v1/storages", content=b'{"display_name": "d%d"}' % n,
                           headers={**alice, "Content-Type": media_type})  # fmt: skip
        assert made.status_code == 201, (media_type, made.text)
    # routes that take other bodies take them as before: uploads of any type, no body where none is needed
    storage = made.json()["id"]
    put = client.put(f"/api/v1/storages/{storage}/objects/notes.txt", content=b"hi",
                     headers={**alice, "Content-Type": "text/plain"})  # fmt: skip
    assert put.status_code in (200, 201), put.text
    created = client.post("/api/v1/environments", json={"application": "files", "start": False}, headers=alice)
    assert created.status_code == 201, created.text
    stop = client.post(f"/api/v1/environments/{created.json()['id']}/stop", headers=alice)
    assert stop.status_code == 200, stop.text
    # documented: where an operation takes JSON, and only there
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    assert "415" in paths["/api/v1/environments"]["post"]["responses"]
    assert "415" in paths["/api/v1/auth/refresh"]["post"]["responses"]
    assert "415" not in paths["/api/v1/auth/local/form"]["post"]["responses"]
    assert "415" not in paths["/api/v1/storages/{storage_id}/objects/{key}"]["put"]["responses"]


# -- secrets at rest -----------------------------------------------------------------------------------
def test_environment_variables_are_encrypted_at_rest(client: TestClient, alice: dict[str, str], app: FastAPI) -> None:
    saved = client.put("/api/v1/settings/env-vars/API_KEY", json={"value": "sk-live-123"}, headers=alice)
    assert saved.status_code == 200
    context: AppContext = app.state.context
    with context.engine.connect() as connection:
        stored = connection.execute(text("SELECT * FROM env_vars")).mappings().one()
    assert b"sk-live-123" not in b"".join(v if isinstance(v, bytes) else str(v).encode() for v in stored.values())
    assert client.get("/api/v1/settings/env-vars", headers=alice).json()[0]["value"] == "sk-live-123"


def test_plaintext_variables_of_an_older_database_are_encrypted_by_the_upgrade(tmp_path: Path) -> None:
    from cmbcluster.db import create_db_engine, upgrade
    from cmbcluster.security import Sealer

    engine = create_db_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(engine, "0001")
    now = dt.datetime.now(dt.UTC).isoformat()
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO users (id, email, name, role, status, auth_provider, subject, created_at) "
                 "VALUES ('u1', 'a@b.org', 'A', 'user', 'active', 'local', 'a@b.org', :now)"), {"now": now},
        )  # fmt: skip
        connection.execute(
            text(
                "INSERT INTO env_vars (id, user_id, name, value, updated_at) "
                "VALUES ('v1', 'u1', 'TOKEN', 'plain', :now)"
            ),
            {"now": now},
        )
    with pytest.raises(RuntimeError, match="secret key"):
        upgrade(engine)  # refuses to run without the key rather than lose the values
    key = b"k" * 32
    upgrade(engine, secret_key=key)
    from sqlalchemy.orm import Session

    with Session(engine) as db:
        row = db.execute(select(EnvVar)).scalar_one()
        assert Sealer(key, "env-vars").unseal(row.ciphertext) == b"plain"
        assert db.execute(select(User)).scalar_one().email_verified is False
    engine.dispose()


def test_rotating_the_secret_key_keeps_every_secret(tmp_path: Path) -> None:
    old, new = "o" * 40, "n" * 40
    env = clean_environ({"CMBCLUSTER_DATA_DIR": str(tmp_path / "data"), "CMBCLUSTER_SECRET_KEY": old})
    app = create_app(CoreSettings(data_dir=tmp_path / "data", secret_key=old))  # type: ignore[arg-type]
    with TestClient(app, base_url=LOCAL) as client:
        alice = dev_sign_in(client, "alice@example.org")
        client.put("/api/v1/settings/env-vars/TOKEN", json={"value": "v1"}, headers=alice)
        client.put("/api/v1/settings/secret-files/id_rsa", content=b"private", headers=alice)
    rotated = run_cli("secrets", "reencrypt", env={**env, "CMBCLUSTER_SECRET_KEY": new,
                                                   "CMBCLUSTER_SECRET_KEY_PREVIOUS": old}, cwd=tmp_path)  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    assert "re-encrypted 2" in rotated.stdout
    app = create_app(CoreSettings(data_dir=tmp_path / "data", secret_key=new))  # type: ignore[arg-type]
    with TestClient(app, base_url=LOCAL) as client:
        alice = dev_sign_in(client, "alice@example.org")
        assert client.get("/api/v1/settings/env-vars", headers=alice).json()[0]["value"] == "v1"
        context: AppContext = app.state.context
        with context.sessions() as db:
            from cmbcluster.services import user_settings

            user_id = db.execute(select(User.id)).scalars().first()
            sealers = {"variables_sealer": context.sealer("env-vars"), "files_sealer": context.sealer("secret-files")}
            _, files = user_settings.settings_at_start(db, str(user_id), **sealers)
            assert files == {"id_rsa": b"private"}
    # a value sealed with a key nobody configures any more is reported, not lost silently
    again = run_cli("secrets", "reencrypt", env={**env, "CMBCLUSTER_SECRET_KEY": "z" * 40}, cwd=tmp_path)
    assert again.returncode == 1 and "match no configured key" in again.stderr


# -- found by an outsider's attack run ------------------------------------------------------------------
def test_the_development_sign_in_refuses_a_rebound_host_name(settings: CoreSettings) -> None:
    """DNS rebinding: a web page whose name now points at 127.0.0.1 drives the server from its own
    origin. The development sign-in answers only requests addressed to this machine."""
    with TestClient(create_app(settings), base_url="http://attacker.example:18700") as rebound:
        refused = rebound.get("/api/v1/auth/local/login", follow_redirects=False)
        assert refused.status_code == 403 and "127.0.0.1" in refused.json()["message"]
        assert rebound.post("/api/v1/auth/local/form", data={"email": "a@b.org"}).status_code in (403, 422)
        local = rebound.get("/api/v1/auth/local/login", headers={"Host": "localhost:8000"}, follow_redirects=False)
        assert local.status_code == 303


def test_the_development_sign_in_beside_a_real_provider_takes_no_account_over(
    settings: CoreSettings, keys: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(oidc_app(settings, keys, monkeypatch), base_url=LOCAL) as client:
        dev_sign_in(client, "first@example.org")
        assert exchange(client, keys, "kim", "kim@example.org", verified=True).status_code == 200
        with pytest.raises(AssertionError, match="account with this e-mail address exists"):  # typed: no link
            dev_sign_in(client, "kim@example.org")
        boss = dev_sign_in(client, ADMIN)  # nor does a typed address make an admin
        assert client.get("/api/v1/auth/me", headers=boss).json()["role"] == "user"


def test_addresses_change_only_in_ascii_case(
    settings: CoreSettings, keys: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unicode case rules would turn a verified KELVIN SIGN address into another person's."""
    with TestClient(oidc_app(settings, keys, monkeypatch), base_url=LOCAL) as client:
        dev_sign_in(client, "first@example.org")
        kim = exchange(client, keys, "kim", "Kim@Example.org", verified=True).json()["user"]
        assert kim["email"] == "kim@example.org"
        kelvin = exchange(client, keys, "attacker", "\u212aim@example.org", verified=True).json()["user"]
        assert kelvin["id"] != kim["id"] and kelvin["email"] == "\u212aim@example.org"
        boss_lookalike = exchange(client, keys, "attacker-2", "\u212a" + ADMIN[1:], verified=True)
        assert boss_lookalike.json()["user"]["role"] == "user"
        spaced = exchange(client, keys, "attacker-3", " " + ADMIN, verified=True)
        assert spaced.status_code == 401 and "invalid e-mail" in spaced.json()["message"]
        # nor does a "verified" address that reads as another's: the same check as the development sign-in's
        for lookalike in ("ki\u200bm@example.org", "\u202egro.elpmaxe@mik"):
            refused = exchange(client, keys, "attacker-4", lookalike, verified=True)
            assert refused.status_code == 401 and "invalid e-mail" in refused.json()["message"], lookalike


def _submit_dev_form(client: TestClient, email: str) -> httpx.Response:
    """The development sign-in's form as a browser posts it, with ``email`` typed in."""
    login = client.get("/api/v1/auth/local/login", follow_redirects=False)
    fields = {k: v[0] for k, v in parse_qs(urlsplit(login.headers["location"]).query).items()}
    answer: httpx.Response = client.post(
        "/api/v1/auth/local/form",
        data={**{k: fields[k] for k in ("redirect_uri", "state", "nonce", "code_challenge")}, "email": email},
        follow_redirects=False,
    )
    return answer


@pytest.mark.parametrize(
    ("email", "named"),
    [
        ("a\u202e@e.org", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),  # shows as "a@e.org" reversed around it
        ("a\u2066b@e.org", "U+2066 (LEFT-TO-RIGHT ISOLATE)"),
        ("a\u200fb@e.org", "U+200F (RIGHT-TO-LEFT MARK)"),
        ("a\x00@e.org", "U+0000 (a control character)"),  # was refused only at the callback, 401
        ("a\x1b[31m@e.org", "U+001B (a control character)"),
        ("ad\u200ba@e.org", "U+200B (ZERO WIDTH SPACE)"),  # an invisible look-alike of ada@
        ("ada\u00a0x@e.org", "U+00A0 (NO-BREAK SPACE)"),
        ("ad a@e.org", "U+0020 (SPACE)"),
        ("admin\u3164@e.org", "U+3164 (HANGUL FILLER)"),  # a letter drawn as nothing: reads as admin@
        ("admin\u115f@e.org", "U+115F (HANGUL CHOSEONG FILLER)"),
        ("ad\u034fmin@e.org", "U+034F (COMBINING GRAPHEME JOINER)"),
    ],
)
def test_the_development_sign_in_refuses_addresses_that_read_as_another(
    client: TestClient, email: str, named: str
) -> None:
    """An address is shown to admins (users, audit, CSV) and compared with CMBCLUSTER_ADMIN_EMAILS:
    the form refuses, saying which character, what would make it read as another."""
    answer = _submit_dev_form(client, email)
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["error"] == "invalid_request" and named in body["message"], body
    assert email not in body["message"]  # named, never echoed: it would reorder the message
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    with context.sessions() as db:
        assert db.execute(select(User)).first() is None  # nobody signed in


def test_the_development_sign_in_takes_addresses_in_any_script(client: TestClient) -> None:
    """Only characters not shown as themselves are refused: an address in another script signs in."""
    for email in ("zoë@example.org", "用户@例子.广告", "δοκιμή@παράδειγμα.δοκιμή"):
        headers = dev_sign_in(client, email)
        assert client.get("/api/v1/auth/me", headers=headers).json()["email"] == email


def test_a_name_from_the_sign_in_is_shown_as_itself_and_fits_its_column(client: TestClient) -> None:
    """The name a provider (here the development form) sends is shown to admins beside the address:
    what would reorder or hide text goes, never the sign-in; a long one is cut to the column's size
    (PostgreSQL would refuse it whole)."""
    headers = dev_sign_in(client, "eve@example.org", name="Eve\u202e nimdA\x00\u200b\u00a0 Lovelace ")
    assert client.get("/api/v1/auth/me", headers=headers).json()["name"] == "Eve nimdA Lovelace"
    assert shown_name("Ada " + "x" * 300, limit=200) == "Ada " + "x" * 196  # a provider's name is not limited
    assert dev_sign_in(client, "zoe@example.org", name="\u202e\u200b")  # nothing printable: the address's name
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    with context.sessions() as db:
        assert db.execute(select(User.name).where(User.email == "zoe@example.org")).scalar_one() == "zoe"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/storages", {"display_name": "a\u202eb"}),  # shown as "ab" in the web UI, as sent in the audit
        ("/api/v1/storages", {"display_name": "\u3164"}),  # a blank-looking bucket
        ("/api/v1/settings/tokens", {"name": "tok\u202eevil\u0000"}),
    ],
)
def test_names_other_people_read_refuse_what_would_hide_or_reorder_them(
    client: TestClient, path: str, body: dict[str, str]
) -> None:
    headers = dev_sign_in(client, "ada@example.org")
    answer = client.post(path, headers=headers, json=body)
    assert answer.status_code == 400 and "U+" in answer.json()["message"], answer.text


def test_non_finite_or_deeply_nested_claims_are_refused(
    settings: CoreSettings, keys: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from joserfc import jws

    def raw(payload: str) -> str:
        return jws.serialize_compact({"alg": "RS256", "kid": "key-1"}, payload.encode(), keys.keys["key-1"])

    base = {"iss": keys.issuer, "aud": CLIENT_ID, "sub": "n", "email": "n@example.org", "email_verified": True}
    now = int(time.time())
    with TestClient(oidc_app(settings, keys, monkeypatch), base_url=LOCAL) as client:
        for extra in (
            '"exp": NaN',
            '"exp": Infinity',
            f'"exp": {now + 300}, "nbf": NaN',
            f'"exp": {now + 300}, "iat": NaN',
        ):
            token = raw(json.dumps(base)[:-1] + ", " + extra + "}")
            answer = client.post("/api/v1/auth/exchange", json={"provider": "oidc", "token": token})
            assert answer.status_code == 401, (extra, answer.text)
        nested = raw('{"a": ' + "[" * 5000 + "]" * 5000 + "}")
        answer = client.post("/api/v1/auth/exchange", json={"provider": "oidc", "token": nested})
        assert answer.status_code in (401, 422)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/api/v1/settings/env-vars/FOO", '{"value": "\\ud800"}'),
        ("POST", "/api/v1/settings/tokens", '{"name": "\\ud800"}'),
        ("POST", "/api/v1/environments", '{"application": "files", "env": {"A": "\\ud800"}, "start": false}'),
        ("POST", "/api/v1/storages", '{"display_name": "\\udfff"}'),
    ],
)
def test_a_lone_surrogate_is_a_clear_400(
    client: TestClient, alice: dict[str, str], method: str, path: str, body: str
) -> None:
    answer = client.request(method, path, content=body, headers={**alice, "Content-Type": "application/json"})
    assert answer.status_code in (400, 422), answer.text
    assert answer.json()["error"] == "invalid_request"


def test_keys_that_were_not_utf8_are_refused(client: TestClient, alice: dict[str, str]) -> None:
    storage = client.post("/api/v1/storages", json={"display_name": "mine"}, headers=alice).json()
    for key in ("%ED%A0%80", "%C0%AE", "a%FFb"):
        answer = client.put(f"/api/v1/storages/{storage['id']}/objects/{key}", content=b"x", headers=alice)
        assert answer.status_code == 400 and "UTF-8" in answer.json()["message"], key


def test_headers_are_refused_while_they_arrive(served: tuple[ServeProcess, dict[str, str]]) -> None:
    """uvicorn's parser would keep a whole header block: the server stops reading at 32 KiB."""
    server, _ = served
    before = _rss_kib(server.process.pid)
    for header_line in (b"X-A: " + b"a" * 8000 + b"\r\n", b"a:\r\n"):  # big ones, and many empty ones
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            sent = 0
            try:
                while sent < 32 * 1024 * 1024:
                    sock.sendall(header_line * 50)
                    sent += len(header_line) * 50
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        assert sent < 32 * 1024 * 1024, sent  # refused before the client gave up (kernel buffers hold MBs)
    assert _rss_kib(server.process.pid) - before < 10 * 1024


def test_sign_in_limits_count_each_client_behind_a_trusted_proxy(tmp_path: Path) -> None:
    env = clean_environ({
        "CMBCLUSTER_DATA_DIR": str(tmp_path / "data"), "CMBCLUSTER_LOGIN_ATTEMPTS_PER_MINUTE": "3",
        "CMBCLUSTER_FORWARDED_ALLOW_IPS": "127.0.0.2",
    })  # fmt: skip
    with ServeProcess(env, tmp_path) as server:
        server.wait_ready()
        proxy = httpx.Client(base_url=server.url, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        for _ in range(3):
            ok = proxy.get("/api/v1/auth/local/login", headers={"X-Forwarded-For": "203.0.113.66"})
            assert ok.status_code == 303
        assert proxy.get("/api/v1/auth/local/login", headers={"X-Forwarded-For": "203.0.113.66"}).status_code == 429
        other = proxy.get("/api/v1/auth/local/login", headers={"X-Forwarded-For": "198.51.100.7"})
        assert other.status_code == 303  # another person behind the same ingress is not blocked
        proxy.close()


def test_sign_in_attempts_sent_at_once_are_counted_exactly(tmp_path: Path) -> None:
    """A brute force sends its guesses in parallel: 40 attempts at once from one address against a
    limit of 10 get exactly 10 answers and 30 refusals (429), none a database error."""
    env = clean_environ({"CMBCLUSTER_DATA_DIR": str(tmp_path / "data"), "CMBCLUSTER_LOGIN_ATTEMPTS_PER_MINUTE": "10"})
    with ServeProcess(env, tmp_path) as server:
        server.wait_ready()

        def attempt(_: int) -> int:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                return client.get("/api/v1/auth/local/login").status_code

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            statuses = sorted(pool.map(attempt, range(40)))
    assert statuses == [303] * 10 + [429] * 30, statuses


def test_the_data_directory_is_private(client: TestClient, settings: CoreSettings) -> None:
    assert settings.data_dir.stat().st_mode & 0o777 == 0o700


def test_malformed_json_says_so_and_where(client: TestClient, alice: dict[str, str]) -> None:
    body = '{"display_name": "data",, }'
    answer = client.post("/api/v1/storages", content=body, headers={**alice, "Content-Type": "application/json"})
    assert answer.status_code == 422, answer.text
    found = answer.json()
    assert found["error"] == "invalid_request"
    assert found["message"].startswith("the request body is not valid JSON at character 24:"), found["message"]
    assert body not in found["message"]  # the message explains, it does not echo the body


def test_a_refused_body_is_not_echoed_many_times_over(client: TestClient, alice: dict[str, str]) -> None:
    """A 650 KB body of 60,000 unknown fields was answered with every one of them (5.4 MB, eight
    times the bytes it cost to send): a 422 lists its first problems and counts the rest."""
    from cmbcluster.api.errors import MAX_DETAIL_ERRORS

    body = {"value": "x", **{f"k{i}": 1 for i in range(60_000)}}
    answer = client.put("/api/v1/settings/env-vars/BIG", json=body, headers=alice)
    assert answer.status_code == 422, answer.text[:300]
    assert len(answer.content) < 20_000
    refused = answer.json()
    assert len(refused["detail"]) == MAX_DETAIL_ERRORS and refused["detail"][0]["type"] == "extra_forbidden"
    assert refused["message"].startswith(f"60000 problems, the first {MAX_DETAIL_ERRORS} listed; k0: ")


def test_an_admin_role_a_sign_in_rule_gave_ends_when_the_rule_no_longer_gives_it(
    settings: CoreSettings, keys: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone removed from the identity provider's admin group (or from CMBCLUSTER_ADMIN_EMAILS)
    stayed an administrator for ever. Their next sign-in now takes the role back; a role an
    administrator gave by hand, and the last administrator's, stay."""

    def sign_in(client: TestClient, sub: str, email: str, groups: list[str]) -> dict[str, Any]:
        token = keys.sign({"sub": sub, "aud": CLIENT_ID, "email": email, "email_verified": True, "groups": groups,
                           "jti": new_id()})  # fmt: skip
        answer = client.post("/api/v1/auth/exchange", json={"provider": "oidc", "token": token})
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    with TestClient(oidc_app(settings, keys, monkeypatch), base_url=LOCAL) as client:
        first = dev_sign_in(client, "first@example.org")  # the first user: an admin, whatever groups say
        assert sign_in(client, "lin", "lin@example.org", ["admins"])["user"]["role"] == "admin"
        lin = sign_in(client, "lin", "lin@example.org", ["physics"])  # removed from the group
        assert lin["user"]["role"] == "user"
        as_lin = {"Authorization": f"Bearer {lin['token']}"}
        assert client.get("/api/v1/admin/users", headers=as_lin).status_code == 403
        # listed in ADMIN_EMAILS, then not: the same (the app's list is its settings')
        assert sign_in(client, "boss", ADMIN, [])["user"]["role"] == "admin"
        client.app.state.context.config.core.admin_emails = []  # type: ignore[attr-defined]
        assert sign_in(client, "boss", ADMIN, [])["user"]["role"] == "user"
        # made an admin by an administrator: no sign-in takes that back
        ada = sign_in(client, "ada", "ada@example.org", [])
        promoted = client.patch(f"/api/v1/admin/users/{ada['user']['id']}", headers=first, json={"role": "admin"})
        assert promoted.status_code == 200, promoted.text
        assert sign_in(client, "ada", "ada@example.org", [])["user"]["role"] == "admin"
        roles = [(e["detail"].get("role"), e["detail"].get("reason")) for e in client.get(
            "/api/v1/admin/audit", headers=first, params={"action": "user.role_changed"}).json()["items"]]  # fmt: skip
        assert ("user", "no longer granted by provider group") in roles
        assert ("user", "no longer granted by CMBCLUSTER_ADMIN_EMAILS (verified address)") in roles


def test_the_last_administrator_keeps_the_role_a_sign_in_rule_gave(
    settings: CoreSettings, keys: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(oidc_app(settings, keys, monkeypatch), base_url=LOCAL) as client:
        first = dev_sign_in(client, "first@example.org")
        first_id = client.get("/api/v1/auth/me", headers=first).json()["id"]

        def sign_in(groups: list[str]) -> dict[str, Any]:
            token = keys.sign({"sub": "lin", "aud": CLIENT_ID, "email": "lin@example.org", "email_verified": True,
                               "groups": groups, "jti": new_id()})  # fmt: skip
            return dict(client.post("/api/v1/auth/exchange", json={"provider": "oidc", "token": token}).json())

        lin = sign_in(["admins"])
        assert lin["user"]["role"] == "admin"
        # the first administrator leaves: Lin, made an admin by the group, is the only one
        as_lin = {"Authorization": f"Bearer {lin['token']}"}
        gone = client.patch(f"/api/v1/admin/users/{first_id}", headers=as_lin, json={"status": "deactivated"})
        assert gone.status_code == 200, gone.text
        assert sign_in([])["user"]["role"] == "admin"  # else nobody could administer the deployment
