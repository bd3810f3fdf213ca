"""How `cmbcluster serve` serves the UI: precompressed assets, real 404s, and the API left alone."""

from __future__ import annotations

import gzip
import os
import re
from urllib.parse import urlsplit

import httpx
import pytest

from cmbcluster.testing.oidc import OidcMockServer
from cmbcluster.testing.process import ServeProcess
from cmbcluster.webui import accepts_gzip

GZIP = {"Accept-Encoding": "gzip"}
IDENTITY = {"Accept-Encoding": "identity"}


def body_as_sent(url: str, headers: dict[str, str]) -> tuple[httpx.Response, bytes]:
    with httpx.Client(timeout=10) as client, client.stream("GET", url, headers=headers) as response:
        return response, b"".join(response.iter_raw())


@pytest.fixture(scope="module")
def signed_in(server: ServeProcess, oidc: OidcMockServer) -> httpx.Client:
    oidc.put_user("dora", {"email": "dora@example.org", "email_verified": True, "name": "Dora"})
    # signed in with the session cookie, as a browser: its changes carry our Origin, as a browser's do
    client = httpx.Client(base_url=server.url, timeout=30, headers={"Origin": server.url})
    start = client.get("/api/v1/auth/oidc/login", follow_redirects=False)
    callback = urlsplit(oidc.authorize(start.headers["location"], "dora"))
    assert client.get(f"{callback.path}?{callback.query}", follow_redirects=False).status_code == 303
    return client


def test_pages_and_scripts_are_sent_gzipped_to_browsers_that_accept_it(server: ServeProcess) -> None:
    packed, packed_body = body_as_sent(f"{server.url}/", GZIP)
    plain, plain_body = body_as_sent(f"{server.url}/", IDENTITY)
    assert packed.status_code == plain.status_code == 200
    assert packed.headers["content-encoding"] == "gzip" and "content-encoding" not in plain.headers
    assert gzip.decompress(packed_body) == plain_body and b"<html" in plain_body
    assert packed.headers["cache-control"] == "no-cache" and packed.headers["x-frame-options"] == "DENY"
    script = re.search(rb'src="(/_next/static/[^"]+\.js)"', plain_body)
    assert script is not None
    asset, asset_body = body_as_sent(server.url + script.group(1).decode(), GZIP)
    assert asset.headers["content-encoding"] == "gzip" and "immutable" in asset.headers["cache-control"]
    assert asset.headers["content-type"].endswith("javascript; charset=utf-8")
    assert len(asset_body) < len(gzip.decompress(asset_body))


def test_every_page_is_a_file_and_unknown_paths_are_real_404s(server: ServeProcess) -> None:
    for page in ("/signin/", "/environments/", "/storage/files/?id=anything", "/admin/users/"):
        response = httpx.get(server.url + page)
        assert response.status_code == 200 and "text/html" in response.headers["content-type"], page
    missing = httpx.get(f"{server.url}/no/such/page/")
    assert missing.status_code == 404 and "Page not found" in missing.text
    api = httpx.get(f"{server.url}/api/v1/no-such-thing")
    assert api.status_code == 404 and api.json()["error"] == "not_found"
    assert httpx.post(f"{server.url}/api/v1/no-such-thing").status_code == 404
    assert httpx.post(f"{server.url}/environments/").status_code == 405
    assert httpx.put(f"{server.url}/api/v1/environments").status_code == 405  # the API's own answer
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    escape = httpx.get(f"{server.url}/..%2F..%2F..%2Fetc%2Fpasswd")
    assert escape.status_code == 404 and "root:" not in escape.text
    # a name longer than the file system allows (found by an outsider: answered 500)
    for long_path in ("/" + "a" * 256, "/storage/" + "é" * 130, "/environments/" + "x" * 300 + "/"):
        assert httpx.get(server.url + long_path).status_code == 404, long_path[:20]
    # a NUL no file name can hold (found by an outsider: answered 500, with a traceback in the log)
    for nul_path in ("/%00", "/storage/%00", "/environments/a%00/"):
        assert httpx.get(server.url + nul_path).status_code == 404, nul_path


def test_downloads_and_progress_streams_are_never_recompressed(signed_in: httpx.Client) -> None:
    storage = signed_in.post("/api/v1/storages", json={"display_name": "raw"}).json()
    content = os.urandom(200_000)
    url = f"/api/v1/storages/{storage['id']}/objects/data.bin"
    assert signed_in.put(url, content=content, headers={"Content-Type": "text/plain"}).status_code == 201
    with signed_in.stream("GET", url, headers=GZIP) as download:
        assert "content-encoding" not in download.headers
        assert b"".join(download.iter_raw()) == content
    catalog = signed_in.get("/api/v1/applications").json()["items"]
    env = signed_in.post("/api/v1/environments", json={"application": catalog[0]["id"], "start": False}).json()
    with signed_in.stream("GET", f"/api/v1/environments/{env['id']}/events", headers=GZIP) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in events.headers
        assert b"event: status" in b"".join(events.iter_raw())
    signed_in.delete(f"/api/v1/environments/{env['id']}")


@pytest.mark.parametrize(
    ("header", "gzip_ok"),
    [("gzip, deflate, br", True), ("br;q=1.0, gzip;q=0.5", True), ("*", True), ("gzip;q=0", False),
     ("identity", False), ("", False), ("gzip;q=nonsense", False)],
)  # fmt: skip
def test_gzip_is_sent_only_when_the_browser_accepts_it(header: str, gzip_ok: bool) -> None:
    assert accepts_gzip(header) is gzip_ok
