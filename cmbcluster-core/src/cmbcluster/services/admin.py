"""Administration: finding users, changing their role and status, the audit trail, activity, stats.

Changes that reach beyond the database (a deactivated user's environments stop, a deleted user's
environments and cloud identity go) take the :class:`~cmbcluster.context.AppContext` after the
database session, as :mod:`cmbcluster.services.environments` does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVarTuple

from pydantic import BaseModel, Field, model_validator
from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from cmbcluster.bodies import RequestBody
from cmbcluster.db.models import Activity, Application, AuditEvent, Environment, Storage, User, utcnow
from cmbcluster.db.models import Session as SessionRow
from cmbcluster.errors import Conflict, InvalidRequest, NotFound
from cmbcluster.interfaces import UserRef
from cmbcluster.services import budgets, environments, storages
from cmbcluster.services.audit import audit
from cmbcluster.services.sessions import ACCOUNT_GONE, DEACTIVATED, revoke_all_sessions
from cmbcluster.services.users import other_active_admins

if TYPE_CHECKING:
    from cmbcluster.context import AppContext

Role = Literal["admin", "user"]
Status = Literal["active", "deactivated"]
#: A year: longer than that is "never" (0).
MAX_UPTIME_MINUTES_LIMIT = 366 * 24 * 60


class UserUpdate(RequestBody):
    """What an admin may change on a user; only the fields sent change."""

    role: Role | None = None
    status: Status | None = None
    # strict: "10" is a string, not a number of minutes or bytes (a script's bug to hear of)
    max_uptime_minutes: int | None = Field(
        default=None,
        strict=True,
        ge=0,
        le=MAX_UPTIME_MINUTES_LIMIT,
        description="Stop this user's environments after this many minutes (0: never); null: the server default",
    )
    storage_quota_bytes: int | None = Field(
        default=None,
        strict=True,
        ge=0,
        le=2**62,
        description="Bytes this user's buckets may hold, current objects and earlier versions together "
        "(0: no quota); null: the server default (CMBCLUSTER_STORAGE_QUOTA_BYTES)",
    )

    @model_validator(mode="after")
    def _no_null_role_or_status(self) -> UserUpdate:
        nulls = sorted(
            name for name in ("role", "status") if name in self.model_fields_set and getattr(self, name) is None
        )
        if nulls:
            raise ValueError(f"cannot be null: {', '.join(nulls)} (leave a field out to keep it)")
        return self


Row = TypeVarTuple("Row")


def _page(query: Select[*Row], page: int, page_size: int) -> Select[*Row]:
    if page < 1 or not 1 <= page_size <= 200:
        raise InvalidRequest("page must be at least 1 and page_size between 1 and 200")
    return query.limit(page_size).offset((page - 1) * page_size)


def _count(db: Session, query: Select[*Row]) -> int:
    total: int = db.execute(select(func.count()).select_from(query.order_by(None).subquery())).scalar_one()
    return total


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# -- users -----------------------------------------------------------------------------------------
def list_users(
    db: Session,
    *,
    query: str | None = None,
    role: str | None = None,
    status: str | None = None,
    page: int = 1,
    page_size: int = 50,
) -> tuple[list[User], int]:
    """Users whose e-mail or name contains ``query`` (case-insensitive), by e-mail; and the total."""
    stmt = select(User)
    if query and query.strip():
        pattern = _like(query.strip().lower())
        stmt = stmt.where(or_(User.email.ilike(pattern, escape="\\"), User.name.ilike(pattern, escape="\\")))
    if role:
        stmt = stmt.where(User.role == role)
    if status:
        stmt = stmt.where(User.status == status)
    total = _count(db, stmt)
    users = db.execute(_page(stmt.order_by(User.email, User.id), page, page_size)).scalars()
    return list(users), total


def get_user(db: Session, user_id: str) -> User:
    user = db.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id!r}")
    return user


def user_counts(db: Session, user_id: str) -> dict[str, int]:
    """How many environments (and running ones), buckets and live sessions a user has."""
    now = utcnow()

    def count(stmt: Select[Any]) -> int:
        value: int = db.execute(stmt).scalar_one()
        return value

    base = select(func.count()).select_from(Environment).where(Environment.user_id == user_id)
    return {
        "environments": count(base),
        "running_environments": count(base.where(Environment.status.in_(("starting", "running")))),
        "storages": count(select(func.count()).select_from(Storage).where(Storage.user_id == user_id)),
        "active_sessions": count(
            select(func.count())
            .select_from(SessionRow)
            .where(SessionRow.user_id == user_id, SessionRow.revoked_at.is_(None), SessionRow.expires_at > now)
        ),
    }


def update_user(db: Session, user_id: str, changes: UserUpdate, *, actor_id: str | None) -> User:
    """Change a user's role, status or maximum uptime, with an audit event per change.

    Admins cannot demote or deactivate themselves (InvalidRequest) and the last active admin
    stays one (Conflict). Deactivation revokes every session of the user at once.
    """
    user = get_user(db, user_id)
    fields = changes.model_fields_set
    new_role = changes.role if "role" in fields and changes.role is not None else user.role
    new_status = changes.status if "status" in fields and changes.status is not None else user.status
    if actor_id is not None and actor_id == user.id:
        if new_role != "admin" and user.role == "admin":
            raise InvalidRequest("you cannot remove your own administrator role; ask another administrator")
        if new_status != "active" and user.status == "active":
            raise InvalidRequest("you cannot deactivate your own account; ask another administrator")
    loses_admin = user.role == "admin" and user.status == "active" and (new_role != "admin" or new_status != "active")
    if loses_admin and other_active_admins(db, user.id) == 0:
        raise Conflict(f"{user.email} is the last active administrator; make another user an administrator first")

    target = {"target_type": "user", "target_id": user.id}
    if new_role != user.role:
        audit(db, actor_id=actor_id, action="user.role_changed", email=user.email,
              before={"role": user.role}, after={"role": new_role}, **target)  # fmt: skip
        user.role = new_role
        user.admin_because = None  # an administrator's choice: no sign-in rule takes it back
    if new_status != user.status:
        revoked = 0
        if new_status == "deactivated":
            revoked = user_counts(db, user.id)["active_sessions"]
            revoke_all_sessions(db, user.id)
        audit(
            db,
            actor_id=actor_id,
            action="user.deactivated" if new_status == "deactivated" else "user.reactivated",
            email=user.email,
            before={"status": user.status},
            after={"status": new_status},
            sessions_revoked=revoked,
            **target,
        )
        user.status = new_status
    if "max_uptime_minutes" in fields and changes.max_uptime_minutes != user.max_uptime_minutes:
        audit(db, actor_id=actor_id, action="user.max_uptime_changed", email=user.email,
              before={"max_uptime_minutes": user.max_uptime_minutes},
              after={"max_uptime_minutes": changes.max_uptime_minutes}, **target)  # fmt: skip
        user.max_uptime_minutes = changes.max_uptime_minutes
    if "storage_quota_bytes" in fields and changes.storage_quota_bytes != user.storage_quota_bytes:
        audit(db, actor_id=actor_id, action="user.storage_quota_changed", email=user.email,
              before={"storage_quota_bytes": user.storage_quota_bytes},
              after={"storage_quota_bytes": changes.storage_quota_bytes}, **target)  # fmt: skip
        user.storage_quota_bytes = changes.storage_quota_bytes
    db.commit()
    return user


def change_user(db: Session, context: AppContext, user_id: str, changes: UserUpdate, *, actor_id: str | None) -> User:
    """:func:`update_user`, and what follows outside the database: a deactivated user's environments
    stop too, so nothing of theirs keeps running or costing."""
    user = update_user(db, user_id, changes, actor_id=actor_id)
    if user.status != "active":
        # Their open streams and WebSockets end first, saying why (not merely that an environment stopped).
        context.revocations.ended(DEACTIVATED, user_id=user.id)
        for env in environments.list_owned(db, user):
            if env.status in environments.ACTIVE_STATUSES:
                environments.stop(db, context, env, actor_id=actor_id, reason="stopped: the account was deactivated")
    return user


def delete_user(db: Session, context: AppContext, user_id: str, *, actor_id: str | None) -> None:
    """Delete a user: their sessions, tokens, settings and activity go with them (the audit trail
    stays). Never their data: a user who still owns buckets is refused (Conflict), so that
    nothing is deleted by accident. What runs or exists for them outside the database goes first
    (:func:`_release`); if that fails, the user stays and the call can be repeated."""
    user = get_user(db, user_id)
    if actor_id is not None and actor_id == user.id:
        raise InvalidRequest("you cannot delete your own account; ask another administrator")
    if user.role == "admin" and user.status == "active" and other_active_admins(db, user.id) == 0:
        raise Conflict(f"{user.email} is the last active administrator; make another user an administrator first")
    buckets = user_counts(db, user.id)["storages"]
    if buckets:
        raise Conflict(
            f"{user.email} still owns {buckets} bucket(s): delete them (or keep the user, deactivated) first; "
            "deleting a user never deletes data"
        )
    _release(db, context, user, actor_id=actor_id)
    budgets.forget_user(db, user.id)
    audit(db, actor_id=actor_id, action="user.deleted", target_type="user", target_id=user.id, email=user.email)
    db.delete(user)
    db.commit()
    context.revocations.ended(ACCOUNT_GONE, user_id=user.id)


def _release(db: Session, context: AppContext, user: User, *, actor_id: str | None) -> None:
    """Remove a user's environments (choices, not data), cloud identity and what the compute
    backend keeps for them (their ServiceAccount on Kubernetes)."""
    for env in environments.list_owned(db, user):
        environments.remove(db, context, env, actor_id=actor_id)
    context.infra.delete_user_identity(UserRef(id=user.id, email=user.email), namespace=context.namespace)
    context.compute.forget_user(user.id)


# -- audit trail and activity ----------------------------------------------------------------------
def list_audit(
    db: Session,
    *,
    action: str | None = None,
    actor_id: str | None = None,
    target_id: str | None = None,
    target_type: str | None = None,
    page: int = 1,
    page_size: int = 50,
) -> tuple[list[tuple[AuditEvent, str | None, str | None]], int]:
    """Audit events, newest first, each with its actor's e-mail and name (None for the system); and the total."""
    stmt = select(AuditEvent, User.email, User.name).outerjoin(User, User.id == AuditEvent.actor_id)
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    if actor_id:
        stmt = stmt.where(AuditEvent.actor_id == actor_id)
    if target_id:
        stmt = stmt.where(AuditEvent.target_id == target_id)
    if target_type:
        stmt = stmt.where(AuditEvent.target_type == target_type)
    total = _count(db, stmt)
    rows = db.execute(_page(stmt.order_by(AuditEvent.at.desc(), AuditEvent.id.desc()), page, page_size)).all()
    return [(event, email, name) for event, email, name in rows], total


