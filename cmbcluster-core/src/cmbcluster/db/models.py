"""The schema of the control plane. Change it only together with a migration in ``migrations/``."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy import false as sa_false
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def new_id() -> str:
    return uuid.uuid4().hex


def _system_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


#: What :func:`utcnow` reads; tests replace it (``cmbcluster.testing.clock``) to run a month in a second.
clock = _system_clock


def utcnow() -> dt.datetime:
    return clock()


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: use timezone-aware UTC")
        return value.astimezone(dt.UTC) if value is not None else None

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON, list[str]: JSON}


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("auth_provider", "subject"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(20), default="user")  # admin | user
    #: why the user is an admin when a sign-in rule made them one, ``provider_group`` or
    #: ``admin_emails``: a later sign-in the rule no longer grants takes the role back. None: the
    #: first user, an administrator's choice, or from before 0010 (never taken back by a sign-in).
    admin_because: Mapped[str | None] = mapped_column(String(20), default=None)
    status: Mapped[str] = mapped_column(String(20), default="active")  # active | deactivated
    #: whether the identity provider vouched for ``email`` (only a verified address is linked to)
    email_verified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    auth_provider: Mapped[str] = mapped_column(String(40))
    subject: Mapped[str] = mapped_column(String(255))
    max_uptime_minutes: Mapped[int | None] = mapped_column(Integer, default=None)
    #: bytes the user's buckets may hold, current and noncurrent versions together (None: no quota)
    storage_quota_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Session(Base):
    """A server-side sign-in session; only the token's hash is stored."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    refresh_hash: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: when the user signed in with their identity provider: refreshes carry it from session to
    #: session, and none is granted past CMBCLUSTER_REFRESH_TTL_DAYS after it (None: before 0010,
    #: counted from ``created_at``)
    signed_in_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    expires_at: Mapped[dt.datetime]
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    user_agent: Mapped[str] = mapped_column(String(400), default="")


class ApiToken(Base):
    """A token for scripts; shown once at creation, stored hashed."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Application(Base):
    """An entry of the admin-managed application catalog."""

    __tablename__ = "applications"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    slug: Mapped[str] = mapped_column(String(63), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    summary: Mapped[str] = mapped_column(Text, default="")
    image: Mapped[str] = mapped_column(String(400))
    command: Mapped[list[str]] = mapped_column(default=list)
    port: Mapped[int] = mapped_column(Integer, default=8080)
    working_dir: Mapped[str] = mapped_column(String(400), default="")
    icon: Mapped[str] = mapped_column(Text, default="")
    category: Mapped[str] = mapped_column(String(60), default="")
    tags: Mapped[list[str]] = mapped_column(default=list)
    default_preset: Mapped[str] = mapped_column(String(40), default="standard")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Storage(Base):
    """A user's bucket, as known to the control plane."""

    __tablename__ = "storages"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    backend: Mapped[str] = mapped_column(String(40))
    bucket_name: Mapped[str] = mapped_column(String(63), unique=True)
    display_name: Mapped[str] = mapped_column(String(100))
    storage_class: Mapped[str] = mapped_column(String(20), default="standard")
    status: Mapped[str] = mapped_column(String(20), default="active")  # creating | active | deleting
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Usage is costly to compute on a cloud bucket (a full listing): cached, refreshed when stale.
    usage_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)  # PostgreSQL's integer ends at 2 GiB
    usage_objects: Mapped[int | None] = mapped_column(default=None)
    #: earlier versions the backend keeps (and bills) until the bucket's lifecycle removes them
    usage_noncurrent_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    usage_noncurrent_objects: Mapped[int | None] = mapped_column(default=None)
    usage_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    #: counts the changes made through the API (uploads, deletes, moves): a measurement stores its
    #: figures only if none happened since it began (on any replica), or it would drop them
    usage_version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: while ``deleting``: whether the delete was forced (a restart resumes it as it was asked)
    delete_force: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    #: the server instance running the delete while ``deleting``: another replica finishes it only
    #: once that instance is gone (None: recorded before owners were, treated as gone)
    delete_owner: Mapped[str | None] = mapped_column(String(32), default=None)
    #: the server instance running a move of objects in this bucket (None: none runs): one at a
    #: time, as two moves of one folder would each copy it (:func:`cmbcluster.services.storages.move_objects`)
    move_owner: Mapped[str | None] = mapped_column(String(32), default=None)


