"""Administration (admins only): users, roles and status, the audit trail, activity, dashboard stats."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from cmbcluster.api.deps import AdminUser, Context, DbSession
from cmbcluster.db.models import User
from cmbcluster.services import admin as service
from cmbcluster.services.admin import Role, Stats, Status, UserUpdate

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])

PageNumber = Annotated[int, Query(ge=1, le=1_000_000, description="1 for the first page")]
PageSize = Annotated[int, Query(ge=1, le=200)]
Filter = Annotated[str | None, Query(max_length=200)]


class AdminUserOut(BaseModel):
    id: str
    email: str
    name: str
    role: str
    status: str
    auth_provider: str
    max_uptime_minutes: int | None
    storage_quota_bytes: int | None = Field(
        description="This user's own storage quota in bytes (0: none); null: the server default"
    )
    created_at: dt.datetime
    last_login_at: dt.datetime | None


class UserCounts(BaseModel):
    environments: int
    running_environments: int
    storages: int
    active_sessions: int


class AdminUserDetailOut(AdminUserOut):
    counts: UserCounts


class UsersPage(BaseModel):
    items: list[AdminUserOut]
    total: int
    page: int
    page_size: int


class AuditEventOut(BaseModel):
    id: int
    at: dt.datetime
    actor_id: str | None
    actor_email: str | None = Field(description="None for the system, or an actor that no longer exists")
    action: str
    target_type: str
    target_id: str
    detail: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditEventOut]
    total: int
    page: int
    page_size: int


class ActivityOut(BaseModel):
    id: int
    at: dt.datetime
    kind: str
    environment_id: str | None
    detail: dict[str, Any]


class ActivityPage(BaseModel):
    items: list[ActivityOut]
    total: int
    page: int
    page_size: int


def _user_out(user: User) -> AdminUserOut:
    return AdminUserOut.model_validate(user, from_attributes=True)


def _user_detail(db: DbSession, user: User) -> AdminUserDetailOut:
    return AdminUserDetailOut(**_user_out(user).model_dump(), counts=UserCounts(**service.user_counts(db, user.id)))


@router.get("/users", response_model=UsersPage, summary="Find users by e-mail or name")
def list_users(
    admin: AdminUser,
    db: DbSession,
    query: Annotated[str | None, Query(max_length=200, description="Part of the e-mail or name")] = None,
    role: Annotated[Role | None, Query()] = None,
    status: Annotated[Status | None, Query()] = None,
    page: PageNumber = 1,
    page_size: PageSize = 50,
) -> UsersPage:
    users, total = service.list_users(db, query=query, role=role, status=status, page=page, page_size=page_size)
    return UsersPage(items=[_user_out(user) for user in users], total=total, page=page, page_size=page_size)


@router.get("/users/{user_id}", response_model=AdminUserDetailOut, summary="One user, with counts")
def get_user(user_id: str, admin: AdminUser, db: DbSession) -> AdminUserDetailOut:
    return _user_detail(db, service.get_user(db, user_id))


@router.patch(
    "/users/{user_id}",
    response_model=AdminUserDetailOut,
    summary="Change a user's role, status or maximum uptime; deactivation signs them out at once",
)
def update_user(
    user_id: str, body: UserUpdate, admin: AdminUser, db: DbSession, context: Context
) -> AdminUserDetailOut:
    return _user_detail(db, service.change_user(db, context, user_id, body, actor_id=admin.id))


@router.delete(
    "/users/{user_id}",
    status_code=204,
    summary="Delete a user who owns no buckets: their environments and cloud identity go too",
)
def delete_user(user_id: str, admin: AdminUser, db: DbSession, context: Context) -> Response:
    service.delete_user(db, context, user_id, actor_id=admin.id)
    return Response(status_code=204)


@router.get("/users/{user_id}/activity", response_model=ActivityPage, summary="A user's activity, newest first")
def user_activity(
    user_id: str, admin: AdminUser, db: DbSession, page: PageNumber = 1, page_size: PageSize = 50
) -> ActivityPage:
    rows, total = service.list_activity(db, user_id, page=page, page_size=page_size)
    return ActivityPage(
        items=[ActivityOut.model_validate(row, from_attributes=True) for row in rows],
        total=total,
        page=page,
        page_size=page_size,
    )


@router.get("/audit", response_model=AuditPage, summary="The audit trail, newest first")
def audit_trail(
    admin: AdminUser,
    db: DbSession,
    page: PageNumber = 1,
    page_size: PageSize = 50,
    action: Filter = None,
    actor_id: Filter = None,
    target_id: Filter = None,
    target_type: Filter = None,
) -> AuditPage:
    rows, total = service.list_audit(
        db,
        action=action,
        actor_id=actor_id,
        target_id=target_id,
        target_type=target_type,
        page=page,
        page_size=page_size,
    )
    items = [
        AuditEventOut(
            id=event.id,
            at=event.at,
            actor_id=event.actor_id,
            actor_email=email,
            action=event.action,
            target_type=event.target_type,
            target_id=event.target_id,
            detail=event.detail,
        )
        for event, email in rows
    ]
    return AuditPage(items=items, total=total, page=page, page_size=page_size)


@router.get("/stats", response_model=Stats, summary="Counts for the admin dashboard")
def dashboard_stats(admin: AdminUser, db: DbSession) -> Stats:
    return service.stats(db)
