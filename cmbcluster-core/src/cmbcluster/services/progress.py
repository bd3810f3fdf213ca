"""Progress of starting environments, for the streams that follow it (``GET .../events``).

An open stream holds nothing while it waits: no database connection, no worker thread. One
:class:`ProgressHub` per control-plane process does the work for every stream of that process:

- it wakes up when the compute backend reports a change (the Kubernetes backend's watch calls the
  listener registered with ``ComputeBackend.on_status_change``), when this process changed an
  environment itself (:meth:`ProgressHub.notify`), and at the latest every ``poll_seconds``,
  a pause that grows to ``max_poll_seconds`` while nothing changes (an autoscaler adding nodes
  keeps dialogs open for minutes) and shrinks back at the next change; a pass starts at most
  ``MIN_PASS_SECONDS`` after the one before, and what is reported meanwhile joins it;
- then, in one hop to its own thread (never queued behind requests in the shared worker pool)
  and one short read-only database session, it reads the followed environments a change was
  reported for (every followed one after a quiet pause, and at least every ``poll_seconds`` however
  busy, for changes nobody reports), takes what the backend now reports for those still starting,
  and hands each stream its new state at once; recording that report in the database (as the
  reconcile loop does) follows in the background, so progress never waits for the database's
  write lock, which a burst of starts keeps busy. An end (running, failed) reaches the streams
  once recorded: a stream that says ``running`` means the environment opens;
- the application's output while it starts is read in the background too (a log read goes
  through the kubelet, which may take seconds to answer): a pass sends the lines last read, and
  the next pass the newer ones. Only a failure's last lines are read within the pass, since its
  event ends the stream.

Changes made by another replica reach this one through the database, which every replica reads
at that interval: a replica that does not reconcile still sees every change. (PostgreSQL's
LISTEN/NOTIFY would save that read; one batched read a second per replica is cheap enough.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.db.engine import in_batches, one_writer
from cmbcluster.db.models import Environment, utcnow
from cmbcluster.errors import CmbclusterError
from cmbcluster.interfaces import ComputeBackend
from cmbcluster.services.status import PHASE_STATUS, Report, record_reports, reported

log = logging.getLogger(__name__)

#: How far along each status is, for the launch dialog's bar.
PROGRESS = {"stopped": 0, "pending": 10, "starting": 50, "running": 100, "failed": 100, "stopping": 50}
#: A stream ends once its environment reaches one of these.
TERMINAL = ("running", "stopped", "failed")
#: Progress that is not an end is recorded at most this often (an end at once): streams show it
#: from the backend's report already; the list and other replicas see it within this. In a burst
#: of starts, each record is a turn at SQLite's one write lock, which the starts queue for.
PROGRESS_RECORD_SECONDS = 1.0
#: The reports that end a start, recorded at once: a stream announces an end once recorded.
_ENDS = frozenset(phase for phase, status in PHASE_STATUS.items() if status in TERMINAL)
#: A pass starts at most this long after the one before: the changes reported meanwhile are read
#: (and their ends recorded) together. A burst of 200 starts reports hundreds of changes a second,
#: each of which made a pass of its own, a read and a write transaction, each a thread hop.
MIN_PASS_SECONDS = 0.05
#: The application's last output lines an event carries while it starts and when it failed.
PROGRESS_LOG_LINES = 15
#: How often that output is read again (a pass may come sooner; reading may be a cluster call).
PROGRESS_LOG_REFRESH_SECONDS = 1.0
#: At most this many outputs read per round in the background, a round at most once a second: with
#: 200 starts at once, the output shown may be some 13 s old. The ones read longest ago come first.
PROGRESS_LOG_READS_PER_ROUND = 16


@dataclass(eq=False)
class Subscription:
    """One stream's view of one environment: the newest state, and a signal when it changes."""

    environment_id: str
    user_id: str
    latest: dict[str, Any] | None = None  #: None: deleted, or not this user's
    seen: bool = False  #: a first state has been read
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: why the stream's caller may no longer follow it (signed out, revoked): it says so and ends
    signed_out: str | None = None
    _key: tuple[object, ...] | None = None

    def offer(self, event: dict[str, Any] | None) -> bool:
        """Take a state; True when it differs from the last one (the stream then sends it)."""
        key = None if event is None else (event["status"], event["message"], event["url"], tuple(event["log"]))
        if self.signed_out is not None or (self.seen and key == self._key):
            return False
        self.seen, self._key, self.latest = True, key, event
        self.changed.set()
        return True

    def end(self, why: str) -> None:
        """The caller's session or API token stopped working (:mod:`cmbcluster.services.revocation`):
        the stream's last event says why; no state is offered after it."""
        self.signed_out = why
        self.changed.set()


