"""The storage API: buckets and their objects, over the embedded local backend."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update

from cmbcluster.app import create_app
from cmbcluster.db.models import (
    Application,
    AuditEvent,
    Environment,
    EnvironmentStorage,
    Storage,
    UploadJournal,
    User,
)
from cmbcluster.errors import PayloadTooLarge, ProviderUnavailable
from cmbcluster.services import storages as storage_service
from cmbcluster.services.reconcile import Reconciler
from cmbcluster.services.usage import USAGE_MAX_AGE
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ

API = "/api/v1/storages"
MIB = 1024 * 1024
Headers = dict[str, str]


# -- helpers -----------------------------------------------------------------------------------


def create(client: TestClient, headers: Headers, name: str = "data", **extra: Any) -> dict[str, Any]:
    answer = client.post(API, json={"display_name": name, **extra}, headers=headers)
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


def object_url(storage_id: str, key: str) -> str:
    return f"{API}/{storage_id}/objects/{quote(key)}"


def put(
    client: httpx.Client, headers: Headers, storage_id: str, key: str, body: Any, content_type: str | None = None
) -> httpx.Response:
    extra = {"Content-Type": content_type} if content_type else {}
    response: httpx.Response = client.put(object_url(storage_id, key), content=body, headers={**headers, **extra})
    return response


def chunked(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """A generator body: sent with Transfer-Encoding: chunked, no Content-Length."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def keys(page: dict[str, Any]) -> list[str]:
    return [item["key"] for item in page["objects"]]


def audit_actions(client: TestClient) -> list[tuple[str, str, dict[str, Any]]]:
    with client.app.state.context.sessions() as db:  # type: ignore[attr-defined]
        events = db.execute(select(AuditEvent).where(AuditEvent.target_type == "storage").order_by(AuditEvent.id))
        return [(e.action, e.target_id, e.detail) for e in events.scalars()]


@contextmanager
def client_with(settings: CoreSettings, **overrides: Any) -> Iterator[tuple[TestClient, Headers]]:
    app = create_app(settings.model_copy(update=overrides))
    with TestClient(app, base_url=LOCAL) as client:
        yield client, dev_sign_in(client, "ada@example.org", "Ada")


def bucket_dir(client: TestClient, storage: dict[str, Any]) -> Path:
    root: Path = client.app.state.context.storage.root  # type: ignore[attr-defined]
    return root / str(storage["bucket_name"])


# -- buckets -----------------------------------------------------------------------------------


def test_create_list_get_delete_with_usage(client: TestClient, alice: Headers) -> None:
    assert client.get(API, headers=alice).json()["storages"] == []
    made = create(client, alice, "  Simulations  ")
    assert made["display_name"] == "Simulations"  # trimmed
    assert made["storage_class"] == "standard" and made["status"] == "active" and made["backend"] == "local"
    assert made["size_bytes"] == 0 and made["object_count"] == 0 and made["usage_measured_at"]
    assert re.fullmatch(r"[a-z0-9-]{3,63}", made["bucket_name"])
    assert bucket_dir(client, made).is_dir()

    assert put(client, alice, made["id"], "run/one.bin", b"x" * 1000).status_code == 201
    assert put(client, alice, made["id"], "two.txt", b"hello").status_code == 201
    got = client.get(f"{API}/{made['id']}", headers=alice).json()
    assert (got["size_bytes"], got["object_count"]) == (1005, 2)  # re-measured: uploads invalidate the cache
    listed = client.get(API, headers=alice).json()["storages"]
    assert [(s["id"], s["size_bytes"], s["object_count"]) for s in listed] == [(made["id"], 1005, 2)]

    second = create(client, alice, "Second")
    assert [s["id"] for s in client.get(API, headers=alice).json()["storages"]] == [made["id"], second["id"]]

    refused = client.delete(f"{API}/{made['id']}", headers=alice)
    assert refused.status_code == 409
    # named as its owner knows it, never by the backend's real name
    assert refused.json()["message"] == "bucket 'Simulations' is not empty; delete its objects first or use force"
    assert client.get(f"{API}/{made['id']}", headers=alice).json()["status"] == "active"  # unchanged
    assert client.delete(f"{API}/{made['id']}", params={"force": "true"}, headers=alice).status_code == 204
    assert client.get(f"{API}/{made['id']}", headers=alice).status_code == 404
    assert not bucket_dir(client, made).exists()
    assert client.delete(f"{API}/{second['id']}", headers=alice).status_code == 204  # empty: no force needed
    assert client.get(API, headers=alice).json()["storages"] == []

    actions = [(action, target) for action, target, _ in audit_actions(client)]
    assert ("storage.created", made["id"]) in actions and ("storage.deleted", made["id"]) in actions
    assert ("storage.deleted", second["id"]) in actions


def test_usage_is_cached_and_measured_again_when_stale(client: TestClient, alice: Headers) -> None:
    made = create(client, alice)
    (bucket_dir(client, made) / "outside.bin").write_bytes(b"z" * 300)  # written behind the API's back
    assert client.get(f"{API}/{made['id']}", headers=alice).json()["size_bytes"] == 0  # cached, fresh
    stale = dt.datetime.now(dt.UTC) - USAGE_MAX_AGE - dt.timedelta(seconds=1)
    with client.app.state.context.sessions() as db:  # type: ignore[attr-defined]
        db.execute(update(Storage).where(Storage.id == made["id"]).values(usage_at=stale))
        db.commit()
    # A listing waits up to LIST_USAGE_WAIT_SECONDS for the measurement it starts (a loaded machine
    # can take longer: a fresh-clone run did), then answers the cached figures until it ends.
    deadline = time.monotonic() + 30
    while True:
        listed = client.get(API, headers=alice).json()["storages"][0]
        if (listed["size_bytes"], listed["object_count"]) == (300, 1) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (listed["size_bytes"], listed["object_count"]) == (300, 1)
    assert dt.datetime.fromisoformat(listed["usage_measured_at"]) > stale
    with client.app.state.context.sessions() as db:  # type: ignore[attr-defined]
        row = db.get(Storage, made["id"])
        assert row is not None and (row.usage_bytes, row.usage_objects) == (300, 1)  # stored for next time


def test_create_validates_its_input(client: TestClient, alice: Headers) -> None:
    for body in (
        {"display_name": ""},
        {"display_name": "   "},
        {"display_name": "x" * 101},
        {"display_name": "ok", "storage_class": "fast"},
        {"display_name": "ok", "unknown": 1},
        {},
    ):
        assert client.post(API, json=body, headers=alice).status_code == 422, body
    tab = client.post(API, json={"display_name": "tab\there"}, headers=alice)  # as every name people read
    assert tab.status_code == 400 and "U+0009" in tab.json()["message"], tab.text
    # A portable class this backend does not offer: the backend refuses, nothing is left behind.
    refused = client.post(API, json={"display_name": "cold", "storage_class": "cold"}, headers=alice)
    assert refused.status_code == 400 and "standard" in refused.json()["message"]
    assert client.get(API, headers=alice).json()["storages"] == []
    root: Path = client.app.state.context.storage.root  # type: ignore[attr-defined]
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []
    assert client.post(API, json={"display_name": "x"}).status_code == 401


def test_bucket_limit_per_user(settings: CoreSettings) -> None:
    with client_with(settings, max_buckets_per_user=2) as (client, ada):
        create(client, ada, "one")
        create(client, ada, "two")
        refused = client.post(API, json={"display_name": "three"}, headers=ada)
        assert refused.status_code == 409
        assert refused.json()["error"] == "conflict"
        assert refused.json()["message"] == (
            "you already have 2 buckets, the most allowed per user is 2; delete one before creating another"
        )
        root: Path = client.app.state.context.storage.root  # type: ignore[attr-defined]
        assert len([p for p in root.iterdir() if not p.name.startswith(".")]) == 2  # no bucket was made
        other = dev_sign_in(client, "eve@example.org")
        create(client, other, "mine")  # the limit is per user


