"""The progress hub's view of what starting applications print: read in the background, paced,
and a change only when the lines changed."""

from __future__ import annotations

from cmbcluster.interfaces import ComputeBackend, EnvironmentPhase, EnvironmentSpec, EnvironmentStatus
from cmbcluster.services.progress import StartupOutput


class PrintingCompute(ComputeBackend):
    """Environments that print what ``printed`` says; counts the log reads (a cluster call each)."""

    def __init__(self) -> None:
        self.printed: dict[str, str] = {}
        self.reads: list[str] = []

    def logs(self, environment_id: str, *, tail: int = 200) -> str:
        self.reads.append(environment_id)
        return self.printed.get(environment_id, "")

    def start(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        raise NotImplementedError

    def stop(self, environment_id: str) -> None:
        raise NotImplementedError

    def status(self, environment_id: str) -> EnvironmentStatus:
        return EnvironmentStatus(environment_id=environment_id, phase=EnvironmentPhase.STARTING)

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
    assert output.read_wanted() is True and compute.reads == ["a"]
    assert output.lines("a") == ["loading the maps"] and compute.reads == ["a"]  # read within the second: not again
    assert not output.wanted


def test_an_application_that_printed_nothing_is_no_change() -> None:
    """A change wakes every stream's next pass: 200 quiet starts must not keep the hub busy."""
    compute = PrintingCompute()
    output = StartupOutput(compute)
    for environment_id in ("a", "b", "c"):
        output.lines(environment_id)
    assert output.read_wanted() is False
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
    assert output.read_wanted() is True
    assert sorted(compute.reads) == ["a", "b"] and output.lines("b") == ["two"]


def test_a_failures_last_lines_are_read_at_once() -> None:
    compute = PrintingCompute()
    compute.printed["a"] = "config error: no such catalog file\n"
    output = StartupOutput(compute)
    assert output.lines("a", fresh=True) == ["config error: no such catalog file"]
    assert compute.reads == ["a"]