class UploadJournal(Base):
    """An upload under way, recorded before it starts and removed once it ends either way: what is
    left after a crash names the uploads whose unfinished parts the next start aborts."""

    __tablename__ = "upload_journal"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    storage_id: Mapped[str] = mapped_column(String(32), index=True)  # no foreign key: outlives a delete
    backend: Mapped[str] = mapped_column(String(40))
    bucket_name: Mapped[str] = mapped_column(String(63))
    key: Mapped[str] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: the server instance running the upload (:class:`ServerInstance`); only an entry whose owner
    #: is gone is aborted, never a live replica's upload. Null: written before owners were recorded.
    owner: Mapped[str | None] = mapped_column(String(32), default=None)
    #: bytes this upload holds against its owner's (and groups') storage quotas while it runs
    reserved_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: renewed while the upload's bytes arrive: a hold not renewed for longer than the upload idle
    #: timeout (and a heartbeat's interval) counts no more, whatever became of its upload. The
    #: database's default serves servers of the previous version during a rolling update: their
    #: inserts do not name the column.
    heartbeat_at: Mapped[dt.datetime] = mapped_column(default=utcnow, server_default=func.now())


class ServerInstance(Base):
    """A running control-plane process (one per replica), with a heartbeat: the work it journals
    (uploads, bucket deletes) is another replica's to recover only once its heartbeat stopped."""

    __tablename__ = "server_instances"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Environment(Base):
    """A user's environment. ``desired_state`` is what the user asked for; ``status`` what runs."""

    __tablename__ = "environments"
    __table_args__ = (Index("ix_environments_user_status", "user_id", "status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    application_id: Mapped[str] = mapped_column(ForeignKey("applications.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    backend: Mapped[str] = mapped_column(String(40))
    desired_state: Mapped[str] = mapped_column(String(20), default="running")  # running | stopped
    status: Mapped[str] = mapped_column(String(20), default="pending")
    status_message: Mapped[str] = mapped_column(Text, default="")
    url: Mapped[str | None] = mapped_column(String(400), default=None)
    cpu: Mapped[float] = mapped_column(default=1.0)
    memory_mib: Mapped[int] = mapped_column(Integer, default=2048)
    preset: Mapped[str] = mapped_column(String(40), default="standard")
    env: Mapped[dict[str, Any]] = mapped_column(default=dict)  # this environment's own variables
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_activity_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    shutdown_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    warned_at: Mapped[dt.datetime | None] = mapped_column(default=None)

    application_row: Mapped[Application] = relationship()
    mounts: Mapped[list[EnvironmentStorage]] = relationship(
        cascade="all, delete-orphan", order_by="EnvironmentStorage.mount_path"
    )


class EnvironmentStorage(Base):
    """Which of the user's buckets an environment mounts, and where."""

    __tablename__ = "environment_storages"

    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id", ondelete="CASCADE"), primary_key=True)
    storage_id: Mapped[str] = mapped_column(ForeignKey("storages.id", ondelete="RESTRICT"), primary_key=True)
    mount_path: Mapped[str] = mapped_column(String(400))
    read_only: Mapped[bool] = mapped_column(Boolean, default=False)


class StartSlot(Base):
    """A server-wide concurrent-start slot, held in the database so limits hold across replicas."""

    __tablename__ = "start_slots"

    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id", ondelete="CASCADE"), primary_key=True)
    acquired_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]

    #: for the order of inserts only: a new environment and its slot are flushed together, the
    #: environment first (the unit of work orders rows by relationships, not foreign keys)
    environment: Mapped[Environment] = relationship()


class RateLimit(Base):
    """A fixed-window counter (sign-in attempts per client), shared by every replica."""

    __tablename__ = "rate_limits"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    window_start: Mapped[dt.datetime]
    count: Mapped[int] = mapped_column(Integer, default=0)


class UsedToken(Base):
    """Sign-in states and exchanged ID tokens, by hash, kept until they expire: each works once."""

    __tablename__ = "used_tokens"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)