def test_backend_failure_leaves_no_row(client: TestClient, alice: Headers, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(*args: object, **kwargs: object) -> None:
        raise ProviderUnavailable("the object store did not answer")

    monkeypatch.setattr(client.app.state.context.storage, "create_bucket", unavailable)  # type: ignore[attr-defined]
    answer = client.post(API, json={"display_name": "x"}, headers=alice)
    assert answer.status_code == 503 and answer.json()["message"] == "the object store did not answer"
    assert client.get(API, headers=alice).json()["storages"] == []


def test_row_failure_deletes_the_new_bucket(settings: CoreSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_audit(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database went away")

    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False, base_url=LOCAL) as client:
        ada = dev_sign_in(client, "ada@example.org")
        monkeypatch.setattr(storage_service, "audit", broken_audit)
        assert client.post(API, json={"display_name": "x"}, headers=ada).status_code == 500
        monkeypatch.undo()
        root: Path = app.state.context.storage.root
        assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []  # the bucket went again
        assert client.get(API, headers=ada).json()["storages"] == []


def _environment(client: TestClient, user_email: str, storage_id: str, status: str) -> str:
    with client.app.state.context.sessions() as db:  # type: ignore[attr-defined]
        row = db.get(Storage, storage_id)
        assert row is not None
        app = Application(slug=f"app-{status}", name="App", image="example/app:1")
        db.add(app)
        db.flush()
        env = Environment(
            user_id=row.user_id, application_id=app.id, name=f"analysis-{status}", backend="local", status=status
        )
        db.add(env)
        db.flush()
        db.add(EnvironmentStorage(environment_id=env.id, storage_id=storage_id, mount_path="/data"))
        db.commit()
        return env.id


def test_a_bucket_mounted_by_a_live_environment_cannot_be_deleted(client: TestClient, alice: Headers) -> None:
    made = create(client, alice)
    env_id = _environment(client, "alice@example.org", made["id"], "running")
    refused = client.delete(f"{API}/{made['id']}", params={"force": True}, headers=alice)
    assert refused.status_code == 409 and "analysis-running" in refused.json()["message"]
    assert client.get(f"{API}/{made['id']}", headers=alice).status_code == 200
    with client.app.state.context.sessions() as db:  # type: ignore[attr-defined]
        db.execute(update(Environment).where(Environment.id == env_id).values(status="stopped"))
        db.commit()
    assert client.delete(f"{API}/{made['id']}", headers=alice).status_code == 204  # stopped: the link goes too
    with client.app.state.context.sessions() as db:  # type: ignore[attr-defined]
        assert db.execute(select(EnvironmentStorage)).first() is None
        assert db.get(Environment, env_id) is not None
    detail = next(d for action, _, d in audit_actions(client) if action == "storage.deleted")
    assert detail["detached_environments"] == [env_id]


# -- objects -----------------------------------------------------------------------------------


def test_upload_then_download_is_byte_identical(client: TestClient, alice: Headers) -> None:
    sid = create(client, alice)["id"]
    data = os.urandom(3 * MIB + 12345)
    uploaded = put(client, alice, sid, "runs/2024/cmb map.fits", chunked(data))
    assert uploaded.status_code == 201, uploaded.text
    info = uploaded.json()
    assert info["key"] == "runs/2024/cmb map.fits" and info["size"] == len(data) and info["etag"]
    assert uploaded.headers["location"] == f"{API}/{sid}/objects/runs/2024/cmb%20map.fits"

    with client.stream("GET", object_url(sid, info["key"]), headers=alice) as answer:
        assert answer.status_code == 200
        digest = hashlib.sha256()
        for block in answer.iter_bytes():
            digest.update(block)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert answer.headers["content-length"] == str(len(data))
    assert answer.headers["etag"] == f'"{info["etag"]}"'
    assert answer.headers["accept-ranges"] == "bytes"
    assert answer.headers["content-disposition"] == 'attachment; filename="cmb map.fits"'
    assert answer.headers["x-content-type-options"] == "nosniff"

    # With a Content-Length this time, replacing the object.
    replaced = put(client, alice, sid, info["key"], data[:1000], content_type="image/fits")
    assert replaced.status_code == 201 and replaced.json()["size"] == 1000
    assert client.get(object_url(sid, info["key"]), headers=alice).content == data[:1000]


def test_empty_object_and_non_ascii_names(client: TestClient, alice: Headers) -> None:
    sid = create(client, alice)["id"]
    assert put(client, alice, sid, "données/résumé €.txt", b"bonjour").status_code == 201
    answer = client.get(object_url(sid, "données/résumé €.txt"), headers=alice)
    assert answer.content == b"bonjour"
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.headers["content-disposition"] == (
        "attachment; filename=\"r_sum_ _.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%E2%82%AC.txt"
    )
    assert put(client, alice, sid, "empty", b"").status_code == 201
    empty = client.get(object_url(sid, "empty"), headers=alice)
    assert empty.status_code == 200 and empty.content == b"" and empty.headers["content-length"] == "0"


def test_range_requests(client: TestClient, alice: Headers) -> None:
    sid = create(client, alice)["id"]
    data = bytes(range(256)) * 40  # 10240 bytes
    etag = put(client, alice, sid, "r.bin", data).json()["etag"]
    url = object_url(sid, "r.bin")

    def get(range_value: str, **extra: str) -> httpx.Response:
        response: httpx.Response = client.get(url, headers={**alice, "Range": range_value, **extra})
        return response

    for header, first, last in (
        ("bytes=0-9", 0, 9),
        ("bytes=100-", 100, 10239),
        ("bytes=-5", 10235, 10239),
        ("bytes=10000-99999", 10000, 10239),  # clamped to the end
        ("bytes=-999999", 0, 10239),
        ("bytes=10239-10239", 10239, 10239),
    ):
        answer = get(header)
        assert answer.status_code == 206, header
        assert answer.content == data[first : last + 1], header
        assert answer.headers["content-range"] == f"bytes {first}-{last}/10240", header
        assert answer.headers["content-length"] == str(last - first + 1), header
    for ignored in ("bytes=5-2", "bytes=0-1,5-6", "items=0-1", "bytes=-", "bytes=a-b"):
        answer = get(ignored)  # not a single valid byte range: the whole object (RFC 9110 allows ignoring)
        assert answer.status_code == 200 and answer.content == data, ignored
    for unsatisfiable in ("bytes=10240-", "bytes=20000-30000", "bytes=-0"):
        answer = get(unsatisfiable)
        assert answer.status_code == 416, unsatisfiable
        assert answer.headers["content-range"] == "bytes */10240"
        assert answer.json()["error"] == "range_not_satisfiable"
    assert get("bytes=0-3", **{"If-Range": f'"{etag}"'}).status_code == 206
    stale = get("bytes=0-3", **{"If-Range": '"an-older-version"'})
    assert stale.status_code == 200 and stale.content == data
    put(client, alice, sid, "empty", b"")
    assert client.get(object_url(sid, "empty"), headers={**alice, "Range": "bytes=0-"}).status_code == 416


def test_head_gives_the_download_headers_without_the_body(client: TestClient, alice: Headers) -> None:
    sid = create(client, alice)["id"]
    put(client, alice, sid, "notes/a.json", b'{"a": 1}')
    head = client.head(object_url(sid, "notes/a.json"), headers=alice)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == "8"
    assert head.headers["content-type"] == "application/json"
    assert head.headers["etag"] and head.headers["last-modified"].endswith("GMT")
    assert client.head(object_url(sid, "notes/missing.json"), headers=alice).status_code == 404
    missing = client.get(object_url(sid, "notes/missing.json"), headers=alice)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_listing_with_prefixes_and_pages(client: TestClient, alice: Headers) -> None:
    sid = create(client, alice)["id"]
    for key in ("a/1.txt", "a/2.txt", "b/x/1.txt", "c.txt", "ca.txt"):
        assert put(client, alice, sid, key, key.encode()).status_code == 201
    url = f"{API}/{sid}/objects"
    top = client.get(url, headers=alice).json()
    assert keys(top) == ["c.txt", "ca.txt"] and top["prefixes"] == ["a/", "b/"] and top["next_page_token"] is None
    assert set(top["objects"][0]) == {"key", "size", "last_modified", "content_type", "etag"}
    assert top["objects"][0]["size"] == 5 and top["objects"][0]["content_type"] == "text/plain"
    assert keys(client.get(url, params={"prefix": "a/"}, headers=alice).json()) == ["a/1.txt", "a/2.txt"]
    assert client.get(url, params={"prefix": "b/"}, headers=alice).json()["prefixes"] == ["b/x/"]
    assert keys(client.get(url, params={"prefix": "c"}, headers=alice).json()) == ["c.txt", "ca.txt"]
    flat = client.get(url, params={"delimiter": "false"}, headers=alice).json()
    assert keys(flat) == ["a/1.txt", "a/2.txt", "b/x/1.txt", "c.txt", "ca.txt"] and flat["prefixes"] == []

    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"delimiter": "false", "page_size": 2}
        if token:
            params["page_token"] = token
        page = client.get(url, params=params, headers=alice).json()
        seen += keys(page)
        pages += 1
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == keys(flat) and pages == 3
    for bad in ({"page_size": 0}, {"page_size": 1001}, {"delimiter": "maybe"}):
        assert client.get(url, params=bad, headers=alice).status_code == 422, bad
    assert client.get(url, params={"prefix": "../"}, headers=alice).status_code == 400
    assert client.get(url, params={"prefix": "a/../"}, headers=alice).status_code == 400


def test_a_page_token_this_server_never_gave_is_a_400(client: TestClient, alice: Headers) -> None:
    """'zzz' listed from after 'zzz' (an empty page, or the first one: found by an outsider); a token
    carries on the listing it was given for only."""
    sid = create(client, alice)["id"]
    other = create(client, alice, "other")["id"]
    for key in ("a/1.txt", "a/2.txt", "a/3.txt", "b.txt"):
        assert put(client, alice, sid, key, b"x").status_code == 201
    url = f"{API}/{sid}/objects"
    first = client.get(url, params={"prefix": "a/", "page_size": 2}, headers=alice).json()
    token = first["next_page_token"]
    assert keys(first) == ["a/1.txt", "a/2.txt"] and token
    rest = client.get(url, params={"prefix": "a/", "page_size": 2, "page_token": token}, headers=alice)
    assert keys(rest.json()) == ["a/3.txt"] and rest.json()["next_page_token"] is None
    # what the local backend's tokens were (the last key), forged, cut or changed ones
    middle = len(token) // 2
    changed = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    for forged in ("zzz", "a/2.txt", token[:-4], changed, "é"):
        answer = client.get(url, params={"prefix": "a/", "page_token": forged}, headers=alice)
        assert answer.status_code == 400, (forged, answer.text)
        assert answer.json()["message"].startswith("page_token is not one this server gave: start from the first")
    for elsewhere in (
        {"prefix": "b", "page_token": token}, {"prefix": "a/", "delimiter": "false", "page_token": token},
    ):  # fmt: skip
        answer = client.get(url, params=elsewhere, headers=alice)
        assert answer.status_code == 400 and "given for another listing" in answer.json()["message"], elsewhere
    another_bucket = client.get(f"{API}/{other}/objects", params={"prefix": "a/", "page_token": token}, headers=alice)
    assert another_bucket.status_code == 400 and "another listing" in another_bucket.json()["message"]


def test_a_prefix_no_key_could_start_with_is_refused_as_a_key_would_be(client: TestClient, alice: Headers) -> None:
    """A partial prefix lists what starts with it, a name starting with dots included (".", "maps/.."
    were refused as if they were whole names); one no key can start with is a 400 in the key's words."""
    sid = create(client, alice)["id"]
    for key in (".config/a.json", "maps/.hidden", "maps/..old/b.txt", "maps/planck.fits"):
        assert put(client, alice, sid, key, b"x").status_code == 201, key
    url = f"{API}/{sid}/objects"

    def listed(prefix: str, delimiter: bool = True) -> list[str]:
        answer = client.get(url, params={"prefix": prefix, "delimiter": delimiter}, headers=alice)
        assert answer.status_code == 200, (prefix, answer.text)
        names: list[str] = keys(answer.json()) + answer.json()["prefixes"]
        return names

    assert listed(".") == [".config/"]
    assert listed("maps/.") == ["maps/.hidden", "maps/..old/"]
    assert listed("maps/..", delimiter=False) == ["maps/..old/b.txt"]
    assert listed("ma") == ["maps/"] and listed("maps/") == ["maps/.hidden", "maps/planck.fits", "maps/..old/"]
    assert listed("maps/pl") == ["maps/planck.fits"]
    for prefix, like_key in (
        ("maps/a\x00b", "a\x00b"), ("maps\\", "a\\b"), ("\x7f", "a\x7fb"), ("maps/../", "maps/../x"),
        ("maps//", "maps//x"), ("/", "/x"), ("x" * 256, "x" * 256),
    ):  # fmt: skip
        refused = client.get(url, params={"prefix": prefix}, headers=alice)
        as_key = client.post(f"{url}/delete", json={"keys": [like_key]}, headers=alice)  # a URL would drop '..'
        assert refused.status_code == as_key.status_code == 400, (prefix, refused.text, as_key.text)
        assert refused.json()["message"] == as_key.json()["message"], prefix


def test_delete_one_and_many(client: TestClient, alice: Headers) -> None:
    sid = create(client, alice)["id"]
    for key in ("a/1", "a/2", "b", "c"):
        put(client, alice, sid, key, b"1234")
    assert client.delete(object_url(sid, "b"), headers=alice).status_code == 204
    assert client.delete(object_url(sid, "b"), headers=alice).status_code == 204  # idempotent
    assert client.get(object_url(sid, "b"), headers=alice).status_code == 404

    url = f"{API}/{sid}/objects/delete"
    refused = client.post(url, json={"keys": ["a/1", "../c"]}, headers=alice)
    assert refused.status_code == 400
    assert client.get(object_url(sid, "a/1"), headers=alice).status_code == 200  # nothing of the batch deleted
    answer = client.post(url, json={"keys": ["a/1", "a/2", "a/1", "never-was"]}, headers=alice)
    assert answer.status_code == 200 and answer.json() == {"deleted": 3}
    assert keys(client.get(f"{API}/{sid}/objects", params={"delimiter": False}, headers=alice).json()) == ["c"]
    bad_bodies: list[dict[str, list[str]]] = [
        {"keys": []},
        {"keys": [f"k{i}" for i in range(1001)]},
        {"keys": [""]},
        {},
    ]
    for bad in bad_bodies:
        assert client.post(url, json=bad, headers=alice).status_code == 422
    assert client.get(f"{API}/{sid}", headers=alice).json()["object_count"] == 1

    deletions = [(a, d) for a, t, d in audit_actions(client) if a == "storage.objects_deleted" and t == sid]
    assert [d["keys"] for _, d in deletions] == [["b"], ["b"], ["a/1", "a/2", "never-was"]]


def test_an_object_cannot_be_a_folder_too(client: TestClient, alice: Headers) -> None:
    sid = create(client, alice)["id"]
    put(client, alice, sid, "a/b", b"1")
    assert put(client, alice, sid, "a", b"2").status_code == 409
    assert put(client, alice, sid, "a/b/c", b"3").status_code == 409


@pytest.mark.parametrize(
    "raw_key",
    ["a/%2E%2E/b", "%2E%2E/escape", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "a/%2E/b", "a%5Cb", "x%00y", "dir/", "a//b", ""],
)
def test_unsafe_object_keys_are_400(client: TestClient, alice: Headers, raw_key: str) -> None:
    made = create(client, alice)
    url = f"{API}/{made['id']}/objects/{raw_key}"
    for method in ("PUT", "GET", "DELETE"):
        answer = client.request(method, url, content=b"payload" if method == "PUT" else None, headers=alice)
        assert answer.status_code == 400, (method, raw_key, answer.text)
        assert answer.json()["error"] == "invalid_request"
    assert client.head(url, headers=alice).status_code == 400
    data_dir: Path = client.app.state.context.config.core.data_dir  # type: ignore[attr-defined]
    stored = [p for p in data_dir.rglob("*") if p.is_file() and p.read_bytes() == b"payload"]
    assert stored == []


@pytest.mark.parametrize(
    ("key", "said"),
    [
        ("invoice\u202efdp.exe", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),  # shown as "invoiceexe.pdf"
        ("maps/\u2066planck\u2069.fits", "U+2066 (LEFT-TO-RIGHT ISOLATE)"),
        ("\u202aa", "U+202A"),
        ("a\u202c", "U+202C"),
        ("a\u2068b", "U+2068"),
        ("rlm\u200f.txt", "U+200F (RIGHT-TO-LEFT MARK)"),  # the implicit marks reorder too
        ("a\u200eb", "U+200E (LEFT-TO-RIGHT MARK)"),
        ("a\u061cb", "U+061C (ARABIC LETTER MARK)"),
        ("c1\u0085x", "control characters"),  # NEXT LINE, a C1 control
        ("\u200bzw.txt", "U+200B (ZERO WIDTH SPACE)"),  # found by an outsider: shown as "zw.txt"
        ("bom\ufeff.txt", "U+FEFF (ZERO WIDTH NO-BREAK SPACE)"),
        ("soft\u00adhyphen.txt", "U+00AD (SOFT HYPHEN)"),
        ("no\u00a0break.txt", "U+00A0 (NO-BREAK SPACE)"),  # shown as "no break.txt"
        ("line\u2028sep.txt", "U+2028 (LINE SEPARATOR)"),
        ("zw\u200c.txt", "U+200C (ZERO WIDTH NON-JOINER)"),  # beside Latin letters, invisible
        (".cmbcluster-tmp-upload", "reserved"),
        ("run1/.cmbcluster-tmp-1234/map.fits", "reserved"),
        ("report.pdf ", "ends with a space"),
        ("run1 /map.fits", "ends with a space"),
    ],
)
def test_keys_that_would_pass_for_another_name_are_refused_on_writing(
    client: TestClient, alice: Headers, key: str, said: str
) -> None:
    """A bidirectional override shows "invoice\u202efdp.exe" as "invoiceexe.pdf"; a name ending in a
    space looks like the one without it; ``.cmbcluster-tmp-`` is the product's own. Writing such a key
    is a 400 saying why; nothing is stored."""
    sid = create(client, alice)["id"]
    url = f"{API}/{sid}/objects/{quote(key)}"
    refused = client.put(url, content=b"payload", headers=alice)
    assert refused.status_code == 400, refused.text
    assert said in refused.json()["message"], refused.json()["message"]
    assert put(client, alice, sid, "source.txt", b"payload").status_code == 201
    moved = client.post(f"{API}/{sid}/objects/move", json={"source": "source.txt", "destination": key}, headers=alice)
    assert moved.status_code == 400 and said in moved.json()["message"], moved.text
    assert put(client, alice, sid, "dir/a.txt", b"payload").status_code == 201
    into = {"source": "dir/", "destination": f"{key}/"}
    folder = client.post(f"{API}/{sid}/objects/move", json=into, headers=alice)
    assert folder.status_code == 400 and said in folder.json()["message"], folder.text
    assert keys(client.get(f"{API}/{sid}/objects", headers=alice, params={"delimiter": "false"}).json()) == [
        "dir/a.txt", "source.txt"
    ]  # fmt: skip


def test_names_spelled_with_joiners_are_kept(client: TestClient, alice: Headers) -> None:
    """Persian and the Indic scripts spell words with the zero-width joiners, and emoji sequences join
    with them: between such characters they are part of the name, not a disguise."""
    sid = create(client, alice)["id"]
    for key in ("\u0646\u06cc\u0645\u200c\u0641\u0627\u0635\u0644\u0647.txt",  # Persian "half space"
                "\u0915\u094d\u200d\u0937.txt",  # Devanagari, a joiner after the virama
                "team-\U0001f469\u200d\U0001f52c.png"):  # woman scientist  # fmt: skip
        assert put(client, alice, sid, key, b"payload").status_code == 201, key


def test_a_key_written_outside_the_api_can_still_be_read_renamed_and_deleted(
    client: TestClient, alice: Headers
) -> None:
    """Environments write into their mounted buckets directly: a file named there with a bidirectional
    override (or a trailing space) is listed, downloaded, moved to a plain name and deleted as usual."""
    made = create(client, alice)
    odd = "invoice\u202efdp.exe"
    (bucket_dir(client, made) / odd).write_bytes(b"written by a notebook")
    (bucket_dir(client, made) / "notes.txt ").write_bytes(b"spaced")
    assert keys(client.get(f"{API}/{made['id']}/objects", headers=alice).json()) == [odd, "notes.txt "]
    assert client.get(object_url(made["id"], odd), headers=alice).content == b"written by a notebook"
    moved = client.post(
        f"{API}/{made['id']}/objects/move", json={"source": odd, "destination": "invoice.pdf.exe"}, headers=alice
    )
    assert moved.status_code == 200, moved.text
    assert client.delete(object_url(made["id"], "notes.txt "), headers=alice).status_code == 204
    assert keys(client.get(f"{API}/{made['id']}/objects", headers=alice).json()) == ["invoice.pdf.exe"]


def test_zero_width_joiners_and_inner_spaces_are_part_of_names(client: TestClient, alice: Headers) -> None:
    """Persian needs the zero-width non-joiner, emoji sequences the joiner: names keep them."""
    sid = create(client, alice)["id"]
    for key in ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.txt", "team \U0001f469\u200d\U0001f52c/run 1.txt"):
        assert put(client, alice, sid, key, b"x").status_code == 201, key


def test_another_users_storage_is_not_found_on_every_route(client: TestClient, alice: Headers, bob: Headers) -> None:
    sid = create(client, alice)["id"]
    put(client, alice, sid, "secret.txt", b"alice's")
    unknown = "0" * 32
    routes: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", f"{API}/{{id}}", {}),
        ("DELETE", f"{API}/{{id}}", {"params": {"force": True}}),
        ("GET", f"{API}/{{id}}/objects", {}),
        ("PUT", f"{API}/{{id}}/objects/secret.txt", {"content": b"bob's"}),
        ("PUT", f"{API}/{{id}}/objects/%2E%2E/x", {"content": b"bob's"}),
        ("GET", f"{API}/{{id}}/objects/secret.txt", {}),
        ("GET", f"{API}/{{id}}/objects/secret.txt", {"headers": {"Range": "bytes=0-1"}}),
        ("HEAD", f"{API}/{{id}}/objects/secret.txt", {}),
        ("DELETE", f"{API}/{{id}}/objects/secret.txt", {}),
        ("POST", f"{API}/{{id}}/objects/delete", {"json": {"keys": ["secret.txt"]}}),
    ]
    for method, template, kwargs in routes:
        extra_headers = kwargs.pop("headers", {})
        theirs = client.request(method, template.format(id=sid), headers={**bob, **extra_headers}, **kwargs)
        nothing = client.request(method, template.format(id=unknown), headers={**bob, **extra_headers}, **kwargs)
        assert theirs.status_code == nothing.status_code == 404, (method, template)
        if method != "HEAD":
            assert theirs.json()["message"].replace(sid, "ID") == nothing.json()["message"].replace(unknown, "ID")
    assert [s["id"] for s in client.get(API, headers=bob).json()["storages"]] == []
    assert client.get(object_url(sid, "secret.txt"), headers=alice).content == b"alice's"  # untouched
    assert client.get(f"{API}/{sid}", headers=alice).status_code == 200


