"""Uploads running at once never together pass a storage quota: a user's uploads into several of
their buckets, and a group's members' uploads against the group's quota. Through the API of a
served control plane (``cmbcluster serve``): one on SQLite, two replicas on one PostgreSQL
database (tests/postgres.py), real HTTP from client threads.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from cmbcluster.db import create_db_engine
from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ
from tests.postgres import emptied, postgres_url  # noqa: F401 - a fixture, registered by importing it

API = "/api/v1/storages"
MIB = 1024 * 1024
#: What an upload of unknown length holds at first (services.storages.RESERVATION_STEP).
STEP = 16 * MIB
Headers = dict[str, str]


@dataclass
class Served:
    """The control plane's replicas (one on SQLite) and their database, read to see the holds."""

    servers: list[ServeProcess]
    engine: Engine
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, index: int) -> httpx.Client:
        """A client of replica ``index`` (modulo their number)."""
        return self.clients[index % len(self.clients)]

    def held(self) -> int:
        """What the uploads under way hold, on every replica."""
        held = text("SELECT coalesce(sum(reserved_bytes), 0) FROM upload_journal")
        with self.engine.connect() as connection:
            return int(connection.execute(held).scalar_one())

    def output(self) -> str:
        return "\n".join(server.output()[-3000:] for server in self.servers)