#: Where an audit event of each target type keeps the target's name, when the target is gone.
_NAME_IN_DETAIL = {"user": "email", "environment": "name", "storage": "display_name", "application": "name",
                   "secret_file": "name", "api_token": "name",
                   "budget.user": "label", "budget.group": "label"}  # fmt: skip


def target_names(db: Session, events: Sequence[AuditEvent]) -> dict[tuple[str, str], str]:
    """A name for people of each event's target, by (type, id): a user's e-mail, an environment's,
    bucket's or application's name as it is now, or as the event recorded it if it is gone."""
    wanted: dict[str, set[str]] = {}
    for event in events:
        wanted.setdefault(event.target_type, set()).add(event.target_id)
    lookups: dict[str, Any] = {
        "user": (User.id, User.email),
        "environment": (Environment.id, Environment.name),
        "storage": (Storage.id, Storage.display_name),
        "application": (Application.id, Application.name),
    }
    names: dict[tuple[str, str], str] = {}
    for target_type, ids in wanted.items():
        columns = lookups.get(target_type)
        if columns is None:
            continue
        id_column, name_column = columns
        for object_id, name in db.execute(select(id_column, name_column).where(id_column.in_(sorted(ids)))).all():
            names[(target_type, str(object_id))] = str(name)
    for event in events:
        key = (event.target_type, event.target_id)
        recorded = event.detail.get(_NAME_IN_DETAIL.get(event.target_type, "name")) if event.detail else None
        if key not in names and isinstance(recorded, str) and recorded:
            names[key] = recorded
    return names


