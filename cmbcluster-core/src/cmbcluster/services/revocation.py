"""Long-lived responses end once their caller's session or API token stops working.

A sign-out, a revoked API token, a deactivated or deleted account refuse the very next request
(:func:`cmbcluster.services.sessions.authenticate`); the responses that outlive a request (progress
streams, WebSockets through the proxy) must end as promptly, yet hold nothing while they wait (no
database connection, no thread per open response: issue 16). One :class:`RevocationWatch` per
control-plane process does it for all of them:

- each such response *holds* its credential while it lasts (:meth:`RevocationWatch.hold`), with what
  to do once the credential stops working (a progress stream sends a last event saying why; a
  WebSocket closes with 1008 and the reason);
- a revocation made through this process ends the holds it concerns at once, in memory
  (:meth:`RevocationWatch.ended`: the sign-out and token revocation routes, deactivation, deletion),
  before what follows it runs (a deactivation then stops the user's environments: the stream says
  that the account was deactivated, not merely that the environment stopped);
- a revocation this process does not see (made through another replica, or by a session expiring)
  is found by a periodic check: every :data:`CHECK_SECONDS`, one short read of every held credential
  at once, in a thread of its own, by the same rules as a request (:func:`sessions.refusal`), the
  connection returned at once.

Why a periodic read rather than a message between replicas: replicas share nothing but the database
(the progress hub learns other replicas' changes the same way), a read needs no PostgreSQL-only
LISTEN/NOTIFY, and it also catches expiries. It costs one query per process every few seconds
whatever the number of open responses (1,000 streams of 200 users: one read of 200 sessions), not one
per response. In-memory events alone would miss the other replicas; the check alone would make a
sign-out wait up to :data:`CHECK_SECONDS`, and lose the race against a deactivation's own stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.errors import CmbclusterError
from cmbcluster.services import sessions
from cmbcluster.services.sessions import Credential

log = logging.getLogger(__name__)

#: How often open responses' credentials are read again: how long a revocation made elsewhere (another
#: replica) or an expiry takes at most to end them; well within a progress stream's keep-alive (15 s).
CHECK_SECONDS = 5.0


@dataclass(eq=False)
class Hold:
    """One open response's claim on its credential."""

    credential: Credential
    #: called once, on the event loop, with why the credential stopped working
    on_end: Callable[[str], None]


class RevocationWatch:
    def __init__(self, sessions: sessionmaker[Session], *, check_seconds: float = CHECK_SECONDS) -> None:
        self.sessions = sessions
        self.check_seconds = check_seconds
        self._holds: dict[Credential, set[Hold]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- open responses (on the event loop) ----------------------------------------------------------
    def hold(self, credential: Credential, on_end: Callable[[str], None]) -> Hold:
        hold = Hold(credential, on_end)
        self._holds.setdefault(credential, set()).add(hold)
        return hold

    def release(self, hold: Hold) -> None:
        holds = self._holds.get(hold.credential)
        if holds is not None:
            holds.discard(hold)
            if not holds:
                del self._holds[hold.credential]

    @property
    def held(self) -> int:
        """How many open responses hold a credential."""
        return sum(len(holds) for holds in self._holds.values())

    # -- revocations ---------------------------------------------------------------------------------
    def ended(
        self, why: str, *, session_id: str | None = None, token_id: str | None = None, user_id: str | None = None
    ) -> None:
        """A session, an API token, or every credential of a user, stopped working through this
        process (committed): end their open responses now. Safe from any thread (routes run in
        worker threads); the holds end on the event loop, in the order of the calls."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # not serving: no response is open

        def concerns(credential: Credential) -> bool:
            return (
                (credential.kind == "session" and credential.id == session_id)
                or (credential.kind == "api_token" and credential.id == token_id)
                or credential.user_id == user_id
            )

        def end() -> None:
            for credential in [c for c in self._holds if concerns(c)]:
                self._end(credential, why)

        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(end)

    def _end(self, credential: Credential, why: str) -> None:
        for hold in self._holds.pop(credential, ()):
            try:
                hold.on_end(why)
            except Exception:  # one response's failure never keeps the others open
                log.exception("ending an open response of a revoked credential failed")

    # -- the periodic check --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """The watch's one task; ends when ``stop`` is set."""
        self._loop = asyncio.get_running_loop()
        # A thread of its own: never queued behind requests in the shared worker pool.
        reader = anyio.CapacityLimiter(1)
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.check_seconds)
                if stop.is_set() or not self._holds:
                    continue
                try:
                    refused = await anyio.to_thread.run_sync(self._check, list(self._holds), limiter=reader)
                except Exception:  # a database hiccup: the next check tries again
                    log.warning("checking the credentials of open responses failed", exc_info=True)
                    continue
                for credential, error in refused.items():
                    self._end(credential, error.message)
        finally:
            self._loop = None

    def _check(self, credentials: list[Credential]) -> dict[Credential, CmbclusterError]:
        with self.sessions() as db:
            refused = sessions.refusals(db, credentials)
            db.rollback()  # end the read transaction, return the connection
        return refused
