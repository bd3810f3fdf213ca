"""Administration (admins only): users, roles and status, the audit trail, activity, dashboard stats."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import Depends, Query, Response
from pydantic import BaseModel, Field

from cmbcluster.api.deps import AdminUser, ApiRouter, Context, DbSession
from cmbcluster.api.routes.environments import EnvironmentOut
from cmbcluster.api.routes.storages import make_storage_runtime
from cmbcluster.db.models import User
from cmbcluster.services import admin as service
from cmbcluster.services import environments as envs
from cmbcluster.services.admin import Role, Stats, Status, UserUpdate

router = ApiRouter(prefix="/api/v1/admin", tags=["admin"])

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
    default_max_uptime_minutes: int = Field(
        description="The server's maximum uptime (CMBCLUSTER_MAX_UPTIME_HOURS), for users without their own; 0: never"
    )


class AuditEventOut(BaseModel):
    id: int
    at: dt.datetime
    actor_id: str | None
    actor_email: str | None = Field(description="None for the system, or an actor that no longer exists")
    actor_name: str | None = Field(default=None, description="The actor's name, when known")
    action: str
    target_type: str
    target_id: str
    target_name: str | None = Field(
        default=None, description="The target's name for people (an e-mail, an environment's or bucket's name)"
    )
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
    context: Context,
    query: Annotated[str | None, Query(max_length=200, description="Part of the e-mail or name")] = None,
    role: Annotated[Role | None, Query()] = None,
    status: Annotated[Status | None, Query()] = None,
    page: PageNumber = 1,
    page_size: PageSize = 50,
) -> UsersPage:
    users, total = service.list_users(db, query=query, role=role, status=status, page=page, page_size=page_size)
    return UsersPage(
        items=[_user_out(user) for user in users], total=total, page=page, page_size=page_size,
        default_max_uptime_minutes=envs.uptime_minutes(context, None),
    )  # fmt: skip


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
    names = service.target_names(db, [event for event, _, _ in rows])
    items = [
        AuditEventOut(
            id=event.id,
            at=event.at,
            actor_id=event.actor_id,
            actor_email=email,
            actor_name=name or None,
            action=event.action,
            target_type=event.target_type,
            target_id=event.target_id,
            target_name=names.get((event.target_type, event.target_id)),
            detail=event.detail,
        )
        for event, email, name in rows
    ]
    return AuditPage(items=items, total=total, page=page, page_size=page_size)


@router.get(
    "/stats",
    response_model=Stats,
    summary="Counts for the admin dashboard (buckets' usage measured again where stale)",
    dependencies=[Depends(make_storage_runtime)],
)
def dashboard_stats(admin: AdminUser, db: DbSession, context: Context) -> Stats:
    return service.stats(db, context)


class AdminEnvironmentsPage(BaseModel):
    items: list[EnvironmentOut]
    total: int
    page: int
    page_size: int


EnvironmentStatus = Literal["pending", "starting", "running", "stopping", "stopped", "failed"]


@router.get("/environments", response_model=AdminEnvironmentsPage, summary="Every user's environments, newest first")
def list_environments(
    admin: AdminUser,
    db: DbSession,
    context: Context,
    query: Annotated[
        str | None, Query(max_length=200, description="Part of the name or the owner's e-mail or name")
    ] = None,
    status: Annotated[EnvironmentStatus | None, Query()] = None,
    page: PageNumber = 1,
    page_size: PageSize = 50,
) -> AdminEnvironmentsPage:
    items, total = envs.admin_views(db, context, status=status, query=query, page=page, page_size=page_size)
    return AdminEnvironmentsPage.model_validate({"items": items, "total": total, "page": page, "page_size": page_size})


@router.post(
    "/environments/{environment_id}/stop",
    response_model=EnvironmentOut,
    summary="Stop any user's environment (audited; its owner sees who stopped it)",
)
def stop_environment(environment_id: str, admin: AdminUser, db: DbSession, context: Context) -> EnvironmentOut:
    service.stop_environment(db, context, environment_id, admin=admin)
    return EnvironmentOut.model_validate(envs.admin_view(db, context, environment_id))


@router.delete(
    "/environments/{environment_id}",
    status_code=204,
    summary="Delete any user's environment (audited; its buckets stay)",
)
def delete_environment(environment_id: str, admin: AdminUser, db: DbSession, context: Context) -> Response:
    service.delete_environment(db, context, environment_id, admin=admin)
    return Response(status_code=204)
