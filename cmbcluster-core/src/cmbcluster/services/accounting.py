"""Usage records and reports: how long each environment held what, how much each bucket stored.

Recording
- An environment's **interval** opens when it becomes pending/starting/running and closes when it
  stops, fails or is deleted. One rule does it, for every path (a request, the reconcile loop, the
  progress hub): a ``before_flush`` listener on the control plane's sessions that sees each change
  of ``Environment.status`` in the same transaction as the change itself. A partial unique index
  allows one open interval per environment, so nothing is ever counted twice.
- After a crash, the reconcile loop continues an interval whose environment still runs (a pod
  outlives its control plane), and closes one whose environment vanished at the last moment it was
  seen running (``seen_s``, refreshed on every full pass), not at the moment the loss was noticed.
- A bucket's **stored bytes** are measured by the usage refresher; each measurement that differs
  from the last closes the bucket's current interval and opens one with the new figure.

Reports integrate the intervals over [from, to) in SQL (plain integer seconds, the same on SQLite
and PostgreSQL) and price them with the deployment's :class:`~cmbcluster.interfaces.PriceTable`.
A GB-month is a GiB stored for 730 hours, as on the cloud price pages.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import ColumnElement, case, event, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.db.models import (
    Application,
    Environment,
    Group,
    GroupMember,
    Storage,
    StorageInterval,
    UsageInterval,
    User,
    new_id,
    utcnow,
)
from cmbcluster.errors import InvalidRequest
from cmbcluster.pricing import HOURS_PER_MONTH, PriceTable

GroupBy = Literal["user", "group", "application", "day"]
GROUP_BYS: tuple[str, ...] = ("user", "group", "application", "day")
#: Statuses in which an environment holds its reservation (what the cluster keeps for it).
RESERVING = ("pending", "starting", "running")
GIB = 1024**3
MAX_REPORT_DAYS = 366
NO_GROUP = "(no group)"


def epoch(moment: dt.datetime) -> int:
    return int(moment.timestamp())


# -- recording -----------------------------------------------------------------------------------
def install(sessions: sessionmaker[Session]) -> None:
    """Record environment intervals on every session the control plane makes."""
    if not event.contains(sessions, "before_flush", _before_flush):
        event.listen(sessions, "before_flush", _before_flush)


def _before_flush(db: Session, _context: object, _instances: object) -> None:
    changed = [
        env for env in (*db.new, *db.dirty)
        if isinstance(env, Environment) and (env in db.new or _status_changed(env))
    ]  # fmt: skip
    deleted = [env for env in db.deleted if isinstance(env, Environment)]
    if not changed and not deleted:
        return
    now = epoch(utcnow())
    with db.no_autoflush:
        for env in changed:
            if not env.id:  # a new record: its id is needed now, not at its insert
                env.id = new_id()
            if _field(env, "status") in RESERVING:
                _open(db, env, now)
            else:
                _close(db, env.id, epoch(env.stopped_at) if env.stopped_at else now)
        for env in deleted:
            _close(db, env.id, now)


def _status_changed(env: Environment) -> bool:
    from sqlalchemy import inspect

    return bool(inspect(env).attrs.status.history.has_changes())


def _open_interval(db: Session, model: type[UsageInterval] | type[StorageInterval], key: str) -> Any:
    column = UsageInterval.environment_id if model is UsageInterval else StorageInterval.storage_id
    return db.execute(select(model).where(column == key, model.end_s.is_(None))).scalar_one_or_none()


def _open(db: Session, env: Environment, now: int) -> None:
    current = _open_interval(db, UsageInterval, env.id)
    if current is not None and current.end_s is None:
        return  # pending -> starting -> running: one interval
    application = env.application_row if "application_row" in env.__dict__ else db.get(Application, env.application_id)
    start = min(now, epoch(env.started_at)) if env.started_at else now
    # Never before the end of its previous run: a stale copy of the record (another thread's
    # session that loaded it before a stop) must not count those hours again.
    last_end = db.execute(
        select(func.max(UsageInterval.end_s)).where(UsageInterval.environment_id == env.id)
    ).scalar_one_or_none()
    if last_end is not None:
        start = min(now, max(start, last_end))
    db.add(
        UsageInterval(
            environment_id=env.id, user_id=env.user_id, application=application.slug if application else "",
            preset=_field(env, "preset"), cpu=_field(env, "cpu"), memory_gib=_field(env, "memory_mib") / 1024,
            accelerator="", start_s=start, seen_s=start,
        )
    )  # fmt: skip


def _field(env: Environment, name: str) -> Any:
    """A field of an environment, or its column default when a new one was made without it."""
    value = getattr(env, name)
    return value if value is not None else Environment.__table__.c[name].default.arg


def _close(db: Session, environment_id: str, end: int) -> None:
    interval = _open_interval(db, UsageInterval, environment_id)
    if interval is not None and interval.end_s is None:  # not closed already in this transaction
        interval.end_s = max(interval.start_s, end)


def mark_seen(db: Session, environment_ids: Iterable[str], now: dt.datetime) -> None:
    """The backend reported these environments running at ``now`` (the reconcile loop's full pass)."""
    ids = list(environment_ids)
    if ids:
        db.execute(
            update(UsageInterval)
            .where(UsageInterval.environment_id.in_(ids), UsageInterval.end_s.is_(None))
            .values(seen_s=epoch(now))
        )


def close_at_last_seen(db: Session, environment_id: str) -> None:
    """The environment vanished (a crash, a node lost): it ran until it was last seen running."""
    interval = _open_interval(db, UsageInterval, environment_id)
    if interval is not None:
        interval.end_s = interval.seen_s


def sync_open_intervals(db: Session, backend: str) -> int:
    """Open the interval of any reserving environment that has none (one running before this
    release, or recorded by a session made without :func:`install`). Returns how many."""
    missing = db.execute(
        select(Environment).where(
            Environment.backend == backend,
            Environment.status.in_(RESERVING),
            ~select(UsageInterval.id)
            .where(UsageInterval.environment_id == Environment.id, UsageInterval.end_s.is_(None))
            .exists(),
        )
    ).scalars()
    count = 0
    now = epoch(utcnow())
    with db.no_autoflush:
        for env in missing:
            _open(db, env, now)
            count += 1
    return count


def record_stored_bytes(db: Session, storage: Storage, size_bytes: int | None, at: dt.datetime) -> None:
    """A measurement of a bucket: a new interval when its size or class changed."""
    if size_bytes is None:
        return
    now = epoch(at)
    current: StorageInterval | None = _open_interval(db, StorageInterval, storage.id)
    if current is not None:
        if current.bytes == size_bytes and current.storage_class == storage.storage_class:
            return
        if now <= current.start_s:  # an older measurement finishing late: the newer one stands
            return
        current.end_s = now
        db.flush()  # the open-interval index allows one: close before opening
    db.add(
        StorageInterval(
            storage_id=storage.id, user_id=storage.user_id, storage_class=storage.storage_class,
            bytes=size_bytes, start_s=now,
        )
    )  # fmt: skip


def close_storage(db: Session, storage_id: str, at: dt.datetime) -> None:
    """The bucket is gone: it stores nothing from now on."""
    current = _open_interval(db, StorageInterval, storage_id)
    if current is not None:
        current.end_s = max(current.start_s, epoch(at))


# -- aggregation ---------------------------------------------------------------------------------
def _overlap(start: Any, end: Any, lo: int, hi: int) -> ColumnElement[Any]:
    """Seconds of [start, end) inside [lo, hi): CASE expressions, the same on every database."""
    return case((end < hi, end), else_=hi) - case((start > lo, start), else_=lo)


@dataclass
class Usage:
    """Usage of one row of a report (a user, a group, an application or a day)."""

    environment_hours: float = 0.0
    core_hours: float = 0.0
    memory_gib_hours: float = 0.0
    storage_gb_months: float = 0.0
    compute_cost: float = 0.0
    storage_cost: float = 0.0
    stored_bytes_now: int = 0

    def add(self, other: Usage) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def cost(self) -> float:
        return self.compute_cost + self.storage_cost

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment_hours": round(self.environment_hours, 6), "core_hours": round(self.core_hours, 6),
            "memory_gib_hours": round(self.memory_gib_hours, 6),
            "storage_gb_months": round(self.storage_gb_months, 6), "compute_cost": round(self.compute_cost, 2),
            "storage_cost": round(self.storage_cost, 2), "cost": round(self.cost, 2),
        }  # fmt: skip