@pytest.fixture(params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    data = tmp_path / "data"
    if request.param == "sqlite":
        url, replicas = f"sqlite:///{data / 'cmbcluster.db'}", 1
    else:
        url, replicas = emptied(request.getfixturevalue("postgres_url")), 2
    env = clean_environ({"CMBCLUSTER_DATA_DIR": str(data), "CMBCLUSTER_DATABASE_URL": url})
    servers: list[ServeProcess] = []
    try:
        for _ in range(replicas):  # one after the other: the first makes the data folder and the schema
            servers.append(ServeProcess(env, tmp_path))
            servers[-1].wait_ready("/readyz")
        found = Served(servers, create_db_engine(url))
        found.clients = [httpx.Client(base_url=s.url, timeout=120) for s in servers]
        yield found
        for client in found.clients:
            client.close()
        found.engine.dispose()
    finally:
        for server in servers:
            server.stop()


def sign_in(served: Served, *emails: str) -> list[Headers]:
    return [dev_sign_in(served.client(0), email) for email in emails]


def create(client: httpx.Client, headers: Headers, name: str) -> dict[str, Any]:
    made = client.post(API, json={"display_name": name}, headers=headers)
    assert made.status_code == 201, made.text
    body: dict[str, Any] = made.json()
    return body


def set_user_quota(served: Served, admin: Headers, user: Headers, quota: int) -> None:
    user_id = served.client(0).get("/api/v1/auth/me", headers=user).json()["id"]
    answer = served.client(0).patch(f"/api/v1/admin/users/{user_id}", headers=admin,
                                    json={"storage_quota_bytes": quota})  # fmt: skip
    assert answer.status_code == 200, answer.text


def set_group_quota(served: Served, admin: Headers, members: list[str], quota: int) -> None:
    lab = "/api/v1/admin/groups/cmb-lab"
    assert served.client(0).put(lab, headers=admin, json={"members": members}).status_code == 200
    assert served.client(0).patch(lab, headers=admin, json={"storage_quota_bytes": quota}).status_code == 200


def stored_bytes(served: Served, headers: Headers, storage_id: str) -> int:
    listing = served.client(0).get(f"{API}/{storage_id}/objects", headers=headers, params={"delimiter": "false"})
    assert listing.status_code == 200, listing.text
    return sum(int(o["size"]) for o in listing.json()["objects"])


def wait_until(condition: Any, served: Served, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}, not within {timeout} s:\n{served.output()}"
        time.sleep(0.05)


@pytest.mark.parametrize("whose", ["user", "group"])
def test_an_upload_under_way_counts_what_others_stored_since_it_began(served: Served, whose: str) -> None:
    """A 40 MiB quota. An upload of unknown length begins (it holds 16 MiB) and pauses; meanwhile
    24 MiB are uploaded into another bucket (the user's own, or another member's of the group), which
    fills the quota. When the first upload goes on past its 16 MiB, it must count those 24 MiB as
    stored now, not as they were when it began: it is stopped with 413 and stores nothing."""
    quota = 40 * MIB
    admin, alice, bob = sign_in(served, "ada@example.org", "alice@example.org", "bob@example.org")
    if whose == "user":
        set_user_quota(served, admin, alice, quota)
        streamer = other = alice
    else:
        set_group_quota(served, admin, ["alice@example.org", "bob@example.org"], quota)
        streamer, other = bob, alice
    streamed_into = create(served.client(0), streamer, "streamed")
    filled = create(served.client(0), other, "filled")

    resume = threading.Event()
    answers: list[httpx.Response] = []

    def paused_body() -> Iterator[bytes]:
        yield b"s" * MIB
        resume.wait(120)
        for _ in range(20):
            yield b"s" * MIB

    def stream() -> None:
        url = f"{API}/{streamed_into['id']}/objects/stream.bin"
        answers.append(served.client(1).put(url, content=paused_body(), headers=streamer))

    streaming = threading.Thread(target=stream)
    streaming.start()
    try:
        wait_until(lambda: served.held() == STEP, served, "the stream holds its first 16 MiB")
        fill = served.client(0).put(f"{API}/{filled['id']}/objects/fill.bin", content=b"f" * (quota - STEP),
                                    headers=other)  # fmt: skip
        assert fill.status_code == 201, fill.text  # exactly what the stream's hold left
    finally:
        resume.set()
        streaming.join(120)
    (answer,) = answers
    assert answer.status_code == 413, answer.text
    assert "left of" in answer.json()["message"] and "nothing was stored" in answer.json()["message"]
    assert stored_bytes(served, streamer, streamed_into["id"]) == 0
    assert stored_bytes(served, other, filled["id"]) == quota - STEP
    wait_until(lambda: served.held() == 0, served, "every hold ends with its upload")


def test_many_uploads_at_once_never_pass_a_quota(served: Served) -> None:
    """Alice may store 6 MiB, and the group of Alice, Bob and Carol 12 MiB. They upload 42 files of
    1 MiB at once, each into one of their two buckets (through either replica): Alice's buckets end
    with at most 6 MiB, all three members' with at most 12, every refusal says which quota, and no
    upload's hold outlives it."""
    admin, *members = sign_in(served, "ada@example.org", "alice@example.org", "bob@example.org", "carol@example.org")
    set_user_quota(served, admin, members[0], 6 * MIB)
    set_group_quota(served, admin, ["alice@example.org", "bob@example.org", "carol@example.org"], 12 * MIB)
    buckets = [(headers, create(served.client(0), headers, f"b{i}")["id"]) for headers in members for i in range(2)]

    def upload(index: int) -> httpx.Response:
        headers, storage_id = buckets[index % len(buckets)]
        return served.client(index).put(f"{API}/{storage_id}/objects/f{index}.bin", content=b"u" * MIB,
                                        headers=headers)  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(42) as pool:
        answers = list(pool.map(upload, range(42)))
    statuses = sorted({a.status_code for a in answers})
    assert set(statuses) <= {201, 413, 507}, [a.text for a in answers if a.status_code not in (201, 413, 507)]
    for refused in (a for a in answers if a.status_code != 201):
        message = refused.json()["message"]
        assert "your storage quota" in message or "your group 'cmb-lab'" in message, message
    stored = [stored_bytes(served, headers, storage_id) for headers, storage_id in buckets]
    accepted = sum(a.status_code == 201 for a in answers)
    assert sum(stored) == accepted * MIB  # what was answered 201 is stored, and nothing else
    assert sum(stored[:2]) <= 6 * MIB, f"Alice's buckets hold {sum(stored[:2]) / MIB} MiB of her 6 MiB quota"
    assert sum(stored) <= 12 * MIB, f"the group's buckets hold {sum(stored) / MIB} MiB of its 12 MiB quota"
    wait_until(lambda: served.held() == 0, served, "every hold ends with its upload")
