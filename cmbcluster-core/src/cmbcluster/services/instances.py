"""The running control-plane processes (one per replica), each with a heartbeat in the database.

Work a process journals while it runs (an upload, a bucket delete) carries its instance id. The
replica that recovers interrupted work touches an entry only when its owner is gone: its heartbeat
older than :data:`INSTANCE_LEASE`, or its row removed at a clean stop. That holds whether or not
the replicas elect a leader: without one, several may still share a database for a while (a
Deployment's rolling update starts the new pod beside the old one). Only a SQLite database is one
server's alone (its serving lock, :class:`~cmbcluster.db.backup.ServingLock`): there every other
instance is a previous run of this one, gone whatever its last heartbeat says, so what a crash
left is recovered at the next start.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, delete, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session
from starlette.concurrency import run_in_threadpool

from cmbcluster.db.models import ServerInstance, utcnow

if TYPE_CHECKING:
    from cmbcluster.context import AppContext

log = logging.getLogger(__name__)

#: How often a running instance writes its heartbeat.
HEARTBEAT_SECONDS = 10.0
#: An instance whose heartbeat is older than this is gone: its journalled work is recovered.
INSTANCE_LEASE = dt.timedelta(seconds=60)


def register(context: AppContext) -> None:
    """Record this process as running (at start, before the first request)."""
    with context.sessions() as db:
        db.merge(ServerInstance(id=context.instance_id, started_at=utcnow(), heartbeat_at=utcnow()))
        db.commit()


def beat(context: AppContext) -> None:
    with context.sessions() as db:
        found = db.execute(
            update(ServerInstance).where(ServerInstance.id == context.instance_id).values(heartbeat_at=utcnow())
        )
        if not found.rowcount:  # type: ignore[attr-defined]  # removed by hand, or a database restored
            db.add(ServerInstance(id=context.instance_id, heartbeat_at=utcnow()))
        db.commit()
    context.deferred_writes.write()


def unregister(context: AppContext) -> None:
    """At a clean stop, after the last request: nothing of this process is in flight any more."""
    with context.sessions() as db:
        db.execute(delete(ServerInstance).where(ServerInstance.id == context.instance_id))
        db.commit()


def owned_by_gone(context: AppContext, owner: InstrumentedAttribute[str | None]) -> ColumnElement[bool]:
    """A WHERE clause on ``owner`` (an instance id column): true for work whose owner is gone.

    Never this process's own work. On a database only this server uses (SQLite), every other
    owner is a previous run; on a shared one, an owner is gone once its heartbeat is older than
    :data:`INSTANCE_LEASE`, with or without leader election."""
    if _database_is_ours_alone(context):
        return or_(owner.is_(None), owner != context.instance_id)
    live = select(ServerInstance.id).where(ServerInstance.heartbeat_at >= utcnow() - INSTANCE_LEASE)
    return or_(owner.is_(None), (owner != context.instance_id) & owner.not_in(live))


def owned_by_live(context: AppContext, owner: InstrumentedAttribute[str | None]) -> ColumnElement[bool]:
    """The converse of :func:`owned_by_gone`: this process's work and that of live instances."""
    if _database_is_ours_alone(context):
        return owner == context.instance_id
    live = select(ServerInstance.id).where(ServerInstance.heartbeat_at >= utcnow() - INSTANCE_LEASE)
    return (owner == context.instance_id) | owner.in_(live)


def _database_is_ours_alone(context: AppContext) -> bool:
    """SQLite: one control plane per database file (the server holds its serving lock)."""
    return context.engine.dialect.name == "sqlite"


def forget_gone(db: Session) -> None:
    """Drop the rows of instances gone long ago (their work has been recovered by then)."""
    db.execute(delete(ServerInstance).where(ServerInstance.heartbeat_at < utcnow() - 10 * INSTANCE_LEASE))


async def run_heartbeat(context: AppContext, stop: asyncio.Event) -> None:
    """Write this instance's heartbeat every :data:`HEARTBEAT_SECONDS` until ``stop`` is set."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=HEARTBEAT_SECONDS)
            return
        except TimeoutError:
            pass
        try:
            await run_in_threadpool(beat, context)
        except Exception:  # the database is away: other replicas may take this one for gone
            log.exception("writing this server's heartbeat failed; trying again in %.0f s", HEARTBEAT_SECONDS)