def test_oversized_uploads_are_413_and_leave_nothing(settings: CoreSettings) -> None:
    with client_with(settings, max_upload_bytes=1000) as (client, ada):
        made = create(client, ada)
        sid = made["id"]
        declared = put(client, ada, sid, "big.bin", b"x" * 1001)
        assert declared.status_code == 413 and declared.json()["error"] == "payload_too_large"
        assert "1000" in declared.json()["message"]
        streamed = put(client, ada, sid, "big.bin", chunked(b"x" * 5000, 300))  # no Content-Length
        assert streamed.status_code == 413
        assert client.get(object_url(sid, "big.bin"), headers=ada).status_code == 404
        # An oversized replacement keeps the previous version.
        assert put(client, ada, sid, "big.bin", chunked(b"y" * 1000, 300)).status_code == 201  # exactly the limit
        assert put(client, ada, sid, "big.bin", chunked(b"z" * 1500, 300)).status_code == 413
        assert client.get(object_url(sid, "big.bin"), headers=ada).content == b"y" * 1000
        root: Path = client.app.state.context.storage.root  # type: ignore[attr-defined]
        assert list((root / ".tmp").iterdir()) == []  # no partial upload left behind
        assert [p.name for p in bucket_dir(client, made).iterdir()] == ["big.bin"]