def list_activity(db: Session, user_id: str, *, page: int = 1, page_size: int = 50) -> tuple[list[Activity], int]:
    """A user's activity, newest first; NotFound for an unknown user."""
    get_user(db, user_id)
    stmt = select(Activity).where(Activity.user_id == user_id)
    total = _count(db, stmt)
    rows = db.execute(_page(stmt.order_by(Activity.at.desc(), Activity.id.desc()), page, page_size)).scalars()
    return list(rows), total


# -- dashboard -------------------------------------------------------------------------------------
class UserStats(BaseModel):
    total: int
    active: int
    deactivated: int
    admins: int = Field(description="Active administrators")
    signed_in_last_24h: int


class EnvironmentStats(BaseModel):
    total: int
    by_status: dict[str, int]


class StorageStats(BaseModel):
    count: int
    usage_bytes: int = Field(description="Sum of the cached usage (current objects) of every bucket")
    noncurrent_bytes: int = Field(description="Sum of the earlier versions every bucket keeps (and is billed for)")
    usage_unknown: int = Field(description="Buckets whose usage was never measured")


class ApplicationStats(BaseModel):
    active: int
    total: int


class Stats(BaseModel):
    users: UserStats
    environments: EnvironmentStats
    storages: StorageStats
    applications: ApplicationStats
    at: dt.datetime