def usage_by(
    db: Session, prices: PriceTable, lo: dt.datetime, hi: dt.datetime, *,
    by: Literal["user", "application"] = "user", user_ids: list[str] | None = None, now: dt.datetime | None = None,
) -> dict[str, Usage]:  # fmt: skip
    """Usage and estimated cost per user id (or application slug) over [lo, hi), up to ``now``."""
    now_s = epoch(now or utcnow())
    lo_s, hi_s = epoch(lo), min(epoch(hi), now_s)
    result: dict[str, Usage] = defaultdict(Usage)
    if hi_s <= lo_s:
        return result
    end = func.coalesce(UsageInterval.end_s, now_s)
    seconds = _overlap(UsageInterval.start_s, end, lo_s, hi_s)
    key = UsageInterval.user_id if by == "user" else UsageInterval.application
    query = (
        select(key, UsageInterval.preset, func.sum(seconds), func.sum(seconds * UsageInterval.cpu),
               func.sum(seconds * UsageInterval.memory_gib))
        .where(UsageInterval.start_s < hi_s, or_(UsageInterval.end_s.is_(None), UsageInterval.end_s > lo_s))
        .group_by(key, UsageInterval.preset)
    )  # fmt: skip
    if user_ids is not None:
        query = query.where(UsageInterval.user_id.in_(user_ids))
    for name, preset, env_s, cpu_s, mem_s in db.execute(query):
        row = result[name]
        core_hours, gib_hours = (cpu_s or 0) / 3600, (mem_s or 0) / 3600
        row.environment_hours += (env_s or 0) / 3600
        row.core_hours += core_hours
        row.memory_gib_hours += gib_hours
        price = prices.compute_for(preset)
        row.compute_cost += core_hours * price.vcpu_hour + gib_hours * price.gib_hour
    if by == "user":
        s_end = func.coalesce(StorageInterval.end_s, now_s)
        s_seconds = _overlap(StorageInterval.start_s, s_end, lo_s, hi_s)
        storage_query = (
            select(StorageInterval.user_id, StorageInterval.storage_class, func.sum(s_seconds * StorageInterval.bytes))
            .where(StorageInterval.start_s < hi_s, or_(StorageInterval.end_s.is_(None), StorageInterval.end_s > lo_s))
            .group_by(StorageInterval.user_id, StorageInterval.storage_class)
        )
        if user_ids is not None:
            storage_query = storage_query.where(StorageInterval.user_id.in_(user_ids))
        for user_id, storage_class, byte_seconds in db.execute(storage_query):
            gb_months = float(byte_seconds or 0) / GIB / (HOURS_PER_MONTH * 3600)
            result[user_id].storage_gb_months += gb_months
            result[user_id].storage_cost += gb_months * prices.storage_for(storage_class)
    return result


