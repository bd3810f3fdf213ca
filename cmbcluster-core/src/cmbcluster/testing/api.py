"""Helpers for tests that drive the HTTP API (with FastAPI's TestClient or httpx against a server)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: A base URL for FastAPI's TestClient (``TestClient(app, base_url=LOCAL)``): the development
#: sign-in answers only requests addressed to this machine, and TestClient's own default
#: (``http://testserver``) is not.
LOCAL = "http://127.0.0.1"


def dev_sign_in(client: Any, email: str, name: str = "", next_path: str = "/") -> dict[str, str]:
    """Sign in through the development login exactly as a browser does (login, form, callback).

    ``client`` is FastAPI's TestClient or an ``httpx.Client`` with the server as base URL.

    Returns ``Authorization`` headers carrying the session token, and clears the client's
    cookies so several users can share one client.
    """
    login = client.get("/api/v1/auth/local/login", params={"next": next_path}, follow_redirects=False)
    assert login.status_code == 303, login.text
    form_url = login.headers["location"]
    fields = {k: v[0] for k, v in parse_qs(urlsplit(form_url).query).items()}
    page = client.get(form_url)
    assert page.status_code == 200, page.text
    submitted = client.post(
        "/api/v1/auth/local/form",
        data={
            **{k: fields[k] for k in ("redirect_uri", "state", "nonce", "code_challenge")},
            "email": email,
            "name": name,
        },
        follow_redirects=False,
    )
    assert submitted.status_code == 303, submitted.text
    callback = urlsplit(submitted.headers["location"])
    # The login cookie, sent back as a browser does: over https it is Secure, which a client that
    # reaches the server over plain http (behind the TLS the public URL names) would keep to itself.
    done = client.get(f"{callback.path}?{callback.query}", headers={"Cookie": _cookies(login)}, follow_redirects=False)
    assert done.status_code == 303, done.text
    # the secure name where the public URL is https (cmbcluster.api.deps.SECURE_SESSION_COOKIE)
    session = {name: value for name, value in _set_cookies(done) if name.endswith("cmbcluster_session")}
    token = session.get("cmbcluster_session") or session.get("__Host-cmbcluster_session")
    assert token, "no session cookie was set"
    client.cookies.clear()
    return {"Authorization": f"Bearer {token}"}


def _set_cookies(response: Any) -> list[tuple[str, str]]:
    """(name, value) of each cookie a response sets."""
    from http.cookies import SimpleCookie

    return [(name, morsel.value) for header in response.headers.get_list("set-cookie")
            for name, morsel in SimpleCookie(header).items()]  # fmt: skip


def _cookies(response: Any) -> str:
    """A ``Cookie`` header with the cookies ``response`` sets."""
    return "; ".join(f"{name}={value}" for name, value in _set_cookies(response))


def make_bucket(
    client: Any,
    headers: dict[str, str],
    files: Mapping[str, bytes | Iterable[bytes]],
    *,
    display_name: str = "data",
    storage_class: str = "standard",
) -> str:
    """Create a bucket through the API as the user of ``headers`` (from :func:`dev_sign_in`) and upload
    ``files`` into it (key -> bytes, or an iterable of chunks, streamed); the storage's id."""
    body = {"display_name": display_name, "storage_class": storage_class}
    created = client.post("/api/v1/storages", headers=headers, json=body)
    assert created.status_code == 201, created.text
    storage_id = str(created.json()["id"])
    for key, content in files.items():
        put = client.put(f"/api/v1/storages/{storage_id}/objects/{key}", headers=headers, content=content)
        assert put.is_success, put.text
    return storage_id
