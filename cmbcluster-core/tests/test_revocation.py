"""Long-lived responses end once their caller may no longer use the API: the launch dialog's progress
stream and a WebSocket through the proxy, when the session signs out, an API token is revoked or an
administrator deactivates the account (revocation takes effect at once, for open responses too).

A real `cmbcluster serve` on the embedded default; the progress streams follow environments that
run `sleep`, which never opens its port, so they stay "starting" (and their streams open) for as long
as a test needs. Each test ends its streams itself within a deadline: a stream that never ends fails
the test, it does not hang it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from test_environment_proxy import APPLICATION
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cmbcluster.db import create_db_engine
from cmbcluster.db.models import Session as SessionRow
from cmbcluster.db.models import utcnow
from cmbcluster.local.compute import LocalProcessCompute
from cmbcluster.services.revocation import CHECK_SECONDS
from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ

#: How soon a stream must end after a sign-out or revocation made through this server (it learns of
#: it at once) and after one it did not make (another replica's: its next check).
AT_ONCE, AT_NEXT_CHECK = 3.0, CHECK_SECONDS + 3.0
Event = tuple[str, dict[str, Any]]
Action = Callable[[httpx.AsyncClient], Awaitable[None]]


@dataclass
class Served:
    server: ServeProcess
    admin: dict[str, str]
    data: Path

    @property
    def url(self) -> str:
        return self.server.url

    def sign_in(self, email: str) -> str:
        """A new session of ``email`` through the development sign-in: its token."""
        with httpx.Client(base_url=self.url, timeout=30) as http:
            return dev_sign_in(http, email)["Authorization"].removeprefix("Bearer ")

    def waiting_environment(self, token: str) -> str:
        """An environment of the token's user that stays "starting": its id."""
        answer = httpx.post(f"{self.url}/api/v1/environments", json={"application": "waits"}, headers=bearer(token))
        assert answer.status_code == 201, answer.text
        environment_id: str = answer.json()["id"]
        return environment_id


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("revocation")
    script = root / "echo_app.py"
    script.write_text(APPLICATION)
    env = clean_environ({
        "CMBCLUSTER_DATA_DIR": str(root / "data"),
        "CMBCLUSTER_START_TIMEOUT_SECONDS": "3600",
        "CMBCLUSTER_LOGIN_ATTEMPTS_PER_MINUTE": "1000",
    })  # fmt: skip
    with ServeProcess(env, root) as server:
        assert server.wait_ready("/readyz").status_code == 200, server.output()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            admin = dev_sign_in(http, "ada@example.org")
            for application in (
                {"slug": "waits", "name": "Waits", "image": "local", "command": [shutil.which("sleep"), "3600"]},
                {"slug": "echo", "name": "Echo", "image": "local", "default_preset": "light",
                 "command": [sys.executable, str(script), "{port}", "{token}", "{base_url}"]},
            ):  # fmt: skip
                created = http.post("/api/v1/applications", json=application, headers=admin)
                assert created.status_code == 201, created.text
            yield Served(server, admin, root / "data")
    # whatever happened to the server, none of its environments may outlive the tests
    compute = LocalProcessCompute(root / "data" / "compute")
    for status in compute.list_managed():
        compute.delete(status.environment_id)


async def follow(
    served: Served, headers: dict[str, str], environment_id: str, action: Action, *, within: float
) -> tuple[list[Event], float]:
    """Follow ``environment_id``'s progress stream; once its first event came, run ``action``. The
    events, and how long after the action the response ended; AssertionError if it was still open
    ``within`` seconds after the action."""
    events: list[Event] = []
    acted_at: float | None = None
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as http:
        path = f"/api/v1/environments/{environment_id}/events"
        async with http.stream("GET", path, headers=headers) as stream:
            assert stream.status_code == 200, await stream.aread()
            lines = stream.aiter_lines()
            name = "message"
            while True:
                deadline = 30.0 if acted_at is None else acted_at + within - time.monotonic()
                try:
                    line = await asyncio.wait_for(anext(lines), timeout=max(deadline, 0.0))
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise AssertionError(f"the stream was still open {within} s later; it sent {events}") from None
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((name, json.loads(line.removeprefix("data: "))))
                    if acted_at is None:
                        await action(http)
                        acted_at = time.monotonic()
    assert acted_at is not None, f"the stream ended before its first event: {events}"
    return events, time.monotonic() - acted_at


