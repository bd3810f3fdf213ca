"""Administration through the API: users, roles and status, audit trail, activity, stats."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.db.models import Activity, Application, Environment, Storage, User, utcnow
from cmbcluster.db.models import Session as SessionRow
from cmbcluster.errors import Conflict, InvalidRequest
from cmbcluster.services import admin as admin_service
from cmbcluster.services import sessions
from cmbcluster.testing.api import dev_sign_in

API = "/api/v1/admin"


def sessions_of(client: TestClient) -> sessionmaker[Session]:
    maker: sessionmaker[Session] = client.app.state.context.sessions  # type: ignore[attr-defined]
    return maker


def me(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    response = client.get("/api/v1/auth/me", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def patch_user(client: TestClient, headers: dict[str, str], user_id: str, **body: Any) -> Any:
    return client.patch(f"{API}/users/{user_id}", json=body, headers=headers)


def audit_items(client: TestClient, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    response = client.get(f"{API}/audit", params=params, headers=headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


# -- access ----------------------------------------------------------------------------------------
def test_every_admin_route_refuses_non_admins(client: TestClient, admin: dict[str, str], alice: dict[str, str]) -> None:
    ada = me(client, admin)["id"]
    calls = [
        ("GET", f"{API}/users", None),
        ("GET", f"{API}/users/{ada}", None),
        ("PATCH", f"{API}/users/{ada}", {"role": "user"}),
        ("GET", f"{API}/users/{ada}/activity", None),
        ("GET", f"{API}/audit", None),
        ("GET", f"{API}/stats", None),
    ]
    for method, url, body in calls:
        assert client.request(method, url, json=body).status_code == 401, url
        refused = client.request(method, url, json=body, headers=alice)
        assert refused.status_code == 403, (url, refused.text)
        assert refused.json() == {"error": "permission_denied", "message": "administrators only"}
        assert client.request(method, url, json=None if method == "PATCH" else body, headers=admin).status_code in (
            200,
            422,  # an empty PATCH body
        )
    assert me(client, admin)["role"] == "admin"  # alice's attempt changed nothing


# -- finding users ---------------------------------------------------------------------------------
@pytest.fixture
def many_users(client: TestClient, admin: dict[str, str]) -> None:
    for i in range(5):
        dev_sign_in(client, f"student{i}@uni.example", f"Student Number{i}")
    dev_sign_in(client, "prof@uni.example", "Grace HOPPER")
    dev_sign_in(client, "under_score@example.org", "Percent 100%")


def test_search_filters_and_paging(client: TestClient, admin: dict[str, str], many_users: None) -> None:
    def search(**params: Any) -> dict[str, Any]:
        response = client.get(f"{API}/users", params=params, headers=admin)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    everyone = search()
    assert everyone["total"] == 8 and len(everyone["items"]) == 8
    assert [u["email"] for u in everyone["items"]] == sorted(u["email"] for u in everyone["items"])
    assert {"id", "email", "name", "role", "status", "auth_provider", "max_uptime_minutes", "created_at",
            "last_login_at"} <= set(everyone["items"][0])  # fmt: skip

    assert [u["email"] for u in search(query="hopper")["items"]] == ["prof@uni.example"]  # name, any case
    assert [u["email"] for u in search(query="PROF@UNI")["items"]] == ["prof@uni.example"]  # e-mail, any case
    assert search(query="uni.example")["total"] == 6
    assert search(query="  student3 ")["total"] == 1
    assert search(query="nobody")["total"] == 0
    # LIKE wildcards are taken literally
    assert [u["email"] for u in search(query="%")["items"]] == ["under_score@example.org"]
    assert [u["email"] for u in search(query="_")["items"]] == ["under_score@example.org"]

    assert [u["email"] for u in search(role="admin")["items"]] == ["ada@example.org"]
    assert search(role="user")["total"] == 7
    assert search(status="active")["total"] == 8 and search(status="deactivated")["total"] == 0

    page1 = search(query="student", page_size=2)
    page2 = search(query="student", page_size=2, page=2)
    page3 = search(query="student", page_size=2, page=3)
    assert (page1["total"], page1["page"], page1["page_size"]) == (5, 1, 2)
    emails = [u["email"] for page in (page1, page2, page3) for u in page["items"]]
    assert emails == [f"student{i}@uni.example" for i in range(5)]
    assert search(query="student", page_size=2, page=4)["items"] == []

    for params in ({"page": 0}, {"page_size": 0}, {"page_size": 201}, {"page": "x"}, {"role": "root"},
                   {"status": "banned"}, {"query": "q" * 201}):  # fmt: skip
        assert client.get(f"{API}/users", params=params, headers=admin).status_code == 422, params
    assert search(page_size=200)["total"] == 8


def test_user_detail(client: TestClient, admin: dict[str, str], alice: dict[str, str]) -> None:
    alice_id = me(client, alice)["id"]
    detail = client.get(f"{API}/users/{alice_id}", headers=admin).json()
    assert detail["email"] == "alice@example.org" and detail["role"] == "user"
    assert detail["counts"] == {"environments": 0, "running_environments": 0, "storages": 0, "active_sessions": 1}
    missing = client.get(f"{API}/users/nobody", headers=admin)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert patch_user(client, admin, "nobody", role="admin").status_code == 404


# -- roles and status ------------------------------------------------------------------------------
def test_role_change_is_effective_and_audited(client: TestClient, admin: dict[str, str], alice: dict[str, str]) -> None:
    ada_id, alice_id = me(client, admin)["id"], me(client, alice)["id"]
    promoted = patch_user(client, admin, alice_id, role="admin")
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["role"] == "admin"
    assert client.get(f"{API}/stats", headers=alice).status_code == 200  # at once, same session

    assert patch_user(client, admin, alice_id, role="admin").status_code == 200  # no change, no event
    demoted = patch_user(client, alice, ada_id, role="user")  # another admin may demote ada
    assert demoted.json()["role"] == "user"
    assert client.get(f"{API}/stats", headers=admin).status_code == 403

    events = audit_items(client, alice, action="user.role_changed")
    assert [(e["target_id"], e["actor_email"], e["detail"]["before"], e["detail"]["after"]) for e in events] == [
        (ada_id, "alice@example.org", {"role": "admin"}, {"role": "user"}),
        (alice_id, "ada@example.org", {"role": "user"}, {"role": "admin"}),
    ]


def test_deactivation_is_effective_at_once_and_reactivation_works(
    client: TestClient, admin: dict[str, str], bob: dict[str, str]
) -> None:
    bob_id = me(client, bob)["id"]
    context = client.app.state.context  # type: ignore[attr-defined]
    with context.sessions() as db:
        _, api_token = sessions.create_api_token(db, db.get(User, bob_id), name="script", expires_in_days=None)
    script = {"Authorization": f"Bearer {api_token}"}
    assert client.get("/api/v1/auth/me", headers=script).status_code == 200

    response = patch_user(client, admin, bob_id, status="deactivated")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "deactivated"
    assert response.json()["counts"]["active_sessions"] == 0

    # the very next request with his existing credentials is refused
    refused = client.get("/api/v1/auth/me", headers=bob)
    assert refused.status_code in (401, 403), refused.text  # revoked session (401) or deactivated (403)
    assert client.get("/api/v1/auth/me", headers=script).status_code == 403
    with context.sessions() as db:
        rows = db.execute(select(SessionRow).where(SessionRow.user_id == bob_id)).scalars().all()
        assert rows and all(row.revoked_at is not None for row in rows)
    with pytest.raises(AssertionError, match="this account is deactivated"):
        dev_sign_in(client, "bob@example.org")  # signing in again is refused too

    deactivated = audit_items(client, admin, action="user.deactivated", target_id=bob_id)
    assert len(deactivated) == 1
    assert deactivated[0]["detail"]["before"] == {"status": "active"}
    assert deactivated[0]["detail"]["after"] == {"status": "deactivated"}
    assert deactivated[0]["detail"]["sessions_revoked"] == 1

    reactivated = patch_user(client, admin, bob_id, status="active")
    assert reactivated.json()["status"] == "active"
    assert client.get("/api/v1/auth/me", headers=bob).status_code == 401  # the old session stays revoked
    again = dev_sign_in(client, "bob@example.org")
    assert me(client, again)["id"] == bob_id
    assert [e["detail"]["after"] for e in audit_items(client, admin, action="user.reactivated")] == [
        {"status": "active"}
    ]


def test_admins_cannot_demote_or_deactivate_themselves(client: TestClient, admin: dict[str, str]) -> None:
    ada_id = me(client, admin)["id"]
    demote = patch_user(client, admin, ada_id, role="user")
    assert demote.status_code == 400
    assert demote.json()["message"] == "you cannot remove your own administrator role; ask another administrator"
    deactivate = patch_user(client, admin, ada_id, status="deactivated")
    assert deactivate.status_code == 400
    assert "cannot deactivate your own account" in deactivate.json()["message"]
    both = patch_user(client, admin, ada_id, role="user", status="deactivated", max_uptime_minutes=60)
    assert both.status_code == 400
    # nothing changed, not even the part that would have been allowed
    assert me(client, admin)["role"] == "admin"
    assert client.get(f"{API}/users/{ada_id}", headers=admin).json()["max_uptime_minutes"] is None
    # harmless changes to oneself are fine
    assert patch_user(client, admin, ada_id, role="admin", status="active").status_code == 200
    assert patch_user(client, admin, ada_id, max_uptime_minutes=90).json()["max_uptime_minutes"] == 90


def test_the_last_active_admin_stays_one(client: TestClient, admin: dict[str, str], alice: dict[str, str]) -> None:
    ada_id, alice_id = me(client, admin)["id"], me(client, alice)["id"]
    # alice becomes an admin, then is deactivated: a deactivated admin does not count
    patch_user(client, admin, alice_id, role="admin")
    assert patch_user(client, admin, alice_id, status="deactivated").status_code == 200
    with sessions_of(client)() as db:
        # the API cannot reach this state (an admin calling it is another active admin), the
        # service refuses it for every caller, e.g. a command-line tool acting as the system
        with pytest.raises(Conflict, match="last active administrator"):
            admin_service.update_user(db, ada_id, admin_service.UserUpdate(role="user"), actor_id=None)
        with pytest.raises(Conflict, match="last active administrator"):
            admin_service.update_user(db, ada_id, admin_service.UserUpdate(status="deactivated"), actor_id=None)
        with pytest.raises(InvalidRequest):
            admin_service.update_user(db, ada_id, admin_service.UserUpdate(role="user"), actor_id=ada_id)
        # demoting the deactivated admin is fine: she is not an active one
        assert admin_service.update_user(
            db, alice_id, admin_service.UserUpdate(role="user"), actor_id=None
        ).role == "user"  # fmt: skip
    with sessions_of(client)() as db:
        admins = db.execute(select(User).where(User.role == "admin", User.status == "active")).scalars().all()
        assert [u.id for u in admins] == [ada_id]


def test_max_uptime_and_invalid_changes(client: TestClient, admin: dict[str, str], alice: dict[str, str]) -> None:
    alice_id = me(client, alice)["id"]
    assert patch_user(client, admin, alice_id, max_uptime_minutes=480).json()["max_uptime_minutes"] == 480
    assert patch_user(client, admin, alice_id, max_uptime_minutes=0).json()["max_uptime_minutes"] == 0
    assert patch_user(client, admin, alice_id, max_uptime_minutes=None).json()["max_uptime_minutes"] is None
    assert patch_user(client, admin, alice_id, role="user").json()["max_uptime_minutes"] is None  # untouched
    events = audit_items(client, admin, action="user.max_uptime_changed")
    changes = [(e["detail"]["before"], e["detail"]["after"]) for e in events]
    assert [(before["max_uptime_minutes"], after["max_uptime_minutes"]) for before, after in changes] == [
        (0, None), (480, 0), (None, 480),
    ]  # fmt: skip
    for body in ({"role": "root"}, {"status": "banned"}, {"role": None}, {"status": None},
                 {"max_uptime_minutes": -1}, {"max_uptime_minutes": 10**9}, {"max_uptime_minutes": "long"},
                 {"max_uptime_minutes": "10"}, {"storage_quota_bytes": "10"}, {"storage_quota_bytes": 1.5},
                 {"email": "x@example.org"}):  # fmt: skip
        response = patch_user(client, admin, alice_id, **body)
        assert response.status_code == 422, (body, response.text)
    assert me(client, alice)["role"] == "user"


# -- audit trail and activity ----------------------------------------------------------------------
def test_audit_trail_newest_first_with_filters_and_paging(
    client: TestClient, admin: dict[str, str], alice: dict[str, str], bob: dict[str, str]
) -> None:
    ada_id, alice_id, bob_id = me(client, admin)["id"], me(client, alice)["id"], me(client, bob)["id"]
    patch_user(client, admin, alice_id, role="admin")
    patch_user(client, alice, bob_id, status="deactivated")
    patch_user(client, alice, bob_id, status="active")

    everything = client.get(f"{API}/audit", headers=admin).json()
    items = everything["items"]
    assert everything["total"] == len(items) >= 6  # three sign-ups, three changes
    assert [e["action"] for e in items[:3]] == ["user.reactivated", "user.deactivated", "user.role_changed"]
    assert [e["at"] for e in items] == sorted((e["at"] for e in items), reverse=True)
    assert items[0]["actor_id"] == alice_id and items[0]["actor_email"] == "alice@example.org"
    assert items[0]["target_type"] == "user" and items[0]["target_id"] == bob_id
    created = [e for e in items if e["action"] == "user.created"]
    assert {e["target_id"] for e in created} == {ada_id, alice_id, bob_id}

    assert [e["action"] for e in audit_items(client, admin, actor_id=alice_id)] == [
        "user.reactivated", "user.deactivated", "user.created",
    ]  # fmt: skip
    assert {e["target_id"] for e in audit_items(client, admin, target_id=bob_id)} == {bob_id}
    assert audit_items(client, admin, action="no.such.action") == []
    assert {e["target_type"] for e in audit_items(client, admin, target_type="user")} == {"user"}

    first = client.get(f"{API}/audit", params={"page_size": 2}, headers=admin).json()
    second = client.get(f"{API}/audit", params={"page_size": 2, "page": 2}, headers=admin).json()
    assert [e["id"] for e in first["items"] + second["items"]] == [e["id"] for e in items[:4]]
    assert client.get(f"{API}/audit", params={"page_size": 500}, headers=admin).status_code == 422

    # an actor that no longer exists, and the system, have no e-mail
    with sessions_of(client)() as db:
        from cmbcluster.services.audit import audit

        audit(db, actor_id="0" * 32, action="test.ghost", target_type="user", target_id=ada_id)
        audit(db, actor_id=None, action="test.system", target_type="user", target_id=ada_id)
        db.commit()
    latest = audit_items(client, admin, page_size=2)
    assert [(e["action"], e["actor_email"]) for e in latest] == [("test.system", None), ("test.ghost", None)]


def test_user_activity_listing(client: TestClient, admin: dict[str, str], alice: dict[str, str]) -> None:
    alice_id = me(client, alice)["id"]
    base = utcnow() + dt.timedelta(minutes=1)
    with sessions_of(client)() as db:
        for i in range(4):
            db.add(Activity(user_id=alice_id, kind="environment.started", environment_id=f"env{i}",
                            at=base + dt.timedelta(seconds=i), detail={"n": i}))  # fmt: skip
        db.commit()
    page = client.get(f"{API}/users/{alice_id}/activity", headers=admin).json()
    assert page["total"] == 5  # four above, and her sign-in
    assert [a["environment_id"] for a in page["items"]] == ["env3", "env2", "env1", "env0", None]
    assert page["items"][0]["detail"] == {"n": 3} and page["items"][-1]["kind"] == "sign_in"
    second = client.get(f"{API}/users/{alice_id}/activity", params={"page": 2, "page_size": 3}, headers=admin).json()
    assert [a["environment_id"] for a in second["items"]] == ["env0", None]
    assert (second["page"], second["page_size"], second["total"]) == (2, 3, 5)
    assert client.get(f"{API}/users/nobody/activity", headers=admin).status_code == 404
    ada_activity = client.get(f"{API}/users/{me(client, admin)['id']}/activity", headers=admin).json()
    assert [a["kind"] for a in ada_activity["items"]] == ["sign_in"]  # only her own
    assert client.get(f"{API}/users/{alice_id}/activity", params={"page": 0}, headers=admin).status_code == 422


# -- dashboard -------------------------------------------------------------------------------------
def test_stats(client: TestClient, admin: dict[str, str], alice: dict[str, str], bob: dict[str, str]) -> None:
    alice_id, bob_id = me(client, alice)["id"], me(client, bob)["id"]
    before = client.get(f"{API}/stats", headers=admin).json()["applications"]  # the seeded catalog
    with sessions_of(client)() as db:
        app = Application(slug="s", name="S", image="x")
        db.add_all([app, Application(slug="old", name="Old", image="x", active=False)])
        db.flush()
        for user_id, status in ((alice_id, "running"), (alice_id, "stopped"), (bob_id, "running"),
                                (bob_id, "failed")):  # fmt: skip
            db.add(Environment(user_id=user_id, application_id=app.id, name=status, backend="local", status=status))
        db.add_all([
            Storage(user_id=alice_id, backend="local", bucket_name="a-1", display_name="a", usage_bytes=1000),
            Storage(user_id=alice_id, backend="local", bucket_name="a-2", display_name="b", usage_bytes=24,
                    usage_noncurrent_bytes=4096),
            Storage(user_id=bob_id, backend="local", bucket_name="b-1", display_name="c"),
        ])  # fmt: skip
        # someone who has not signed in for a while
        db.add(User(email="old@example.org", auth_provider="local", subject="old",
                    last_login_at=utcnow() - dt.timedelta(days=3)))  # fmt: skip
        db.commit()
    patch_user(client, admin, bob_id, status="deactivated")  # which stops bob's running environment

    stats = client.get(f"{API}/stats", headers=admin).json()
    assert stats["users"] == {"total": 4, "active": 3, "deactivated": 1, "admins": 1, "signed_in_last_24h": 3}
    assert stats["environments"] == {"total": 4, "by_status": {"failed": 1, "running": 1, "stopped": 2}}
    assert stats["storages"] == {"count": 3, "usage_bytes": 1024, "noncurrent_bytes": 4096, "usage_unknown": 1}
    assert stats["applications"] == {"active": before["active"] + 1, "total": before["total"] + 2}
    assert dt.datetime.fromisoformat(stats["at"]).tzinfo is not None

    alice_detail = client.get(f"{API}/users/{alice_id}", headers=admin).json()
    assert alice_detail["counts"] == {"environments": 2, "running_environments": 1, "storages": 2,
                                      "active_sessions": 1}  # fmt: skip


def test_deactivation_stops_the_users_environments(
    client: TestClient, admin: dict[str, str], alice: dict[str, str]
) -> None:
    import time

    env = client.post("/api/v1/environments", headers=alice, json={"application": "files"}).json()
    alice_id = client.get("/api/v1/auth/me", headers=alice).json()["id"]
    context = client.app.state.context  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + 20
        while client.get(f"/api/v1/environments/{env['id']}", headers=alice).json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert (
            client.patch(f"/api/v1/admin/users/{alice_id}", headers=admin, json={"status": "deactivated"}).status_code
            == 200
        )
        me = client.get("/api/v1/auth/me", headers=alice)
        assert me.status_code == 403 and "deactivated" in me.json()["message"]
        assert context.compute.status(env["id"]).phase.value == "stopped"
    finally:
        for status in context.compute.list_managed():
            context.compute.delete(status.environment_id)
