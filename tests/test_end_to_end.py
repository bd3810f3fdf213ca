"""A scientist's whole day on the embedded default, over HTTP against `cmbcluster serve`:
sign in (development login, and a real OpenID Connect provider), create a bucket, upload a
file, start an environment that mounts it, follow its progress to Running, find the file
through the application, stop, restart, delete."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from cmbcluster.local.compute import LocalProcessCompute
from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.oidc import OidcMockServer
from cmbcluster.testing.process import ServeProcess, clean_environ


@pytest.fixture(scope="module")
def oidc() -> Iterator[OidcMockServer]:
    with OidcMockServer() as server:
        yield server


@pytest.fixture
def server(tmp_path: Path, oidc: OidcMockServer) -> Iterator[ServeProcess]:
    data = tmp_path / "data"
    env = clean_environ({
        "CMBCLUSTER_DATA_DIR": str(data),
        "CMBCLUSTER_AUTH_PROVIDERS": "oidc,local",
        "CMBCLUSTER_OIDC_ISSUER": oidc.issuer,
        "CMBCLUSTER_OIDC_CLIENT_ID": "cmbcluster",
        "CMBCLUSTER_OIDC_CLIENT_SECRET": "a-client-secret",
    })  # fmt: skip
    with ServeProcess(env, tmp_path) as process:
        assert process.wait_ready("/readyz").status_code == 200, process.output()
        yield process
    compute = LocalProcessCompute(data / "compute")
    for status in compute.list_managed():
        compute.delete(status.environment_id)


def oidc_sign_in(client: httpx.Client, oidc: OidcMockServer, sub: str) -> dict[str, str]:
    start = client.get("/api/v1/auth/oidc/login", follow_redirects=False)
    assert start.status_code == 303
    callback = urlsplit(oidc.authorize(start.headers["location"], sub))
    done = client.get(f"{callback.path}?{callback.query}", follow_redirects=False)
    assert done.status_code == 303, done.text
    token = client.cookies.get("cmbcluster_session")
    client.cookies.clear()
    return {"Authorization": f"Bearer {token}"}


def follow_progress(client: httpx.Client, headers: dict[str, str], env_id: str) -> list[dict[str, object]]:
    events = []
    with client.stream("GET", f"/api/v1/environments/{env_id}/events", headers=headers, timeout=60) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    return events


def test_a_scientists_day(server: ServeProcess, oidc: OidcMockServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        providers = [p["name"] for p in client.get("/api/v1/auth/providers").json()["providers"]]
        assert providers == ["oidc", "local"]
        admin = dev_sign_in(client, "pi@example.org", "Principal Investigator")
        assert client.get("/api/v1/auth/me", headers=admin).json()["role"] == "admin"
        oidc.put_user("vera", {"email": "vera@example.org", "email_verified": True, "name": "Vera Rubin"})
        vera = oidc_sign_in(client, oidc, "vera")
        assert client.get("/api/v1/auth/me", headers=vera).json()["name"] == "Vera Rubin"

        bucket = client.post("/api/v1/storages", headers=vera, json={"display_name": "Planck maps"})
        assert bucket.status_code == 201, bucket.text
        storage_id = bucket.json()["id"]
        upload = client.put(
            f"/api/v1/storages/{storage_id}/objects/maps/smica.txt", headers=vera, content=b"T(nside=2048)"
        )
        assert upload.status_code == 201, upload.text

        created = client.post(
            "/api/v1/environments", headers=vera,
            json={"application": "files", "mounts": [{"storage_id": storage_id, "mount_path": "/home/vera/data"}]},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        env_id = created.json()["id"]
        events = follow_progress(client, vera, env_id)
        assert events[-1]["status"] == "running", events
        url = str(events[-1]["url"])
        assert url == f"/environments/{env_id}/"  # through the control plane: /home/vera/data is ~/data
        served = client.get(url + "data/maps/smica.txt", headers=vera)
        assert served.text == "T(nside=2048)"
        assert len(served.headers.get_list("date")) == 1  # the application's and the server's were both sent
        assert client.get(url + "data/maps/smica.txt", headers=admin).status_code == 404  # hers alone

        stopped = client.post(f"/api/v1/environments/{env_id}/stop", headers=vera).json()
        assert stopped["status"] == "stopped"
        assert client.get(url, headers=vera).status_code == 404
        assert client.post(f"/api/v1/environments/{env_id}/restart", headers=vera).status_code == 200
        events = follow_progress(client, vera, env_id)
        assert events[-1]["status"] == "running"
        assert client.get(str(events[-1]["url"]) + "data/maps/smica.txt", headers=vera).text == "T(nside=2048)"

        assert client.delete(f"/api/v1/environments/{env_id}", headers=vera).status_code == 204
        assert client.get("/api/v1/environments", headers=vera).json()["items"] == []
        # the bucket and its file outlive the environment
        kept = client.get(f"/api/v1/storages/{storage_id}/objects/maps/smica.txt", headers=vera)
        assert kept.content == b"T(nside=2048)"
        # and the admin sees the trail of it all
        actions = {e["action"] for e in client.get("/api/v1/admin/audit", headers=admin).json()["items"]}
        assert {"environment.created", "environment.deleted", "storage.created"} <= actions


def test_the_catalogs_streamlit_example_runs_through_the_control_plane(server: ServeProcess) -> None:
    """This session installs cmbcluster-core[streamlit]: the example application starts from the catalog
    and answers through the proxy, HTTP and its WebSocket (Streamlit serves under its base path)."""
    from websockets.sync.client import connect
    from websockets.typing import Origin, Subprotocol

    with httpx.Client(base_url=server.url, timeout=30) as client:
        headers = dev_sign_in(client, "stella@example.org")
        catalog = {a["slug"]: a for a in client.get("/api/v1/applications", headers=headers).json()["items"]}
        assert catalog["streamlit"]["available"] is True, catalog["streamlit"]["unavailable_reason"]
        bucket = client.post("/api/v1/storages", headers=headers, json={"display_name": "lightcurves"}).json()
        client.put(f"/api/v1/storages/{bucket['id']}/objects/curve.csv", headers=headers, content=b"t,flux\n0,1\n1,2\n")
        mounts = [{"storage_id": bucket["id"], "mount_path": "/home/user/data"}]
        created = client.post(
            "/api/v1/environments", headers=headers, json={"application": "streamlit", "mounts": mounts}
        )
        assert created.status_code == 201, created.text
        events = follow_progress(client, headers, created.json()["id"])
        assert events[-1]["status"] == "running", events
        url = str(events[-1]["url"])
        health = client.get(f"{url}_stcore/health", headers=headers)
        assert health.status_code == 200 and health.text == "ok"
        page = client.get(url, headers=headers)
        assert page.status_code == 200 and "<title>Streamlit</title>" in page.text
        cookie = headers["Authorization"].removeprefix("Bearer ")
        socket_url = f"{server.url.replace('http://', 'ws://')}{url}_stcore/stream"
        cookies = {"Cookie": f"cmbcluster_session={cookie}"}
        with connect(socket_url, additional_headers=cookies, origin=Origin(server.url),
                     subprotocols=[Subprotocol("streamlit")]) as socket:  # fmt: skip
            assert socket.subprotocol == "streamlit"
        assert client.delete(f"/api/v1/environments/{created.json()['id']}", headers=headers).status_code == 204
