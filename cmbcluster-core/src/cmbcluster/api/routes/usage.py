"""Usage and estimated cost: per user, group, application or day (admins), and one's own month."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import Query, Response
from pydantic import BaseModel, ConfigDict, Field

from cmbcluster.api.deps import AdminUser, ApiRouter, Context, CurrentUser, DbSession
from cmbcluster.api.routes.budgets import BudgetStatusOut, status_out
from cmbcluster.services import accounting, budgets

router = ApiRouter(prefix="/api/v1/usage", tags=["usage"])

FromQuery = Annotated[
    str | None, Query(alias="from", description="ISO date or time, UTC unless given; default: this month's start")
]
ToQuery = Annotated[
    str | None,
    Query(description="ISO date or time (exclusive); default: the next month's start in from's offset (UTC if none)"),
]


class UsageRow(BaseModel):
    key: str
    label: str
    environment_hours: float
    core_hours: float
    memory_gib_hours: float
    storage_gb_months: float
    compute_cost: float
    storage_cost: float
    cost: float
    budget_state: Literal["ok", "warning", "exceeded"] | None = Field(
        default=None, description="This month's state of the row's own budget (by user or group); null: none"
    )


class UsageTotals(BaseModel):
    environment_hours: float
    core_hours: float
    memory_gib_hours: float
    storage_gb_months: float
    compute_cost: float
    storage_cost: float
    cost: float


class UsageReport(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: dt.datetime = Field(alias="from")
    to: dt.datetime
    group_by: str
    currency: str
    estimate: str  # "estimates from <provider> list prices read on <date>, not a bill"
    priced: bool = Field(description="False when no prices are configured: every amount is 0 and means nothing")
    prices_read_on: dt.date | None
    price_sources: list[str]
    rows: list[UsageRow]
    totals: UsageTotals | None  # none by group: a user in two groups counts in both
    cluster_fee: float
    budgets: list[BudgetStatusOut] = Field(
        default_factory=list, description="This month's budgets (yours, or every one for admins): warning from 80 %"
    )


def _out(report: accounting.Report, found: list[budgets.BudgetStatus]) -> UsageReport:
    data: dict[str, Any] = report.as_dict()
    data["from_"] = data.pop("from")
    scope = {"user": "user", "group": "group"}.get(report.group_by)
    states = {(s.budget.target_id if scope == "user" else s.label): s.state for s in found if s.budget.scope == scope}
    for row in data["rows"]:
        row["budget_state"] = states.get(row["key"]) if scope else None
    return UsageReport(**data, budgets=status_out(found))


@router.get(
    "", response_model=UsageReport, summary="Usage and estimated cost by user, group, application or day (admins)",
    responses={200: {"content": {"text/csv": {}}}},
)  # fmt: skip
def usage_report(
    admin: AdminUser, db: DbSession, context: Context, start: FromQuery = None, to: ToQuery = None,
    group_by: Annotated[str, Query(description="user, group, application or day")] = "user",
    format: Annotated[Literal["json", "csv"], Query()] = "json",
) -> Any:  # fmt: skip
    lo, hi = accounting.parse_period(start, to)
    report = accounting.report(db, context.prices, lo, hi, group_by)
    if format == "csv":  # the rows alone: no budgets
        name = f"usage-{lo.date().isoformat()}-{hi.date().isoformat()}-by-{group_by}.csv"
        return Response(
            report.csv(), media_type="text/csv", headers={"Content-Disposition": f'attachment; filename="{name}"'}
        )
    return _out(report, budgets.statuses(db, context.prices))


@router.get("/me", response_model=UsageReport, summary="Your own usage and estimated cost, by day")
def my_usage(user: CurrentUser, db: DbSession, context: Context, start: FromQuery = None, to: ToQuery = None) -> Any:
    lo, hi = accounting.parse_period(start, to)
    report = accounting.report(db, context.prices, lo, hi, "day", user_ids=[user.id])
    return _out(report, budgets.statuses(db, context.prices, user_id=user.id))


@router.get("/prices", summary="The price table estimates are computed with")
def prices(user: CurrentUser, context: Context) -> dict[str, Any]:
    return context.prices.describe()
