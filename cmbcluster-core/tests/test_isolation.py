"""Two users, every route: Bob can neither read, change nor learn of Alice's things.

The table below classifies every operation of the OpenAPI document. A route added without a
line here fails ``test_every_route_is_classified``, so no endpoint ships without this check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cmbcluster.testing.api import dev_sign_in

PUBLIC, SELF, OWNED, ADMIN, CATALOG_READ = "public", "self", "owned", "admin", "catalog-read"

# (method, path) -> (category, JSON body or None)
ROUTES: dict[tuple[str, str], tuple[str, Any]] = {
    ("GET", "/healthz"): (PUBLIC, None),
    ("GET", "/readyz"): (PUBLIC, None),
    ("GET", "/metrics"): (ADMIN, None),  # names users with their usage; Prometheus has its own token
    ("GET", "/api/v1/auth/providers"): (PUBLIC, None),
    ("GET", "/api/v1/auth/{provider}/login"): (PUBLIC, None),
    ("GET", "/api/v1/auth/{provider}/callback"): (PUBLIC, None),
    ("GET", "/api/v1/auth/local/form"): (PUBLIC, None),  # the development sign-in's page
    ("POST", "/api/v1/auth/local/form"): (PUBLIC, None),
    ("POST", "/api/v1/auth/exchange"): (PUBLIC, None),
    ("POST", "/api/v1/auth/refresh"): (PUBLIC, None),
    ("POST", "/api/v1/auth/logout"): (SELF, None),
    ("GET", "/api/v1/auth/me"): (SELF, None),
    ("GET", "/api/v1/auth/me/activity"): (SELF, None),  # Bob's own: none of Alice's environment ids
    ("GET", "/api/v1/plugins"): (ADMIN, None),
    ("GET", "/api/v1/applications"): (CATALOG_READ, None),
    ("GET", "/api/v1/applications/presets"): (CATALOG_READ, None),
    ("GET", "/api/v1/applications/{id_or_slug}"): (CATALOG_READ, None),
    ("POST", "/api/v1/applications"): (ADMIN, {"slug": "evil", "name": "Evil", "image": "x", "port": 80}),
    ("PATCH", "/api/v1/applications/{id_or_slug}"): (ADMIN, {"name": "Hijacked"}),
    ("DELETE", "/api/v1/applications/{id_or_slug}"): (ADMIN, None),
    ("GET", "/api/v1/environments"): (SELF, None),
    ("POST", "/api/v1/environments"): (SELF, {"application": "files", "start": False}),
    ("GET", "/api/v1/environments/authorize"): (OWNED, None),
    ("GET", "/api/v1/environments/{environment_id}"): (OWNED, None),
    ("DELETE", "/api/v1/environments/{environment_id}"): (OWNED, None),
    ("POST", "/api/v1/environments/{environment_id}/start"): (OWNED, None),
    ("POST", "/api/v1/environments/{environment_id}/stop"): (OWNED, None),
    ("POST", "/api/v1/environments/{environment_id}/restart"): (OWNED, None),
    ("POST", "/api/v1/environments/{environment_id}/activity"): (OWNED, None),
    ("GET", "/api/v1/environments/{environment_id}/logs"): (OWNED, None),
    ("GET", "/api/v1/environments/{environment_id}/events"): (OWNED, None),
    ("GET", "/api/v1/environments/{environment_id}/enter"): (OWNED, None),
    ("PATCH", "/api/v1/environments/{environment_id}"): (OWNED, {"preset": "light"}),
    ("POST", "/api/v1/environments/{environment_id}/extend"): (OWNED, None),
    ("GET", "/api/v1/environments/resources"): (SELF, None),
    ("GET", "/api/v1/storages"): (SELF, None),
    ("POST", "/api/v1/storages"): (SELF, {"display_name": "bob's"}),
    ("GET", "/api/v1/storages/{storage_id}"): (OWNED, None),
    ("DELETE", "/api/v1/storages/{storage_id}"): (OWNED, None),
    ("GET", "/api/v1/storages/{storage_id}/objects"): (OWNED, None),
    ("POST", "/api/v1/storages/{storage_id}/objects/delete"): (OWNED, {"keys": ["secret.txt"]}),
    ("POST", "/api/v1/storages/{storage_id}/objects/move"): (OWNED, {"source": "secret.txt", "destination": "x"}),
    ("GET", "/api/v1/storages/{storage_id}/preview/{key}"): (OWNED, None),
    ("POST", "/api/v1/storages/{storage_id}/archive"): (OWNED, None),
    ("PUT", "/api/v1/storages/{storage_id}/objects/{key}"): (OWNED, None),
    ("GET", "/api/v1/storages/{storage_id}/objects/{key}"): (OWNED, None),
    ("HEAD", "/api/v1/storages/{storage_id}/objects/{key}"): (OWNED, None),
    ("DELETE", "/api/v1/storages/{storage_id}/objects/{key}"): (OWNED, None),
    ("GET", "/api/v1/settings/env-vars"): (SELF, None),
    ("PUT", "/api/v1/settings/env-vars/{name}"): (SELF, {"value": "bob's own"}),  # names are per user
    ("DELETE", "/api/v1/settings/env-vars/{name}"): (OWNED, None),
    ("GET", "/api/v1/settings/secret-files"): (SELF, None),
    ("PUT", "/api/v1/settings/secret-files/{name}"): (SELF, None),  # names are per user
    ("DELETE", "/api/v1/settings/secret-files/{name}"): (OWNED, None),
    ("GET", "/api/v1/settings/tokens"): (SELF, None),
    ("POST", "/api/v1/settings/tokens"): (SELF, {"name": "bob's"}),
    ("DELETE", "/api/v1/settings/tokens/{token_id}"): (OWNED, None),
    ("GET", "/api/v1/admin/users"): (ADMIN, None),
    ("GET", "/api/v1/admin/users/{user_id}"): (ADMIN, None),
    ("PATCH", "/api/v1/admin/users/{user_id}"): (ADMIN, {"role": "admin"}),
    ("DELETE", "/api/v1/admin/users/{user_id}"): (ADMIN, None),
    ("GET", "/api/v1/admin/users/{user_id}/activity"): (ADMIN, None),
    ("GET", "/api/v1/admin/audit"): (ADMIN, None),
    ("GET", "/api/v1/admin/stats"): (ADMIN, None),
    ("GET", "/api/v1/admin/migration"): (ADMIN, None),
    ("GET", "/api/v1/usage"): (ADMIN, None),
    ("GET", "/api/v1/usage/me"): (SELF, None),
    ("GET", "/api/v1/usage/prices"): (SELF, None),
    ("GET", "/api/v1/admin/budgets"): (ADMIN, None),
    ("PUT", "/api/v1/admin/budgets/{scope}/{target}"): (ADMIN, {"amount": 1, "unit": "core_hours"}),
    ("DELETE", "/api/v1/admin/budgets/{scope}/{target}"): (ADMIN, None),
    ("GET", "/api/v1/admin/groups"): (ADMIN, None),
    ("PUT", "/api/v1/admin/groups/{name}"): (ADMIN, {"members": []}),
    ("PATCH", "/api/v1/admin/groups/{name}"): (ADMIN, {"storage_quota_bytes": 0}),
    ("DELETE", "/api/v1/admin/groups/{name}"): (ADMIN, None),
    ("GET", "/api/v1/admin/environments"): (ADMIN, None),
    ("POST", "/api/v1/admin/environments/{environment_id}/stop"): (ADMIN, None),
    ("DELETE", "/api/v1/admin/environments/{environment_id}"): (ADMIN, None),
}


@dataclass
class AliceThings:
    user_id: str
    environment_id: str
    storage_id: str
    token_id: str
    token: str
    application_id: str

    def secrets(self) -> list[str]:
        """What must never appear in an answer to Bob."""
        return [self.user_id, self.environment_id, self.storage_id, self.token_id, "ALICE_VAR", "alice.key",
                "alice@example.org", "secret.txt"]  # fmt: skip


@pytest.fixture
def things(client: TestClient, admin: dict[str, str], alice: dict[str, str]) -> AliceThings:
    storage = client.post("/api/v1/storages", headers=alice, json={"display_name": "alice data"}).json()
    client.put(f"/api/v1/storages/{storage['id']}/objects/secret.txt", headers=alice, content=b"alice only")
    env = client.post(
        "/api/v1/environments", headers=alice,
        json={"application": "files", "mounts": [{"storage_id": storage["id"], "mount_path": "/data"}]},
    ).json()  # fmt: skip
    client.put("/api/v1/settings/env-vars/ALICE_VAR", headers=alice, json={"value": "hers"})
    client.put("/api/v1/settings/secret-files/alice.key", headers=alice, content=b"key material")
    token = client.post("/api/v1/settings/tokens", headers=alice, json={"name": "alice script"}).json()
    deadline = time.monotonic() + 20
    while client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["status"] != "running":
        assert time.monotonic() < deadline, "alice's environment did not start"
        time.sleep(0.1)
    return AliceThings(
        user_id=client.get("/api/v1/auth/me", headers=alice).json()["id"], environment_id=env["id"],
        storage_id=storage["id"], token_id=token["id"], token=token["token"], application_id=env["application"]["id"],
    )  # fmt: skip


UNKNOWN = AliceThings(
    user_id="0" * 32, environment_id="1" * 32, storage_id="2" * 32, token_id="3" * 32, token="", application_id="4" * 32
)


def _masked(text: str, owner: AliceThings) -> str:
    for value in (owner.environment_id, owner.storage_id, owner.token_id, owner.user_id, owner.application_id):
        text = text.replace(value, "<id>")
    return text


def _path(template: str, alice: AliceThings, route_kind: str) -> str:
    values = {
        "environment_id": alice.environment_id, "storage_id": alice.storage_id, "key": "secret.txt",
        "token_id": alice.token_id, "user_id": alice.user_id, "id_or_slug": alice.application_id,
        "provider": "local", "scope": "user", "target": alice.user_id,
        "name": "alice.key" if "secret-files" in template else "ALICE_VAR",
    }  # fmt: skip
    path = template.format(**values)
    if template.endswith("/authorize"):
        path += f"?environment_id={alice.environment_id}"
    return path


def test_every_route_is_classified(client: TestClient) -> None:
    app: Any = client.app
    documented = {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}
    assert documented == set(ROUTES), (
        f"classify these routes in ROUTES: {sorted(documented - set(ROUTES))}; "
        f"stale entries: {sorted(set(ROUTES) - documented)}"
    )


def test_bob_cannot_read_change_or_learn_of_alices_things(
    client: TestClient, alice: dict[str, str], things: AliceThings
) -> None:
    bob = dev_sign_in(client, "bob@example.org")
    for (method, template), (kind, body) in sorted(ROUTES.items()):
        if kind == PUBLIC or (method, template) == ("POST", "/api/v1/auth/logout"):
            continue
        path = _path(template, things, kind)
        extra: dict[str, Any] = {"json": body} if body is not None else {}
        if method == "PUT" and body is None:
            extra = {"content": b"bob's bytes"}
        response = client.request(method, path, headers=bob, **extra)
        where = f"{method} {path}"
        if kind == OWNED:
            assert response.status_code == 404, f"{where}: {response.status_code} {response.text[:200]}"
            # indistinguishable from an id that does not exist at all: no existence leak
            unknown = _path(template, UNKNOWN, kind)
            twin = client.request(method, unknown, headers=bob, **extra)
            assert (twin.status_code, _masked(twin.text, UNKNOWN)) == (404, _masked(response.text, things)), where
        elif kind == ADMIN:
            assert response.status_code == 403, f"{where}: {response.status_code}"
        else:
            assert response.status_code < 400, f"{where}: {response.status_code} {response.text[:200]}"
        for secret in things.secrets():
            if secret not in path:  # an id Bob sent may be echoed back; nothing else may appear
                assert secret not in response.text, f"{where} leaked {secret!r}"

    # and everything of Alice's is as she left it
    assert client.get(f"/api/v1/environments/{things.environment_id}", headers=alice).json()["status"] == "running"
    kept = client.get(f"/api/v1/storages/{things.storage_id}/objects/secret.txt", headers=alice)
    assert kept.content == b"alice only"
    names = [v["name"] for v in client.get("/api/v1/settings/env-vars", headers=alice).json()]
    assert "ALICE_VAR" in names
    assert client.get("/api/v1/settings/env-vars", headers=alice).json()[names.index("ALICE_VAR")]["value"] == "hers"
    assert [f["name"] for f in client.get("/api/v1/settings/secret-files", headers=alice).json()] == ["alice.key"]
    assert client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {things.token}"}).status_code == 200
    assert client.get("/api/v1/applications/files", headers=alice).json()["name"] != "Hijacked"
    assert client.get("/api/v1/auth/me", headers=alice).json()["role"] == "user"
    context = client.app.state.context  # type: ignore[attr-defined]
    for status in context.compute.list_managed():
        context.compute.delete(status.environment_id)


def test_bob_cannot_reach_alices_environment_through_the_control_plane(
    client: TestClient, alice: dict[str, str], things: AliceThings
) -> None:
    """/environments/<id>/ is no API route (the environment's own traffic), and just as private."""
    from starlette.testclient import WebSocketDenialResponse

    bob = dev_sign_in(client, "bob@example.org")
    assert client.get(f"/environments/{things.environment_id}/", headers=alice).status_code == 200
    answers = []
    for environment_id in (things.environment_id, UNKNOWN.environment_id):
        response = client.get(f"/environments/{environment_id}/", headers=bob)
        answers.append((response.status_code, response.text.replace(environment_id, "<id>")))
        with pytest.raises(WebSocketDenialResponse) as denied:
            with client.websocket_connect(f"/environments/{environment_id}/socket", headers=bob):
                pass
        assert denied.value.status_code == 404
    assert answers[0] == answers[1] and answers[0][0] == 404
    context = client.app.state.context  # type: ignore[attr-defined]
    for status in context.compute.list_managed():
        context.compute.delete(status.environment_id)


def test_signed_out_callers_are_401_everywhere_but_public_routes(client: TestClient, things: AliceThings) -> None:
    for (method, template), (kind, body) in sorted(ROUTES.items()):
        if kind == PUBLIC:
            continue
        path = _path(template, things, kind)
        extra: dict[str, Any] = {"json": body} if body is not None else {}
        response = client.request(method, path, **extra)
        assert response.status_code == 401, f"{method} {path}: {response.status_code}"
    context = client.app.state.context  # type: ignore[attr-defined]
    for status in context.compute.list_managed():
        context.compute.delete(status.environment_id)
