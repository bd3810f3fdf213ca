"""Recording what a compute backend reports about an environment: one rule for the request that
starts it, the reconcile loop and the progress hub. Imports no application context, so anything
may use it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import NamedTuple, Protocol

from sqlalchemy import bindparam, delete, select
from sqlalchemy.orm import Session

from cmbcluster.db.engine import in_batches
from cmbcluster.db.models import Environment, StartSlot, utcnow
from cmbcluster.interfaces import EnvironmentPhase, EnvironmentStatus
from cmbcluster.services.audit import activity

#: The status an environment takes from each phase its backend reports
PHASE_STATUS = {
    EnvironmentPhase.PENDING: "pending",
    EnvironmentPhase.STARTING: "starting",
    EnvironmentPhase.RUNNING: "running",
    EnvironmentPhase.STOPPING: "stopping",
    EnvironmentPhase.STOPPED: "stopped",
    EnvironmentPhase.FAILED: "failed",
}


#: How long a start may be in flight (reserved, not yet taken by the backend, which may still
#: report the previous run's end), as the reconcile loop's full pass also allows it.
START_GRACE = dt.timedelta(seconds=60)


class Recorded(Protocol):
    """What :func:`reported` reads of an environment's record (an ORM row or a plain one)."""

    desired_state: str
    status: str
    started_at: dt.datetime | None


def reported(record: Recorded, status: EnvironmentStatus) -> tuple[str, str, str | None] | None:
    """(status, message, url) the environment of ``record`` takes from what the backend reports;
    None when the report changes nothing (MISSING is the reconcile loop's business, not this
    one's; so is an environment being stopped, whose process vanishing then is no failure).

    A STOPPED report for a record pending since less than :data:`START_GRACE` is no news: the start
    is reserved but may not be handed to the backend yet (launch builds its spec first), and a
    backend that keeps a stopped environment (the embedded default) still reports the previous
    run's stop. Recording it would end the start as it begins. An application that exits at once
    on its own is recorded once the grace is over. So is STOPPING: on Kubernetes a restart's start
    is reserved while the previous run's pod, of the same name, is still going away."""
    if status.phase == EnvironmentPhase.MISSING or record.desired_state != "running":
        return None
    if (
        status.phase in (EnvironmentPhase.STOPPED, EnvironmentPhase.STOPPING)
        and record.status == "pending"
        and record.started_at is not None
        and utcnow() - record.started_at < START_GRACE
    ):
        return None
    new_status = PHASE_STATUS[status.phase]
    return new_status, status.message, status.url if new_status in ("starting", "running") else None


def apply_status(
    db: Session, env: Environment, status: EnvironmentStatus, *, released: list[str] | None = None
) -> bool:
    """Record what the backend reports (the rule of :func:`reported`); True when something
    changed. Releases the start slot once the environment runs or ends; with ``released``, adds
    its id there instead, for the caller to release in the same transaction."""
    found = reported(env, status)
    if found is None:
        return False
    new_status = found[0]
    changed = (env.status, env.status_message, env.url) != (new_status, status.message, status.url)
    if new_status == "running" and env.status != "running":
        activity(db, user_id=env.user_id, kind="environment_running", environment_id=env.id)
    env.status, env.status_message, env.url = found
    if new_status in ("running", "stopped", "failed"):
        if released is None:
            release_start_slot(db, env.id)
        else:
            released.append(env.id)
    if new_status in ("stopped", "failed") and env.stopped_at is None:
        env.stopped_at = utcnow()
    return changed


class Report(NamedTuple):
    """What the backend reported for an environment, and the run it was read for (the record's
    ``started_at`` then)."""

    status: EnvironmentStatus
    started_at: dt.datetime | None


def record_reports(db: Session, reports: Mapping[str, Report]) -> int:
    """Record reports read earlier (the progress hub's, the reconcile loop's fast pass) on
    environments still starting, each only on the run it was read for: a restart since (a new run,
    its start recorded meanwhile) is not given the previous run's end, which had it marked stopped
    while it ran, then stopped for real by the reconcile loop (an outsider's trial). How many
    changed; the caller commits."""
    changed = 0
    released: list[str] = []
    for batch in in_batches(list(reports)):
        for env in db.execute(select(Environment).where(Environment.id.in_(batch))).scalars():
            report = reports[env.id]
            if env.status in ("pending", "starting") and env.started_at == report.started_at:
                changed += apply_status(db, env, report.status, released=released)
    # The slots of the environments that now run or ended, in one statement a batch (a burst's
    # hundreds were a statement each)
    with db.no_autoflush:
        for batch in in_batches(released):
            db.execute(_RELEASE_SLOTS, {"environment_ids": batch})
    return changed


def release_start_slot(db: Session, environment_id: str) -> None:
    """Give back the environment's server-wide start slot (nothing when it holds none)."""
    # Without flushing what else changed: recording a burst's statuses then writes every row in
    # one flush at commit instead of one flush per environment.
    with db.no_autoflush:
        db.execute(_RELEASE_SLOT, {"environment_id": environment_id})


def delete_expired_slots(db: Session, now: dt.datetime) -> None:
    """Free the start slots of starts that never ended (a crashed server's), past their expiry."""
    with db.no_autoflush:
        db.execute(_DELETE_EXPIRED_SLOTS, {"now": now})


# Built once, and without the ORM's bookkeeping for the deleted rows (nothing loads a slot): a
# burst of starts releases a slot for every one, and deletes the expired ones at each.
_RELEASE_SLOT = (
    delete(StartSlot)
    .where(StartSlot.environment_id == bindparam("environment_id"))
    .execution_options(synchronize_session=False)
)
_RELEASE_SLOTS = (
    delete(StartSlot)
    .where(StartSlot.environment_id.in_(bindparam("environment_ids", expanding=True)))
    .execution_options(synchronize_session=False)
)
_DELETE_EXPIRED_SLOTS = (
    delete(StartSlot).where(StartSlot.expires_at <= bindparam("now")).execution_options(synchronize_session=False)
)
