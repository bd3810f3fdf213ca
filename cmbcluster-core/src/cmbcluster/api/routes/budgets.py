"""Monthly budgets of users and groups, and the groups themselves (admins only)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path, Response
from pydantic import BaseModel, Field

from cmbcluster.api.deps import AdminUser, ApiRouter, Context, DbSession
from cmbcluster.bodies import RequestBody
from cmbcluster.services import budgets as service

router = ApiRouter(prefix="/api/v1/admin", tags=["admin"])

Scope = Annotated[Literal["user", "group"], Path(description="user or group")]
Target = Annotated[str, Path(max_length=200, description="A user's id or e-mail, or a group's id or name")]
GroupName = Annotated[
    str,
    Path(min_length=1, max_length=service.MAX_GROUP_NAME, description="Printable text: no control, formatting, "
         "bidirectional or line-break characters"),
]  # fmt: skip


class BudgetStatusOut(BaseModel):
    """A budget and how much of it this month (UTC) has used."""

    id: str
    scope: str = Field(description="user or group")
    target_id: str
    label: str = Field(description="The user's e-mail or the group's name")
    amount: float
    unit: str = Field(description="currency (the price table's) or core_hours")
    currency: str
    hard: bool = Field(description="At 100 %, running environments are stopped too")
    used: float = Field(description="This month so far, in the budget's unit (an estimate from list prices)")
    percent: float = Field(
        description=f"100 x used / amount, at most {service.PERCENT_CAP:g} (the message says >999 %)"
    )
    state: Literal["ok", "warning", "exceeded"] = Field(description="warning from 80 %, exceeded from 100 %")
    message: str


class BudgetIn(RequestBody):
    amount: float = Field(
        ge=service.MIN_AMOUNT, le=service.MAX_AMOUNT, allow_inf_nan=False,
        description=f"At least {service.MIN_AMOUNT}, kept to {service.AMOUNT_DECIMALS} decimal places",
    )  # fmt: skip
    unit: Literal["currency", "core_hours"] = "currency"
    hard: bool = Field(default=False, description="At 100 %, stop running environments too")


class GroupIn(RequestBody):
    members: list[str] = Field(max_length=10_000, description="Users by id or e-mail; replaces the members")


class GroupOut(BaseModel):
    id: str
    name: str
    members: list[str] = Field(description="The members' e-mails")
    storage_quota_bytes: int | None = Field(
        description="What the members' buckets may hold together, earlier versions included; null: no group quota"
    )


class GroupChange(RequestBody):
    storage_quota_bytes: int | None = Field(
        ge=0, le=2**62, strict=True, description="What the members' buckets may hold together, in bytes "
        "(earlier versions included); 0 or null: no group quota. Each member's own quota holds as well.",
    )  # fmt: skip


def status_out(found: list[service.BudgetStatus]) -> list[BudgetStatusOut]:
    return [BudgetStatusOut(**status.as_dict()) for status in found]


@router.get("/budgets", response_model=list[BudgetStatusOut], summary="Every budget, with this month's use")
def list_budgets(admin: AdminUser, db: DbSession, context: Context) -> Any:
    return status_out(service.statuses(db, context.prices))


@router.put(
    "/budgets/{scope}/{target}", response_model=BudgetStatusOut, summary="Set a user's or a group's monthly budget"
)
def set_budget(scope: Scope, target: Target, body: BudgetIn, admin: AdminUser, db: DbSession, context: Context) -> Any:
    budget = service.set_budget(
        db, context.prices, actor_id=admin.id, scope=scope, target=target, amount=body.amount, unit=body.unit,
        hard=body.hard,
    )  # fmt: skip
    return BudgetStatusOut(**service.status_of(db, context.prices, budget, target).as_dict())


@router.delete("/budgets/{scope}/{target}", status_code=204, summary="Remove a budget")
def delete_budget(scope: Scope, target: Target, admin: AdminUser, db: DbSession) -> Response:
    service.delete_budget(db, actor_id=admin.id, scope=scope, target=target)
    return Response(status_code=204)


@router.get("/groups", response_model=list[GroupOut], summary="Groups of users, for reports and budgets")
def list_groups(admin: AdminUser, db: DbSession) -> Any:
    return service.groups(db)


@router.put("/groups/{name}", response_model=GroupOut, summary="Create a group or replace its members")
def set_group(name: GroupName, body: GroupIn, admin: AdminUser, db: DbSession) -> Any:
    group = service.set_group(db, actor_id=admin.id, name=name, members=body.members)
    return service.group_of(db, group.id, name)


@router.patch("/groups/{name}", response_model=GroupOut, summary="Set a group's storage quota")
def change_group(name: GroupName, body: GroupChange, admin: AdminUser, db: DbSession) -> Any:
    group = service.set_group_storage_quota(db, actor_id=admin.id, name=name, quota_bytes=body.storage_quota_bytes)
    return service.group_of(db, group.id, name)


@router.delete("/groups/{name}", status_code=204, summary="Remove a group (and its budget)")
def delete_group(name: GroupName, admin: AdminUser, db: DbSession) -> Response:
    service.delete_group(db, actor_id=admin.id, name=name)
    return Response(status_code=204)
