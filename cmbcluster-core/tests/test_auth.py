"""Sign-in and sessions through the API, with the development provider."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cmbcluster.app import create_app
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in
from cmbcluster.testing.clock import manual_clock


def test_providers_are_listed_from_plugins(client: TestClient) -> None:
    body = client.get("/api/v1/auth/providers").json()
    assert body == {
        "providers": [
            {"name": "local", "display_name": "Development sign-in", "login_url": "/api/v1/auth/local/login",
             "kind": "development"}
        ]
    }  # fmt: skip


def test_first_user_is_admin_and_later_ones_are_not(
    client: TestClient, admin: dict[str, str], alice: dict[str, str]
) -> None:
    assert client.get("/api/v1/auth/me", headers=admin).json()["role"] == "admin"
    me = client.get("/api/v1/auth/me", headers=alice).json()
    assert (me["email"], me["name"], me["role"], me["status"]) == ("alice@example.org", "Alice", "user", "active")


def hold_until_both_arrive(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, *, timeout: float) -> None:
    """Make two concurrent requests interleave at ``module.name``: each call waits there until the
    other arrives (or ``timeout`` passes, for code that lets only one get that far)."""
    arrived = threading.Barrier(2, timeout=timeout)
    original = getattr(module, name)

    def held(*args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(threading.BrokenBarrierError):
            arrived.wait()
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, held)


@pytest.mark.parametrize("same_person", [False, True], ids=["two people", "one person in two tabs"])
def test_sign_ins_at_once_on_a_fresh_install_make_one_admin_and_one_account_each(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, same_person: bool
) -> None:
    """Two first sign-ins at once on a fresh install (found by an outsider's trial): both looked up,
    found nobody, counted no user, and both became admin. Both are held after the lookup until the
    other arrives, the interleaving that did it; now one is the admin, the other a user, and one
    person's two sign-ins at once make one account (and both succeed)."""
    from cmbcluster.services import users

    hold_until_both_arrive(monkeypatch, users, "_link_by_email", timeout=2)
    emails = ["first@example.org"] * 2 if same_person else ["first@example.org", "second@example.org"]
    with ThreadPoolExecutor(2) as pool:
        signed_in = list(pool.map(lambda email: dev_sign_in(TestClient(client.app, base_url=LOCAL), email), emails))
    me = [client.get("/api/v1/auth/me", headers=headers).json() for headers in signed_in]
    if same_person:
        assert me[0]["id"] == me[1]["id"] and me[0]["role"] == "admin"
    else:
        assert sorted(m["role"] for m in me) == ["admin", "user"], me


def test_admin_emails_are_admins(settings: CoreSettings) -> None:
    app = create_app(settings.model_copy(update={"admin_emails": ["boss@example.org"]}))
    with TestClient(app, base_url=LOCAL) as client:
        dev_sign_in(client, "first@example.org")
        boss = dev_sign_in(client, "Boss@Example.org")
        assert client.get("/api/v1/auth/me", headers=boss).json()["role"] == "admin"


def test_session_cookie_is_httponly_samesite_and_works(client: TestClient) -> None:
    login = client.get("/api/v1/auth/local/login", follow_redirects=False)
    form_url = login.headers["location"]
    from urllib.parse import parse_qs, urlsplit

    fields = {k: v[0] for k, v in parse_qs(urlsplit(form_url).query).items()}
    submitted = client.post(
        "/api/v1/auth/local/form",
        data={k: fields[k] for k in ("redirect_uri", "state", "nonce", "code_challenge")} | {"email": "c@example.org"},
        follow_redirects=False,
    )
    done = client.get(submitted.headers["location"].replace(LOCAL, ""), follow_redirects=False)
    cookie_header = done.headers["set-cookie"]
    assert "cmbcluster_session=" in cookie_header
    assert "HttpOnly" in cookie_header and "SameSite=lax" in cookie_header
    assert "Secure" not in cookie_header  # plain http on loopback
    assert done.headers["location"] == "/"
    assert client.get("/api/v1/auth/me").json()["email"] == "c@example.org"  # the cookie signs in


def test_over_https_the_session_cookie_is_host_only_and_one_another_host_planted_is_no_session(
    settings: CoreSettings,
) -> None:
    """Over https the session cookie is ``__Host-cmbcluster_session``: Secure, no Domain (an old
    CMBCLUSTER_COOKIE_DOMAIN is ignored), which only this host can set. A page on another host of
    the domain (an environment's own host, any other site there) can set ``cmbcluster_session`` for
    the parent domain, which the browser then sends here: it is never read as a session, so nobody
    can sign another's browser in as themselves."""
    from http.cookies import SimpleCookie
    from urllib.parse import parse_qs, urlsplit

    core = settings.model_copy(update={"cookie_domain": "example.org", "public_url": "https://cmb.example.org"})
    with TestClient(create_app(core), base_url="https://cmb.example.org") as client:
        ada = dev_sign_in(client, "ada@example.org")
        eve = dev_sign_in(client, "eve@example.org")["Authorization"].removeprefix("Bearer ")
        login = client.get("/api/v1/auth/local/login", follow_redirects=False)
        fields = {k: v[0] for k, v in parse_qs(urlsplit(login.headers["location"]).query).items()}
        submitted = client.post(
            "/api/v1/auth/local/form",
            data={k: fields[k] for k in ("redirect_uri", "state", "nonce", "code_challenge")} | {"email": "a@b.org"},
            follow_redirects=False,
        )
        callback = urlsplit(submitted.headers["location"])
        set_cookies = client.get(f"{callback.path}?{callback.query}", follow_redirects=False).headers.get_list(
            "set-cookie"
        )
        (session,) = [SimpleCookie(h)["__Host-cmbcluster_session"] for h in set_cookies if h.startswith("__Host-")]
        assert session["secure"] and session["httponly"] and session["path"] == "/" and not session["domain"]
        assert not [h for h in set_cookies if h.startswith("cmbcluster_session=")]
        client.cookies.clear()
        planted = client.get("/api/v1/auth/me", headers={"Cookie": f"cmbcluster_session={eve}"})
        assert planted.status_code == 401
        both = client.get("/api/v1/auth/me", headers={"Cookie": f"cmbcluster_session={eve}; __Host-cmbcluster_session="
                                                                f"{session.value}"})  # fmt: skip
        assert both.json()["email"] == "a@b.org"
        logout = client.post("/api/v1/auth/logout", headers=ada)
        assert logout.headers["set-cookie"].startswith("__Host-cmbcluster_session=")
        assert "Domain" not in logout.headers["set-cookie"]


def test_next_path_is_kept_but_never_an_open_redirect(client: TestClient) -> None:
    from urllib.parse import parse_qs, urlsplit

    for requested, expected in (("/environments?x=1", "/environments?x=1"), ("https://evil.example", "/"),
                                ("//evil.example", "/")):  # fmt: skip
        login = client.get("/api/v1/auth/local/login", params={"next": requested}, follow_redirects=False)
        fields = {k: v[0] for k, v in parse_qs(urlsplit(login.headers["location"]).query).items()}
        submitted = client.post(
            "/api/v1/auth/local/form",
            data={k: fields[k] for k in ("redirect_uri", "state", "nonce", "code_challenge")} | {"email": "n@x.org"},
            follow_redirects=False,
        )
        done = client.get(submitted.headers["location"].replace(LOCAL, ""), follow_redirects=False)
        assert done.headers["location"] == expected


def test_callback_without_matching_state_is_refused(client: TestClient) -> None:
    client.get("/api/v1/auth/local/login", follow_redirects=False)  # sets the login cookie
    response = client.get("/api/v1/auth/local/callback", params={"code": "x", "state": "forged"})
    assert response.status_code == 401
    assert "state does not match" in response.json()["message"]
    client.cookies.clear()
    response = client.get("/api/v1/auth/local/callback", params={"code": "x", "state": "forged"})
    assert response.status_code == 401 and "no sign-in in progress" in response.json()["message"]
    assert client.get("/api/v1/auth/local/callback").status_code == 400


def test_dev_form_refuses_foreign_redirects(client: TestClient) -> None:
    response = client.post(
        "/api/v1/auth/local/form",
        data={
            "redirect_uri": "https://evil.example/cb",
            "state": "s",
            "nonce": "n",
            "code_challenge": "c",
            "email": "a@b.c",
        },
    )
    assert response.status_code == 400


def test_unknown_provider_is_404(client: TestClient) -> None:
    assert client.get("/api/v1/auth/google/login", follow_redirects=False).status_code == 404


def test_requests_without_or_with_bad_credentials_are_401(client: TestClient) -> None:
    assert client.get("/api/v1/auth/me").status_code == 401
    for token in ("garbage", "cmbs_" + "x" * 43, "cmbt_" + "y" * 43):
        response = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, token
        assert response.json()["error"] == "authentication_failed"


def test_a_user_deleted_after_the_sign_in_query_is_refused_not_a_500(
    client: TestClient, alice: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sign-in reads plain columns; a route that needs the whole user loads it next. A user deleted
    in between is told their account is gone (401), like one deleted before the request."""
    from cmbcluster.api import deps

    signed_in = deps.sign_in

    def then_deleted(request: Any) -> deps.Principal:
        principal = signed_in(request)
        return dataclasses.replace(principal, user=dataclasses.replace(principal.user, id="deleted-meanwhile"))

    monkeypatch.setattr(deps, "sign_in", then_deleted)
    me = client.get("/api/v1/auth/me", headers=alice)
    assert me.status_code == 401, me.text
    assert me.json()["message"] == "this account no longer exists"


def test_logout_revokes_the_session_at_once(client: TestClient, alice: dict[str, str]) -> None:
    assert client.post("/api/v1/auth/logout", headers=alice).status_code == 204
    assert client.get("/api/v1/auth/me", headers=alice).status_code == 401


def _exchanged_session(client: TestClient, email: str) -> dict[str, Any]:
    """A session from the token exchange (what scripts and the CLI use), with its refresh token."""
    from cmbcluster.security import pkce_challenge

    provider = client.app.state.context.auth["local"]  # type: ignore[attr-defined]
    code = provider.issue_code(email=email, name="", nonce="n", code_challenge=pkce_challenge("v" * 50))
    id_token = provider.exchange_code(code, redirect_uri="x", code_verifier="v" * 50).id_token
    session: dict[str, Any] = client.post("/api/v1/auth/exchange", json={"provider": "local", "token": id_token}).json()
    return session


def test_refresh_rotates_the_session(client: TestClient) -> None:
    session = _exchanged_session(client, "api@example.org")
    assert session["user"]["email"] == "api@example.org"
    old = {"Authorization": f"Bearer {session['token']}"}
    assert client.get("/api/v1/auth/me", headers=old).status_code == 200
    rotated = client.post("/api/v1/auth/refresh", json={"refresh_token": session["refresh_token"]})
    assert rotated.status_code == 200
    assert rotated.json()["user"]["email"] == "api@example.org"
    new = {"Authorization": f"Bearer {rotated.json()['token']}"}
    assert client.get("/api/v1/auth/me", headers=new).status_code == 200
    assert client.get("/api/v1/auth/me", headers=old).status_code == 401  # rotated away
    again = client.post("/api/v1/auth/refresh", json={"refresh_token": session["refresh_token"]})
    assert again.status_code == 401  # a refresh token works once


def test_refreshes_never_extend_a_sign_in_past_the_refresh_lifetime(client: TestClient) -> None:
    """Each refresh issued a pair whose window counted from its own issue: a script refreshing
    once a month stayed signed in for ever, and never heard the identity provider again (an
    account disabled there, an admin group left). Refreshes now continue the sign-in, no further."""
    session = _exchanged_session(client, "script@example.org")
    with manual_clock(dt.datetime.now(dt.UTC)) as clock:
        clock.advance(days=20)
        rotated = client.post("/api/v1/auth/refresh", json={"refresh_token": session["refresh_token"]})
        assert rotated.status_code == 200, rotated.text
        clock.advance(days=20)  # the new pair is 20 days old, the sign-in 40
        refused = client.post("/api/v1/auth/refresh", json={"refresh_token": rotated.json()["refresh_token"]})
        assert refused.status_code == 401
        assert refused.json()["message"].endswith("of a sign-in over 30 days old: sign in again")


def test_a_refresh_token_replayed_at_the_same_time_buys_one_session_only(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stolen refresh token sent while its owner refreshes too must not buy both of them a
    session: the check that it is unused and its rotation must not interleave. Both requests are
    held where the rotation issues the new session, after the check, until the other arrives
    (or a second has passed, for a server that lets only one through). Found by an outsider's trial;
    tests/test_postgresql.py sends the same through two replicas."""
    from cmbcluster.services import sessions

    refresh_token = _exchanged_session(client, "twice@example.org")["refresh_token"]
    hold_until_both_arrive(monkeypatch, sessions, "create_session", timeout=1)
    with ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(lambda _: client.post("/api/v1/auth/refresh", json={"refresh_token": refresh_token}), range(2))
        )
    assert sorted(answer.status_code for answer in answers) == [200, 401], [answer.text for answer in answers]


def test_a_refresh_token_is_refused_while_its_user_is_deactivated_and_once_expired(client: TestClient) -> None:
    from sqlalchemy import update

    from cmbcluster.db.models import Session as SessionRow
    from cmbcluster.db.models import User

    context = client.app.state.context  # type: ignore[attr-defined]
    session = _exchanged_session(client, "paused@example.org")

    def set_status(status: str) -> None:
        with context.sessions() as db:
            db.execute(update(User).where(User.id == session["user"]["id"]).values(status=status))
            db.commit()

    def refresh() -> Any:
        return client.post("/api/v1/auth/refresh", json={"refresh_token": session["refresh_token"]})

    set_status("deactivated")
    refused = refresh()
    assert (
        refused.status_code == 403 and refused.json()["message"] == "this account is deactivated; ask an administrator"
    )
    set_status("active")  # reactivated: the refusal did not use the token up
    rotated = refresh()
    assert rotated.status_code == 200, rotated.text
    session = _exchanged_session(client, "late@example.org")
    with context.sessions() as db:  # older than the refresh lifetime
        too_old = dt.datetime.now(dt.UTC) - context.refresh_ttl - dt.timedelta(seconds=1)
        db.execute(update(SessionRow).where(SessionRow.user_id == session["user"]["id"])
                   .values(created_at=too_old, signed_in_at=too_old))  # fmt: skip
        db.commit()
    expired = refresh()
    assert expired.status_code == 401 and "of a sign-in over 30 days old" in expired.json()["message"]


def test_exchange_rejects_bad_tokens_and_input(client: TestClient) -> None:
    assert client.post("/api/v1/auth/exchange", json={"provider": "local", "token": "not.a.jwt"}).status_code == 401
    assert client.post("/api/v1/auth/exchange", json={"provider": "nope", "token": "x"}).status_code == 404
    assert client.post("/api/v1/auth/exchange", json={"provider": "local"}).status_code == 422
    assert (
        client.post("/api/v1/auth/exchange", content=b"{", headers={"content-type": "application/json"}).status_code
        == 422
    )


def test_sign_in_attempts_are_rate_limited(settings: CoreSettings) -> None:
    app = create_app(settings.model_copy(update={"login_attempts_per_minute": 3}))
    with TestClient(app, base_url=LOCAL) as client:
        statuses = [client.get("/api/v1/auth/local/login", follow_redirects=False).status_code for _ in range(5)]
        assert statuses == [303, 303, 303, 429, 429]
        limited = client.get("/api/v1/auth/local/login", follow_redirects=False)
        assert 1 <= int(limited.headers["retry-after"]) <= 61


def test_cookie_session_refuses_cross_site_changes(client: TestClient, alice: dict[str, str]) -> None:
    token = alice["Authorization"].removeprefix("Bearer ")
    client.cookies.set("cmbcluster_session", token)
    response = client.post("/api/v1/auth/logout", headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert client.get("/api/v1/auth/me").status_code == 200  # still signed in
    assert client.post("/api/v1/auth/logout", headers={"Origin": LOCAL}).status_code == 204


def test_session_expiry(settings: CoreSettings) -> None:
    app = create_app(settings.model_copy(update={"session_ttl_hours": 1.5 / 3600}))  # a second and a half
    with TestClient(app, base_url=LOCAL) as client:
        headers = dev_sign_in(client, "short@example.org")
        assert client.get("/api/v1/auth/me", headers=headers).status_code == 200
        time.sleep(1.7)
        assert client.get("/api/v1/auth/me", headers=headers).status_code == 401


def test_a_refused_browser_sign_in_lands_on_the_sign_in_page_with_the_reason(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Browsers come back from the identity provider: they get the UI's sign-in page with the reason;
    API clients keep getting the JSON error."""
    monkeypatch.setattr("cmbcluster.webui.ui_available", lambda: True)
    url = "/api/v1/auth/local/callback?code=x&state=y"
    page = client.get(url, headers={"Accept": "text/html,application/xhtml+xml"}, follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/signin/?error=no+sign-in+in+progress+in+this+browser%3B+start+again"
    api = client.get(url, headers={"Accept": "application/json"}, follow_redirects=False)
    assert api.status_code == 401 and api.json()["error"] == "authentication_failed"