def memberships(db: Session, user_ids: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Group names of each user."""
    query = select(GroupMember.user_id, Group.name).join(Group, Group.id == GroupMember.group_id)
    if user_ids is not None:
        query = query.where(GroupMember.user_id.in_(list(user_ids)))
    found: dict[str, list[str]] = defaultdict(list)
    for user_id, name in db.execute(query.order_by(Group.name)):
        found[user_id].append(name)
    return found


# -- reports -------------------------------------------------------------------------------------
def parse_period(start: str | None, end: str | None, now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """[from, to) from ISO dates or times; default: this month so far. Clear errors otherwise."""
    moment = now or utcnow()
    lo = _parse_moment(start, "from") if start else moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    hi = _parse_moment(end, "to") if end else _next_month(lo)
    if hi <= lo:
        raise InvalidRequest(f"'to' ({hi.isoformat()}) must be after 'from' ({lo.isoformat()})")
    if hi - lo > dt.timedelta(days=MAX_REPORT_DAYS):
        raise InvalidRequest(f"a report covers at most {MAX_REPORT_DAYS} days")
    return lo, hi


def month_period(month: str) -> tuple[dt.datetime, dt.datetime]:
    """``2026-11`` -> [2026-11-01, 2026-12-01) in UTC."""
    try:
        lo = dt.datetime.strptime(month, "%Y-%m").replace(tzinfo=dt.UTC)
    except ValueError:
        raise InvalidRequest(f"month {month!r} is not of the form YYYY-MM (for example 2026-11)") from None
    return lo, _next_month(lo)


def _next_month(moment: dt.datetime) -> dt.datetime:
    first = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + dt.timedelta(days=32)).replace(day=1)


def _parse_moment(value: str, name: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{name!r} must be an ISO date or time such as 2026-11-01 or 2026-11-01T12:00:00Z, not {value!r}"
        ) from None
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


@dataclass
class Report:
    start: dt.datetime
    end: dt.datetime
    group_by: str
    prices: PriceTable
    rows: list[tuple[str, str, Usage]] = field(default_factory=list)  # key, label, usage
    cluster_fee: float = 0.0

    def totals(self) -> Usage:
        total = Usage()
        for _key, _label, usage in self.rows if self.group_by != "group" else ():
            total.add(usage)
        return total

    def as_dict(self) -> dict[str, Any]:
        totals = self.totals().as_dict() if self.group_by != "group" else None
        return {
            "from": self.start, "to": self.end, "group_by": self.group_by, "currency": self.prices.currency,
            "estimate": self.prices.disclaimer, "prices_read_on": self.prices.read_on,
            "price_sources": list(self.prices.sources),
            "rows": [{"key": key, "label": label, **usage.as_dict()} for key, label, usage in self.rows],
            "totals": totals, "cluster_fee": round(self.cluster_fee, 2),
        }  # fmt: skip

    def csv(self) -> str:
        import csv
        import io

        buffer = io.StringIO()
        buffer.write(f"# {self.prices.disclaimer}; currency {self.prices.currency}\n")
        writer = csv.writer(buffer)
        columns = list(Usage().as_dict())
        writer.writerow([self.group_by, "label", *columns])
        for key, label, usage in self.rows:
            values = usage.as_dict()
            writer.writerow([key, label, *(values[c] for c in columns)])
        if self.cluster_fee:
            writer.writerow(["cluster", "cluster fee", *([""] * (len(columns) - 1)), round(self.cluster_fee, 2)])
        return buffer.getvalue()


def report(
    db: Session, prices: PriceTable, start: dt.datetime, end: dt.datetime, group_by: str,
    *, user_ids: list[str] | None = None, now: dt.datetime | None = None,
) -> Report:  # fmt: skip
    if group_by not in GROUP_BYS:
        raise InvalidRequest(f"group_by must be one of {', '.join(GROUP_BYS)}, not {group_by!r}")
    moment = now or utcnow()
    result = Report(start=start, end=end, group_by=group_by, prices=prices)
    if group_by == "day":
        day = start
        while day < end:
            following = min(end, day + dt.timedelta(days=1))
            total = Usage()
            for usage in usage_by(db, prices, day, following, user_ids=user_ids, now=moment).values():
                total.add(usage)
            result.rows.append((day.date().isoformat(), day.strftime("%a %d %b"), total))
            day = following
    elif group_by == "application":
        by_app = usage_by(db, prices, start, end, by="application", user_ids=user_ids, now=moment)
        names = dict(db.execute(select(Application.slug, Application.name)).all())
        result.rows = [(slug, names.get(slug, slug), usage) for slug, usage in sorted(by_app.items())]
    else:
        by_user = usage_by(db, prices, start, end, user_ids=user_ids, now=moment)
        if group_by == "user":
            emails = _emails(db, list(by_user))
            result.rows = sorted(
                ((uid, emails.get(uid, f"(deleted user {uid})"), usage) for uid, usage in by_user.items()),
                key=lambda row: row[1],
            )
        else:
            groups: dict[str, Usage] = defaultdict(Usage)
            member_of = memberships(db, by_user)
            for uid, usage in by_user.items():
                for name in member_of.get(uid) or [NO_GROUP]:
                    groups[name].add(usage)  # a user in two groups counts in both
            result.rows = [(name, name, usage) for name, usage in sorted(groups.items())]
    if user_ids is None:
        hours = max(0.0, (min(end, moment) - start).total_seconds() / 3600)
        result.cluster_fee = hours * prices.cluster_hour
    return result


def _emails(db: Session, user_ids: list[str]) -> dict[str, str]:
    if not user_ids:
        return {}
    return dict(db.execute(select(User.id, User.email).where(User.id.in_(user_ids))).all())


def totals_since_start(db: Session) -> tuple[dict[str, float], dict[str, int]]:
    """All-time core-hours per user id, and the bytes each user stores now (for /metrics)."""
    now_s = epoch(utcnow())
    end = func.coalesce(UsageInterval.end_s, now_s)
    core = dict(
        db.execute(
            select(UsageInterval.user_id, func.sum((end - UsageInterval.start_s) * UsageInterval.cpu))
            .group_by(UsageInterval.user_id)
        ).all()
    )  # fmt: skip
    stored = dict(
        db.execute(
            select(StorageInterval.user_id, func.sum(StorageInterval.bytes))
            .where(StorageInterval.end_s.is_(None))
            .group_by(StorageInterval.user_id)
        ).all()
    )  # fmt: skip
    return {uid: float(v or 0) / 3600 for uid, v in core.items()}, {uid: int(v or 0) for uid, v in stored.items()}


@dataclass
class Totals:
    """All-time core-hours and bytes stored now, by user e-mail and by group name (for /metrics)."""

    core_hours_by_user: dict[str, float] = field(default_factory=dict)
    stored_bytes_by_user: dict[str, int] = field(default_factory=dict)
    core_hours_by_group: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    stored_bytes_by_group: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def totals_by_user_and_group(db: Session) -> Totals:
    core, stored = totals_since_start(db)
    ids = sorted(set(core) | set(stored))
    emails, member_of = _emails(db, ids), memberships(db, ids)
    totals = Totals()
    for uid in ids:
        label = emails.get(uid, f"(deleted user {uid})")
        totals.core_hours_by_user[label] = core.get(uid, 0.0)
        totals.stored_bytes_by_user[label] = stored.get(uid, 0)
        for name in member_of.get(uid) or [NO_GROUP]:  # a user in two groups counts in both
            totals.core_hours_by_group[name] += core.get(uid, 0.0)
            totals.stored_bytes_by_group[name] += stored.get(uid, 0)
    return totals