class ProgressHub:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        compute: ComputeBackend,
        *,
        poll_seconds: float = 0.5,
        max_poll_seconds: float = 2.0,
    ) -> None:
        self.sessions = sessions
        self.compute = compute
        self.output = StartupOutput(compute)
        self.poll_seconds = poll_seconds
        self.max_poll_seconds = max_poll_seconds
        self._subscriptions: dict[str, set[Subscription]] = {}
        # What the next pass reads: the environments a change was reported for, or every followed
        # one (on the hub's loop only; notify() hands them over from other threads)
        self._changed: set[str] = set()
        self._read_all = False
        self._recorded_at = -math.inf
        self._unrecorded: set[str] = set()  # found behind while a record was in flight, or paced
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recording: asyncio.Task[None] | None = None
        self._reading_output: asyncio.Task[None] | None = None
        # The hub's own threads, to read, to write and to read output: never queued behind
        # requests in the shared worker pool (made in run(), on the loop they serve)
        self._reader: anyio.CapacityLimiter | None = None
        self._writer: anyio.CapacityLimiter | None = None
        self._output_reader: anyio.CapacityLimiter | None = None

    # -- streams -------------------------------------------------------------------------------
    def subscribe(self, environment_id: str, user_id: str) -> Subscription:
        subscription = Subscription(environment_id, user_id)
        self._subscriptions.setdefault(environment_id, set()).add(subscription)
        self.notify(environment_id)  # its first state comes with the next pass (within MIN_PASS_SECONDS)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        followers = self._subscriptions.get(subscription.environment_id)
        if followers is not None:
            followers.discard(subscription)
            if not followers:
                del self._subscriptions[subscription.environment_id]

    def followed_ids(self) -> frozenset[str]:
        """The environments this process's streams follow while the hub runs (it records their
        changes, so the reconcile loop need not read them again); empty when it does not run."""
        return frozenset(self._subscriptions) if self._loop is not None else frozenset()

    @property
    def followed(self) -> int:
        """How many streams are open (a gauge for /metrics and the benchmarks)."""
        return sum(len(s) for s in self._subscriptions.values())

    # -- changes ---------------------------------------------------------------------------------
    def notify(self, environment_id: str | None = None) -> None:
        """Something may have changed: look now, at ``environment_id`` alone when given, else at
        every followed environment. Safe from any thread (the backend's watch)."""
        loop = self._loop
        if loop is None or self._wake is None or loop.is_closed():
            return
        if environment_id is not None and environment_id not in self._subscriptions:
            return  # nobody follows it: nothing to do
        try:
            loop.call_soon_threadsafe(self._look_at, environment_id)
        except RuntimeError:  # the loop is shutting down
            pass

    def _look_at(self, environment_id: str | None) -> None:
        """(On the hub's loop) have the next pass read ``environment_id``, or everything for None."""
        if environment_id is None:
            self._read_all = True
        else:
            self._changed.add(environment_id)
        if self._wake is not None:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """The hub's one task; ends when ``stop`` is set."""
        self._loop = asyncio.get_running_loop()
        self._wake = wake = asyncio.Event()
        self._stop = stop
        self._reader, self._writer, self._output_reader = (anyio.CapacityLimiter(1) for _ in range(3))
        self.compute.on_status_change(self.notify)
        stopper = asyncio.create_task(self._wake_on(stop, wake))
        try:
            await self._serve(stop)
        finally:
            stopper.cancel()
            self._loop = None

    async def _serve(self, stop: asyncio.Event) -> None:
        assert self._wake is not None and self._loop is not None
        pause = self.poll_seconds
        last_full = last_pass = -math.inf
        while not stop.is_set():
            try:
                # asyncio.timeout, not wait_for: no task of its own per pass (a burst makes hundreds)
                async with asyncio.timeout(pause if self._subscriptions else None):
                    await self._wake.wait()
                pause = self.poll_seconds  # woken by a change: look closely again
            except TimeoutError:
                pause = min(self.max_poll_seconds, pause * 1.5)
                self._read_all = True
            if (soon := last_pass + MIN_PASS_SECONDS - self._loop.time()) > 0:
                await asyncio.sleep(soon)  # what is reported meanwhile joins this pass
            last_pass = self._loop.time()
            self._wake.clear()
            if stop.is_set() or not self._subscriptions:
                continue
            # A reported change is read alone (a burst of starts reports hundreds, each of which made
            # a pass read all of them); every followed environment at least every poll interval,
            # however busy, for changes nobody reports (another replica's, a backend without a watch).
            if self._read_all or self._loop.time() - last_full >= self.poll_seconds:
                followed, last_full = list(self._subscriptions), self._loop.time()
            else:
                followed = [i for i in self._changed if i in self._subscriptions]
            self._changed.clear()
            self._read_all = False
            if not followed:
                continue
            try:
                states, behind = await anyio.to_thread.run_sync(self._read, followed, limiter=self._reader)
            except Exception:  # a database hiccup: the next pass tries again, reading everything
                log.exception("reading the progress of starting environments failed")
                self._read_all = True
                await asyncio.sleep(self.poll_seconds)
                continue
            # Only what was read: a stream that subscribed meanwhile gets its state next pass.
            for environment_id in followed:
                state = states.get(environment_id)
                for subscription in list(self._subscriptions.get(environment_id, ())):
                    owned = state is not None and state["user_id"] == subscription.user_id
                    if subscription.offer(state["event"] if owned and state is not None else None):
                        pause = self.poll_seconds
            if behind:
                self._record_soon(behind)
            if self.output.wanted and self._reading_output is None:
                self._reading_output = asyncio.create_task(self._read_output())
        for task in (self._recording, self._reading_output):
            if task is not None:
                await task

    def _record_soon(self, behind: dict[str, Report]) -> None:
        """Record what a pass found behind: now, when it holds an end or progress was last recorded
        :data:`PROGRESS_RECORD_SECONDS` ago and no record is in flight; otherwise these are read
        again once the record in flight is written (an end must not wait for the next full pass)."""
        assert self._loop is not None
        ends = any(report.status.phase in _ENDS for report in behind.values())
        if self._recording is None and (ends or self._loop.time() - self._recorded_at >= PROGRESS_RECORD_SECONDS):
            self._recorded_at = self._loop.time()
            self._recording = asyncio.create_task(self._record(behind))
        else:
            self._unrecorded.update(behind)

    async def _record(self, reports: dict[str, Report]) -> None:
        """Write what the backend reported (one write transaction, in a thread of its own); a
        pass meanwhile does not start another (see :meth:`_record_soon`)."""
        try:
            await anyio.to_thread.run_sync(self._write, reports, limiter=self._writer)
            # the next pass reads what was recorded (an end reaches its streams), and what waited
            waited, self._unrecorded = self._unrecorded, set()
            for environment_id in reports.keys() | waited:
                self._look_at(environment_id)
        except Exception:  # the database busy past its timeout: the next pass or the reconcile loop retries
            log.warning("recording the progress of %d starting environments failed", len(reports),
                        exc_info=True)  # fmt: skip
        finally:
            self._recording = None

    async def _read_output(self) -> None:
        """Read the output the last passes wanted (a round at a time, in a thread of its own, at
        most a round per refresh interval); a pass sends what changed."""
        began = time.monotonic()
        try:
            changed = await anyio.to_thread.run_sync(self.output.read_wanted, limiter=self._output_reader)
            for environment_id in changed:
                self._look_at(environment_id)
            # Paced: with many starts waiting, rounds back to back would keep the hub busy for nothing
            # (a stopping hub does not wait for the pause).
            pause = max(0.0, PROGRESS_LOG_REFRESH_SECONDS - (time.monotonic() - began))
            if self._stop is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=pause)
        except Exception:  # never fatal: the output is shown as last read
            log.warning("reading the output of starting environments failed", exc_info=True)
        finally:
            self._reading_output = None

    @staticmethod
    async def _wake_on(stop: asyncio.Event, wake: asyncio.Event) -> None:
        await stop.wait()
        wake.set()

    def _read(self, environment_ids: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Report]]:
        """The followed environments' states (blocking: one short read-only session for all of
        them), with what the backend reports for those still starting; and the reports not yet
        in the database, by environment id."""
        states: dict[str, dict[str, Any]] = {}
        behind: dict[str, Report] = {}
        with self.sessions() as db:
            for batch in in_batches(environment_ids):
                for row in db.execute(_STATE_QUERY.where(Environment.id.in_(batch))):
                    now = (row.status, row.status_message, row.url)
                    if row.status in ("pending", "starting"):
                        status = self.compute.status(row.id)
                        found = reported(row, status)
                        if found is not None and found != now:
                            behind[row.id] = Report(status, row.started_at)
                            if found[0] not in TERMINAL:
                                # Progress is shown at once; an end (running: the URL opens) only
                                # once recorded, since what the stream announces must already hold.
                                now = found
                    event = progress_event(*now)
                    if event["status"] in ("starting", "failed"):
                        # what the application is doing (as last read), or why it stopped (a failure
                        # ends the stream: its event has the output as it ended, read now)
                        event["log"] = self.output.lines(row.id, fresh=event["status"] == "failed")
                    states[row.id] = {"user_id": row.user_id, "event": event}
            db.rollback()  # end the read transaction, return the connection
        return states, behind

    def _write(self, reports: dict[str, Report]) -> None:
        """Record the reports the last pass read (not asked again: one backend call per pass), each
        only on the run it was read for (:func:`~cmbcluster.services.status.record_reports`)."""
        with self.sessions() as db, one_writer(db):
            record_reports(db, reports)
            db.commit()


