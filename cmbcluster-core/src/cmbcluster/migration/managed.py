"""What every managed transfer does the same way, for plugins offering one through the hook
``cmbcluster_managed_transfer`` (first-party and third parties'; public and stable for plugin API 1.x).

A cloud's transfer service (Google's Storage Transfer Service, AWS DataSync, Azure's) runs a job
that is started once and then polled until it ends. A plugin subclasses :class:`PolledTransfer`
and writes only its service's calls: :meth:`~PolledTransfer.start`, :meth:`~PolledTransfer.poll`
and :meth:`~PolledTransfer.cleanup`, each reading the service's answer into a
:class:`TransferStatus`. :meth:`PolledTransfer.run` does the rest, the same for every cloud:

- polls soon after the start (many small jobs end in seconds), then less often, up to
  ``poll_interval``; stops waiting after ``timeout``;
- hands the bytes the service reports, as they grow, to the migration's progress display;
- retries a poll that fails with :class:`~cmbcluster.errors.ProviderUnavailable` or
  :class:`~cmbcluster.errors.LimitExceeded` (after the plugin's client has used up its own
  retries), up to ``poll_failures`` in a row: the job goes on in the service whatever our
  connection does, so a minute of unreachable API must not abandon a day-long transfer. Calls
  made to start the job are not retried here: the plugin's client retries them where repeating
  them is safe (429, 5xx, throttling), and a refusal (403, 400) is final;
- raises ProviderUnavailable saying what failed, with the service's own reason as ``detail``,
  when the job ends in failure (core then does not switch the bucket);
- calls :meth:`~PolledTransfer.cleanup` once however ``run`` ends (the job succeeded, failed,
  timed out, a call was refused, the operator pressed Ctrl-C), so no job and no credentials
  stored in one stay behind; a cleanup failure is logged, never raised over the outcome.

Core verifies the copy from both buckets' listings afterwards: nothing a service reports is taken
as proof (see :mod:`cmbcluster.interfaces.transfer`).
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cmbcluster.errors import CmbclusterError, LimitExceeded, ProviderUnavailable
from cmbcluster.interfaces.transfer import ManagedTransfer

__all__ = ["PolledTransfer", "TransferStatus"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TransferStatus:
    """One reading of a transfer job, in the service's words.

    ``state`` is the service's own status (``TRANSFERRING``, ``IN_PROGRESS``), shown in logs;
    ``done`` says the job ended, ``succeeded`` whether it ended well (read only once done);
    ``bytes_transferred`` is the service's count so far; ``error`` the service's reason for a
    failure (its error codes and messages), which the operator reads.
    """

    state: str
    done: bool = False
    succeeded: bool = False
    bytes_transferred: int = 0
    error: str | None = None


class PolledTransfer(ManagedTransfer):
    """A :class:`~cmbcluster.interfaces.ManagedTransfer` whose service runs a job that is started
    once, then polled until it ends (see the module). Subclasses implement :attr:`what`,
    :meth:`start` and :meth:`poll`, and where they make anything, :meth:`cleanup` and :meth:`close`.

    The timing attributes may be set per instance (tests poll fast).
    """

    #: Seconds between polls once the job has run a while.
    poll_interval: float = 10.0
    #: Seconds before the first poll; doubled after each until ``poll_interval``.
    first_poll_interval: float = 0.5
    #: Seconds to wait for the job in all (then ProviderUnavailable; ``cleanup`` still runs).
    timeout: float = 7 * 24 * 3600.0
    #: Polls in a row that may fail for a moment before ``run`` gives up.
    poll_failures: int = 5
    #: The last status read (``cleanup`` gets it).
    _last: TransferStatus | None = None

    @property
    @abc.abstractmethod
    def what(self) -> str:
        """The transfer, in messages: ``"the transfer of s3://a to gs://b"``."""

    @abc.abstractmethod
    def start(self) -> TransferStatus:
        """Create the service's job and start it; return its first status.

        Where the service lets jobs be found again (by a name or a tag of ours), reuse the one an
        interrupted run left running rather than starting a second. Raise a
        :class:`~cmbcluster.errors.CmbclusterError` (your client's errors mapped) when a call is
        refused.
        """

    @abc.abstractmethod
    def poll(self) -> TransferStatus:
        """Read the job's status once (one API call, retried by your client where safe)."""

    def cleanup(self, status: TransferStatus | None) -> None:
        """Remove what :meth:`start` made (the job; credentials stored in it), once, however
        ``run`` ends: ``status`` is the last one read (None: ``start`` did not finish; not
        ``done``: ``run`` gave up waiting, or was interrupted, so stop the job if the service
        lets you). Best effort: a CmbclusterError raised here is logged."""

    def close(self) -> None:
        """Release the clients (after ``cleanup``)."""

    def run(self, progress: Callable[[int], None] | None = None) -> None:
        self._last = None
        try:
            self._last = self.start()
            self._wait(progress)
        finally:
            try:
                self.cleanup(self._last)
            except CmbclusterError as exc:
                log.warning("%s: could not clean up after it: %s", self.what, exc.message)
            finally:
                self.close()
        last = self._last
        assert last is not None  # start() returned, or run raised above
        if not last.succeeded:
            reason = last.error or f"{self.service} reported {last.state}"
            raise ProviderUnavailable(f"{self.what} failed", detail=reason)

    def _wait(self, progress: Callable[[int], None] | None) -> None:
        """Poll until the job is done (``self._last``), reporting its bytes as they grow."""
        assert self._last is not None
        deadline = time.monotonic() + self.timeout
        delay = min(self.first_poll_interval, self.poll_interval)
        reported = failures = 0
        while True:
            status = self._last
            if progress is not None and status.bytes_transferred > reported:
                progress(status.bytes_transferred - reported)
                reported = status.bytes_transferred
            if status.done:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProviderUnavailable(
                    f"{self.what} did not finish within {self.timeout:.0f} s (last {self.service} status: "
                    f"{status.state}); it is stopped where {self.service} allows it; run `migrate` again"
                )
            time.sleep(min(delay, left))
            delay = min(delay * 2, self.poll_interval)
            try:
                self._last = self.poll()
            except (ProviderUnavailable, LimitExceeded) as exc:
                failures += 1
                if failures > self.poll_failures:
                    raise
                log.warning(
                    "%s: reading its status failed (%s), %d time(s) in a row; the job goes on, polling again",
                    self.what, exc.message, failures,
                )  # fmt: skip
            else:
                failures = 0