class EnvVar(Base):
    """A user's environment variable; its value is encrypted at rest like secret files."""

    __tablename__ = "env_vars"
    __table_args__ = (UniqueConstraint("user_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SecretFile(Base):
    """A user's secret file, encrypted at rest (``ciphertext``)."""

    __tablename__ = "secret_files"
    __table_args__ = (UniqueConstraint("user_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Activity(Base):
    """What a user did or what happened to their environments (heartbeats, traffic, culling)."""

    __tablename__ = "activity"
    __table_args__ = (Index("ix_activity_user_at", "user_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    environment_id: Mapped[str | None] = mapped_column(String(32), default=None)
    kind: Mapped[str] = mapped_column(String(40))
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class AuditEvent(Base):
    """Who changed what: role and status changes, environment and storage actions."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor_id: Mapped[str | None] = mapped_column(String(32), default=None)
    action: Mapped[str] = mapped_column(String(60))
    target_type: Mapped[str] = mapped_column(String(40))
    target_id: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


# -- usage and budgets (see services/accounting.py) ----------------------------------------------
# Times are whole seconds since the epoch: interval arithmetic in SQL is then the same plain
# integer arithmetic on SQLite and PostgreSQL, and sums are exact. No foreign keys to users or
# environments: the records of what was used outlive what used it.


class UsageInterval(Base):
    """An environment holding resources, from its start to its stop (``end_s`` NULL while it runs)."""

    __tablename__ = "usage_intervals"
    __table_args__ = (
        Index("ix_usage_intervals_start", "start_s"),
        Index("ix_usage_intervals_user_start", "user_id", "start_s"),
        Index("ix_usage_intervals_end", "end_s"),  # today's part of a report: what ended since midnight
        # at most one open interval per environment: a start can never be counted twice
        Index(
            "ux_usage_intervals_open",
            "environment_id",
            unique=True,
            sqlite_where=text("end_s IS NULL"),
            postgresql_where=text("end_s IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    environment_id: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(32))
    application: Mapped[str] = mapped_column(String(63))
    preset: Mapped[str] = mapped_column(String(40))
    cpu: Mapped[float] = mapped_column(Float)
    memory_gib: Mapped[float] = mapped_column(Float)
    accelerator: Mapped[str] = mapped_column(String(60), default="")
    start_s: Mapped[int] = mapped_column(BigInteger)
    end_s: Mapped[int | None] = mapped_column(BigInteger, default=None)
    #: the last time the backend reported it running: where a crash's interval is closed
    seen_s: Mapped[int] = mapped_column(BigInteger)


class StorageInterval(Base):
    """A bucket holding ``bytes`` of a storage class from ``start_s`` until the next measurement that
    differs (``end_s`` NULL for the current one)."""

    __tablename__ = "storage_intervals"
    __table_args__ = (
        Index("ix_storage_intervals_start", "start_s"),
        Index("ix_storage_intervals_end", "end_s"),
        Index(
            "ux_storage_intervals_open",
            "storage_id",
            unique=True,
            sqlite_where=text("end_s IS NULL"),
            postgresql_where=text("end_s IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    storage_id: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(32))
    storage_class: Mapped[str] = mapped_column(String(20))
    bytes: Mapped[int] = mapped_column(BigInteger)
    start_s: Mapped[int] = mapped_column(BigInteger)
    end_s: Mapped[int | None] = mapped_column(BigInteger, default=None)


class UsageRollup(Base):
    """Closed environment intervals summed per day and per month (``span``), user, application and
    preset: what reports read instead of every interval. Kept by ``services/accounting.py`` in the
    transaction that closes an interval; open intervals are added at query time."""

    # Keyed by what reports select on, without a row id on SQLite: a year's months are then read
    # from consecutive pages (a row id table scattered them: 12,000 rows took 55 ms, now 10).
    __tablename__ = "usage_rollups"
    __table_args__ = (Index("ix_usage_rollups_user", "user_id", "span", "start_s"), {"sqlite_with_rowid": False})

    span: Mapped[str] = mapped_column(String(5), primary_key=True)  # day | month
    start_s: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # its first second (UTC)
    user_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    application: Mapped[str] = mapped_column(String(63), primary_key=True)
    preset: Mapped[str] = mapped_column(String(40), primary_key=True)
    seconds: Mapped[int] = mapped_column(BigInteger)
    cpu_seconds: Mapped[float] = mapped_column(Float)
    memory_gib_seconds: Mapped[float] = mapped_column(Float)


class StorageRollup(Base):
    """Closed storage intervals summed per day and per month, user and storage class (byte-seconds:
    a double, as bucket sizes times a month's seconds outgrow a 64-bit integer)."""

    __tablename__ = "storage_rollups"
    __table_args__ = (Index("ix_storage_rollups_user", "user_id", "span", "start_s"), {"sqlite_with_rowid": False})

    span: Mapped[str] = mapped_column(String(5), primary_key=True)
    start_s: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    storage_class: Mapped[str] = mapped_column(String(20), primary_key=True)
    byte_seconds: Mapped[float] = mapped_column(Float)


class Group(Base):
    """An admin-managed set of users (a research group), for reports and budgets."""

    __tablename__ = "groups"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: what the members' buckets may hold together, earlier versions included; None: no quota
    storage_quota_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)


class GroupMember(Base):
    __tablename__ = "group_members"

    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True)


class Budget(Base):
    """A monthly budget of a user or a group, in the price table's currency or in core-hours."""

    __tablename__ = "budgets"
    __table_args__ = (UniqueConstraint("scope", "target_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    scope: Mapped[str] = mapped_column(String(10))  # user | group
    target_id: Mapped[str] = mapped_column(String(32))
    amount: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(20))  # currency | core_hours
    #: at 100 %, stop running environments too (otherwise only new starts are refused)
    hard: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class BudgetEvent(Base):
    """A budget crossing 80 or 100 % in a month: recorded once, sent to the webhook until delivered."""

    __tablename__ = "budget_events"
    __table_args__ = (UniqueConstraint("budget_id", "month", "level"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    budget_id: Mapped[str] = mapped_column(ForeignKey("budgets.id", ondelete="CASCADE"))
    month: Mapped[str] = mapped_column(String(7))  # YYYY-MM
    level: Mapped[int] = mapped_column(Integer)  # 80 | 100
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class MigrationBucket(Base):
    """One bucket being moved to another storage backend by ``cmbcluster migrate``.

    ``state``: ``copying`` (the source is still the user's bucket), ``switched`` (the storage row
    points at the target; the source is kept), ``finished`` (the source was deleted).
    """

    __tablename__ = "migration_buckets"
    __table_args__ = (UniqueConstraint("storage_id", "target_backend"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    storage_id: Mapped[str] = mapped_column(ForeignKey("storages.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(String(32))
    source_backend: Mapped[str] = mapped_column(String(40))
    source_bucket: Mapped[str] = mapped_column(String(63))
    target_backend: Mapped[str] = mapped_column(String(40))
    target_bucket: Mapped[str | None] = mapped_column(String(63), default=None)
    state: Mapped[str] = mapped_column(String(20), default="copying")
    message: Mapped[str] = mapped_column(Text, default="")
    objects_total: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    switched_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class MigrationObject(Base):
    """An object copied to the target and verified there: the manifest a migration resumes from.

    ``source_etag`` and ``source_modified`` are the source's version as listed before the copy: a
    later listing that differs means the object changed since, and it is copied again.
    ``target_etag`` is what the target reported: a later difference means something changed the
    copy behind the migration's back.
    """

    __tablename__ = "migration_objects"
    __table_args__ = (UniqueConstraint("bucket_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bucket_id: Mapped[str] = mapped_column(ForeignKey("migration_buckets.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    md5: Mapped[str] = mapped_column(String(32))
    source_etag: Mapped[str] = mapped_column(String(200), default="")
    source_modified: Mapped[dt.datetime]
    target_etag: Mapped[str] = mapped_column(String(200), default="")
    verified_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
