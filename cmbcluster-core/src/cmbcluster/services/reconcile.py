"""Making the database and the compute backend agree, and stopping what should stop.

Runs at start-up (before the first request) and then in the background:
- every second, environments that are pending or starting get their status from the backend;
- at start-up, and on every full pass of the replica that reconciles, bucket deletes a crash
  interrupted are finished (or rolled back) and the uploads it left unfinished aborted: only the
  work of server instances that are gone (:mod:`cmbcluster.services.instances`), never a live
  replica's;
- every ``CMBCLUSTER_RECONCILE_INTERVAL_SECONDS``, a full pass: anything the backend runs that
  has no record is removed (no orphans); a record whose process or pod vanished is marked
  stopped (no ghosts); an environment past its idle or uptime limit is stopped, with a warning
  recorded beforehand. A start under way, or begun after the pass listed the backend, is left to
  the every-second pass and the progress hub: the listing may still show its previous run's end.
All state is in the database, so a restarted control plane forgets nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Collection
from dataclasses import dataclass, field

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool

from cmbcluster.context import AppContext
from cmbcluster.db.engine import one_writer
from cmbcluster.db.models import Environment, Storage, utcnow
from cmbcluster.interfaces import EnvironmentPhase
from cmbcluster.services import accounting, budgets, environments, instances, storages
from cmbcluster.services.audit import activity
from cmbcluster.services.status import (
    START_GRACE,
    Report,
    apply_status,
    delete_expired_slots,
    record_reports,
    release_start_slot,
)

log = logging.getLogger(__name__)

TRANSITIONAL = ("pending", "starting")
#: What a full pass follows. "stopping" with the desired state "running": someone else stops it (on
#: Kubernetes an eviction, a node drain, kubectl deleting the pod); once it is gone it is recorded
#: stopped, as any vanished environment. Left out, it stayed "stopping" for good, and could not be
#: started again.
FOLLOWED = (*environments.ACTIVE_STATUSES, "stopping")
FAST_INTERVAL_SECONDS = 1.0
# Built once: the every-second pass runs it.
_TRANSITIONAL = select(Environment.id, Environment.started_at).where(
    Environment.backend == bindparam("backend"), Environment.status.in_(TRANSITIONAL)
)


@dataclass
class ReconcileReport:
    orphans_removed: list[str] = field(default_factory=list)
    marked_stopped: list[str] = field(default_factory=list)  # recorded as running, found stopped or failed
    stopped_leftovers: list[str] = field(default_factory=list)
    culled: list[str] = field(default_factory=list)
    warned: list[str] = field(default_factory=list)
    # bucket deletes a crash interrupted (storage id: "deleted" or "active" again), and unfinished
    # uploads of server instances that are gone, aborted
    storage_deletes: dict[str, str] = field(default_factory=dict)
    uploads_aborted: int = 0
    over_budget: list[str] = field(default_factory=list)  # stopped: a hard budget is used up


class Reconciler:
    def __init__(self, context: AppContext) -> None:
        self.context = context

    def _environments(self, db: Session, *statuses: str) -> list[Environment]:
        query = (
            select(Environment)
            .where(Environment.backend == self.context.config.compute.name)
            .options(selectinload(Environment.application_row), selectinload(Environment.mounts))
        )
        if statuses:
            query = query.where(Environment.status.in_(statuses))
        return list(db.execute(query).scalars())

    def _by_id(self, db: Session, ids: set[str]) -> list[Environment]:
        if not ids:
            return []
        return list(db.execute(select(Environment).where(Environment.id.in_(ids))).scalars())

    def refresh_transitional(self, followed: Collection[str] = ()) -> int:
        """Update pending and starting environments from the backend; fail those past the start timeout.

        ``followed``: environments whose progress streams of this process follow; the progress hub
        reads and records those itself (at once on a backend's change), so only their timeout is
        checked here. With 200 starts watched at once, reading them again every second doubled
        the control plane's work during the burst.
        """
        changed = 0
        timeout = dt.timedelta(seconds=self.context.config.core.start_timeout_seconds)
        reports: dict[str, Report] = {}
        with self.context.sessions() as db:
            # Plain rows: a burst's 200 starts were loaded as ORM objects (with their applications
            # and mounts) every second, only for their ids and start times; a late one is loaded.
            rows = db.execute(_TRANSITIONAL, {"backend": self.context.config.compute.name}).all()
            for environment_id, started_at in rows:
                if started_at is not None and utcnow() - started_at > timeout:
                    env = db.get(Environment, environment_id)
                    if env is None or env.status not in TRANSITIONAL:
                        continue  # deleted or moved on since the read
                    self.context.compute.stop(env.id)
                    environments.mark_failed(db, env, f"did not start within {timeout.total_seconds():.0f} s")
                    changed += 1
                    continue
                if environment_id not in followed:
                    reports[environment_id] = Report(self.context.compute.status(environment_id), started_at)
            db.rollback()  # what was read may be old by now: recorded on the runs it was read for
            if reports:  # nothing to write: no turn at the database's one writer
                with one_writer(db):
                    changed += record_reports(db, reports)
                    db.commit()
        return changed

    def reconcile(self, *, startup: bool = False) -> ReconcileReport:
        """One full pass. ``startup``: no start can be in flight, so nothing gets a grace period."""
        report = ReconcileReport()
        compute = self.context.compute
        listed_at = utcnow()
        managed = {status.environment_id: status for status in compute.list_managed()}
        with self.context.sessions() as db:
            # Every id is needed to spot orphans, but only environments that run (or should, or
            # whose backend says they do) need loading: most records are stopped and stay so.
            known = set(
                db.execute(
                    select(Environment.id).where(Environment.backend == self.context.config.compute.name)
                ).scalars()
            )
            rows = {env.id: env for env in self._environments(db, *FOLLOWED) + self._by_id(db, set(managed) & known)}
            for env_id in sorted(set(managed) - known):
                log.warning("removing environment %s (%s): the backend holds it but no record exists", env_id,
                            managed[env_id].phase.value)  # fmt: skip
                compute.remove_unrecorded(env_id)
                report.orphans_removed.append(env_id)
            now = utcnow()
            seen: list[str] = []
            # Stopped once the records say so, all at once: one by one, applications slow to exit
            # kept a start-up after a crash from serving for 5 s each (found by an outsider's trial).
            to_stop: list[str] = []
            for env in rows.values():
                if not startup and _listing_predates(env, listed_at, now):
                    continue  # the fast pass and the progress hub follow it; the next full pass lists it afresh
                status = managed.get(env.id)
                vanished = status is None or status.phase == EnvironmentPhase.MISSING
                # A start reserved but never handed over before a crash: what the backend holds (the
                # embedded default keeps a stopped run) is the previous run's, and no start is in
                # flight at start-up, so it waits for no grace (a minute of "pending", then "stopped").
                interrupted = (
                    startup
                    and env.status == "pending"
                    and (vanished or (status is not None and status.phase == EnvironmentPhase.STOPPED))
                )
                if env.desired_state == "running" and env.status in FOLLOWED:
                    if vanished or interrupted:
                        accounting.close_at_last_seen(db, env.id)  # it ran until last seen, not until now
                        env.status, env.url, env.stopped_at = "stopped", None, now
                        env.desired_state = "stopped"
                        env.status_message = (
                            "its start was cut short when the control plane stopped; start it again" if interrupted
                            else "the environment's process or pod is gone; start it again"
                        )  # fmt: skip
                        release_start_slot(db, env.id)
                        activity(db, user_id=env.user_id, kind="environment_vanished", environment_id=env.id)
                        report.marked_stopped.append(env.id)
                    elif status is not None:
                        if status.phase in (EnvironmentPhase.STOPPED, EnvironmentPhase.FAILED):
                            accounting.close_at_last_seen(db, env.id)  # it ended since the last pass
                        else:
                            seen.append(env.id)
                        apply_status(db, env, status)
                        if env.status in ("stopped", "failed"):  # it exited or failed meanwhile
                            to_stop.append(env.id)  # and make sure nothing of it keeps running
                            report.marked_stopped.append(env.id)
                elif env.desired_state == "stopped" and env.status in environments.ACTIVE_STATUSES:
                    to_stop.append(env.id)  # a stop that a crash interrupted: finish it
                    env.status, env.url, env.stopped_at = "stopped", None, now
                    env.status_message = "stopped"
                    release_start_slot(db, env.id)
                    report.stopped_leftovers.append(env.id)
                elif (
                    status is not None
                    and status.phase in (EnvironmentPhase.RUNNING, EnvironmentPhase.STARTING, EnvironmentPhase.PENDING)
                    and env.status not in environments.ACTIVE_STATUSES
                ):
                    to_stop.append(env.id)  # a stop that a crash interrupted
                    report.stopped_leftovers.append(env.id)
            delete_expired_slots(db, now)
            accounting.mark_seen(db, seen, now)
            accounting.sync_open_intervals(db, self.context.config.compute.name)
            db.commit()
            environments.stop_in_backend(self.context, to_stop)
            self._cull(db, report)
            self._budgets(db, report)
            self._update_gauges(db)
            self._recover_storage(db, report)
            self._sample_storage(db)
        return report

    def _recover_storage(self, db: Session, report: ReconcileReport) -> None:
        """What a crash left half-done in storage: interrupted bucket deletes are finished or rolled
        back, and unfinished uploads aborted, of server instances that are gone (a previous run, or
        a replica whose heartbeat stopped). With several replicas this runs on the leader, from
        the pass it makes when it takes over. A failure is logged; the next pass tries again."""
        try:
            instances.forget_gone(db)
            db.commit()
            report.storage_deletes = storages.resume_interrupted_deletes(db, self.context)
            report.uploads_aborted = storages.abort_journalled_uploads(db, self.context)
        except Exception:
            db.rollback()
            log.exception("recovering interrupted storage work failed; the next full pass tries again")

    def _cull(self, db: Session, report: ReconcileReport) -> None:
        core = self.context.config.core
        warning = dt.timedelta(minutes=core.shutdown_warning_minutes)
        now = utcnow()
        for env in self._environments(db, "running"):
            idle_deadline = environments.idle_shutdown_at(self.context, env)
            if idle_deadline is not None and now >= idle_deadline:
                reason = f"stopped after {core.idle_timeout_minutes} minutes without activity"
            elif env.shutdown_at is not None and now >= env.shutdown_at:
                reason = "stopped: it reached its maximum uptime"
            else:
                deadline = environments.next_shutdown(self.context, env)
                if deadline is not None and now >= deadline - warning and env.warned_at is None:
                    env.warned_at = now
                    activity(db, user_id=env.user_id, kind="shutdown_warning", environment_id=env.id,
                             shutdown_at=deadline.isoformat())  # fmt: skip
                    db.commit()
                    report.warned.append(env.id)
                continue
            environments.stop(db, self.context, env, actor_id=None, reason=reason)
            self.context.metrics.culled.inc()
            report.culled.append(env.id)

    def _budgets(self, db: Session, report: ReconcileReport) -> None:
        try:
            hard_stops = budgets.enforce(db, self.context)
        except Exception:  # a budget's trouble must not stop the loop's other work
            db.rollback()
            log.exception("budget enforcement failed this pass")
            return
        for stop in hard_stops:
            running = db.execute(
                select(Environment.id).where(
                    Environment.user_id.in_(stop.user_ids), Environment.status.in_(environments.ACTIVE_STATUSES)
                )
            ).scalars()
            for environment_id in list(running):
                # Each on its own: one whose stop fails (the cluster refused it) is tried again next
                # pass, and never keeps the others of a used-up hard budget running until then.
                try:
                    env = db.get(Environment, environment_id)
                    if env is not None:
                        environments.stop(db, self.context, env, actor_id=None, reason=stop.reason)
                        report.over_budget.append(environment_id)
                except Exception:
                    db.rollback()
                    log.exception("stopping environment %s for a used-up hard budget failed", environment_id)

    def _sample_storage(self, db: Session) -> None:
        """Measure buckets whose last measurement is older than the sampling interval, in the
        usage refresher's own pool (this pass does not wait): usage reports integrate the results."""
        due = utcnow() - dt.timedelta(minutes=self.context.config.core.usage_sample_minutes)
        stale = db.execute(
            select(Storage.id, Storage.bucket_name).where(
                Storage.backend == self.context.config.storage.name,
                Storage.status == "active",
                (Storage.usage_at.is_(None)) | (Storage.usage_at < due),
            )
        ).all()
        for storage_id, bucket in stale:
            self.context.storage_runtime.refresher.refresh(storage_id, bucket)

    def _update_gauges(self, db: Session) -> None:
        counts = dict(db.execute(select(Environment.status, func.count()).group_by(Environment.status)).all())
        for status in ("pending", "starting", "running", "stopped", "failed"):
            self.context.metrics.environments.labels(status).set(counts.get(status, 0))


def _listing_predates(env: Environment, listed_at: dt.datetime, now: dt.datetime) -> bool:
    """Whether the backend's listing, taken at ``listed_at``, may describe an earlier run of ``env``
    than its record does: the record's start began after the listing (a restart meanwhile: the listing
    has the old run's end, or nothing), or is still in flight (pending or starting for less than
    START_GRACE: the backend may not have it yet, or still report the previous run's end). Acting on
    such a listing stopped starts as they happened."""
    if env.started_at is None:
        return False
    # At or after: a start stamped the instant the listing was taken (a coarse clock) may be missing from it.
    return env.started_at >= listed_at or (env.status in TRANSITIONAL and now - env.started_at < START_GRACE)


async def run_background(context: AppContext, stop: asyncio.Event) -> None:
    """The background loops of one control plane; ends when ``stop`` is set.

    With leader election (several replicas), only the elected replica runs them, and it starts
    with a full pass as soon as it takes over: the previous leader may have died mid-pass.
    """
    reconciler = Reconciler(context)
    interval = context.config.core.reconcile_interval_seconds
    loop = asyncio.get_running_loop()
    last_full = loop.time()
    leading = not context.compute.elects_leader  # a single replica reconciled at start-up already
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=FAST_INTERVAL_SECONDS)
            return
        except TimeoutError:
            pass
        try:
            if not await run_in_threadpool(context.compute.leads_background_work):
                leading = False
                continue
            if not leading:
                leading, last_full = True, float("-inf")
            await run_in_threadpool(reconciler.refresh_transitional, context.progress.followed_ids())
            if loop.time() - last_full >= interval:
                last_full = loop.time()
                report = await run_in_threadpool(reconciler.reconcile)
                if report.orphans_removed or report.marked_stopped or report.culled or report.storage_deletes:
                    log.info("reconciled", extra={"report": report.__dict__})
        except Exception:  # keep the loop alive whatever one pass hits; the next pass retries
            log.exception("background reconcile pass failed")
