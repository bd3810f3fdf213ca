"""The progress hub: which environments a pass reads, and its view of what starting applications
print (read in the background, paced, and a change only when the lines changed)."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from cmbcluster.db import create_db_engine, upgrade
from cmbcluster.db.engine import session_factory
from cmbcluster.db.models import Application, Environment, User
from cmbcluster.interfaces import ComputeBackend, EnvironmentPhase, EnvironmentSpec, EnvironmentStatus
from cmbcluster.services.progress import ProgressHub, StartupOutput
from cmbcluster.services.status import Report


class PrintingCompute(ComputeBackend):
    """Environments that print what ``printed`` says and report what ``messages`` says; counts the log
    reads and status calls (each a cluster call on some backends)."""

    def __init__(self) -> None:
        self.printed: dict[str, str] = {}
        self.reads: list[str] = []
        self.messages: dict[str, str] = {}  #: what status() says of each environment
        self.asked: collections.Counter[str] = collections.Counter()  #: status() calls, by environment

    def logs(self, environment_id: str, *, tail: int = 200) -> str:
        self.reads.append(environment_id)
        return self.printed.get(environment_id, "")

    def start(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        raise NotImplementedError

    def stop(self, environment_id: str) -> None:
        raise NotImplementedError

    def status(self, environment_id: str) -> EnvironmentStatus:
        self.asked[environment_id] += 1
        message = self.messages.get(environment_id, "")
        return EnvironmentStatus(environment_id=environment_id, phase=EnvironmentPhase.STARTING, message=message)

    def list_managed(self) -> list[EnvironmentStatus]:
        return []

    def delete(self, environment_id: str) -> None:
        raise NotImplementedError


def test_lines_answer_what_was_last_read_and_never_wait_for_the_cluster() -> None:
    compute = PrintingCompute()
    compute.printed["a"] = "loading the maps\n"
    output = StartupOutput(compute)
    assert output.lines("a") == [] and compute.reads == []  # nothing read yet; now due
    assert output.wanted
    assert output.read_wanted() == {"a"} and compute.reads == ["a"]
    assert output.lines("a") == ["loading the maps"] and compute.reads == ["a"]  # read within the second: not again
    assert not output.wanted


def test_an_application_that_printed_nothing_is_no_change() -> None:
    """A change wakes every stream's next pass: 200 quiet starts must not keep the hub busy."""
    compute = PrintingCompute()
    output = StartupOutput(compute)
    for environment_id in ("a", "b", "c"):
        output.lines(environment_id)
    assert output.read_wanted() == set()
    assert sorted(compute.reads) == ["a", "b", "c"]


def test_a_round_reads_at_most_its_share_the_longest_unread_first() -> None:
    compute = PrintingCompute()
    output = StartupOutput(compute)
    output.lines("old")
    output.read_wanted()
    output._seen["old"] = (1.0, [])  # read long ago
    for environment_id in ("old", "new1", "new2", "new3"):
        output.lines(environment_id)
    compute.reads.clear()
    output.read_wanted(reads=2)
    assert set(compute.reads) <= {"new1", "new2", "new3"} and len(compute.reads) == 2  # never read: first
    output.read_wanted(reads=2)
    assert sorted(compute.reads) == ["new1", "new2", "new3", "old"]


def test_a_round_reads_every_output_it_takes_though_the_first_changed() -> None:
    compute = PrintingCompute()
    compute.printed = {"a": "one\n", "b": "two\n"}
    output = StartupOutput(compute)
    output.lines("a"), output.lines("b")
    assert output.read_wanted() == {"a", "b"}
    assert sorted(compute.reads) == ["a", "b"] and output.lines("b") == ["two"]


def test_a_failures_last_lines_are_read_at_once() -> None:
    compute = PrintingCompute()
    compute.printed["a"] = "config error: no such catalog file\n"
    output = StartupOutput(compute)
    assert output.lines("a", fresh=True) == ["config error: no such catalog file"]
    assert compute.reads == ["a"]