def signed_out(message: str) -> Event:
    return "signed_out", {"status": "signed_out", "message": message}


def test_signing_out_ends_that_sessions_progress_streams_and_says_so(served: Served) -> None:
    """As the web UI does it: the stream with the session cookie, the sign-out route with the cookie
    from this site's page. The user's other session (another browser) keeps its stream."""
    token, other = served.sign_in("grace@example.org"), served.sign_in("grace@example.org")
    environment_id = served.waiting_environment(token)
    cookie = {"Cookie": f"cmbcluster_session={token}"}

    async def scenario() -> tuple[list[Event], float, list[Event]]:
        kept: list[Event] = []

        async def sign_out(http: httpx.AsyncClient) -> None:
            answer = await http.post("/api/v1/auth/logout", headers={**cookie, "Origin": served.url})
            assert answer.status_code == 204, answer.text

        async def keep(http: httpx.AsyncClient) -> None:
            kept.append(("opened", {}))

        async def other_stream() -> None:
            await follow(served, bearer(other), environment_id, keep, within=60)

        elsewhere = asyncio.create_task(other_stream())
        while not kept:
            await asyncio.sleep(0.05)
        events, ended_after = await follow(served, cookie, environment_id, sign_out, within=AT_ONCE)
        await asyncio.sleep(1.0)
        still_open = not elsewhere.done()
        elsewhere.cancel()
        await asyncio.gather(elsewhere, return_exceptions=True)
        return events, ended_after, [("still open", {})] if still_open else []

    events, ended_after, other_session = asyncio.run(scenario())
    assert events[:-1] and {name for name, _ in events[:-1]} == {"status"}, events
    assert events[-1] == signed_out("your session has ended; sign in again"), events
    assert ended_after < AT_ONCE
    assert other_session == [("still open", {})], "signing out one session ended another's stream"
    refused = httpx.get(f"{served.url}/api/v1/environments/{environment_id}/events", headers=cookie)
    assert refused.status_code == 401


def test_revoking_an_api_token_ends_its_progress_streams(served: Served) -> None:
    session = served.sign_in("katherine@example.org")
    created = httpx.post(f"{served.url}/api/v1/settings/tokens", json={"name": "script"}, headers=bearer(session))
    assert created.status_code == 201, created.text
    api_token, token_id = created.json()["token"], created.json()["id"]
    environment_id = served.waiting_environment(api_token)

    async def revoke(http: httpx.AsyncClient) -> None:
        answer = await http.delete(f"/api/v1/settings/tokens/{token_id}", headers=bearer(session))
        assert answer.status_code == 204, answer.text

    events, ended_after = asyncio.run(follow(served, bearer(api_token), environment_id, revoke, within=AT_ONCE))
    assert events[-1] == signed_out("this API token is unknown, expired or revoked"), events
    assert ended_after < AT_ONCE


def test_deactivating_a_user_ends_their_progress_streams_and_says_why(served: Served) -> None:
    """Deactivation also stops their environments; the stream says the account is deactivated, not
    merely that the environment stopped."""
    token = served.sign_in("dorothy@example.org")
    user_id = httpx.get(f"{served.url}/api/v1/auth/me", headers=bearer(token)).json()["id"]
    environment_id = served.waiting_environment(token)

    async def deactivate(http: httpx.AsyncClient) -> None:
        off = {"status": "deactivated"}
        answer = await http.patch(f"/api/v1/admin/users/{user_id}", json=off, headers=served.admin)
        assert answer.status_code == 200, answer.text

    events, ended_after = asyncio.run(follow(served, bearer(token), environment_id, deactivate, within=AT_ONCE))
    assert events[-1] == signed_out("this account is deactivated; ask an administrator"), events
    assert ended_after < AT_ONCE