def test_objects_of_a_storage_being_deleted_are_refused(client: TestClient, alice: Headers) -> None:
    sid = create(client, alice)["id"]
    with client.app.state.context.sessions() as db:  # type: ignore[attr-defined]
        db.execute(update(Storage).where(Storage.id == sid).values(status="deleting"))
        db.commit()
    assert put(client, alice, sid, "a", b"1").status_code == 409
    assert client.get(f"{API}/{sid}/objects", headers=alice).status_code == 409
    # Deleting again finishes the job (an earlier attempt may have crashed half-way).
    assert client.delete(f"{API}/{sid}", headers=alice).status_code == 204


def test_openapi_documents_every_storage_route(client: TestClient) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    operations = [
        (path, method, operation)
        for path, item in spec["paths"].items()
        if path.startswith(API)
        for method, operation in item.items()
    ]
    assert len(operations) == 13  # with move, preview and archive
    for path, method, operation in operations:
        assert operation.get("summary"), (path, method)
        assert operation["tags"] == ["storage"]
    upload = spec["paths"][f"{API}/{{storage_id}}/objects/{{key}}"]["put"]
    assert "application/octet-stream" in upload["requestBody"]["content"]
    assert set(spec["components"]["schemas"]["StorageCreate"]["required"]) == {"display_name"}


