"""`cmbcluster budgets` and `cmbcluster groups`: the operator's commands on the server's database,
the same services as the admin API, and bad input answered with one clear line (exit status 2)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cmbcluster.cli import app as cli
from cmbcluster.settings import CoreSettings

Invoke = Callable[..., tuple[int, str]]


#: Budgets in currency need prices: the embedded default's are all zero.
PRICES = '{"vcpu_hour": 0.05, "gib_hour": 0.01}'


@pytest.fixture
def settings(tmp_path: Path) -> CoreSettings:
    return CoreSettings(data_dir=tmp_path / "data", prices=PRICES)


@pytest.fixture
def run(
    client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    settings: CoreSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> Invoke:
    """The CLI on the signed-up server's data directory (Alice and Bob exist)."""
    monkeypatch.setenv("CMBCLUSTER_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CMBCLUSTER_PRICES", PRICES)

    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, list(args))
        return result.exit_code, result.output

    return invoke


def test_groups_are_created_changed_listed_and_deleted(run: Invoke, client: TestClient, admin: dict[str, str]) -> None:
    invoke = run
    assert invoke("groups", "create", "physics", "alice@example.org") == (
        0,
        "Group physics created with 1 member(s).\n",
    )
    code, output = invoke("groups", "add-member", "physics", "bob@example.org")
    assert code == 0 and "2 member(s)" in output
    code, output = invoke("groups", "list")
    assert code == 0 and "physics" in output and "alice@example.org, bob@example.org" in output
    # the admin API sees what the CLI did
    (physics,) = client.get("/api/v1/admin/groups", headers=admin).json()
    assert physics["members"] == ["alice@example.org", "bob@example.org"]
    code, output = invoke("groups", "remove-member", "physics", "alice@example.org")
    assert code == 0 and "1 member(s)" in output
    assert client.get("/api/v1/admin/groups", headers=admin).json()[0]["members"] == ["bob@example.org"]
    assert invoke("groups", "delete", "physics")[0] == 0
    assert client.get("/api/v1/admin/groups", headers=admin).json() == []
    actions = [e["action"] for e in client.get("/api/v1/admin/audit", headers=admin).json()["items"]]
    assert actions.count("group.set") == 3 and "group.deleted" in actions  # audited, by the server


def test_budgets_are_set_listed_and_deleted(run: Invoke, client: TestClient, admin: dict[str, str]) -> None:
    invoke = run
    code, output = invoke("budgets", "set", "user", "alice@example.org", "25", "--unit", "core_hours", "--hard")
    assert code == 0 and "alice@example.org" in output, output
    (budget,) = client.get("/api/v1/admin/budgets", headers=admin).json()
    assert (budget["label"], budget["amount"], budget["unit"], budget["hard"]) == (
        "alice@example.org",
        25,
        "core_hours",
        True,
    )
    code, output = invoke("budgets", "list")
    assert code == 0 and "alice@example.org" in output and "core-hours" in output and "yes" in output
    assert invoke("budgets", "set", "user", "alice@example.org", "40")[0] == 0  # replaced, in currency now
    assert client.get("/api/v1/admin/budgets", headers=admin).json()[0]["unit"] == "currency"
    assert invoke("budgets", "delete", "user", "alice@example.org")[0] == 0
    assert client.get("/api/v1/admin/budgets", headers=admin).json() == []
    assert "No budget is set" in invoke("budgets", "list")[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("budgets", "set", "planet", "alice@example.org", "5"), "SCOPE is one of user, group, not 'planet'"),
        (("budgets", "set", "user", "nobody@example.org", "5"), "user nobody@example.org not found"),
        (("budgets", "set", "user", "alice@example.org", "0"), "amount must be at least 0.01"),
        (("budgets", "set", "user", "alice@example.org", "5e-324"), "amount must be at least 0.01, not 5e-324"),
        (("budgets", "set", "user", "alice@example.org", "nan"), "amount must be a finite number, not nan"),
        (("budgets", "set", "user", "alice@example.org", "inf"), "amount must be a finite number, not inf"),
        (("budgets", "set", "user", "alice@example.org", "1e13"), "amount must be at most 1e+12"),  # as the API
        (
            ("budgets", "set", "user", "alice@example.org", "5", "--unit", "euros"),
            "unit is one of currency, core_hours",
        ),
        (("budgets", "delete", "user", "alice@example.org"), "has no budget"),
        (("budgets", "set", "group", "astro", "5"), "group astro not found"),
        (("groups", "create", "x" * 101), "1 to 100 characters"),
        (("groups", "create", "a\x00b"), "cannot contain U+0000"),
        (("groups", "create", "team\u202egpj"), "cannot contain U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        (("groups", "create", "two\nlines"), "cannot contain U+000A"),
        (("groups", "create", "a/b"), "a group name cannot contain '/'"),  # the API could not name it
        # reports and /metrics list the users in no group under that name: a group of it merged with them
        (("groups", "create", "(No Group)"), "'(no group)' names the users in no group"),
        (("groups", "create", "astro", "nobody@example.org"), "user nobody@example.org not found"),
        (("groups", "add-member", "astro", "bob@example.org"), "group astro not found"),
        (("groups", "delete", "astro"), "group astro not found"),
    ],
)
def test_bad_input_is_one_clear_line(run: Invoke, args: tuple[str, ...], message: str) -> None:
    code, output = run(*args)
    assert code == 2, output
    assert message in " ".join(output.split()) and "Traceback" not in output


def test_an_existing_group_is_not_created_twice_and_a_non_member_is_not_removed(run: Invoke) -> None:
    invoke = run
    assert invoke("groups", "create", "astro", "bob@example.org")[0] == 0
    code, output = invoke("groups", "create", "astro")
    assert code == 2 and "group astro exists" in output
    code, output = invoke("groups", "remove-member", "astro", "alice@example.org")
    assert code == 2 and "not a member of astro: alice@example.org" in output
    assert "bob@example.org" in invoke("groups", "list")[1]  # unchanged


def test_members_and_budgets_are_found_by_e_mail_in_any_ascii_case(run: Invoke) -> None:
    invoke = run
    assert invoke("groups", "create", "astro", "BOB@example.org")[0] == 0
    code, output = invoke("groups", "add-member", "astro", "Alice@Example.Org")
    assert code == 0 and "2 member(s)" in output, output
    code, output = invoke("groups", "remove-member", "astro", "BOB@EXAMPLE.ORG")
    assert code == 0 and "1 member(s)" in output, output
    assert "alice@example.org" in invoke("groups", "list")[1]
    code, output = invoke("budgets", "set", "user", "ALICE@example.org", "25")
    assert code == 0 and "alice@example.org" in output, output
    assert invoke("budgets", "delete", "user", "alice@EXAMPLE.org")[0] == 0


def test_a_non_number_amount_is_a_usage_error(run: Invoke) -> None:
    code, output = run("budgets", "set", "user", "alice@example.org", "lots")
    assert code == 2 and "Invalid value" in output and "Traceback" not in output
