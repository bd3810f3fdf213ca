"""Budgets under a controllable clock, on the real local compute backend: a warning at 80 %, starts
refused at 100 % (running environments keep running unless the budget is hard), each crossing
audited once and POSTed to a webhook receiver on 127.0.0.1; usage totals on /metrics."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from waiting import wait_until_running

from cmbcluster.app import create_app
from cmbcluster.context import AppContext
from cmbcluster.db.models import AuditEvent, BudgetEvent, Environment, StorageInterval, User
from cmbcluster.errors import ProviderUnavailable
from cmbcluster.services import budgets
from cmbcluster.services.reconcile import Reconciler
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in
from cmbcluster.testing.clock import ManualClock, manual_clock

NOV = dt.datetime(2026, 11, 2, 9, tzinfo=dt.UTC)


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers 503 to the first ``failures`` POSTs."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                if receiver.attempts <= receiver.failures:
                    self.send_response(503)
                else:
                    receiver.received.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/budget"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver(failures=1)
    yield found
    found.close()


@pytest.fixture
def settings(tmp_path: Path, receiver: Receiver) -> CoreSettings:
    return CoreSettings(
        data_dir=tmp_path / "data", idle_timeout_minutes=0, max_uptime_hours=0, budget_webhook_url=receiver.url,
        prices='{"vcpu_hour": 0.05, "gib_hour": 0.01, "storage_gb_month": {"standard": 0.02}}',
    )  # fmt: skip


@pytest.fixture
def clock(client: TestClient) -> Iterator[ManualClock]:
    with manual_clock(NOV) as moving:
        yield moving


def _context(app: FastAPI) -> AppContext:
    context: AppContext = app.state.context
    return context


def _status(context: AppContext, env_id: str) -> str:
    with context.sessions() as db:
        env = db.get(Environment, env_id)
        assert env is not None
        return env.status


def _states(body: dict[str, Any]) -> list[str]:
    return [b["state"] for b in body["budgets"]]


def test_a_budget_warns_at_80_refuses_at_100_and_a_hard_one_stops(
    app: FastAPI, client: TestClient, admin: dict[str, str], alice: dict[str, str], bob: dict[str, str],
    clock: ManualClock, receiver: Receiver,
) -> None:  # fmt: skip
    context = _context(app)
    created = client.post("/api/v1/environments", headers=alice, json={"application": "files", "preset": "light"})
    assert created.status_code == 201, created.text
    env_id, cpu = created.json()["id"], created.json()["cpu"]
    # Alice may use 10 hours of her environment's cores this month; bob has no budget
    budget = client.put(
        "/api/v1/admin/budgets/user/alice@example.org", headers=admin, json={"amount": 10 * cpu, "unit": "core_hours"}
    )
    assert budget.status_code == 200, budget.text
    assert budget.json()["state"] == "ok" and budget.json()["used"] == 0
    audited = client.get("/api/v1/admin/audit", headers=admin, params={"action": "budget.set"}).json()["items"]
    assert [e["target_name"] for e in audited] == [budget.json()["label"]]  # named, as other targets are
    wait_until_running(context, env_id)

    # 7h59: under 80 %, no warning anywhere
    clock.advance(hours=7, minutes=59)
    Reconciler(context).reconcile()
    assert _states(client.get("/api/v1/usage/me", headers=alice).json()) == ["ok"]
    assert receiver.received == []
    # 8h: the warning on her usage (the dashboard's source) and the admin's report
    clock.advance(minutes=1)
    me = client.get("/api/v1/usage/me", headers=alice).json()
    assert _states(me) == ["warning"] and "80 % used" in me["budgets"][0]["message"]
    assert client.get("/api/v1/usage/me", headers=bob).json()["budgets"] == []
    report = client.get("/api/v1/usage", headers=admin).json()
    flags = {row["label"]: row["budget_state"] for row in report["rows"]}
    assert flags["alice@example.org"] == "warning"
    Reconciler(context).reconcile()  # records and sends the crossing (the receiver's first answer is a 503)
    assert [(e["event"], e["level"], e["label"]) for e in receiver.received] == [
        ("budget.warning", 80, "alice@example.org")
    ]
    assert receiver.received[0]["unit"] == "core_hours" and receiver.received[0]["month"] == "2026-11"

    # 10h: used up. A new start is refused naming the budget; the running one keeps running
    clock.advance(hours=2)
    refused = client.post(
        "/api/v1/environments", headers=alice, json={"application": "files", "preset": "light", "start": True}
    )
    assert refused.status_code == 403 and refused.json()["error"] == "budget_exceeded", (
        refused.text
    )  # was internal_error
    assert "your monthly budget of" in refused.json()["message"] and "core-hours" in refused.json()["message"]
    Reconciler(context).reconcile()
    Reconciler(context).reconcile()  # twice: each crossing is audited and sent once
    assert _status(context, env_id) == "running"
    with context.sessions() as db:
        levels = sorted(e.level for e in db.execute(select(BudgetEvent)).scalars())
        assert levels == [80, 100]
        actions = [a.action for a in db.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()]
        assert actions.count("budget.warning") == 1 and actions.count("budget.exceeded") == 1
        # the refused create left no environment behind
        user = db.execute(select(User).where(User.email == "alice@example.org")).scalar_one()
        assert len(db.execute(select(Environment).where(Environment.user_id == user.id)).all()) == 1
    assert [e["level"] for e in receiver.received] == [80, 100]
    # bob, without a budget, still starts
    other = client.post("/api/v1/environments", headers=bob, json={"application": "files", "preset": "light"})
    assert other.status_code == 201, other.text  # created and started

    # made hard: the next pass stops her environment, audited with the budget as the reason
    client.put(
        "/api/v1/admin/budgets/user/alice@example.org", headers=admin,
        json={"amount": 10 * cpu, "unit": "core_hours", "hard": True},
    )  # fmt: skip
    report_ = Reconciler(context).reconcile()
    assert report_.over_budget == [env_id]
    assert _status(context, env_id) == "stopped"
    with context.sessions() as db:
        stop = db.execute(
            select(AuditEvent).where(AuditEvent.action == "environment.stopped", AuditEvent.target_id == env_id)
        ).scalar_one()
        assert "hard budget" in stop.detail["reason"]
    assert client.post(f"/api/v1/environments/{env_id}/start", headers=alice).status_code == 403

    # next month: the budget starts afresh
    clock.set(dt.datetime(2026, 12, 1, 0, 1, tzinfo=dt.UTC))
    assert client.post(f"/api/v1/environments/{env_id}/start", headers=alice).status_code == 200
    for who, env in ((alice, env_id), (bob, other.json()["id"])):
        assert client.post(f"/api/v1/environments/{env}/stop", headers=who).status_code == 200


def test_a_group_budget_in_currency_counts_every_member(
    app: FastAPI, client: TestClient, admin: dict[str, str], alice: dict[str, str], bob: dict[str, str],
    clock: ManualClock,
) -> None:  # fmt: skip
    context = _context(app)
    group = client.put(
        "/api/v1/admin/groups/physics", headers=admin, json={"members": ["alice@example.org", "bob@example.org"]}
    )
    assert group.status_code == 200 and group.json()["members"] == ["alice@example.org", "bob@example.org"]
    assert client.put("/api/v1/admin/budgets/group/physics", headers=admin, json={"amount": 1.0}).status_code == 200
    # Alice's 100 GiB for two weeks: 100 * 336 / 730 GB-months at 0.02 = 0.92 USD (92 %), Bob's share nothing
    with context.sessions() as db:
        uid = db.execute(select(User.id).where(User.email == "alice@example.org")).scalar_one()
        db.add(StorageInterval(storage_id="s", user_id=uid, storage_class="standard", bytes=100 * 1024**3,
                               start_s=int(NOV.timestamp())))  # fmt: skip
        db.commit()
    clock.advance(days=14)
    bob_sees = client.get("/api/v1/usage/me", headers=bob).json()["budgets"]
    assert [(b["label"], b["state"], b["percent"]) for b in bob_sees] == [("physics", "warning", 92.1)]
    assert "group 'physics'" in bob_sees[0]["message"]
    by_group = client.get("/api/v1/usage", headers=admin, params={"group_by": "group"}).json()
    assert {row["key"]: row["budget_state"] for row in by_group["rows"]} == {"physics": "warning"}
    clock.advance(days=2)
    created = client.post(
        "/api/v1/environments", headers=bob, json={"application": "files", "preset": "light", "start": True}
    )
    assert created.status_code == 403 and "group 'physics'" in created.json()["message"]
    # raised: the month's use is back under 80 %, so starts work and a later 80 % warns again
    client.put("/api/v1/admin/budgets/group/physics", headers=admin, json={"amount": 10.0})
    with context.sessions() as db:
        assert db.execute(select(BudgetEvent)).scalars().all() == []


def test_bad_budget_requests_are_clear_4xx(client: TestClient, admin: dict[str, str], alice: dict[str, str]) -> None:
    put = client.put
    assert put("/api/v1/admin/budgets/user/nobody@example.org", headers=admin, json={"amount": 5}).status_code == 404
    assert put("/api/v1/admin/budgets/group/none", headers=admin, json={"amount": 5}).status_code == 404
    answer = put("/api/v1/admin/budgets/team/x", headers=admin, json={"amount": 5})
    assert answer.status_code == 422
    answer = put("/api/v1/admin/budgets/user/alice@example.org", headers=admin, json={"amount": -1})
    assert answer.status_code == 422
    answer = put("/api/v1/admin/budgets/user/alice@example.org", headers=admin, json={"amount": 1, "unit": "EUR"})
    assert answer.status_code == 422
    for lax in ({"amount": True}, {"amount": "5"}, {"amount": 5, "hard": "yes"}, {"amount": 5, "hard": 1}):
        answer = put("/api/v1/admin/budgets/user/alice@example.org", headers=admin, json=lax)
        assert answer.status_code == 422, (lax, answer.text)  # was a budget of 1.0, or a hard one
    for amount in ("NaN", "Infinity"):  # JSON parsers accept these; a budget cannot be one
        body, sent_as = '{"amount": ' + amount + "}", {**admin, "Content-Type": "application/json"}
        answer = put("/api/v1/admin/budgets/user/alice@example.org", headers=sent_as, content=body)
        assert answer.status_code == 422 and "finite number" in answer.json()["message"], answer.text
    answer = client.put("/api/v1/admin/groups/g", headers=admin, json={"members": ["ghost@example.org"]})
    assert answer.status_code == 404 and "ghost@example.org" in answer.json()["message"]
    # found by an outsider's trial: one member named two ways was a 409 "reload", and "Physics" beside
    # "physics" made two groups that read as one
    twice = client.put("/api/v1/admin/groups/physics", headers=admin,
                       json={"members": ["alice@example.org", "ALICE@example.org"]})  # fmt: skip
    assert twice.status_code == 200 and len(twice.json()["members"]) == 1, twice.text
    other_case = client.put("/api/v1/admin/groups/PHYSICS", headers=admin, json={"members": []})
    assert other_case.status_code == 409, other_case.text
    assert (
        other_case.json()["message"]
        == "a group 'physics' exists: a new group's name must differ from it in more than case"
    )
    assert client.delete("/api/v1/admin/budgets/user/alice@example.org", headers=admin).status_code == 404
    # reports and /metrics list the users in no group as "(no group)": a group of that name merged with them
    reserved = client.put("/api/v1/admin/groups/(no group)", headers=admin, json={"members": ["alice@example.org"]})
    assert reserved.status_code == 400 and "names the users in no group" in reserved.json()["message"]


@pytest.mark.parametrize(
    ("method", "path", "body", "changes", "removed"),
    [
        ("PUT", "/api/v1/admin/budgets/user/alice@example.org", {"amount": 5, "unit": "core_hours"}, "set_budget",
         "user alice@example.org's budget"),
        ("PUT", "/api/v1/admin/groups/physics", {"members": []}, "set_group", "group physics"),
        ("PATCH", "/api/v1/admin/groups/physics", {"storage_quota_bytes": 1024}, "set_group_storage_quota",
         "group physics"),
    ],
)  # fmt: skip
def test_a_change_whose_budget_or_group_is_removed_meanwhile_is_a_409_not_a_500(
    app: FastAPI, client: TestClient, admin: dict[str, str], alice: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    method: str, path: str, body: dict[str, Any], changes: str, removed: str,
) -> None:  # fmt: skip
    """Found by an outsider's trial: PUTs and DELETEs of one group's budget at once answered some PUTs
    with a 500 (the change was saved, the DELETE removed it before the answer read it back)."""
    context = _context(app)
    client.put("/api/v1/admin/groups/physics", headers=admin, json={"members": ["alice@example.org"]})
    change = getattr(budgets, changes)

    def then_deleted(*args: Any, **kwargs: Any) -> Any:
        changed = change(*args, **kwargs)
        with context.sessions() as other:  # another admin's DELETE, done between the change and the answer
            if changes == "set_budget":
                budgets.delete_budget(other, actor_id=None, scope="user", target="alice@example.org")
            else:
                budgets.delete_group(other, actor_id=None, name="physics")
        return changed

    monkeypatch.setattr(budgets, changes, then_deleted)
    answer = client.request(method, path, headers=admin, json=body)
    assert answer.status_code == 409, answer.text
    assert answer.json()["message"] == f"{removed} was removed by another request meanwhile"


@pytest.mark.parametrize("amount", [1e-300, 5e-324, 0.001, 0.0099])
def test_a_budget_below_a_hundredth_is_refused(
    client: TestClient, admin: dict[str, str], alice: dict[str, str], amount: float
) -> None:
    """A cent, or a hundredth of a core-hour, is the smallest budget: anything smaller made messages
    such as "1.2499e+299 % used" or "inf % used"."""
    client.put("/api/v1/admin/groups/physics", headers=admin, json={"members": ["alice@example.org"]})
    for unit in budgets.UNITS:
        body = {"amount": amount, "unit": unit, "hard": True}
        answer = client.put("/api/v1/admin/budgets/group/physics", headers=admin, json=body)
        assert answer.status_code == 422, answer.text
        assert "amount" in answer.json()["message"] and "0.01" in answer.json()["message"]
    assert client.get("/api/v1/admin/budgets", headers=admin).json() == []


def test_amounts_are_kept_to_a_hundredth(client: TestClient, admin: dict[str, str], alice: dict[str, str]) -> None:
    answer = client.put("/api/v1/admin/budgets/user/alice@example.org", headers=admin, json={"amount": 12.3456})
    assert answer.status_code == 200 and answer.json()["amount"] == 12.35
    answer = client.put("/api/v1/admin/budgets/user/alice@example.org", headers=admin, json={"amount": 0.01})
    assert answer.status_code == 200 and answer.json()["amount"] == 0.01 and "of 0.01 USD" in answer.json()["message"]
    answer = client.put("/api/v1/admin/budgets/user/alice@example.org", headers=admin, json={"amount": 1e12})
    assert "of 1000000000000 USD" in answer.json()["message"]  # not 1e+12


def test_a_far_overrun_budget_shows_a_bounded_percentage(
    app: FastAPI, client: TestClient, admin: dict[str, str], alice: dict[str, str], bob: dict[str, str],
    clock: ManualClock,
) -> None:  # fmt: skip
    from cmbcluster.db.models import Budget, UsageInterval

    context = _context(app)
    tiny = {"amount": 0.01, "unit": "core_hours"}
    assert client.put("/api/v1/admin/budgets/user/alice@example.org", headers=admin, json=tiny).status_code == 200
    with context.sessions() as db:
        ids = dict(db.execute(select(User.email, User.id)).all())
        start = int(NOV.timestamp())
        for who in ("alice@example.org", "bob@example.org"):  # 2 core-hours each
            hour = {"start_s": start, "end_s": start + 3600, "seen_s": start + 3600}
            db.add(UsageInterval(environment_id=f"e-{who}", user_id=ids[who], application="files", preset="light",
                                 cpu=2, memory_gib=1, **hour))  # fmt: skip
        # a budget an earlier version accepted: the smallest positive float
        db.add(Budget(scope="user", target_id=ids["bob@example.org"], amount=5e-324, unit="core_hours", hard=False))
        db.commit()
    clock.advance(days=1)
    for headers in (alice, bob):
        (found,) = client.get("/api/v1/usage/me", headers=headers).json()["budgets"]
        assert found["state"] == "exceeded" and found["percent"] == 1000, found  # finite and bounded
        assert "is >999 % used" in found["message"] and "inf" not in found["message"], found["message"]
    listed = client.get("/api/v1/admin/budgets", headers=admin).json()
    assert [b["percent"] for b in listed] == [1000, 1000]
    refused = client.post("/api/v1/environments", headers=bob, json={"application": "files", "preset": "light"})
    assert refused.status_code == 403 and ">999 %" in refused.json()["message"]


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("a%00b", "U+0000"),
        ("a%E2%80%AEgpj.exe", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ("physics%0Aadmins", "U+000A"),
        ("phys%E2%80%8Bics", "U+200B (ZERO WIDTH SPACE)"),
        ("a%C2%A0b", "U+00A0 (NO-BREAK SPACE)"),
    ],
)
def test_a_group_name_is_printable_text(client: TestClient, admin: dict[str, str], name: str, shown: str) -> None:
    """A NUL, a line break or a right-to-left override would disguise a group in the admin's tables,
    the CSV and `cmbcluster groups list`."""
    answer = client.put(f"/api/v1/admin/groups/{name}", headers=admin, json={"members": []})
    assert answer.status_code == 400, answer.text
    assert "a group name is printable text" in answer.json()["message"] and shown in answer.json()["message"]
    assert client.get("/api/v1/admin/groups", headers=admin).json() == []
    too_long = client.put(f"/api/v1/admin/groups/{'x' * 101}", headers=admin, json={"members": []})
    assert too_long.status_code == 422
    fine = client.put("/api/v1/admin/groups/Kosmologie, Ü 2026 (CMB-S4)", headers=admin, json={"members": []})
    assert fine.status_code == 200 and fine.json()["name"] == "Kosmologie, Ü 2026 (CMB-S4)"


def test_a_group_named_before_the_rule_can_still_be_deleted(
    app: FastAPI, client: TestClient, admin: dict[str, str]
) -> None:
    from cmbcluster.db.models import Group

    with _context(app).sessions() as db:
        db.add(Group(name="a\x00b"))
        db.commit()
    (group,) = client.get("/api/v1/admin/groups", headers=admin).json()
    assert client.delete(f"/api/v1/admin/groups/{group['id']}", headers=admin).status_code == 204


def test_users_are_found_by_e_mail_in_ascii_case_only(
    client: TestClient, admin: dict[str, str], alice: dict[str, str]
) -> None:
    """Addresses are stored with ASCII letters lower-cased (docs/operators/security.md): an admin typing
    ALICE@Example.ORG means alice@example.org; a Unicode look-alike (KELVIN SIGN for K) means no one."""
    dev_sign_in(client, "kim@example.org")
    group = client.put("/api/v1/admin/groups/physics", headers=admin, json={"members": ["ALICE@Example.ORG"]})
    assert group.status_code == 200, group.text
    assert group.json()["members"] == ["alice@example.org"]
    budget = client.put("/api/v1/admin/budgets/user/Alice@EXAMPLE.org", headers=admin, json={"amount": 5})
    assert budget.status_code == 200 and budget.json()["label"] == "alice@example.org", budget.text
    assert client.delete("/api/v1/admin/budgets/user/ALICE@example.org", headers=admin).status_code == 204
    look_alike = client.put("/api/v1/admin/groups/physics", headers=admin, json={"members": ["\u212aim@example.org"]})
    assert look_alike.status_code == 404 and "not found" in look_alike.json()["message"]
    spaced = client.put("/api/v1/admin/groups/physics", headers=admin, json={"members": ["alice @example.org"]})
    assert spaced.status_code == 404


def test_an_unreachable_webhook_is_logged_never_raised(
    app: FastAPI, client: TestClient, admin: dict[str, str], alice: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    context = _context(app)
    receiver = Receiver()
    url = receiver.url
    receiver.close()  # nothing listens there any more
    client.put("/api/v1/admin/budgets/user/alice@example.org", headers=admin, json={"amount": 1})
    with context.sessions() as db:
        found = budgets.statuses(db, context.prices)
        found[0].used = 1.0  # the crossing itself is tested above; here only its delivery
        budgets.record_crossings(db, found)
        db.commit()
        assert budgets.deliver_pending(db, url, pause=0) == 0
        events = db.execute(select(BudgetEvent)).scalars().all()
        assert [(e.attempts, e.delivered_at) for e in events] == [(budgets.TRIES_PER_PASS, None)] * 2
    assert "not delivered" in caplog.text


def test_metrics_show_core_hours_and_stored_bytes_by_user_and_group(
    app: FastAPI, client: TestClient, admin: dict[str, str], alice: dict[str, str], bob: dict[str, str]
) -> None:
    from cmbcluster.db.models import UsageInterval

    context = _context(app)
    client.put("/api/v1/admin/groups/astro", headers=admin, json={"members": ["bob@example.org"]})
    with context.sessions() as db:
        ids = dict(db.execute(select(User.email, User.id)).all())
        start = int(NOV.timestamp())
        db.add_all([
            UsageInterval(environment_id="e1", user_id=ids["alice@example.org"], application="files", preset="light",
                          cpu=2, memory_gib=4, start_s=start, end_s=start + 3 * 3600, seen_s=start),
            UsageInterval(environment_id="e2", user_id=ids["bob@example.org"], application="files", preset="light",
                          cpu=1, memory_gib=2, start_s=start, end_s=start + 5 * 3600, seen_s=start),
            StorageInterval(storage_id="s1", user_id=ids["bob@example.org"], storage_class="standard", bytes=4096,
                            start_s=start),
        ])  # fmt: skip
        db.commit()
    text = client.get("/metrics", headers=admin).text
    assert 'cmbcluster_user_core_hours_total{user="alice@example.org"} 6.0' in text
    assert 'cmbcluster_user_core_hours_total{user="bob@example.org"} 5.0' in text
    assert 'cmbcluster_group_core_hours_total{group="astro"} 5.0' in text
    assert 'cmbcluster_group_core_hours_total{group="(no group)"} 6.0' in text
    assert 'cmbcluster_user_stored_bytes{user="bob@example.org"} 4096.0' in text
    assert 'cmbcluster_group_stored_bytes{group="astro"} 4096.0' in text


def test_a_deleted_users_budget_goes_with_them(
    app: FastAPI, client: TestClient, admin: dict[str, str], alice: dict[str, str]
) -> None:
    """Found by an outsider's trial: it stayed, listed under the user's id for ever, and could not be
    removed (the API and the CLI looked the user up first)."""
    from cmbcluster.db.models import Budget

    client.put("/api/v1/admin/budgets/user/alice@example.org", headers=admin, json={"amount": 5})
    alice_id = client.get("/api/v1/auth/me", headers=alice).json()["id"]
    assert client.delete(f"/api/v1/admin/users/{alice_id}", headers=admin).status_code == 204
    assert client.get("/api/v1/admin/budgets", headers=admin).json() == []
    with _context(app).sessions() as db:  # one an earlier version kept
        db.add(Budget(scope="user", target_id=alice_id, amount=5, unit="currency", hard=False))
        db.commit()
    assert client.delete(f"/api/v1/admin/budgets/user/{alice_id}", headers=admin).status_code == 204
    assert client.get("/api/v1/admin/budgets", headers=admin).json() == []
    assert client.delete(f"/api/v1/admin/budgets/user/{alice_id}", headers=admin).status_code == 404


def test_the_core_hours_counter_never_goes_back(
    app: FastAPI, client: TestClient, admin: dict[str, str], alice: dict[str, str], clock: ManualClock
) -> None:
    """Prometheus reads a counter that goes down as a restart from zero, and `increase()` then counts
    the user's whole total again (found by an outsider's trial): a running environment counted up to
    the scrape, and once found gone, closed where it was last seen running, took those hours back."""
    context = _context(app)
    created = client.post("/api/v1/environments", headers=alice, json={"application": "files", "preset": "light"})
    assert created.status_code == 201, created.text
    env_id = created.json()["id"]
    wait_until_running(context, env_id)
    clock.advance(hours=1)
    Reconciler(context).reconcile()  # seen running an hour in
    clock.advance(hours=1)

    def counted() -> float:
        prefix = 'cmbcluster_user_core_hours_total{user="alice@example.org"} '
        scrape = client.get("/metrics", headers=admin)
        assert scrape.status_code == 200, scrape.text
        lines = [line for line in scrape.text.splitlines() if line.startswith(prefix)]
        # (once seen missing in a fresh clone's run: the scrape's usage lines, and the log, say why)
        assert len(lines) == 1, [line for line in scrape.text.splitlines() if "core_hours" in line]
        return float(lines[0].removeprefix(prefix))

    scraped = [counted()]
    context.compute.stop(env_id)  # its process is gone: a crash
    clock.advance(minutes=30)
    Reconciler(context).reconcile()
    assert _status(context, env_id) == "stopped"
    scraped.append(counted())
    assert scraped[1] >= scraped[0], scraped
    (row,) = client.get("/api/v1/usage", headers=admin).json()["rows"]
    assert row["label"] == "alice@example.org" and scraped[1] == pytest.approx(row["core_hours"], abs=1e-6)


def test_a_budget_in_currency_is_refused_where_nothing_costs_anything(tmp_path: Path) -> None:
    """On the embedded default every price is zero: a budget of 500 USD would read '0 % used' for
    ever, and the administrator who set it would believe the group capped."""
    with TestClient(create_app(CoreSettings(data_dir=tmp_path / "data")), base_url=LOCAL) as client:
        admin = dev_sign_in(client, "root@example.org")
        dev_sign_in(client, "alice@example.org")
        path = "/api/v1/admin/budgets/user/alice@example.org"
        answer = client.put(path, headers=admin, json={"amount": 500, "unit": "currency"})
        assert answer.status_code == 400, answer.text
        assert answer.json()["message"].startswith("every price of this deployment is zero")
        assert client.get("/api/v1/admin/budgets", headers=admin).json() == []
        assert client.put(path, headers=admin, json={"amount": 500, "unit": "core_hours"}).status_code == 200


def test_a_hard_budget_stops_every_environment_when_one_stop_fails(
    app: FastAPI, client: TestClient, admin: dict[str, str], alice: dict[str, str], clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """One stop the backend refuses (a cluster that answers 503) abandoned the rest of the pass: the
    user's other environments kept running, and costing, past a used-up hard budget (found by an
    outsider's trial). Each is stopped on its own; the refused one is tried again next pass."""
    context = _context(app)
    ids = []
    for name in ("first", "second"):
        created = client.post("/api/v1/environments", headers=alice,
                              json={"application": "files", "preset": "light", "name": name})  # fmt: skip
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
        wait_until_running(context, ids[-1])
    budget = {"amount": 0.01, "unit": "core_hours", "hard": True}
    assert client.put("/api/v1/admin/budgets/user/alice@example.org", headers=admin, json=budget).status_code == 200
    clock.advance(hours=1)
    stop = context.compute.stop
    refused: list[str] = []

    def refusing(environment_id: str) -> None:
        if not refused:  # whichever comes first
            refused.append(environment_id)
            raise ProviderUnavailable("the cluster did not answer")
        stop(environment_id)

    monkeypatch.setattr(context.compute, "stop", refusing)
    first_pass = Reconciler(context).reconcile()
    (other,) = [i for i in ids if i not in refused]
    assert first_pass.over_budget == [other] and _status(context, other) == "stopped"
    Reconciler(context).reconcile()  # its stop's intent was recorded: this pass finishes it
    assert _status(context, refused[0]) == "stopped"
