"""Usage records and reports: how long each environment held what, how much each bucket stored.

Recording
- An environment's **interval** opens when it becomes pending/starting/running and closes when it
  stops, fails or is deleted. One rule does it, for every path (a request, the reconcile loop, the
  progress hub): a ``before_flush`` listener on the control plane's sessions that sees each change
  of ``Environment.status`` in the same transaction as the change itself. A partial unique index
  allows one open interval per environment, and closing one locks it first (two transactions
  closing it at once: the second finds it closed), so nothing is ever counted twice.
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
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from sqlalchemy import Connection, Table, and_, bindparam, delete, event, func, literal, or_, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.db.engine import in_batches
from cmbcluster.db.models import (
    Application,
    Environment,
    Group,
    GroupMember,
    Storage,
    StorageInterval,
    StorageRollup,
    UsageInterval,
    UsageRollup,
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
        opening: list[Environment] = []
        new: set[str] = set()
        for env in changed:
            if not env.id:  # a new record: its id is needed now, not at its insert
                env.id = new_id()
            if _field(env, "status") in RESERVING:
                opening.append(env)
                if env in db.new:
                    new.add(env.id)
            elif env not in db.new:  # a new record has no interval to close
                _close(db, env.id, epoch(env.stopped_at) if env.stopped_at else now)
        for env in deleted:
            _close(db, env.id, now)
        _open(db, opening, now, new=new)


def _status_changed(env: Environment) -> bool:
    return bool(sa_inspect(env).attrs.status.history.has_changes())


def _open_interval(
    db: Session, model: type[UsageInterval] | type[StorageInterval], key: str, *, closing: bool = False
) -> Any:
    """The open interval of an environment or a bucket, or None. ``closing``: locked until this
    transaction ends, so that of two transactions closing it at once (the progress hub and the
    reconcile loop, on PostgreSQL's READ COMMITTED), the second waits and then finds it closed."""
    column = UsageInterval.environment_id if model is UsageInterval else StorageInterval.storage_id
    query = select(model).where(column == key, model.end_s.is_(None))
    if closing:
        query = query.with_for_update()
    return db.execute(query).scalar_one_or_none()


def _open(db: Session, envs: Sequence[Environment], now: int, *, new: Collection[str] = ()) -> None:
    """Open each environment's interval unless it has one open; ``new``: the ids of those being
    inserted now, which have no interval at all (nothing to read: a burst of creates skips two
    queries each). Read for all of them at once: the progress hub records a burst's statuses in
    one flush, and a query per environment was a fifth of the control plane's CPU in a burst."""
    known = [env.id for env in envs if env.id not in new]
    open_ids: set[str] = set()
    for batch in in_batches(known):
        # ORM objects, as the session sees them: one it closed (not flushed yet) counts as closed
        found = db.execute(_OPEN_INTERVALS, {"environment_ids": batch}).scalars()
        open_ids.update(interval.environment_id for interval in found if interval.end_s is None)
    # Never before the end of its previous run: a stale copy of the record (another thread's
    # session that loaded it before a stop) must not count those hours again.
    last_ends: dict[str, int | None] = {}
    for batch in in_batches([i for i in known if i not in open_ids]):
        last_ends.update((row[0], row[1]) for row in db.execute(_LAST_ENDS, {"environment_ids": batch}))
    for env in envs:
        if env.id in open_ids:
            continue  # pending -> starting -> running: one interval
        application = (
            env.application_row if "application_row" in env.__dict__ else db.get(Application, env.application_id)
        )
        start = min(now, epoch(env.started_at)) if env.started_at else now
        last_end = last_ends.get(env.id)
        if last_end is not None:
            start = min(now, max(start, last_end))
        db.add(
            UsageInterval(
                environment_id=env.id, user_id=env.user_id, application=application.slug if application else "",
                preset=_field(env, "preset"), cpu=_field(env, "cpu"), memory_gib=_field(env, "memory_mib") / 1024,
                accelerator="", start_s=start, seen_s=start,
            )
        )  # fmt: skip


# Built once (building a statement costs about as much as running it on SQLite).
_OPEN_INTERVALS = select(UsageInterval).where(
    UsageInterval.environment_id.in_(bindparam("environment_ids", expanding=True)), UsageInterval.end_s.is_(None)
)
_LAST_ENDS = (
    select(UsageInterval.environment_id, func.max(UsageInterval.end_s))
    .where(UsageInterval.environment_id.in_(bindparam("environment_ids", expanding=True)))
    .group_by(UsageInterval.environment_id)
)


def _field(env: Environment, name: str) -> Any:
    """A field of an environment, or its column default when a new one was made without it."""
    value = getattr(env, name)
    return value if value is not None else Environment.__table__.c[name].default.arg


def _close(db: Session, environment_id: str, end: int) -> None:
    interval = _open_interval(db, UsageInterval, environment_id, closing=True)
    if interval is not None and interval.end_s is None:  # not closed already in this transaction
        # never before it was last seen running (a stop timed just before a reconcile pass's sighting):
        # /metrics has counted up to there, and a counter that goes back reads as a reset
        interval.end_s = max(interval.start_s, interval.seen_s, end)


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
    interval = _open_interval(db, UsageInterval, environment_id, closing=True)
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
    envs = list(missing)
    with db.no_autoflush:
        _open(db, envs, epoch(utcnow()))
    return len(envs)


def record_stored_bytes(db: Session, storage: Storage, size_bytes: int | None, at: dt.datetime) -> None:
    """A measurement of a bucket: a new interval when its size or class changed."""
    if size_bytes is None:
        return
    now = epoch(at)
    current: StorageInterval | None = _open_interval(db, StorageInterval, storage.id, closing=True)
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
    current = _open_interval(db, StorageInterval, storage_id, closing=True)
    if current is not None:
        current.end_s = max(current.start_s, epoch(at))


# -- rollups --------------------------------------------------------------------------------------
# Reports over a year of a thousand users' records must answer in a fraction of a second, so closed
# intervals are also summed per day and per month (``usage_rollups``, ``storage_rollups``) in the
# transaction that closes them: mapper events on the interval models see every insert, update and
# delete the ORM flushes, whichever session and code path made it. An interval adds its seconds
# inside each day (and month) it spans; a change to a closed interval takes its old contribution
# back first. Bulk statements bypass these events: :func:`rebuild_rollups` recomputes everything
# (the migration that added the rollups runs it).
DAY_S = 86400
_USAGE_COLUMNS = ("user_id", "application", "preset", "cpu", "memory_gib", "start_s", "end_s")
_STORAGE_COLUMNS = ("user_id", "storage_class", "bytes", "start_s", "end_s")
_USAGE_KEY = ("span", "start_s", "user_id", "application", "preset")
_STORAGE_KEY = ("span", "start_s", "user_id", "storage_class")
Sums = dict[tuple[Any, ...], list[float]]


def _month_start(t: int) -> int:
    return epoch(dt.datetime.fromtimestamp(t, dt.UTC).replace(day=1, hour=0, minute=0, second=0))


def _following_month(t: int) -> int:
    return epoch(_next_month(dt.datetime.fromtimestamp(t, dt.UTC)))


def _days(start: int, end: int) -> Iterator[tuple[int, int]]:
    """(the day's first second, seconds of [start, end) inside that day), UTC days."""
    t = start
    while t < end:
        day = t - t % DAY_S
        following = min(end, day + DAY_S)
        yield day, following - t
        t = following


def _add_usage(sums: Sums, row: Any, sign: int) -> None:
    """Add (sign 1) or take back (-1) a closed interval's seconds per day and per month."""
    if row.end_s is None or row.end_s <= row.start_s:
        return
    for day, seconds in _days(row.start_s, row.end_s):
        s = sign * seconds
        for key in (("day", day), ("month", _month_start(day))):
            acc = sums.setdefault((*key, row.user_id, row.application, row.preset), [0, 0.0, 0.0])
            acc[0] += s
            acc[1] += s * row.cpu
            acc[2] += s * row.memory_gib


def _add_storage(sums: Sums, row: Any, sign: int) -> None:
    if row.end_s is None or row.end_s <= row.start_s:
        return
    for day, seconds in _days(row.start_s, row.end_s):
        for key in (("day", day), ("month", _month_start(day))):
            acc = sums.setdefault((*key, row.user_id, row.storage_class), [0.0])
            acc[0] += sign * seconds * row.bytes


def _upsert(connection: Connection, model: type[UsageRollup] | type[StorageRollup], sums: Sums) -> None:
    """Add ``sums`` to the rollup rows, creating the missing ones; concurrent writers are safe."""
    if not sums:
        return
    table = cast(Table, model.__table__)
    keys = _USAGE_KEY if model is UsageRollup else _STORAGE_KEY
    values = ("seconds", "cpu_seconds", "memory_gib_seconds") if model is UsageRollup else ("byte_seconds",)
    # in key order: two transactions adding to the same rows lock them in the same order (no deadlock)
    rows = [dict(zip((*keys, *values), (*key, *acc), strict=True)) for key, acc in sorted(sums.items())]
    name = connection.dialect.name
    if name in ("sqlite", "postgresql"):
        module = sqlite if name == "sqlite" else postgresql
        statement = module.insert(table)
        statement = statement.on_conflict_do_update(
            index_elements=list(keys), set_={v: table.c[v] + statement.excluded[v] for v in values}
        )
        connection.execute(statement, rows)
        return
    for row in rows:  # other databases: update, else insert (their own unique key stops a double insert)
        match = and_(*(table.c[k] == row[k] for k in keys))
        if not connection.execute(update(table).where(match).values({v: table.c[v] + row[v] for v in values})).rowcount:
            connection.execute(table.insert().values(row))


def _rollup_change(connection: Connection, target: Any, sign_new: bool, take_back: bool) -> None:
    """Apply a flushed change of one interval: its stored (old) row out, its new state in."""
    model = type(target)
    columns = _USAGE_COLUMNS if model is UsageInterval else _STORAGE_COLUMNS
    add = _add_usage if model is UsageInterval else _add_storage
    sums: Sums = {}
    if take_back:  # read from the database: the ORM may not hold the old values (an expired row)
        # Locked: another transaction changing the row meanwhile is waited for, and what it
        # committed is what is taken back (a plain read would take back the row as it was before).
        old = connection.execute(
            select(*(model.__table__.c[c] for c in columns)).where(model.__table__.c.id == target.id).with_for_update()
        ).first()
        if old is not None:
            add(sums, old, -1)
    if sign_new:
        add(sums, target, 1)
    _upsert(connection, UsageRollup if model is UsageInterval else StorageRollup, sums)


def _changed(target: Any, columns: tuple[str, ...]) -> bool:
    state = sa_inspect(target)
    return any(state.attrs[c].history.has_changes() for c in columns)


def _after_insert(_mapper: Any, connection: Connection, target: Any) -> None:
    _rollup_change(connection, target, sign_new=True, take_back=False)


def _before_update(_mapper: Any, connection: Connection, target: Any) -> None:
    if _changed(target, _USAGE_COLUMNS if isinstance(target, UsageInterval) else _STORAGE_COLUMNS):
        _rollup_change(connection, target, sign_new=True, take_back=True)


def _before_delete(_mapper: Any, connection: Connection, target: Any) -> None:
    _rollup_change(connection, target, sign_new=False, take_back=True)


for _model in (UsageInterval, StorageInterval):
    event.listen(_model, "after_insert", _after_insert)
    event.listen(_model, "before_update", _before_update)
    event.listen(_model, "before_delete", _before_delete)


def rebuild_rollups(connection: Connection) -> None:
    """Recompute both rollups from every closed interval (a migration, or after bulk inserts)."""
    for interval, rollup, add, columns in (
        (UsageInterval, UsageRollup, _add_usage, _USAGE_COLUMNS),
        (StorageInterval, StorageRollup, _add_storage, _STORAGE_COLUMNS),
    ):
        connection.execute(delete(rollup))
        sums: Sums = {}
        table = interval.__table__
        query = select(*(table.c[c] for c in columns)).where(table.c.end_s.is_not(None))
        for row in connection.execute(query.execution_options(yield_per=10000)):
            add(sums, row, 1)
            if len(sums) >= 50000:  # bounded memory: the upsert adds to rows already written
                _upsert(connection, rollup, sums)
                sums = {}
        _upsert(connection, rollup, sums)


# -- aggregation ---------------------------------------------------------------------------------
def _plan(lo: int, hi: int, by_day: bool) -> tuple[list[tuple[str, int, int]], list[tuple[int, int]]]:
    """Cover [lo, hi) with whole months and days read from the rollups ((span, first start, end)),
    and the ranges left at either end, shorter than a day, summed from the intervals themselves."""
    first_day = -(-lo // DAY_S) * DAY_S
    last_day = hi - hi % DAY_S
    if first_day >= last_day:
        return [], [(lo, hi)]
    partial = [r for r in ((lo, first_day), (last_day, hi)) if r[0] < r[1]]
    month_lo = _month_start(first_day)
    month_lo = month_lo if month_lo == first_day else _following_month(month_lo)
    month_hi = _month_start(last_day)
    if by_day or month_lo >= month_hi:
        return [("day", first_day, last_day)], partial
    rolled = [("day", first_day, month_lo), ("month", month_lo, month_hi), ("day", month_hi, last_day)]
    return [r for r in rolled if r[1] < r[2]], partial


def _sums(
    db: Session, lo: int, hi: int, now_s: int, by: str, user_ids: list[str] | None, storage: bool
) -> tuple[Sums, Sums]:
    """Seconds, core-seconds and GiB-seconds per (key, user, preset), and byte-seconds per (key,
    user, storage class), of [lo, hi): rollups for whole days and months, intervals for the rest
    (the open ones, and the partial days at either end). ``key``: the user, the application or the
    day's first second; ``user`` is kept for prices per user when the key is not the user."""
    rolled, partial = _plan(lo, hi, by == "day")
    compute: Sums = {}
    stored: Sums = {}

    def key_of(row: Any, day: int) -> tuple[Any, str]:
        if by == "day":
            return day, row.user_id
        return (row.user_id if by == "user" else row.application), ""

    if rolled:
        u_key = {"user": UsageRollup.user_id, "application": UsageRollup.application, "day": UsageRollup.start_s}[by]
        spans = or_(
            *(and_(UsageRollup.span == s, UsageRollup.start_s >= a, UsageRollup.start_s < b) for s, a, b in rolled)
        )
        query = (
            select(u_key, UsageRollup.user_id if by == "day" else literal(""), UsageRollup.preset,
                   func.sum(UsageRollup.seconds), func.sum(UsageRollup.cpu_seconds),
                   func.sum(UsageRollup.memory_gib_seconds))
            .where(spans).group_by(u_key, *([UsageRollup.user_id] if by == "day" else []), UsageRollup.preset)
        )  # fmt: skip
        if user_ids is not None:
            query = query.where(UsageRollup.user_id.in_(user_ids))
        for key, user, preset, seconds, cpu_s, mem_s in db.execute(query):
            acc = compute.setdefault((key, user, preset), [0, 0.0, 0.0])
            acc[0] += int(seconds or 0)  # PostgreSQL sums big integers as numeric (Decimal)
            acc[1] += float(cpu_s or 0)
            acc[2] += float(mem_s or 0)
        if storage:
            s_key = StorageRollup.start_s if by == "day" else StorageRollup.user_id
            s_spans = or_(*(and_(StorageRollup.span == s, StorageRollup.start_s >= a, StorageRollup.start_s < b)
                            for s, a, b in rolled))  # fmt: skip
            s_query = (
                select(s_key, StorageRollup.user_id, StorageRollup.storage_class, func.sum(StorageRollup.byte_seconds))
                .where(s_spans).group_by(s_key, StorageRollup.user_id, StorageRollup.storage_class)
            )  # fmt: skip
            if user_ids is not None:
                s_query = s_query.where(StorageRollup.user_id.in_(user_ids))
            for key, user, storage_class, byte_seconds in db.execute(s_query):
                stored.setdefault((key, user if by == "day" else "", storage_class), [0.0])[0] += float(
                    byte_seconds or 0
                )

    def pieces(model: type[UsageInterval] | type[StorageInterval]) -> Iterator[tuple[Any, int, int]]:
        """(interval, start, end) of the parts of [lo, hi) no rollup covers."""
        # only ``end_s IS NULL``: a condition on start_s too leads SQLite to its start_s index
        # (every row) instead of the small index of open intervals; later ones are skipped below
        columns = select(
            *(model.__table__.c[c] for c in (_USAGE_COLUMNS if model is UsageInterval else _STORAGE_COLUMNS))
        )
        open_ = columns.where(model.end_s.is_(None))
        # One bound each, on the side the database can narrow with an index: the hours after the
        # period's last midnight (often today's) are met by the intervals ending after it, those
        # before its first midnight by the intervals starting before it; the rest skipped below.
        ranges = [(open_, lo, hi)] + [
            (
                columns.where(model.end_s > a)
                if b == hi
                else columns.where(model.end_s.is_not(None), model.start_s < b),
                a,
                b,
            )
            for a, b in partial
        ]
        for query, a, b in ranges:
            if user_ids is not None:
                query = query.where(model.user_id.in_(user_ids))
            for row in db.execute(query):  # plain rows: a thousand ORM objects cost more than the query
                start, end = max(row.start_s, a), min(row.end_s if row.end_s is not None else now_s, b)
                if end > start:
                    yield row, start, end

    for row, start, end in pieces(UsageInterval):
        for day, seconds in _days(start, end) if by == "day" else ((0, end - start),):
            acc = compute.setdefault((*key_of(row, day), row.preset), [0, 0.0, 0.0])
            acc[0] += seconds
            acc[1] += seconds * row.cpu
            acc[2] += seconds * row.memory_gib
    if storage:
        for row, start, end in pieces(StorageInterval):
            for day, seconds in _days(start, end) if by == "day" else ((0, end - start),):
                key = day if by == "day" else row.user_id
                stored.setdefault((key, row.user_id if by == "day" else "", row.storage_class), [0.0])[0] += (
                    seconds * row.bytes
                )
    return compute, stored


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
    by: Literal["user", "application", "day"] = "user", user_ids: list[str] | None = None,
    now: dt.datetime | None = None,
) -> dict[Any, Usage]:  # fmt: skip
    """Usage and estimated cost per user id (or application slug, or UTC day's first second) over
    [lo, hi), up to ``now``. Storage counts for users and days, not applications."""
    now_s = epoch(now or utcnow())
    lo_s, hi_s = epoch(lo), min(epoch(hi), now_s)
    result: dict[Any, Usage] = defaultdict(Usage)
    if hi_s <= lo_s:
        return result
    compute, stored = _sums(db, lo_s, hi_s, now_s, by, user_ids, storage=by != "application")
    for (name, _user, preset), (env_s, cpu_s, mem_s) in compute.items():
        row = result[name]
        core_hours, gib_hours = cpu_s / 3600, mem_s / 3600
        row.environment_hours += env_s / 3600
        row.core_hours += core_hours
        row.memory_gib_hours += gib_hours
        price = prices.compute_for(preset)
        row.compute_cost += core_hours * price.vcpu_hour + gib_hours * price.gib_hour
    for (name, _user, storage_class), (byte_seconds,) in stored.items():
        gb_months = float(byte_seconds) / GIB / (HOURS_PER_MONTH * 3600)
        result[name].storage_gb_months += gb_months
        result[name].storage_cost += gb_months * prices.storage_for(storage_class)
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
    """[from, to) from ISO dates or times; default: this month so far. Clear errors otherwise.

    Both ends keep the offset ``from`` was given in (UTC without one): the default ``to`` is the
    next month's start there, and a report by day has that offset's days. An admin writing her
    midnight, ``2026-11-01T00:00:00+01:00``, means her November, not the hour before UTC's."""
    moment = now or utcnow()
    lo = _parse_moment(start, "from") if start else moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    hi = _parse_moment(end, "to").astimezone(lo.tzinfo) if end else _next_month(lo)
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
    if not _FIRST_MOMENT <= lo < _LAST_MOMENT:
        last = _LAST_MOMENT - dt.timedelta(days=1)
        raise InvalidRequest(f"month {month!r} is not between {_FIRST_MOMENT:%Y-%m} and {last:%Y-%m}")
    return lo, _next_month(lo)


#: The moments a report may name: usage is recorded in seconds since 1970, and past 9998 the
#: next month's start and the following day no longer exist as dates (9999-12 was a 500).
_FIRST_MOMENT = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_LAST_MOMENT = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)