def test_a_session_revoked_elsewhere_ends_its_streams_at_the_next_check(served: Served) -> None:
    """Revoked where this server cannot see it happen (another replica on the same database, whose
    sign-out route wrote it): the server's periodic check of open streams' credentials finds it."""
    token = served.sign_in("mary@example.org")
    environment_id = served.waiting_environment(token)
    user_id = httpx.get(f"{served.url}/api/v1/auth/me", headers=bearer(token)).json()["id"]
    engine = create_db_engine(f"sqlite:///{served.data / 'cmbcluster.db'}")

    async def revoke_in_the_database(http: httpx.AsyncClient) -> None:
        with engine.begin() as connection:
            connection.execute(update(SessionRow).where(SessionRow.user_id == user_id).values(revoked_at=utcnow()))

    try:
        events, ended_after = asyncio.run(
            follow(served, bearer(token), environment_id, revoke_in_the_database, within=AT_NEXT_CHECK)
        )
    finally:
        engine.dispose()
    assert events[-1] == signed_out("your session has ended; sign in again"), events
    assert ended_after < AT_NEXT_CHECK


def test_a_session_that_expires_ends_its_streams(served: Served) -> None:
    token = served.sign_in("ada.byron@example.org")
    environment_id = served.waiting_environment(token)
    user_id = httpx.get(f"{served.url}/api/v1/auth/me", headers=bearer(token)).json()["id"]
    engine = create_db_engine(f"sqlite:///{served.data / 'cmbcluster.db'}")

    async def expire_soon(http: httpx.AsyncClient) -> None:
        soon = utcnow() + dt.timedelta(seconds=1)
        with engine.begin() as connection:
            connection.execute(update(SessionRow).where(SessionRow.user_id == user_id).values(expires_at=soon))

    try:
        events, _ = asyncio.run(follow(served, bearer(token), environment_id, expire_soon, within=AT_NEXT_CHECK + 1))
    finally:
        engine.dispose()
    assert events[-1] == signed_out("your session has ended; sign in again"), events


def test_signing_out_closes_websockets_through_the_proxy(served: Served) -> None:
    """A notebook's kernel connection is a WebSocket through the control plane: it closes (1008, with
    the reason) when the session that opened it signs out."""
    token = served.sign_in("hedy@example.org")
    created = httpx.post(f"{served.url}/api/v1/environments", json={"application": "echo"}, headers=bearer(token))
    assert created.status_code == 201, created.text
    environment_id = created.json()["id"]
    deadline = time.monotonic() + 60
    while True:  # running, and its application answers
        answer = httpx.get(f"{served.url}/environments/{environment_id}/echo", headers=bearer(token))
        if answer.status_code == 200:
            break
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)

    async def scenario() -> tuple[int | None, str, float]:
        url = served.url.replace("http://", "ws://") + f"/environments/{environment_id}/socket"
        async with connect(url, additional_headers=bearer(token), open_timeout=10) as socket:
            await socket.send("hello")
            assert await asyncio.wait_for(socket.recv(), 10) == "echo:hello"
            async with httpx.AsyncClient(base_url=served.url) as http:
                assert (await http.post("/api/v1/auth/logout", headers=bearer(token))).status_code == 204
            signed_out_at = time.monotonic()
            try:
                while True:
                    await asyncio.wait_for(socket.recv(), AT_ONCE)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None, closed
                return closed.rcvd.code, closed.rcvd.reason, time.monotonic() - signed_out_at
            except TimeoutError:
                raise AssertionError(f"the WebSocket was still open {AT_ONCE} s after signing out") from None

    try:
        code, reason, after = asyncio.run(scenario())
    finally:
        httpx.delete(f"{served.url}/api/v1/environments/{environment_id}", headers=served.admin)
    assert (code, reason) == (1008, "your session has ended; sign in again")
    assert after < AT_ONCE
