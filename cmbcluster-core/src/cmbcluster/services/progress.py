"""Progress of starting environments, for the streams that follow it (``GET .../events``).

An open stream holds nothing while it waits: no database connection, no worker thread. One
:class:`ProgressHub` per control-plane process does the work for every stream of that process:

- it wakes up when the compute backend reports a change (the Kubernetes backend's watch calls the
  listener registered with ``ComputeBackend.on_status_change``), when this process changed an
  environment itself (:meth:`ProgressHub.notify`), and at the latest every ``poll_seconds``;
- then, in one worker-thread hop and one short database session, it reads every environment
  that streams follow, records what the backend now reports for those still starting (as the
  reconcile loop does), and hands each stream its new state.

Changes made by another replica reach this one through the database, which every replica reads
at that interval: a replica that does not reconcile still sees every change. (PostgreSQL's
LISTEN/NOTIFY would save that read; one batched read a second per replica is cheap enough.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from cmbcluster.context import AppContext
from cmbcluster.db.models import Environment, utcnow
from cmbcluster.services import environments as envs

log = logging.getLogger(__name__)

#: How far along each status is, for the launch dialog's bar.
PROGRESS = {"stopped": 0, "pending": 10, "starting": 50, "running": 100, "failed": 100, "stopping": 50}
#: A stream ends once its environment reaches one of these.
TERMINAL = ("running", "stopped", "failed")
#: Environments read per query (well under every database's bound-parameter limit).
BATCH = 500


@dataclass(eq=False)
class Subscription:
    """One stream's view of one environment: the newest state, and a signal when it changes."""

    environment_id: str
    user_id: str
    latest: dict[str, Any] | None = None  #: None: deleted, or not this user's
    seen: bool = False  #: a first state has been read
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _key: tuple[object, ...] | None = None

    def offer(self, event: dict[str, Any] | None) -> None:
        key = None if event is None else (event["status"], event["message"], event["url"])
        if self.seen and key == self._key:
            return
        self.seen, self._key, self.latest = True, key, event
        self.changed.set()


class ProgressHub:
    def __init__(self, context: AppContext, *, poll_seconds: float = 0.5) -> None:
        self.context = context
        self.poll_seconds = poll_seconds
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- streams -------------------------------------------------------------------------------
    def subscribe(self, environment_id: str, user_id: str) -> Subscription:
        subscription = Subscription(environment_id, user_id)
        self._subscriptions.setdefault(environment_id, set()).add(subscription)
        self.notify()  # its first state comes with the next pass, at once
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        followers = self._subscriptions.get(subscription.environment_id)
        if followers is not None:
            followers.discard(subscription)
            if not followers:
                del self._subscriptions[subscription.environment_id]

    @property
    def followed(self) -> int:
        """How many streams are open (a gauge for /metrics and the benchmarks)."""
        return sum(len(s) for s in self._subscriptions.values())

    # -- changes ---------------------------------------------------------------------------------
    def notify(self, environment_id: str | None = None) -> None:
        """Something may have changed: look now. Safe from any thread (the backend's watch)."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        if environment_id is not None and environment_id not in self._subscriptions:
            return  # nobody follows it: nothing to do
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop is shutting down
            pass

    async def run(self, stop: asyncio.Event) -> None:
        """The hub's one task; ends when ``stop`` is set."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.context.compute.on_status_change(self.notify)
        stopper = asyncio.create_task(self._wake_on(stop))
        try:
            await self._serve(stop)
        finally:
            stopper.cancel()
            self._loop = None

    async def _serve(self, stop: asyncio.Event) -> None:
        assert self._wake is not None
        while not stop.is_set():
            timeout = self.poll_seconds if self._subscriptions else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            except TimeoutError:
                pass
            self._wake.clear()
            if stop.is_set() or not self._subscriptions:
                continue
            followed = list(self._subscriptions)
            try:
                states = await run_in_threadpool(self._read, followed)
            except Exception:  # a database hiccup: the next pass tries again
                log.exception("reading the progress of starting environments failed")
                await asyncio.sleep(self.poll_seconds)
                continue
            # Only what was read: a stream that subscribed meanwhile gets its state next pass.
            for environment_id in followed:
                state = states.get(environment_id)
                for subscription in list(self._subscriptions.get(environment_id, ())):
                    owned = state is not None and state["user_id"] == subscription.user_id
                    subscription.offer(state["event"] if owned and state is not None else None)

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        if self._wake is not None:
            self._wake.set()

    def _read(self, environment_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The followed environments' states (blocking: one short session for all of them)."""
        states: dict[str, dict[str, Any]] = {}
        with self.context.sessions() as db:
            for batch in _batches(environment_ids, BATCH):
                changed = False
                for env in db.execute(select(Environment).where(Environment.id.in_(batch))).scalars():
                    if env.status in ("pending", "starting"):
                        changed |= envs.apply_status(db, env, self.context.compute.status(env.id))
                    states[env.id] = {"user_id": env.user_id, "event": progress_event(env)}
                if changed:
                    db.commit()
            db.rollback()  # nothing else to write: end the read transaction, return the connection
        return states


def progress_event(env: Environment) -> dict[str, Any]:
    """What a progress stream sends about an environment."""
    return {
        "status": env.status, "message": env.status_message, "url": env.url,
        "progress": PROGRESS.get(env.status, 0), "at": utcnow().isoformat(),
    }  # fmt: skip


def _batches(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