def _next_month(moment: dt.datetime) -> dt.datetime:
    first = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + dt.timedelta(days=32)).replace(day=1)


def _parse_moment(value: str, name: str) -> dt.datetime:
    """``value`` in the offset it was given in, or UTC."""
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{name!r} must be an ISO date or time such as 2026-11-01 or 2026-11-01T12:00:00Z, not {value!r}"
        ) from None
    moment = moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment
    try:
        within = _FIRST_MOMENT <= moment <= _LAST_MOMENT
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the first date there is
        within = False
    if not within:
        raise InvalidRequest(f"{name!r} must be between {_FIRST_MOMENT:%Y-%m-%d} and {_LAST_MOMENT:%Y-%m-%d}")
    return moment


#: What makes a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """``text`` as a CSV cell a spreadsheet shows as text: user e-mails and group names are chosen by
    users, and ``=HYPERLINK(...)`` would run when an admin opens the download in Excel. OWASP's advice:
    a leading single quote on a cell that starts like a formula (numbers are written as numbers)."""
    return f"'{text}" if text.startswith(_FORMULA_STARTS) else text


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
            "estimate": self.prices.disclaimer, "priced": self.prices.priced, "prices_read_on": self.prices.read_on,
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
            writer.writerow([spreadsheet_safe(key), spreadsheet_safe(label), *(values[c] for c in columns)])
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
        # UTC days: one pass over the daily rollups; days from another hour of the day: one each
        by_day = (
            usage_by(db, prices, start, end, by="day", user_ids=user_ids, now=moment)
            if epoch(start) % DAY_S == 0
            else None
        )
        day = start
        while day < end:
            following = min(end, day + dt.timedelta(days=1))
            if by_day is not None:
                total = by_day.get(epoch(day), Usage())
            else:
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
    """All-time core-hours per user id, and the bytes each user stores now (for /metrics).

    A running environment counts until it was last seen running, not until now: one found gone is
    closed there (:func:`close_at_last_seen`), and a counter that went back by the hours since would
    read as a reset to Prometheus, whose ``increase()`` then counts the user's whole total again."""
    core: dict[str, float] = defaultdict(float)
    closed = select(UsageRollup.user_id, func.sum(UsageRollup.cpu_seconds)).where(UsageRollup.span == "month")
    running = select(
        UsageInterval.user_id, func.sum((UsageInterval.seen_s - UsageInterval.start_s) * UsageInterval.cpu)
    ).where(UsageInterval.end_s.is_(None))
    for query in (closed.group_by(UsageRollup.user_id), running.group_by(UsageInterval.user_id)):
        for uid, cpu_seconds in db.execute(query):
            core[uid] += float(cpu_seconds or 0) / 3600
    stored = dict(
        db.execute(
            select(StorageInterval.user_id, func.sum(StorageInterval.bytes))
            .where(StorageInterval.end_s.is_(None))
            .group_by(StorageInterval.user_id)
        ).all()
    )  # fmt: skip
    return dict(core), {uid: int(v or 0) for uid, v in stored.items()}


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