def stats(db: Session, context: AppContext | None = None, *, now: dt.datetime | None = None) -> Stats:
    """Counts for the admin dashboard. With ``context``, buckets' usage is measured again where stale
    (as a user's storage page does, waiting :data:`STATS_USAGE_WAIT_SECONDS` at most), so files
    written from environments count too; without, the cached figures are summed."""
    now = now or utcnow()
    storage_usage = _storage_usage(db, context)

    def scalar(stmt: Select[Any]) -> int:
        return int(db.execute(stmt).scalar_one() or 0)

    users = select(func.count()).select_from(User)
    by_status = {
        str(status): int(count)
        for status, count in db.execute(
            select(Environment.status, func.count()).group_by(Environment.status).order_by(Environment.status)
        ).all()
    }
    apps = select(func.count()).select_from(Application)
    storages = select(func.count()).select_from(Storage)
    return Stats(
        users=UserStats(
            total=scalar(users),
            active=scalar(users.where(User.status == "active")),
            deactivated=scalar(users.where(User.status != "active")),
            admins=scalar(users.where(User.role == "admin", User.status == "active")),
            signed_in_last_24h=scalar(users.where(User.last_login_at >= now - dt.timedelta(hours=24))),
        ),
        environments=EnvironmentStats(total=sum(by_status.values()), by_status=by_status),
        storages=StorageStats(
            count=scalar(storages),
            usage_bytes=storage_usage[0],
            noncurrent_bytes=storage_usage[1],
            usage_unknown=storage_usage[2],
        ),
        applications=ApplicationStats(active=scalar(apps.where(Application.active.is_(True))), total=scalar(apps)),
        at=now,
    )


#: How long the admin dashboard waits for stale buckets to be measured.
STATS_USAGE_WAIT_SECONDS = 5.0


def _storage_usage(db: Session, context: AppContext | None) -> tuple[int, int, int]:
    """(current bytes in every bucket, their noncurrent bytes, buckets never measured)."""
    rows = list(db.execute(select(Storage)).scalars())
    db.commit()  # no transaction held while measuring
    if context is None:
        figures = [(row.usage_bytes, row.usage_noncurrent_bytes) for row in rows]
    else:
        measured = storages.current_usage(rows, context, wait_seconds=STATS_USAGE_WAIT_SECONDS)
        figures = [(measured[row.id].size_bytes, measured[row.id].noncurrent_bytes) for row in rows]
    known = [(current, noncurrent or 0) for current, noncurrent in figures if current is not None]
    return sum(c for c, _ in known), sum(n for _, n in known), len(figures) - len(known)


# -- every user's environments -------------------------------------------------------------------------
def stop_environment(db: Session, context: AppContext, environment_id: str, *, admin: User) -> Environment:
    """Stop any user's environment (audited as the administrator's act; its owner sees why)."""
    env = environments.get_any(db, environment_id)
    if env.status not in environments.ACTIVE_STATUSES:
        raise Conflict(f"{env.name!r} is {env.status}: it is not running")
    environments.stop(db, context, env, actor_id=admin.id, reason=f"stopped by an administrator ({admin.email})")
    return env


def delete_environment(db: Session, context: AppContext, environment_id: str, *, admin: User) -> None:
    """Delete any user's environment (its buckets stay); audited as the administrator's act."""
    environments.remove(db, context, environments.get_any(db, environment_id), actor_id=admin.id)