# -- through a real server ---------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProcess]:
    env = clean_environ({"CMBCLUSTER_DATA_DIR": str(tmp_path / "data")})
    with ServeProcess(env, tmp_path) as process:
        process.wait_ready("/readyz")
        yield process


def test_served_upload_runs_in_constant_memory_and_survives_disconnects(server: ServeProcess, tmp_path: Path) -> None:
    size = 64 * MIB
    block = os.urandom(MIB)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        headers = dev_sign_in(client, "ada@example.org")
        made = client.post(API, json={"display_name": "big"}, headers=headers).json()
        url = object_url(made["id"], "big.bin")
        assert client.put(url, content=b"warm-up", headers=headers).status_code == 201

        before = rss_bytes(server.process.pid)
        peak = before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.02):
                peak = max(peak, rss_bytes(server.process.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()

        def body() -> Iterator[bytes]:
            for index in range(size // MIB):
                yield index.to_bytes(8, "big") + block[8:]

        expected = hashlib.sha256(b"".join(body())).hexdigest()
        digest = hashlib.sha256()
        try:
            answer = client.put(url, content=body(), headers=headers)
            assert answer.status_code == 201, answer.text
            assert answer.json()["size"] == size
            upload_peak = peak
            with client.stream("GET", url, headers=headers) as download:
                assert download.status_code == 200
                for part in download.iter_bytes():
                    digest.update(part)
        finally:
            done.set()
            sampler.join()
        assert digest.hexdigest() == expected
        for what, top in (("upload", upload_peak), ("upload and download", peak)):
            growth = top - before
            assert growth < 64 * MIB, f"the server's RSS grew by {growth / MIB:.1f} MiB during a 64 MiB {what}"

        # A client that goes away half-way: no object, no server error.
        broken = object_url(made["id"], "broken.bin")
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(
                f"PUT {broken} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {headers['Authorization']}\r\n"
                f"Content-Length: {10 * MIB}\r\n\r\n".encode()
            )
            raw.sendall(block * 2)
        deadline = time.monotonic() + 10
        while "interrupted" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get(broken, headers=headers).status_code == 404
        listing = client.get(f"{API}/{made['id']}/objects", headers=headers).json()
        assert keys(listing) == ["big.bin"]

        # A download abandoned half-way is no server error either.
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(
                f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {headers['Authorization']}\r\n\r\n".encode()
            )
            received = 0
            while received < 2 * MIB:
                received += len(raw.recv(256 * 1024))
        assert client.get(f"{API}/{made['id']}", headers=headers).status_code == 200  # still serving
    log = server.output()
    assert "interrupted" in log
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert [r for r in records if r["level"] in ("error", "critical")] == [], log
    assert "Traceback" not in log and " 500" not in log
    temp = tmp_path / "data" / "buckets" / ".tmp"
    assert not temp.exists() or list(temp.iterdir()) == []


def journal_holds(data: Path) -> list[int]:
    """The holds of the uploads a served control plane journals (its SQLite database)."""
    with sqlite3.connect(data / "cmbcluster.db") as db:
        return [row[0] for row in db.execute("SELECT reserved_bytes FROM upload_journal")]


def test_a_stalled_upload_is_stopped_and_frees_its_quota_a_slow_one_is_not(tmp_path: Path) -> None:
    """An upload whose client stops sending is stopped after CMBCLUSTER_UPLOAD_IDLE_TIMEOUT_SECONDS
    (here 2) with a 408 that says so; nothing is stored, and the quota it held is free again. One
    that sends slowly but steadily runs on past that time, still holding its quota (renewed while
    its bytes come, even across recovery passes every second). A client that goes away frees its
    hold too."""
    data = tmp_path / "data"
    env = clean_environ({
        "CMBCLUSTER_DATA_DIR": str(data), "CMBCLUSTER_STORAGE_QUOTA_BYTES": str(8 * MIB),
        "CMBCLUSTER_UPLOAD_IDLE_TIMEOUT_SECONDS": "2", "CMBCLUSTER_RECONCILE_INTERVAL_SECONDS": "1",
    })  # fmt: skip
    with ServeProcess(env, tmp_path) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        server.wait_ready("/readyz")
        headers = dev_sign_in(client, "ada@example.org")
        made = client.post(API, json={"display_name": "uploads"}, headers=headers).json()

        def wait_for_holds(wanted: list[int]) -> None:
            deadline = time.monotonic() + 30
            while journal_holds(data) != wanted and time.monotonic() < deadline:
                time.sleep(0.05)
            assert journal_holds(data) == wanted, server.output()

        # Slow but steady: 32 KiB every quarter second, 1 MiB in 8 s (four times the idle timeout),
        # less than the server's 1 MiB chunks in the time a hold lasts without renewal.
        def slow_body() -> Iterator[bytes]:
            for _ in range(32):
                time.sleep(0.25)
                yield b"s" * (32 * 1024)

        slow: list[httpx.Response] = []
        slow_url, declared = object_url(made["id"], "slow.bin"), {**headers, "Content-Length": str(MIB)}

        def send_slowly() -> None:
            slow.append(client.put(slow_url, content=slow_body(), headers=declared))

        sending = threading.Thread(target=send_slowly)
        sending.start()
        try:
            wait_for_holds([MIB])
            time.sleep(3.5)  # longer than a hold lasts without renewal (2 s and a quarter)
            refused = put(client, headers, made["id"], "big.bin", b"b" * (7 * MIB + 1))
            assert refused.status_code == 413, refused.text
            assert "held by uploads under way" in refused.json()["message"]
        finally:
            sending.join(60)
        assert slow[0].status_code == 201, slow[0].text
        assert slow[0].json()["size"] == MIB
        wait_for_holds([])
        assert put(client, headers, made["id"], "filler.bin", b"f" * (3 * MIB)).status_code == 201  # 4 MiB left

        # Stalled: declares the whole 4 MiB left, sends 1 MiB, then nothing.
        stalled_url = object_url(made["id"], "stalled.bin")
        request = (f"PUT {stalled_url} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {headers['Authorization']}\r\n"
                   f"Content-Length: {4 * MIB}\r\n\r\n").encode()  # fmt: skip
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(request + b"x" * MIB)
            wait_for_holds([4 * MIB])
            began = time.monotonic()
            full = put(client, headers, made["id"], "other.bin", b"o")
            assert full.status_code == 507 and "held by uploads under way" in full.json()["message"]
            raw.settimeout(30)
            answer = b""
            while chunk := raw.recv(65536):
                answer += chunk
            waited = time.monotonic() - began
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer[:500]
        error = json.loads(body)
        assert error["error"] == "request_timeout"
        assert error["message"].startswith("no byte of the upload arrived for 2 seconds: it was stopped")
        assert waited < 15
        assert client.get(stalled_url, headers=headers).status_code == 404
        wait_for_holds([])
        assert put(client, headers, made["id"], "other.bin", b"o" * (4 * MIB)).status_code == 201

        # A client that goes away mid-upload: its hold ends at once.
        assert client.post(f"{API}/{made['id']}/objects/delete", headers=headers,
                           json={"keys": ["other.bin"]}).status_code == 200  # fmt: skip
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(request + b"x" * MIB)
            wait_for_holds([4 * MIB])
        wait_for_holds([])
    log = server.output()
    assert "no byte for 2 s" in log and "interrupted by the client" in log
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert [r for r in records if r["level"] in ("error", "critical")] == [], log
    assert "Traceback" not in log
    temp = data / "buckets" / ".tmp"
    assert not temp.exists() or list(temp.iterdir()) == []


# -- what a crash leaves behind ---------------------------------------------------------------


def test_local_usage_has_no_noncurrent_versions_and_uploads_leave_no_journal(
    client: TestClient, alice: Headers
) -> None:
    made = create(client, alice)
    assert (made["noncurrent_bytes"], made["noncurrent_object_count"]) == (0, 0)
    assert put(client, alice, made["id"], "a.bin", b"a" * 10).status_code == 201
    assert put(client, alice, made["id"], "a.bin", b"b" * 3).status_code == 201
    got = client.get(f"{API}/{made['id']}", headers=alice).json()
    assert (got["size_bytes"], got["noncurrent_bytes"]) == (3, 0)  # the local backend keeps no versions
    with client.app.state.context.sessions() as db:  # type: ignore[attr-defined]
        assert db.execute(select(UploadJournal)).scalars().all() == []


def test_a_delete_that_cannot_be_finished_at_start_is_rolled_back(
    client: TestClient, alice: Headers, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = client.app.state.context  # type: ignore[attr-defined]
    made = create(client, alice)
    assert put(client, alice, made["id"], "keep.txt", b"k" * 7).status_code == 201
    with context.sessions() as db:  # what a server killed mid-delete leaves
        db.execute(update(Storage).where(Storage.id == made["id"]).values(status="deleting", delete_force=True))
        db.commit()
    shown = client.get(f"{API}/{made['id']}", headers=alice).json()
    assert shown["status"] == "deleting"
    assert client.put(f"{API}/{made['id']}/objects/x", headers=alice, content=b"x").status_code == 409

    def unavailable(bucket: str, *, force: bool = False) -> None:
        raise ProviderUnavailable("storage is down")

    monkeypatch.setattr(context.storage, "delete_bucket", unavailable)
    report = Reconciler(context).reconcile(startup=True)
    assert report.storage_deletes == {made["id"]: "active"}
    got = client.get(f"{API}/{made['id']}", headers=alice).json()
    assert got["status"] == "active" and (got["size_bytes"], got["object_count"]) == (7, 1)  # measured anew
    actions = [(action, target) for action, target, _ in audit_actions(client)]
    assert ("storage.delete_rolled_back", made["id"]) in actions

    monkeypatch.undo()
    with context.sessions() as db:
        db.execute(update(Storage).where(Storage.id == made["id"]).values(status="deleting", delete_force=True))
        db.commit()
    assert Reconciler(context).reconcile(startup=True).storage_deletes == {made["id"]: "deleted"}
    assert client.get(f"{API}/{made['id']}", headers=alice).status_code == 404
    assert not bucket_dir(client, made).exists()


# -- quotas ------------------------------------------------------------------------------------


def test_quota_refuses_uploads_before_and_during_and_stores_nothing(
    settings: CoreSettings, caplog: pytest.LogCaptureFixture
) -> None:
    with client_with(settings, storage_quota_bytes=3000) as (client, ada):
        first, second = create(client, ada, "one"), create(client, ada, "two")
        listed = client.get(API, headers=ada).json()
        assert listed["quota"] == {"quota_bytes": 3000, "used_bytes": 0, "noncurrent_bytes": 0}
        assert put(client, ada, first["id"], "a.bin", b"a" * 2000).status_code == 201

        # Declared larger than what is left (1000 bytes, across both buckets): 413 before any byte is stored.
        declared = put(client, ada, second["id"], "b.bin", b"b" * 1001)
        assert declared.status_code == 413 and declared.json()["error"] == "payload_too_large"
        assert "left of your storage quota" in declared.json()["message"]
        assert "nothing was stored" in declared.json()["message"]
        # No Content-Length: stopped in flight once past what is left.
        streamed = put(client, ada, second["id"], "b.bin", chunked(b"b" * 5000, 300))
        assert streamed.status_code == 413 and "storage quota" in streamed.json()["message"]
        assert client.get(object_url(second["id"], "b.bin"), headers=ada).status_code == 404
        root: Path = client.app.state.context.storage.root  # type: ignore[attr-defined]
        assert list((root / ".tmp").iterdir()) == []

        assert put(client, ada, second["id"], "b.bin", b"b" * 1000).status_code == 201  # exactly what is left
        full = put(client, ada, first["id"], "c.bin", b"c")
        assert full.status_code == 507 and full.json()["error"] == "insufficient_storage"
        assert "storage quota of 2.9 KiB is used up" in full.json()["message"]
        # the user's own quota, not a server failure: nothing at error level for operators to chase
        assert not [r for r in caplog.records if r.levelname == "ERROR" and "failed" in r.getMessage()]
        assert client.get(API, headers=ada).json()["quota"]["used_bytes"] == 3000

        # Deleting makes room again.
        assert (
            client.post(f"{API}/{first['id']}/objects/delete", headers=ada, json={"keys": ["a.bin"]}).status_code == 200
        )
        assert put(client, ada, first["id"], "c.bin", b"c" * 100).status_code == 201


def test_a_hold_its_upload_left_behind_counts_until_it_is_not_renewed_for_the_idle_timeout(
    settings: CoreSettings,
) -> None:
    """An upload's journal entry outlived it on a live server (its worker died, or the database was
    away when it ended): its hold counts while renewed lately, but once not renewed for the idle
    timeout and a quarter more it holds nothing, and the next recovery pass forgets it."""
    with client_with(settings, storage_quota_bytes=3000, upload_idle_timeout_seconds=60) as (client, ada):
        context = client.app.state.context  # type: ignore[attr-defined]
        made = create(client, ada)
        with context.sessions() as db:
            db.add(UploadJournal(storage_id=made["id"], backend="local", bucket_name=made["bucket_name"],
                                 key="crashed.bin", owner=context.instance_id, reserved_bytes=3000))  # fmt: skip
            db.commit()

        def renewed(seconds_ago: float) -> None:
            with context.sessions() as db:
                then = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds_ago)
                db.execute(update(UploadJournal).values(heartbeat_at=then))
                db.commit()

        for seconds_ago in (0, 70):  # within the 75 s a hold lasts without renewal
            renewed(seconds_ago)
            held = put(client, ada, made["id"], "a.bin", b"a" * 1000)
            assert held.status_code == 507, held.text
            assert "and 2.9 KiB held by uploads under way" in held.json()["message"]
        renewed(80)
        assert put(client, ada, made["id"], "a.bin", b"a" * 1000).status_code == 201
        assert Reconciler(context).reconcile(startup=True).uploads_aborted == 0  # the local backend keeps no parts
        with context.sessions() as db:
            assert db.execute(select(UploadJournal)).scalars().all() == []


def test_a_stream_near_its_quota_holds_the_rest_at_once_not_chunk_by_chunk(settings: CoreSettings) -> None:
    """An upload of unknown length holds its quota in steps; near the quota, what is left is held in
    one write, not a write and a check for every 1 MiB chunk, and the quota still stops it."""
    with client_with(settings, storage_quota_bytes=10 * MIB) as (client, ada):
        context = client.app.state.context  # type: ignore[attr-defined]
        made = create(client, ada)
        holds: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.startswith(("INSERT INTO upload_journal", "UPDATE upload_journal")):
                holds.append(statement)

        def upload(key: str, size: int) -> None:  # as the upload route does, 1 MiB chunks at a time
            with context.sessions() as db:
                user = db.execute(select(User).where(User.email == "ada@example.org")).scalar_one()
                storage = storage_service.usable_storage(db, context, user, made["id"])
                allowance = storage_service.upload_allowance(db, context, user, storage, declared=None,
                                                             wait_seconds=5)  # fmt: skip
                storage_service.write_object(context, made["id"], storage.bucket_name, key,
                                             (b"x" * MIB for _ in range(size // MIB)), content_type=None,
                                             allowance=allowance)  # fmt: skip

        event.listen(context.engine, "before_cursor_execute", record)
        try:
            upload("a.bin", 8 * MIB)
            assert len(holds) == 1  # the first step (16 MiB) passes the quota: the 10 MiB left instead
            holds.clear()
            with pytest.raises(PayloadTooLarge, match="left of your storage quota"):
                upload("b.bin", 3 * MIB)
            assert len(holds) == 1  # the 2 MiB left, then refused past them: nothing more written
        finally:
            event.remove(context.engine, "before_cursor_execute", record)
        assert client.get(object_url(made["id"], "b.bin"), headers=ada).status_code == 404


def test_a_group_quota_counts_every_members_buckets_and_is_set_by_admins(
    client: TestClient, admin: Headers, alice: Headers, bob: Headers
) -> None:
    lab = "/api/v1/admin/groups/cmb-lab"
    made = client.put(lab, headers=admin, json={"members": ["alice@example.org", "bob@example.org"]})
    assert made.status_code == 200 and made.json()["storage_quota_bytes"] is None
    mine, theirs = create(client, alice), create(client, bob)
    assert client.get(API, headers=alice).json()["group_quotas"] == []  # no group quota by default

    # Set by admins only, checked, audited.
    assert client.patch(lab, headers=alice, json={"storage_quota_bytes": 10**9}).status_code == 403
    assert client.patch(lab, headers=admin, json={"storage_quota_bytes": -1}).status_code == 422
    assert client.patch(lab, headers=admin, json={"storage_quota_bytes": "10"}).status_code == 422
    assert client.patch(lab, headers=admin, json={"storage_quota_bytes": 10, "x": 1}).status_code == 422
    unknown = client.patch("/api/v1/admin/groups/nobody", headers=admin, json={"storage_quota_bytes": 10})
    assert unknown.status_code == 404
    answer = client.patch(lab, headers=admin, json={"storage_quota_bytes": 3000})
    assert answer.status_code == 200 and answer.json()["storage_quota_bytes"] == 3000
    assert [g["storage_quota_bytes"] for g in client.get("/api/v1/admin/groups", headers=admin).json()] == [3000]

    # Bob's bytes count against Alice's room, and the other way round.
    assert put(client, bob, theirs["id"], "b.bin", b"b" * 2000).status_code == 201
    listed = client.get(API, headers=alice).json()
    assert listed["quota"]["quota_bytes"] is None and listed["quota"]["used_bytes"] == 0  # her own: none
    assert listed["group_quotas"] == [
        {"group": "cmb-lab", "quota_bytes": 3000, "used_bytes": 2000, "noncurrent_bytes": 0}
    ]
    declared = put(client, alice, mine["id"], "a.bin", b"a" * 1001)
    assert declared.status_code == 413
    assert "left of the storage quota of your group 'cmb-lab'" in declared.json()["message"]
    assert "nothing was stored" in declared.json()["message"]
    streamed = put(client, alice, mine["id"], "a.bin", chunked(b"a" * 5000, 300))
    assert streamed.status_code == 413 and "group 'cmb-lab'" in streamed.json()["message"]
    assert client.get(object_url(mine["id"], "a.bin"), headers=alice).status_code == 404
    assert put(client, alice, mine["id"], "a.bin", b"a" * 1000).status_code == 201  # exactly what is left
    full = put(client, bob, theirs["id"], "c.bin", b"c")
    assert full.status_code == 507
    assert "the storage quota of your group 'cmb-lab' of 2.9 KiB is used up" in full.json()["message"]
    with client.app.state.context.sessions() as db:  # type: ignore[attr-defined]
        assert db.execute(select(UploadJournal)).scalars().all() == []  # nothing held once uploads end
        changes = db.execute(select(AuditEvent).where(AuditEvent.action == "group.storage_quota_changed")).scalars()
        assert [e.detail["after"] for e in changes] == [{"storage_quota_bytes": 3000}]

    # A non-member is not bound by it; 0 (or null) removes it.
    carol = dev_sign_in(client, "carol@example.org")
    assert put(client, carol, create(client, carol)["id"], "c.bin", b"c" * 5000).status_code == 201
    assert client.patch(lab, headers=admin, json={"storage_quota_bytes": 0}).json()["storage_quota_bytes"] is None
    assert put(client, bob, theirs["id"], "c.bin", b"c").status_code == 201


def test_admins_set_a_users_quota_and_see_it(client: TestClient, admin: Headers, alice: Headers) -> None:
    alice_id = client.get("/api/v1/auth/me", headers=alice).json()["id"]
    made = create(client, alice)
    assert client.get(API, headers=alice).json()["quota"]["quota_bytes"] is None  # no quota by default
    answer = client.patch(f"/api/v1/admin/users/{alice_id}", headers=admin, json={"storage_quota_bytes": 10})
    assert answer.status_code == 200 and answer.json()["storage_quota_bytes"] == 10
    assert client.get(API, headers=alice).json()["quota"]["quota_bytes"] == 10
    assert put(client, alice, made["id"], "big.bin", b"x" * 11).status_code == 413
    refused = client.patch(f"/api/v1/admin/users/{alice_id}", headers=admin, json={"storage_quota_bytes": -1})
    assert refused.status_code == 422
    # Not for users to change.
    assert (
        client.patch(f"/api/v1/admin/users/{alice_id}", headers=alice, json={"storage_quota_bytes": 0}).status_code
        == 403
    )
    assert (
        client.patch(f"/api/v1/admin/users/{alice_id}", headers=admin, json={"storage_quota_bytes": 0}).status_code
        == 200
    )
    assert put(client, alice, made["id"], "big.bin", b"x" * 11).status_code == 201  # 0: no quota


#: The tables of the storage API's own statements (the heartbeat and the reconcile loop's fast pass
#: touch others; ``environment_storages`` is not matched).
STORAGE_TABLES = re.compile(r"\b(storages|groups|group_members|upload_journal)\b")


@contextmanager
def storage_statements(client: TestClient) -> Iterator[list[str]]:
    """The statements on the storage tables made meanwhile, but for the usage refresher's (its
    measurements in their own threads)."""
    engine = client.app.state.context.engine  # type: ignore[attr-defined]
    found: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if STORAGE_TABLES.search(statement) and not threading.current_thread().name.startswith("storage-usage"):
            found.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield found
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_a_group_quota_measures_only_the_bucket_uploaded_to_and_sums_the_rest_in_the_database(
    settings: CoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's members' buckets count as last measured (summed in one query), plus what was
    uploaded through the API since: an upload measures the bucket it goes to, not every member's
    bucket (a full listing each on a cloud), and a listing measures the caller's own buckets only.
    Only an upload those figures would refuse measures the others again (deletes free room)."""
    # no full reconcile pass (it reads the storage tables too) while statements are counted
    with client_with(settings, reconcile_interval_seconds=3600) as (client, admin):
        context = client.app.state.context  # type: ignore[attr-defined]
        alice, bob, carol = (dev_sign_in(client, f"{name}@example.org") for name in ("alice", "bob", "carol"))
        lab = "/api/v1/admin/groups/cmb-lab"
        emails = ["alice@example.org", "bob@example.org", "carol@example.org"]
        assert client.put(lab, headers=admin, json={"members": emails}).status_code == 200
        assert client.patch(lab, headers=admin, json={"storage_quota_bytes": 5000}).status_code == 200
        alice_id = client.get("/api/v1/auth/me", headers=alice).json()["id"]  # her own quota counts too
        own_quota = client.patch(f"/api/v1/admin/users/{alice_id}", headers=admin,
                                 json={"storage_quota_bytes": 10**6})  # fmt: skip
        assert own_quota.status_code == 200
        mine, other = create(client, alice, "mine"), create(client, alice, "other")
        theirs = [create(client, bob, f"b{i}") for i in range(3)] + [create(client, carol, "c")]
        assert put(client, bob, theirs[0]["id"], "b.bin", b"b" * 2000).status_code == 201
        assert put(client, carol, theirs[3]["id"], "c.bin", b"c" * 500).status_code == 201

        measured: list[str] = []  # the buckets listed to measure their usage, in order
        bucket_usage = context.storage.bucket_usage

        def counting(bucket: str) -> Any:
            measured.append(bucket)
            return bucket_usage(bucket)

        monkeypatch.setattr(context.storage, "bucket_usage", counting)

        def stale() -> None:
            with context.sessions() as db:
                old = dt.datetime.now(dt.UTC) - USAGE_MAX_AGE - dt.timedelta(minutes=1)
                db.execute(update(Storage).values(usage_at=old))
                db.commit()
            measured.clear()

        stale()
        with storage_statements(client) as statements:
            assert put(client, alice, mine["id"], "a.bin", b"a" * 1000).status_code == 201
        assert measured == [mine["bucket_name"]]
        upload_statements = len(statements)

        stale()
        with storage_statements(client) as statements:
            listed = client.get(API, headers=alice).json()
        assert sorted(measured) == sorted([mine["bucket_name"], other["bucket_name"]])
        assert listed["group_quotas"][0]["used_bytes"] == 3500  # Bob's and Carol's as cached, hers measured
        assert sum("FROM storages" in s for s in statements) == 1  # her storages, read once
        assert sum("group_members" in s for s in statements) == 2  # her groups, then the members' sums

        # More members and buckets cost no more queries and no more listings.
        dave = dev_sign_in(client, "dave@example.org")
        for i in range(3):
            create(client, dave, f"d{i}")
        assert client.put(lab, headers=admin, json={"members": [*emails, "dave@example.org"]}).status_code == 200
        stale()
        with storage_statements(client) as statements:
            assert put(client, alice, mine["id"], "a.bin", b"a" * 1000).status_code == 201
        assert measured == [mine["bucket_name"]] and len(statements) == upload_statements

        # Bob deletes his 2000 bytes. The cached figures (her 1000 bytes replaced count twice:
        # 4500 used) would refuse 3500 more, so the stale buckets are measured again first (1500
        # used), and the upload fits.
        assert client.post(f"{API}/{theirs[0]['id']}/objects/delete", headers=bob,
                           json={"keys": ["b.bin"]}).status_code == 200  # fmt: skip
        stale()
        assert put(client, alice, other["id"], "x.bin", b"x" * 3500).status_code == 201
        assert theirs[0]["bucket_name"] in measured
        assert put(client, alice, other["id"], "y.bin", b"y").status_code == 507  # 5000 used now


def test_without_quotas_a_listing_reads_each_table_once(settings: CoreSettings) -> None:
    with client_with(settings, reconcile_interval_seconds=3600) as (client, ada):
        made = create(client, ada)
        with storage_statements(client) as statements:
            assert client.get(API, headers=ada).json()["storages"][0]["id"] == made["id"]
            assert client.put(object_url(made["id"], "a.bin"), headers=ada, content=b"a").status_code == 201
    listing = statements[: next(i for i, s in enumerate(statements) if "INSERT INTO upload_journal" in s)]
    assert sum("FROM storages" in s for s in listing) == 2  # the listing's, then the upload's bucket
    assert sum("group_members" in s for s in listing) == 2  # the groups with a quota: none, each time
    assert not any("group_members.group_id IN" in s for s in statements)
