"""PolledTransfer (cmbcluster.migration.managed): what every plugin's managed transfer gets from core,
the waiting, progress, timeout, passing poll failures, the failure's reason and the cleanup, here
with a scripted job (the clouds' own services, on their fakes, are in each plugin's tests)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pytest

from cmbcluster.errors import CmbclusterError, NotFound, PermissionDenied, ProviderUnavailable
from cmbcluster.migration.managed import PolledTransfer, TransferStatus

RUNNING = TransferStatus(state="TRANSFERRING", bytes_transferred=10)


class ScriptedJob(PolledTransfer):
    """Answers ``start`` with the first status (or raises it), then one item of ``script`` per poll."""

    service = "the scripted service"
    first_poll_interval = poll_interval = 0.001

    def __init__(self, script: Iterable[TransferStatus | CmbclusterError], *, cleanup_fails: bool = False) -> None:
        self.script = iter(script)
        self.polls = 0
        self.cleaned: list[TransferStatus | None] = []
        self.closed = False
        self.cleanup_fails = cleanup_fails

    @property
    def what(self) -> str:
        return "the transfer of a to b"

    def _next(self) -> TransferStatus:
        item = next(self.script)
        if isinstance(item, CmbclusterError):
            raise item
        return item

    def start(self) -> TransferStatus:
        return self._next()

    def poll(self) -> TransferStatus:
        self.polls += 1
        return self._next()

    def cleanup(self, status: TransferStatus | None) -> None:
        self.cleaned.append(status)
        if self.cleanup_fails:
            raise NotFound("the job is gone")

    def close(self) -> None:
        self.closed = True


def test_progress_is_the_growth_of_the_services_count_and_the_job_is_cleaned_up_once() -> None:
    done = TransferStatus(state="SUCCESS", done=True, succeeded=True, bytes_transferred=25)
    job = ScriptedJob([TransferStatus(state="QUEUED"), RUNNING, RUNNING, TransferStatus(state="VERIFYING",
                       bytes_transferred=25), done])  # fmt: skip
    reported: list[int] = []
    job.run(reported.append)
    assert reported == [10, 15] and job.polls == 4
    assert job.cleaned == [done] and job.closed


def test_a_failed_job_raises_with_the_services_reason_and_is_cleaned_up() -> None:
    failed = TransferStatus(state="ERROR", done=True, error="S3AccessDenied: cannot write bucket b")
    job = ScriptedJob([RUNNING, failed])
    with pytest.raises(ProviderUnavailable, match="the transfer of a to b failed") as raised:
        job.run()
    assert raised.value.detail == "S3AccessDenied: cannot write bucket b"
    assert job.cleaned == [failed] and job.closed
    quiet = ScriptedJob([TransferStatus(state="ABORTED", done=True)])  # no reason given: its state is said
    with pytest.raises(ProviderUnavailable) as raised:
        quiet.run()
    assert raised.value.detail == "the scripted service reported ABORTED"


def test_polls_failing_for_a_moment_are_tried_again_but_not_forever() -> None:
    blip = ProviderUnavailable("the service answered 503")
    done = TransferStatus(state="SUCCESS", done=True, succeeded=True)
    job = ScriptedJob([RUNNING, *[blip] * PolledTransfer.poll_failures, RUNNING, blip, done])
    job.run()
    assert job.polls == PolledTransfer.poll_failures + 3
    lost = ScriptedJob([RUNNING, *[blip] * (PolledTransfer.poll_failures + 1)])
    with pytest.raises(ProviderUnavailable, match="503"):
        lost.run()
    assert lost.cleaned == [RUNNING]  # not done: the plugin stops the job where its service allows
    refused = ScriptedJob([RUNNING, PermissionDenied("no datasync:DescribeTaskExecution")])
    with pytest.raises(PermissionDenied):  # a refusal is not a moment's failure
        refused.run()
    assert refused.polls == 1


def test_waiting_ends_at_the_timeout_and_a_refused_start_still_cleans_up() -> None:
    job = ScriptedJob([RUNNING] * 10_000)
    job.timeout = 0.05
    with pytest.raises(ProviderUnavailable, match=r"did not finish within 0 s \(last the scripted service status: "
                       "TRANSFERRING\\)"):  # fmt: skip
        job.run()
    assert job.cleaned == [RUNNING] and job.closed
    refused = ScriptedJob([PermissionDenied("no datasync:CreateTask")])
    with pytest.raises(PermissionDenied, match="datasync:CreateTask"):
        refused.run()
    assert refused.cleaned == [None] and refused.closed


def test_a_cleanup_failure_is_logged_not_raised_over_the_outcome(caplog: pytest.LogCaptureFixture) -> None:
    job = ScriptedJob([TransferStatus(state="SUCCESS", done=True, succeeded=True)], cleanup_fails=True)
    with caplog.at_level(logging.WARNING, logger="cmbcluster.migration.managed"):
        job.run()
    assert "the transfer of a to b: could not clean up after it: the job is gone" in caplog.text