def starting_environments(
    tmp_path: Path, names: list[str], **fields: Any
) -> tuple[Engine, sessionmaker[Session], str, list[str]]:
    """A database with one user's environments of ``names``, starting (``fields`` set on each):
    (engine, sessions, user id, environment ids)."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions() as db:
        user = User(email="ada@example.org", name="Ada", auth_provider="local", subject="ada")
        app = Application(slug="lab", name="Lab", image="x")
        db.add_all([user, app])
        db.flush()
        envs = [Environment(user_id=user.id, application_id=app.id, name=name, backend="test", status="starting",
                            **fields) for name in names]  # fmt: skip
        db.add_all(envs)
        db.commit()
        return engine, sessions, user.id, [env.id for env in envs]


def test_a_reported_change_is_read_alone_and_an_unreported_one_within_the_poll_interval(tmp_path: Path) -> None:
    """A burst of starts reports hundreds of changes: each is read alone, not with every followed
    environment (which made the hub's passes cost as much as the starts). A change nobody reports
    (another replica's, a backend without a watch) still reaches its stream within the poll
    interval, however busy the reported ones keep the hub."""
    engine, sessions, user_id, (busy, quiet) = starting_environments(tmp_path, ["busy", "quiet"])
    compute = PrintingCompute()
    hub = ProgressHub(sessions, compute, poll_seconds=0.3, max_poll_seconds=0.3)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        running = asyncio.create_task(hub.run(stop))
        await asyncio.sleep(0)  # the hub is listening
        followers = [hub.subscribe(environment_id, user_id) for environment_id in (busy, quiet)]
        for follower in followers:
            await asyncio.wait_for(follower.changed.wait(), timeout=5)  # first states
            follower.changed.clear()
        compute.asked.clear()
        compute.messages[quiet] = "pulling the image"  # nobody reports this one
        began = loop.time()
        while not followers[1].changed.is_set() and loop.time() - began < 5:
            hub.notify(busy)  # while changes of the other keep coming
            await asyncio.sleep(0.01)
        took = loop.time() - began
        stop.set()
        await running
        assert followers[1].latest is not None and followers[1].latest["message"] == "pulling the image"
        return took

    took = asyncio.run(scenario())
    assert took < 0.3 + 0.5, took  # within the poll interval, and a pass
    # the reported one read at every pass, the other at the poll interval only
    assert compute.asked[busy] >= 5 * compute.asked[quiet] >= 5, compute.asked
    engine.dispose()


def test_a_burst_of_reported_changes_is_read_in_a_few_passes(tmp_path: Path) -> None:
    """200 starts at once report hundreds of changes a second (each pod's watch events); each made
    a pass of its own, a read transaction and a thread hop each (and a write for each end). Passes
    come at most every MIN_PASS_SECONDS: what is reported meanwhile is read together."""
    from cmbcluster.services.progress import MIN_PASS_SECONDS

    engine, sessions, user_id, envs = starting_environments(tmp_path, [f"e{i}" for i in range(100)])
    hub = ProgressHub(sessions, PrintingCompute(), poll_seconds=5, max_poll_seconds=5)  # no pass by the clock
    passes: list[int] = []
    read = hub._read

    def counted(environment_ids: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Report]]:
        passes.append(len(environment_ids))
        return read(environment_ids)

    hub._read = counted  # type: ignore[method-assign]

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        running = asyncio.create_task(hub.run(stop))
        await asyncio.sleep(0)
        followers = [hub.subscribe(environment_id, user_id) for environment_id in envs]
        for follower in followers:
            await asyncio.wait_for(follower.changed.wait(), timeout=5)  # first states
        passes.clear()
        began = loop.time()
        for environment_id in envs:  # a report every 2 ms, as a burst's watch events come
            hub.notify(environment_id)
            await asyncio.sleep(0.002)
        await asyncio.sleep(2 * MIN_PASS_SECONDS)  # the last pass
        took = loop.time() - began
        stop.set()
        await running
        return took

    took = asyncio.run(scenario())
    assert sum(passes) >= 100, passes  # every change read
    assert len(passes) <= took / MIN_PASS_SECONDS + 2, (len(passes), took)
    engine.dispose()


class EndedCompute(PrintingCompute):
    """Every environment's run has ended (what the backend says just after a stop)."""

    def status(self, environment_id: str) -> EnvironmentStatus:
        return EnvironmentStatus(environment_id=environment_id, phase=EnvironmentPhase.STOPPED)


def test_a_report_is_recorded_only_on_the_run_it_was_read_for(tmp_path: Path) -> None:
    """A pass reads "stopped" for a starting run; before it is recorded (in the background, up to a
    second later), the environment is restarted and its new run recorded starting. Given the old
    run's end, the new run was marked stopped while it ran, then stopped for real by the reconcile
    loop (an outsider's trial: a restart answered "starting", then "stopped", with no message)."""
    import datetime as dt

    first_run = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
    engine, sessions, _, (env_id,) = starting_environments(
        tmp_path, ["lab"], desired_state="running", started_at=first_run
    )
    hub = ProgressHub(sessions, EndedCompute())
    _, behind = hub._read([env_id])
    assert set(behind) == {env_id}  # the old run's end, to record
    with sessions() as db:  # meanwhile: restarted, the new run recorded starting
        row = db.get(Environment, env_id)
        assert row is not None
        row.started_at, row.status = first_run + dt.timedelta(seconds=5), "starting"
        db.commit()
    hub._write(behind)
    with sessions() as db:
        row = db.get(Environment, env_id)
        assert row is not None and row.status == "starting"
    hub._write(hub._read([env_id])[1])  # read for the new run, it is recorded
    with sessions() as db:
        row = db.get(Environment, env_id)
        assert row is not None and row.status == "stopped"
    engine.dispose()
