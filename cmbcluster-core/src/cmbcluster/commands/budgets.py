"""``cmbcluster budgets ...`` and ``cmbcluster groups ...``: monthly budgets and groups of users.

For the operator, on the server's own configuration and database, like the admin API's
``/api/v1/admin/budgets`` and ``/api/v1/admin/groups`` (the same services, audited with no actor:
the server). Users are named by e-mail or id, groups by name or id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import typer

budgets_app = typer.Typer(help="Monthly budgets of users and groups.", no_args_is_help=True)
groups_app = typer.Typer(help="Groups of users, for usage reports and budgets.", no_args_is_help=True)

Scope = Annotated[str, typer.Argument(help="user or group.", metavar="SCOPE")]
Target = Annotated[str, typer.Argument(help="A user's e-mail or id, or a group's name or id.")]
GroupName = Annotated[str, typer.Argument(help="The group's name (1 to 100 characters).")]


@budgets_app.command("list")
def list_budgets() -> None:
    """Every budget, with this month's use (an estimate from list prices)."""
    from rich.table import Table

    from cmbcluster.commands.common import operator_database, out
    from cmbcluster.services import budgets

    with operator_database() as (db, prices):
        found = budgets.statuses(db, prices)
    if not found:
        out("No budget is set: `cmbcluster budgets set user ada@example.org 100` sets one.")
        return
    table = Table(title=f"Budgets this month ({prices.disclaimer})")
    for column in ("scope", "for", "amount", "unit", "used", "%", "state", "hard"):
        table.add_column(column, justify="right" if column in ("amount", "used", "%") else "left")
    for status in found:
        b = status.budget
        unit = status.currency if b.unit == "currency" else "core-hours"
        table.add_row(
            b.scope, status.label, budgets.format_amount(b.amount), unit, f"{status.used:.2f}",
            budgets.format_percent(status.percent).removesuffix(" %"),
            status.state, "yes" if b.hard else "",
        )  # fmt: skip
    out(table)


@budgets_app.command("set")
def set_budget(
    scope: Scope,
    target: Target,
    amount: Annotated[float, typer.Argument(help="The monthly amount, at least 0.01 (kept to 2 decimals).")],
    unit: Annotated[str, typer.Option(help="currency (the price table's) or core_hours.")] = "currency",
    hard: Annotated[bool, typer.Option("--hard", help="At 100 %, stop running environments too.")] = False,
) -> None:
    """Set SCOPE TARGET's monthly budget to AMOUNT (replacing any)."""
    from cmbcluster.commands.common import operator_database, out
    from cmbcluster.services import budgets

    with operator_database() as (db, prices):
        _check_scope(scope)
        budget = budgets.set_budget(
            db, prices, actor_id=None, scope=scope, target=target, amount=amount, unit=unit, hard=hard
        )
        status = budgets.status_of(db, prices, budget, target)
    out(f"{status.label} ({scope} budget): {status.describe()}")


@budgets_app.command("delete")
def delete_budget(scope: Scope, target: Target) -> None:
    """Remove SCOPE TARGET's budget."""
    from cmbcluster.commands.common import operator_database, out
    from cmbcluster.services import budgets

    with operator_database() as (db, _prices):
        _check_scope(scope)
        budgets.delete_budget(db, actor_id=None, scope=scope, target=target)
    out(f"The budget of {scope} {target} is removed.")


def _check_scope(scope: str) -> None:
    from cmbcluster.errors import InvalidRequest
    from cmbcluster.services.budgets import SCOPES

    if scope not in SCOPES:
        raise InvalidRequest(f"SCOPE is one of {', '.join(SCOPES)}, not {scope!r}")


@groups_app.command("list")
def list_groups() -> None:
    """Every group and its members."""
    from rich.table import Table

    from cmbcluster.commands.common import operator_database, out
    from cmbcluster.services import budgets

    with operator_database() as (db, _prices):
        found = budgets.groups(db)
    if not found:
        out("No group yet: `cmbcluster groups create NAME [MEMBER...]` makes one.")
        return
    table = Table(title="Groups")
    table.add_column("group")
    table.add_column("members")
    for group in found:
        table.add_row(group["name"], ", ".join(group["members"]) or "(none)")
    out(table)


@groups_app.command("create")
def create_group(
    name: GroupName,
    members: Annotated[list[str] | None, typer.Argument(help="Members, by e-mail or id.")] = None,
) -> None:
    """Create group NAME with MEMBERS (an existing group of that name is refused)."""
    from cmbcluster.commands.common import operator_database, out
    from cmbcluster.errors import Conflict
    from cmbcluster.services import budgets

    with operator_database() as (db, _prices):
        if any(g["name"] == name.strip() for g in budgets.groups(db)):
            raise Conflict(f"group {name.strip()} exists: add members with `cmbcluster groups add-member`")
        budgets.set_group(db, actor_id=None, name=name, members=members or [])
    out(f"Group {name.strip()} created with {len(members or [])} member(s).")


@groups_app.command("add-member")
def add_member(
    name: GroupName, members: Annotated[list[str], typer.Argument(help="Users to add, by e-mail or id.")]
) -> None:
    """Add MEMBERS to group NAME."""
    _change_members(name, add=members)


@groups_app.command("remove-member")
def remove_member(
    name: GroupName, members: Annotated[list[str], typer.Argument(help="Users to remove, by e-mail or id.")]
) -> None:
    """Remove MEMBERS from group NAME."""
    _change_members(name, remove=members)


@groups_app.command("delete")
def delete_group(name: GroupName) -> None:
    """Remove group NAME (and its budget); its members' usage records stay."""
    from cmbcluster.commands.common import operator_database, out
    from cmbcluster.services import budgets

    with operator_database() as (db, _prices):
        budgets.delete_group(db, actor_id=None, name=name)
    out(f"Group {name} is removed.")


def _change_members(name: str, *, add: Sequence[str] = (), remove: Sequence[str] = ()) -> None:
    from cmbcluster.commands.common import operator_database, out
    from cmbcluster.errors import NotFound
    from cmbcluster.services import budgets

    with operator_database() as (db, _prices):
        group_id, label = budgets.resolve_target(db, "group", name)
        current = budgets.group_of(db, group_id, label)["members"]
        leaving = {budgets.resolve_target(db, "user", member)[1] for member in remove}  # e-mails; unknown users refused
        missing = sorted(leaving - set(current))
        if missing:
            raise NotFound(f"not a member of {label}: {', '.join(missing)}")
        members = [m for m in current if m not in leaving] + list(add)
        group = budgets.set_group(db, actor_id=None, name=label, members=members)
        count = len(budgets.group_of(db, group.id, label)["members"])
    out(f"Group {label} has {count} member(s).")