_STATE_QUERY = select(
    Environment.id,
    Environment.user_id,
    Environment.status,
    Environment.status_message,
    Environment.url,
    Environment.desired_state,
    Environment.started_at,
)


def progress_event(status: str, message: str, url: str | None, log: list[str] | None = None) -> dict[str, Any]:
    """What a progress stream sends about an environment; ``log``: the application's last output
    lines, while it starts and when it failed."""
    return {
        "status": status, "message": message, "url": url, "progress": PROGRESS.get(status, 0),
        "at": utcnow().isoformat(), "log": log or [],
    }  # fmt: skip


class StartupOutput:
    """The last output lines of starting environments, read from the backend at most once a second
    per environment however many people watch (reading may be a cluster call, through the kubelet).

    :meth:`lines` never waits for the backend but for a failure's last lines: it answers what was
    last read and notes what is due; :meth:`read_wanted` reads that, in the hub's own thread.
    Thread-safe: the hub reads and refreshes in different threads."""

    def __init__(self, compute: ComputeBackend, *, lines: int = PROGRESS_LOG_LINES) -> None:
        self.compute = compute
        self.count = lines
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, list[str]]] = {}
        self._wanted: set[str] = set()

    @property
    def wanted(self) -> bool:
        """Whether some output is due to be read."""
        return bool(self._wanted)

    def lines(self, environment_id: str, *, fresh: bool = False) -> list[str]:
        """The lines last read (none yet: empty), noting them as due when older than the refresh
        interval; ``fresh``: read now (a failure's last lines)."""
        if fresh:
            return self._read(environment_id)
        with self._lock:
            cached = self._seen.get(environment_id)
            if cached is None or time.monotonic() - cached[0] >= PROGRESS_LOG_REFRESH_SECONDS:
                self._wanted.add(environment_id)
        return cached[1] if cached is not None else []

    def read_wanted(self, reads: int = PROGRESS_LOG_READS_PER_ROUND) -> set[str]:
        """Read up to ``reads`` of the outputs due, those read longest ago first (blocking); the
        environments whose output changed."""
        with self._lock:
            due = sorted(self._wanted, key=lambda i: self._seen[i][0] if i in self._seen else 0.0)[:reads]
            self._wanted.difference_update(due)
            before = {i: self._seen[i][1] for i in due if i in self._seen}
        return {i for i in due if self._read(i) != before.get(i, [])}

    def _read(self, environment_id: str) -> list[str]:
        try:
            text = self.compute.logs(environment_id, tail=self.count)
        except CmbclusterError as exc:
            log.info("no output for environment %s: %s", environment_id, exc.message)
            text = ""
        found = [line[:500] for line in text.splitlines()[-self.count :]]
        now = time.monotonic()
        with self._lock:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < 60}  # forget environments long done
            self._seen[environment_id] = (now, found)
        return found
