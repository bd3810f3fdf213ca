"""Recording what a compute backend reports about an environment: one rule for the request that
starts it, the reconcile loop and the progress hub. Imports no application context, so anything
may use it."""

from __future__ import annotations

from sqlalchemy import bindparam, delete
from sqlalchemy.orm import Session

from cmbcluster.db.models import Environment, StartSlot, utcnow
from cmbcluster.interfaces import EnvironmentPhase, EnvironmentStatus
from cmbcluster.services.audit import activity

_PHASE_TO_STATUS = {
    EnvironmentPhase.PENDING: "pending",
    EnvironmentPhase.STARTING: "starting",
    EnvironmentPhase.RUNNING: "running",
    EnvironmentPhase.STOPPING: "stopping",
    EnvironmentPhase.STOPPED: "stopped",
    EnvironmentPhase.FAILED: "failed",
}


def reported(desired_state: str, recorded: str, status: EnvironmentStatus) -> tuple[str, str, str | None] | None:
    """(status, message, url) an environment meant to be ``desired_state``, recorded as ``recorded``,
    takes from what the backend reports; None when the report changes nothing (MISSING is the
    reconcile loop's business, not this one's; so is an environment being stopped, whose process
    vanishing then is no failure).

    STOPPED means the control plane stopped it. Reported for a record still ``pending``, it is the
    previous run's end: the start is reserved but not yet handed to the backend (launch builds
    its spec first), and recording it would end the start as it begins."""
    if status.phase == EnvironmentPhase.MISSING or desired_state != "running":
        return None
    if recorded == "pending" and status.phase == EnvironmentPhase.STOPPED:
        return None
    new_status = _PHASE_TO_STATUS[status.phase]
    return new_status, status.message, status.url if new_status in ("starting", "running") else None


def apply_status(db: Session, env: Environment, status: EnvironmentStatus) -> bool:
    """Record what the backend reports (the rule of :func:`reported`); True when something
    changed. Releases the start slot once the environment runs or ends."""
    found = reported(env.desired_state, env.status, status)
    if found is None:
        return False
    new_status = found[0]
    changed = (env.status, env.status_message, env.url) != (new_status, status.message, status.url)
    if new_status == "running" and env.status != "running":
        activity(db, user_id=env.user_id, kind="environment_running", environment_id=env.id)
    env.status, env.status_message, env.url = found
    if new_status in ("running", "stopped", "failed"):
        release_start_slot(db, env.id)
    if new_status in ("stopped", "failed") and env.stopped_at is None:
        env.stopped_at = utcnow()
    return changed


def release_start_slot(db: Session, environment_id: str) -> None:
    """Give back the environment's server-wide start slot (nothing when it holds none)."""
    # Without flushing what else changed: recording a burst's statuses then writes every row in
    # one flush at commit instead of one flush per environment.
    with db.no_autoflush:
        db.execute(_RELEASE_SLOT, {"environment_id": environment_id})


# Built once, and without the ORM's bookkeeping for the deleted rows (nothing loads a slot): a
# burst of starts releases a slot for every one.
_RELEASE_SLOT = (
    delete(StartSlot)
    .where(StartSlot.environment_id == bindparam("environment_id"))
    .execution_options(synchronize_session=False)
)
