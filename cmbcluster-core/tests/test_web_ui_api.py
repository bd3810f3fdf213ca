"""What the web UI's file manager, environment controls and administrators' view ask of the API
(issue 15): duplicate bucket names, folders deleted and moved, previews (FITS headers by ranged
reads), several files as one zip streamed in constant memory, limits shown before launching, the
automatic stop extended, stopped environments changed, CPU and memory in use, every user's
environments for administrators, and an audit trail that names things."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import os
import struct
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from cmbcluster.app import create_app
from cmbcluster.db.models import AuditEvent, Environment, utcnow
from cmbcluster.errors import ProviderUnavailable
from cmbcluster.services import instances, previews
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ

API = "/api/v1/storages"
MIB = 1024 * 1024
Headers = dict[str, str]


def bucket(client: TestClient, headers: Headers, name: str, files: dict[str, bytes] | None = None) -> str:
    made = client.post(API, json={"display_name": name}, headers=headers)
    assert made.status_code == 201, made.text
    storage_id = str(made.json()["id"])
    for key, content in (files or {}).items():
        assert (
            client.put(f"{API}/{storage_id}/objects/{quote(key)}", content=content, headers=headers).status_code == 201
        )
    return storage_id


def keys(client: TestClient, headers: Headers, storage_id: str) -> list[str]:
    page = client.get(f"{API}/{storage_id}/objects", params={"delimiter": False}, headers=headers).json()
    return [item["key"] for item in page["objects"]]


def environment(client: TestClient, headers: Headers, **body: Any) -> dict[str, Any]:
    made = client.post("/api/v1/environments", json={"application": "files", **body}, headers=headers)
    assert made.status_code == 201, made.text
    answer: dict[str, Any] = made.json()
    return answer


def wait_running(client: TestClient, headers: Headers, env_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/api/v1/environments/{env_id}", headers=headers).json()
        if body["status"] == "running":
            return body
        time.sleep(0.1)
    raise AssertionError(f"{env_id} did not run")


@pytest.fixture
def cleanup(client: TestClient) -> Iterator[None]:
    yield
    context = client.app.state.context  # type: ignore[attr-defined]
    for status in context.compute.list_managed():
        context.compute.delete(status.environment_id)


# -- FITS files, made here (the format is simple enough to write by hand) ---------------------------


def card(keyword: str, value: str = "", comment: str = "") -> bytes:
    if keyword in ("END", "COMMENT", "HISTORY"):
        text = f"{keyword:<8}{value}"
    else:
        text = f"{keyword:<8}= {value:>20}" + (f" / {comment}" if comment else "")
    return text.ljust(80).encode("ascii")


def header(*cards: bytes) -> bytes:
    data = b"".join([*cards, card("END")])
    return data + b" " * (-len(data) % 2880)


def planck_like_map(rows: int = 12 * 64**2) -> bytes:
    """A primary HDU without data, then a binary table of one float column (a HEALPix map's layout)."""
    primary = header(card("SIMPLE", "T", "conforms to FITS"), card("BITPIX", "8"), card("NAXIS", "0"),
                     card("EXTEND", "T"), card("COMMENT", "a test map"))  # fmt: skip
    table = header(
        card("XTENSION", "'BINTABLE'"), card("BITPIX", "8"), card("NAXIS", "2"), card("NAXIS1", "4"),
        card("NAXIS2", str(rows)), card("PCOUNT", "0"), card("GCOUNT", "1"), card("TFIELDS", "1"),
        card("TTYPE1", "'I_STOKES'"), card("TFORM1", "'E'"), card("EXTNAME", "'FREQ-MAP'", "extension name"),
        card("PIXTYPE", "'HEALPIX'"), card("NSIDE", "64", "resolution"), card("TELESCOP", "'O''Neil'"),
    )  # fmt: skip
    data = struct.pack(f">{rows}f", *([2.7255] * rows))
    return (
        primary
        + table
        + data
        + b"\0" * (-len(data) % 2880)
        + header(card("XTENSION", "'IMAGE'"), card("BITPIX", "16"), card("NAXIS", "0"), card("EXTNAME", "'MASK'"))
    )


def test_parse_card_reads_strings_numbers_and_comments() -> None:
    assert previews.parse_card(card("NSIDE", "2048", "resolution").decode()) == previews.FitsCard(
        keyword="NSIDE", value="2048", comment="resolution"
    )
    quoted = previews.parse_card("TELESCOP= 'O''Neil / x' / the telescope".ljust(80))
    assert (quoted.value, quoted.comment) == ("O'Neil / x", "the telescope")
    assert previews.parse_card("HISTORY made by hand".ljust(80)).value == "made by hand"


# -- buckets and files ------------------------------------------------------------------------------


def test_duplicate_bucket_names_are_refused(client: TestClient, alice: Headers, bob: Headers) -> None:
    bucket(client, alice, "CMB maps 2026")
    bucket(client, alice, "ΣΦΧ Planck")  # letters outside ASCII: the database's lower() knows only ASCII
    bucket(client, alice, "КОСМОЛОГИЯ données 宇宙")
    # the refusal names the bucket the person has, as they named it, not the name just typed
    for same, existing, note in [
        ("CMB maps 2026", "CMB maps 2026", False),
        ("  cmb MAPS 2026 ", "CMB maps 2026", True),
        ("ΣΦΧ Planck", "ΣΦΧ Planck", False),
        ("σφχ planck", "ΣΦΧ Planck", True),
        ("КОСМОЛОГИЯ DONNÉES 宇宙", "КОСМОЛОГИЯ données 宇宙", True),
    ]:
        refused = client.post(API, json={"display_name": same}, headers=alice)
        assert refused.status_code == 409, refused.text
        message = refused.json()["message"]
        assert message.startswith(f"you already have a bucket named {existing!r}"), message
        assert ("names are compared ignoring case" in message) == note, message
    assert len(client.get(API, headers=alice).json()["storages"]) == 3
    bucket(client, bob, "CMB maps 2026")  # another person's names are theirs


def test_folders_are_deleted_with_every_file_in_them(client: TestClient, alice: Headers, bob: Headers) -> None:
    files = {"run1/a.txt": b"a", "run1/deep/b.txt": b"b", "run2/c.txt": b"c", "top.txt": b"t"}
    storage_id = bucket(client, alice, "runs", files)
    gone = client.post(f"{API}/{storage_id}/objects/delete", json={"prefixes": ["run1/"], "keys": ["top.txt"]},
                       headers=alice)  # fmt: skip
    assert gone.status_code == 200 and gone.json() == {"deleted": 3}
    assert keys(client, alice, storage_id) == ["run2/c.txt"]
    assert client.post(f"{API}/{storage_id}/objects/delete", json={}, headers=alice).status_code == 422
    bad = client.post(f"{API}/{storage_id}/objects/delete", json={"prefixes": ["run2"]}, headers=alice)
    assert bad.status_code == 400  # a folder ends with "/"
    assert (
        client.post(f"{API}/{storage_id}/objects/delete", json={"prefixes": ["run2/"]}, headers=bob).status_code == 404
    )
    assert keys(client, alice, storage_id) == ["run2/c.txt"]


def test_files_and_folders_are_renamed_and_moved(client: TestClient, alice: Headers, bob: Headers) -> None:
    files = {"maps/sky.fits": b"sky" * 1000, "maps/sub/mask.fits": b"mask", "notes.txt": b"n"}
    storage_id = bucket(client, alice, "moves", files)
    move = f"{API}/{storage_id}/objects/move"
    renamed = client.post(move, json={"source": "notes.txt", "destination": "docs/readme.txt"}, headers=alice)
    assert renamed.status_code == 200 and renamed.json() == {"moved": 1}
    moved = client.post(move, json={"source": "maps/", "destination": "archive/2026/"}, headers=alice)
    assert moved.json() == {"moved": 2}
    assert keys(client, alice, storage_id) == ["archive/2026/sky.fits", "archive/2026/sub/mask.fits", "docs/readme.txt"]
    assert client.get(f"{API}/{storage_id}/objects/archive/2026/sky.fits", headers=alice).content == b"sky" * 1000
    taken = client.post(move, json={"source": "docs/readme.txt", "destination": "archive/2026/sky.fits"},
                        headers=alice)  # fmt: skip
    assert taken.status_code == 409 and "already exists" in taken.json()["message"]
    assert client.post(move, json={"source": "archive/", "destination": "archive/x/"}, headers=alice).status_code == 400
    assert client.post(move, json={"source": "archive/", "destination": "file"}, headers=alice).status_code == 400
    assert client.post(move, json={"source": "nothing", "destination": "x"}, headers=alice).status_code == 404
    assert client.post(move, json={"source": "docs/readme.txt", "destination": "y"}, headers=bob).status_code == 404
    assert len(keys(client, alice, storage_id)) == 3  # nothing lost by the refusals


def test_a_move_is_all_or_nothing_and_needs_no_room_where_no_versions_are_kept(
    settings: CoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder's move copies every file, then deletes the originals. A copy that fails (the cloud
    refuses, a quota) takes back the copies made before it: the folder is where it was, once. And
    a bucket that keeps no versions frees what it copies: a move near a full quota is taken."""
    app = create_app(settings.model_copy(update={"storage_quota_bytes": 5000}))
    with TestClient(app, base_url=LOCAL) as client:
        alice = dev_sign_in(client, "alice@example.org")
        files = {"maps/a.fits": b"a" * 1000, "maps/b.fits": b"b" * 1000, "maps/c.fits": b"c" * 1000}
        storage_id = bucket(client, alice, "moves", files)
        move = f"{API}/{storage_id}/objects/move"
        backend = app.state.context.storage
        upload = backend.upload_object
        copies = itertools.count()

        def fails_at_the_third(bucket_name: str, key: str, chunks: Any, **kwargs: Any) -> Any:
            if next(copies) == 2:
                raise ProviderUnavailable("the storage service is unavailable")
            return upload(bucket_name, key, chunks, **kwargs)

        monkeypatch.setattr(backend, "upload_object", fails_at_the_third)
        failed = client.post(move, json={"source": "maps/", "destination": "old/"}, headers=alice)
        assert failed.status_code == 503, failed.text
        assert keys(client, alice, storage_id) == sorted(files)  # no copy left behind
        monkeypatch.setattr(backend, "upload_object", upload)
        moved = client.post(move, json={"source": "maps/", "destination": "old/"}, headers=alice)  # 3,000 of 5,000
        assert moved.status_code == 200 and moved.json() == {"moved": 3}, moved.text
        assert keys(client, alice, storage_id) == ["old/a.fits", "old/b.fits", "old/c.fits"]


def test_mistakes_in_naming_folders_are_answered_with_the_fix(client: TestClient, alice: Headers) -> None:
    """Found by an outsider's trial: a folder named without its final '/' was "not found", a folder
    in a delete's keys was "must not end with '/'", and a mount path with '..' "must be absolute"."""
    storage_id = bucket(client, alice, "named", {"maps/sub/a.fits": b"a"})
    move = client.post(f"{API}/{storage_id}/objects/move", json={"source": "maps/sub", "destination": "old"},
                       headers=alice)  # fmt: skip
    assert move.status_code == 404
    assert (
        move.json()["message"] == "'maps/sub' is a folder: to move it, end both names with '/' ('maps/sub/' to 'old/')"
    )
    gone = client.post(f"{API}/{storage_id}/objects/delete", json={"keys": ["maps/"]}, headers=alice)
    assert gone.status_code == 400
    assert gone.json()["message"] == "'maps/' names a folder: folders to delete go in 'prefixes', files in 'keys'"
    assert keys(client, alice, storage_id) == ["maps/sub/a.fits"]
    mounted = client.post("/api/v1/environments", headers=alice, json={
        "application": "files", "start": False, "mounts": [{"storage_id": storage_id, "mount_path": "/../../etc"}],
    })  # fmt: skip
    assert mounted.status_code == 400
    assert mounted.json()["message"] == "mount path '/../../etc' must name its folders: no '.', '..' or empty ones"


def test_one_move_at_a_time_in_a_bucket(client: TestClient, alice: Headers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an outsider's trial: five moves of one folder at once each copied it (1,500 files
    from 300), past the quota too. A move claims its bucket: another is refused while it runs, and
    the folder ends up in one place."""
    files = {f"race/f{i}": b"x" * 10 for i in range(20)}
    storage_id = bucket(client, alice, "race", files)
    move = f"{API}/{storage_id}/objects/move"
    backend = client.app.state.context.storage  # type: ignore[attr-defined]
    upload = backend.upload_object
    copying, go_on = threading.Event(), threading.Event()

    def held(bucket_name: str, key: str, chunks: Any, **kwargs: Any) -> Any:
        copying.set()
        assert go_on.wait(30)
        return upload(bucket_name, key, chunks, **kwargs)

    monkeypatch.setattr(backend, "upload_object", held)
    answers: list[httpx.Response] = []
    first = threading.Thread(target=lambda: answers.append(
        client.post(move, json={"source": "race/", "destination": "one/"}, headers=alice)))  # fmt: skip
    first.start()
    try:
        assert copying.wait(30)
        second = client.post(move, json={"source": "race/", "destination": "two/"}, headers=alice)
        assert second.status_code == 409, second.text
        assert second.json()["message"] == "another move in bucket 'race' is under way: try again once it is done"
    finally:
        go_on.set()
        first.join(30)
    assert answers[0].status_code == 200 and answers[0].json() == {"moved": 20}, answers[0].text
    assert keys(client, alice, storage_id) == sorted(f"one/f{i}" for i in range(20))
    again = client.post(
        move, json={"source": "race/", "destination": "two/"}, headers=alice
    )  # the claim was given back
    assert again.status_code == 404 and "empty or does not exist" in again.json()["message"]


def test_a_move_claim_the_database_failed_to_take_back_is_given_back_at_the_next_heartbeat(
    client: TestClient, alice: Headers
) -> None:
    """This server's own claims never count as gone: one left behind by a database blip at the end
    of a move would refuse every later move in the bucket until the server stopped."""
    storage_id = bucket(client, alice, "blip", {"a/f.txt": b"x"})
    move = f"{API}/{storage_id}/objects/move"
    context = client.app.state.context  # type: ignore[attr-defined]
    failures: list[str] = []

    def away(connection: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        giving_back = statement.startswith("UPDATE storages SET move_owner") and parameters[0] is None
        if giving_back and not failures:
            failures.append(statement)
            raise OperationalError(statement, parameters, Exception("database is locked"))

    event.listen(context.engine, "before_cursor_execute", away)
    try:
        moved = client.post(move, json={"source": "a/", "destination": "b/"}, headers=alice)
    finally:
        event.remove(context.engine, "before_cursor_execute", away)
    assert moved.status_code == 200 and moved.json() == {"moved": 1}, moved.text
    assert failures  # the claim was not given back then
    refused = client.post(move, json={"source": "b/", "destination": "c/"}, headers=alice)
    assert refused.status_code == 409
    instances.beat(context)
    again = client.post(move, json={"source": "b/", "destination": "c/"}, headers=alice)
    assert again.status_code == 200 and again.json() == {"moved": 1}, again.text
    assert keys(client, alice, storage_id) == ["c/f.txt"]


def test_previews_of_text_json_csv_images_and_other_files(client: TestClient, alice: Headers) -> None:
    long_text = "".join(f"line {n}\n" for n in range(20000))
    files = {
        "notes.txt": long_text.encode(), "meta.json": b'{"nside": 2048}', "table.csv": b"ell,cl\n2,1.5\n",
        "plot.png": b"\x89PNG\r\n\x1a\n", "blob.bin": bytes(range(256)) * 4, "unnamed": b"plain words",
    }  # fmt: skip
    storage_id = bucket(client, alice, "previews", files)

    def preview(key: str) -> dict[str, Any]:
        answer = client.get(f"{API}/{storage_id}/preview/{key}", headers=alice)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    text = preview("notes.txt")
    assert text["kind"] == "text" and text["truncated"] and text["text"].startswith("line 0\nline 1\n")
    assert len(text["text"]) <= previews.TEXT_PREVIEW_BYTES
    assert preview("meta.json") | {"size": 0, "content_type": ""} == {
        "key": "meta.json", "size": 0, "content_type": "", "kind": "json",
        "text": '{"nside": 2048}', "truncated": False, "hdus": None, "message": None,
    }  # fmt: skip
    assert preview("table.csv")["kind"] == "csv"
    assert preview("plot.png")["kind"] == "image" and preview("plot.png")["text"] is None
    assert preview("blob.bin")["kind"] == "none" and "download" in preview("blob.bin")["message"]
    assert preview("unnamed")["kind"] == "text"
    assert client.get(f"{API}/{storage_id}/preview/missing.txt", headers=alice).status_code == 404


def test_fits_headers_are_previewed_from_a_few_blocks_whatever_the_size(client: TestClient, alice: Headers) -> None:
    big = planck_like_map(rows=12 * 512**2)  # 12 MiB of data between the headers
    storage_id = bucket(client, alice, "fits", {"maps/map.fits": big, "fake.fits": b"not fits at all"})
    backend = client.app.state.context.storage  # type: ignore[attr-defined]
    read: list[tuple[int, int]] = []
    original = backend.download_object

    def counting(bucket_name: str, key: str, **kwargs: Any) -> Iterator[bytes]:
        if kwargs.get("byte_range"):
            read.append(kwargs["byte_range"])
        return original(bucket_name, key, **kwargs)  # type: ignore[no-any-return]

    backend.download_object = counting
    try:
        answer = client.get(f"{API}/{storage_id}/preview/maps/map.fits", headers=alice).json()
    finally:
        del backend.download_object
    assert answer["kind"] == "fits"
    assert [hdu["name"] for hdu in answer["hdus"]] == ["PRIMARY", "FREQ-MAP", "MASK"]
    cards = {c["keyword"]: c for c in answer["hdus"][1]["cards"]}
    assert cards["NSIDE"] == {"keyword": "NSIDE", "value": "64", "comment": "resolution"}
    assert cards["TELESCOP"]["value"] == "O'Neil" and cards["TTYPE1"]["value"] == "I_STOKES"
    assert answer["hdus"][0]["cards"][0] == {"keyword": "SIMPLE", "value": "T", "comment": "conforms to FITS"}
    # The headers only: a few 2880-byte blocks per HDU, never the 12 MiB of data.
    assert sum(last - first + 1 for first, last in read) <= 3 * previews.HEADER_READ_BLOCKS * previews.BLOCK
    fake = client.get(f"{API}/{storage_id}/preview/fake.fits", headers=alice).json()
    assert fake["kind"] == "none" and "FITS" in fake["message"]


def test_several_files_download_as_one_zip(client: TestClient, alice: Headers, bob: Headers) -> None:
    files = {"maps/a.fits": os.urandom(100_000), "maps/run/b.txt": b"b", "maps/run/deep/c.txt": b"c",
             "maps/skip.txt": b"not chosen", "other.txt": b"o"}  # fmt: skip
    storage_id = bucket(client, alice, "zips", files)
    form = {"key": ["maps/a.fits"], "prefix": ["maps/run/"], "base": "maps/"}
    answer = client.post(f"{API}/{storage_id}/archive", data=form, headers=alice)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    assert int(answer.headers["content-length"]) == len(answer.content)
    assert answer.headers["content-disposition"] == 'attachment; filename="maps.zip"'
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == ["a.fits", "run/b.txt", "run/deep/c.txt"]
        assert archive.read("a.fits") == files["maps/a.fits"]
    whole = client.post(f"{API}/{storage_id}/archive", data={"key": ["other.txt"]}, headers=alice)
    assert whole.headers["content-disposition"] == 'attachment; filename="zips.zip"'
    assert client.post(f"{API}/{storage_id}/archive", data={"key": ["gone.txt"]}, headers=alice).status_code == 404
    assert client.post(f"{API}/{storage_id}/archive", data={}, headers=alice).status_code == 400
    # a script that sends JSON learns how to ask, instead of being told it chose nothing
    as_json = client.post(f"{API}/{storage_id}/archive", json={"keys": ["other.txt"]}, headers=alice)
    assert as_json.status_code == 400 and "form fields `key`" in as_json.json()["message"]
    assert client.post(f"{API}/{storage_id}/archive", data={"key": ["other.txt"]}, headers=bob).status_code == 404


def test_a_zips_base_is_a_folder(client: TestClient, alice: Headers) -> None:
    """``base`` names the folder shown: names in the zip lose whole folder names only, and a base no
    key could be is a 400 (found by an outsider: 'm' cut 'maps/a.txt' to 'aps/a.txt', '../' named
    the zip '...zip')."""
    storage_id = bucket(client, alice, "bases", {"maps/a.txt": b"a"})

    def names(base: str) -> tuple[str, list[str]]:
        answer = client.post(f"{API}/{storage_id}/archive", data={"key": ["maps/a.txt"], "base": base}, headers=alice)
        assert answer.status_code == 200, (base, answer.text)
        with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
            return answer.headers["content-disposition"], archive.namelist()

    assert names("maps/") == ('attachment; filename="maps.zip"', ["a.txt"])
    assert names("maps") == ('attachment; filename="maps.zip"', ["a.txt"])  # the folder, written without its slash
    assert names("m/") == ('attachment; filename="m.zip"', ["maps/a.txt"])  # not its folder: the whole key
    assert names("m")[1] == ["maps/a.txt"]
    for bad in ("../", "maps/../", "/", "a\r\nb/", "a\\b/"):
        answer = client.post(f"{API}/{storage_id}/archive", data={"key": ["maps/a.txt"], "base": bad}, headers=alice)
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_request", (bad, answer.text)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_zip_of_large_files_streams_in_constant_memory(tmp_path: Path) -> None:
    env = clean_environ({"CMBCLUSTER_DATA_DIR": str(tmp_path / "data")})
    with ServeProcess(env, tmp_path) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        server.wait_ready("/readyz")
        headers = dev_sign_in(client, "ada@example.org")
        made = client.post(API, json={"display_name": "big"}, headers=headers).json()
        assert client.put(f"{API}/{made['id']}/objects/warm-up", content=b"w", headers=headers).status_code == 201
        folder = tmp_path / "data" / "buckets" / made["bucket_name"]
        for index in range(3):  # 3 x 256 MiB, sparse on disk: written at once, read as zeros
            with open(folder / f"part{index}.bin", "wb") as handle:
                handle.truncate(256 * MIB)
        before = rss_bytes(server.process.pid)
        peak, done = before, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.02):
                peak = max(peak, rss_bytes(server.process.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        received = 0
        try:
            form = {"key": [f"part{i}.bin" for i in range(3)]}
            with client.stream("POST", f"{API}/{made['id']}/archive", data=form, headers=headers) as answer:
                assert answer.status_code == 200
                length = int(answer.headers["content-length"])
                for part in answer.iter_bytes():
                    received += len(part)
        finally:
            done.set()
            sampler.join()
        assert received == length > 3 * 256 * MIB
        growth = peak - before
        assert growth < 64 * MIB, f"the server's RSS grew by {growth / MIB:.1f} MiB while sending a 768 MiB zip"


# -- environments ----------------------------------------------------------------------------------


def test_limits_are_listed_before_launching(client: TestClient, alice: Headers, cleanup: None) -> None:
    listed = client.get("/api/v1/environments", headers=alice).json()
    core = client.app.state.context.config.core  # type: ignore[attr-defined]
    assert listed["limits"] == {
        "max_active": core.max_environments_per_user, "active": 0,
        "idle_timeout_minutes": core.idle_timeout_minutes, "max_uptime_minutes": int(core.max_uptime_hours * 60),
        "max_extension_minutes": int(core.max_extension_hours * 60),
        "shutdown_warning_minutes": core.shutdown_warning_minutes,
    }  # fmt: skip
    environment(client, alice)
    assert client.get("/api/v1/environments", headers=alice).json()["limits"]["active"] == 1


def test_a_create_refused_by_the_limit_leaves_no_trace(settings: CoreSettings) -> None:
    from cmbcluster.app import create_app
    from cmbcluster.testing.api import LOCAL

    app = create_app(settings.model_copy(update={"max_environments_per_user": 1}))
    with TestClient(app, base_url=LOCAL) as client:
        try:
            user = dev_sign_in(client, "ada@example.org")
            environment(client, user)
            refused = client.post("/api/v1/environments", json={"application": "files", "name": "x"}, headers=user)
            assert refused.status_code == 409
            with app.state.context.sessions() as db:
                created = db.execute(select(AuditEvent).where(AuditEvent.action == "environment.created")).scalars()
                assert len(list(created)) == 1  # the refused one has no audit event
        finally:
            for status in app.state.context.compute.list_managed():
                app.state.context.compute.delete(status.environment_id)


def test_idle_and_uptime_stops_apart_and_extend_up_to_the_maximum(
    client: TestClient, alice: Headers, cleanup: None
) -> None:
    context = client.app.state.context  # type: ignore[attr-defined]
    core = context.config.core
    env = wait_running(client, alice, environment(client, alice)["id"])
    assert env["idle_shutdown_at"] and env["uptime_shutdown_at"] and env["extendable"]
    started = dt.datetime.fromisoformat(env["started_at"])
    uptime = dt.datetime.fromisoformat(env["uptime_shutdown_at"])
    assert uptime - started == dt.timedelta(hours=core.max_uptime_hours)
    assert env["shutdown_at"] == min(env["idle_shutdown_at"], env["uptime_shutdown_at"])
    # Near the maximum uptime: each extend adds an hour, up to the operator's maximum, then refuses.
    with context.sessions() as db:
        row = db.get(Environment, env["id"])
        row.shutdown_at = utcnow() + dt.timedelta(minutes=5)
        row.warned_at = utcnow()
        db.commit()
    extended = client.post(f"/api/v1/environments/{env['id']}/extend", headers=alice)
    assert extended.status_code == 200, extended.text
    moved = dt.datetime.fromisoformat(extended.json()["uptime_shutdown_at"]) - utcnow()
    assert dt.timedelta(minutes=64) < moved <= dt.timedelta(minutes=65)
    assert extended.json()["shutdown_warning"] is False
    limit = started + dt.timedelta(hours=core.max_uptime_hours + core.max_extension_hours)
    with context.sessions() as db:  # at its latest, and used just now (the idle stop is not the nearer one)
        row = db.get(Environment, env["id"])
        row.shutdown_at, row.last_activity_at = limit, limit
        db.commit()
    refused = client.post(f"/api/v1/environments/{env['id']}/extend", headers=alice)
    assert refused.status_code == 409 and "as long as this server allows" in refused.json()["message"]
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["extendable"] is True  # idle timer


def test_a_stopped_environment_changes_size_and_buckets(
    client: TestClient, alice: Headers, bob: Headers, cleanup: None
) -> None:
    first, second = bucket(client, alice, "first"), bucket(client, alice, "second")
    env = environment(client, alice, preset="light", mounts=[{"storage_id": first, "mount_path": "/home/user/data"}])
    url = f"/api/v1/environments/{env['id']}"
    running = client.patch(url, json={"preset": "standard"}, headers=alice)
    assert running.status_code == 409 and "stop it" in running.json()["message"]
    client.post(f"{url}/stop", headers=alice)
    changed = client.patch(url, headers=alice, json={
        "name": "bigger", "preset": "standard", "env": {"BAND": "217"},
        "mounts": [{"storage_id": second, "mount_path": "/home/user/second"}],
    })  # fmt: skip
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["name"], body["preset"], body["memory_mib"], body["env"]) == (
        "bigger",
        "standard",
        2048,
        {"BAND": "217"},
    )
    assert [(m["display_name"], m["mount_path"]) for m in body["mounts"]] == [("second", "/home/user/second")]
    assert client.patch(url, json={"preset": "gigantic"}, headers=alice).status_code == 400
    assert client.patch(url, json={"name": ""}, headers=alice).status_code == 422
    assert client.patch(url, json={"preset": "light"}, headers=bob).status_code == 404
    started = client.post(f"{url}/start", headers=alice).json()
    assert started["preset"] == "standard" and started["mounts"][0]["display_name"] == "second"


def test_cpu_and_memory_of_running_environments(
    client: TestClient, alice: Headers, bob: Headers, cleanup: None
) -> None:
    env = wait_running(client, alice, environment(client, alice)["id"])
    answer = client.get("/api/v1/environments/resources", headers=alice).json()
    assert answer["measured"] is True
    [use] = answer["items"]
    assert use["environment_id"] == env["id"] and use["memory_bytes"] > MIB and use["cpu"] >= 0
    assert client.get("/api/v1/environments/resources", headers=bob).json() == {"measured": True, "items": []}


# -- administrators --------------------------------------------------------------------------------


def test_an_admin_sees_and_stops_every_environment_and_the_audit_trail_names_things(
    client: TestClient, admin: Headers, alice: Headers, cleanup: None
) -> None:
    env = environment(client, alice, name="alice's analysis")
    listed = client.get("/api/v1/admin/environments", headers=admin).json()
    assert listed["total"] == 1
    [item] = listed["items"]
    assert item["owner"]["email"] == "alice@example.org" and item["name"] == "alice's analysis"
    assert client.get("/api/v1/admin/environments", params={"query": "nobody"}, headers=admin).json()["total"] == 0
    assert client.get("/api/v1/admin/environments", headers=alice).status_code == 403
    assert client.post(f"/api/v1/admin/environments/{env['id']}/stop", headers=alice).status_code == 403
    stopped = client.post(f"/api/v1/admin/environments/{env['id']}/stop", headers=admin)
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    mine = client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()
    assert mine["status_message"] == "stopped by an administrator (ada@example.org)"
    assert client.post(f"/api/v1/admin/environments/{env['id']}/stop", headers=admin).status_code == 409
    assert client.delete(f"/api/v1/admin/environments/{env['id']}", headers=admin).status_code == 204
    assert client.delete(f"/api/v1/admin/environments/{env['id']}", headers=admin).status_code == 404
    trail = client.get("/api/v1/admin/audit", headers=admin).json()["items"]
    by_action = {event["action"]: event for event in trail}
    for action in ("environment.stopped", "environment.deleted"):
        assert by_action[action]["actor_email"] == "ada@example.org"
        assert by_action[action]["target_name"] == "alice's analysis"  # named, though it is gone
    assert by_action["environment.created"]["actor_name"]
    users = {e["target_name"] for e in trail if e["target_type"] == "user"}
    assert "alice@example.org" in users


def test_an_admin_never_sees_an_environments_variables(
    client: TestClient, admin: Headers, alice: Headers, cleanup: None
) -> None:
    """Variables are the owner's secrets (people put API keys there; sealed at rest): an administrator
    sees the user's own Settings variables nowhere, and every environment without its variables
    (found by an outsider: the admin's list of environments showed their values)."""
    env = environment(client, alice, name="with a key", env={"OPENAI_API_KEY": "sk-alices-own"})
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["env"] == {
        "OPENAI_API_KEY": "sk-alices-own"
    }
    answers = [
        client.get("/api/v1/admin/environments", headers=admin),
        client.get("/api/v1/admin/environments", params={"query": "with a key"}, headers=admin),
        client.post(f"/api/v1/admin/environments/{env['id']}/stop", headers=admin),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert "sk-alices-own" not in answer.text and "OPENAI_API_KEY" not in answer.text
    assert answers[0].json()["items"][0]["env"] == {}
    assert client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["env"] == {
        "OPENAI_API_KEY": "sk-alices-own"
    }  # the owner's, untouched


def test_stats_measure_bucket_usage(client: TestClient, admin: Headers, alice: Headers) -> None:
    storage_id = bucket(client, alice, "five", {"a.bin": b"x" * (5 * MIB)})
    stats = client.get("/api/v1/admin/stats", headers=admin).json()["storages"]
    assert stats == {"count": 1, "usage_bytes": 5 * MIB, "noncurrent_bytes": 0, "usage_unknown": 0}
    # A file written from an environment (not through the API) counts once the cache is stale.
    folder = client.app.state.context.config.core.data_dir / "buckets"  # type: ignore[attr-defined]
    name = client.get(f"{API}/{storage_id}", headers=alice).json()["bucket_name"]
    (folder / name / "b.bin").write_bytes(b"y" * MIB)
    from cmbcluster.db.models import Storage

    with client.app.state.context.sessions() as db:  # type: ignore[attr-defined]
        db.get(Storage, storage_id).usage_at = utcnow() - dt.timedelta(hours=1)
        db.commit()
    assert client.get("/api/v1/admin/stats", headers=admin).json()["storages"]["usage_bytes"] == 6 * MIB


def test_default_maximum_uptime_and_sign_in_names(client: TestClient, admin: Headers) -> None:
    users = client.get("/api/v1/admin/users", headers=admin).json()
    core = client.app.state.context.config.core  # type: ignore[attr-defined]
    assert users["default_max_uptime_minutes"] == int(core.max_uptime_hours * 60)
    activity = client.get("/api/v1/auth/me/activity", headers=admin).json()["items"]
    signed = [item for item in activity if item["kind"] == "sign_in"]
    assert signed and signed[0]["detail"]["provider_name"] == "Development sign-in"
