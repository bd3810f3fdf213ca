"""The provisioner contract: what every :class:`~cmbcluster.interfaces.Provisioner` must do under
core's engine (``cmbcluster infra plan | up | down``).

``plan`` changes nothing; ``up`` is idempotent and resumable, also after the process died between a
cloud's create call and the record being written; ``down`` removes exactly what ``up`` made, also
after a partial ``up``, and can be rerun. Subclass, provide ``provisioner`` and ``inventory`` (a
function that counts the deployment's resources in the cloud, by kind, read from the cloud itself)::

    from cmbcluster.testing.provisioning import ProvisionerContract

    class TestAzureProvisioner(ProvisionerContract):
        @pytest.fixture
        def provisioner(self, azure):
            return AzureProvisioner(...)

        @pytest.fixture
        def inventory(self, azure):
            return lambda: {"resource-groups": len(azure.resource_groups()), ...}

:class:`Events` records the engine's progress events; :class:`~cmbcluster.local.FolderProvisioner`
is a provisioner whose "cloud" is a folder (each resource a file): a plugin starts from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from cmbcluster.errors import ProviderUnavailable
from cmbcluster.interfaces import (
    PlannedStep,
    ProgressEvent,
    Provisioner,
    ProvisioningOptions,
    ResourceRecord,
    StepContext,
)
from cmbcluster.interfaces.provisioning import ProgressAction
from cmbcluster.local.provisioning import FolderProvisioner
from cmbcluster.provisioning import ProvisioningRecord, down, status, up

__all__ = ["Events", "FolderProvisioner", "Inventory", "ProvisionerContract", "SimulatedCrash", "interrupt"]

Inventory = Callable[[], Mapping[str, int]]


class Events(list[ProgressEvent]):
    """A progress callback that keeps every event: ``up(..., progress=events)``."""

    def __call__(self, event: ProgressEvent) -> None:
        self.append(event)

    def actions(self, action: str) -> list[str]:
        """The messages of the events of one action (``created``, ``adopted``, ``gone``...)."""
        return [e.message for e in self if e.action == action]


class SimulatedCrash(Exception):
    """The process dying between a cloud call and the record being written."""


class _CrashBeforeRecord(StepContext):
    """Core's step context, except that the first resource reported created is never recorded:
    the cloud made it, then the process died."""

    def __init__(self, real: StepContext) -> None:
        self.real, self.step, self.record, self.options = real, real.step, real.record, real.options

    def emit(self, action: ProgressAction, message: str) -> None:
        self.real.emit(action, message)

    def created(self, resource: ResourceRecord) -> ResourceRecord:
        raise SimulatedCrash(resource.label)

    def adopted(self, resource: ResourceRecord) -> ResourceRecord:
        return self.real.adopted(resource)

    def run(self, argv: Sequence[str], *, input_text: str | None = None, timeout: float = 1800) -> bool:
        return self.real.run(argv, input_text=input_text, timeout=timeout)


def interrupt(
    provisioner: Provisioner, monkeypatch: pytest.MonkeyPatch, *, at: str, crash_before_record: bool = False
) -> None:
    """Make ``up`` fail once at step ``at``: with a cloud error before the step does anything, or
    (``crash_before_record``) as a process dying right after the step's first create call."""
    real = provisioner.apply_step
    armed = {"on": True}

    def apply_step(step: PlannedStep, job: StepContext) -> None:
        if step.name != at or not armed["on"]:
            return real(step, job)
        armed["on"] = False
        if not crash_before_record:
            raise ProviderUnavailable(f"injected failure before step {at}")
        return real(step, _CrashBeforeRecord(job))

    monkeypatch.setattr(provisioner, "apply_step", apply_step)


class ProvisionerContract:
    """Subclass it; provide ``provisioner`` and ``inventory``. Set ``interrupt_at`` to a step that
    creates a resource (default: the middle one of the steps that are not add-ons)."""

    interrupt_at: str | None = None

    @pytest.fixture
    def provisioner(self) -> Provisioner:
        raise NotImplementedError("provide a provisioner fixture in your subclass")

    @pytest.fixture
    def inventory(self) -> Inventory:
        raise NotImplementedError("provide an inventory fixture: counts of the deployment's resources in the cloud")

    @pytest.fixture
    def record(self, provisioner: Provisioner, tmp_path: Path) -> ProvisioningRecord:
        return ProvisioningRecord.for_deployment(
            tmp_path / "infra", provider=provisioner.provider or "contract", deployment=provisioner.deployment
        )

    @pytest.fixture
    def full_inventory(self) -> Mapping[str, int] | None:
        """What ``inventory`` counts after a whole ``up``, when you know it (saves the suite a run to learn it)."""
        return None

    @pytest.fixture
    def options(self) -> ProvisioningOptions:
        """How ``up`` runs: add-ons (helm against the new cluster) skipped unless you override it."""
        return ProvisioningOptions(addons="skip")

    @staticmethod
    def _full(
        known: Mapping[str, int] | None,
        provisioner: Provisioner,
        inventory: Inventory,
        record: ProvisioningRecord,
        options: ProvisioningOptions,
    ) -> dict[str, int]:
        if known is not None:
            return dict(known)
        up(provisioner, record, options)
        full = dict(inventory())
        down(provisioner, record, options)
        return full

    def _middle(self, provisioner: Provisioner) -> str:
        if self.interrupt_at is not None:
            return self.interrupt_at
        steps = [s.name for s in provisioner.plan() if not s.external]
        assert steps, "the plan has no step that is not an add-on"
        return steps[len(steps) // 2]

    @staticmethod
    def _is_empty(counts: Mapping[str, int]) -> bool:
        return not any(counts.values())

    def test_plan_names_every_step_and_changes_nothing(self, provisioner: Provisioner, inventory: Inventory) -> None:
        before = dict(inventory())
        steps = provisioner.plan()
        assert steps, "an empty plan"
        names = [s.name for s in steps]
        assert len(set(names)) == len(names), f"step names repeat: {names}"
        assert all(s.description for s in steps)
        assert dict(inventory()) == before

    def test_up_creates_then_down_removes_exactly_what_up_made(
        self,
        provisioner: Provisioner,
        inventory: Inventory,
        record: ProvisioningRecord,
        options: ProvisioningOptions,
        full_inventory: Mapping[str, int] | None,
    ) -> None:
        empty = dict(inventory())
        events = Events()
        up(provisioner, record, options, progress=events)
        full = dict(inventory())
        assert full != empty and events.actions("created")
        if full_inventory is not None:
            assert full == dict(full_inventory)
        assert all(provisioner.resource_exists(r) for r in record.resources)
        states = {s.step: s.state for s in status(provisioner, record)}
        assert all(states[s.name] == "done" for s in provisioner.plan() if not s.external)
        down(provisioner, record, options)
        assert dict(inventory()) == empty and record.resources == []
        down(provisioner, record, options)  # rerunnable: nothing left to do
        assert dict(inventory()) == empty

    def test_rerunning_up_creates_nothing_twice(
        self, provisioner: Provisioner, inventory: Inventory, record: ProvisioningRecord, options: ProvisioningOptions
    ) -> None:
        up(provisioner, record, options)
        full = dict(inventory())
        recorded = len(record.resources)
        events = Events()
        up(provisioner, record, options, progress=events)
        assert events.actions("created") == []
        assert dict(inventory()) == full and len(record.resources) == recorded
        down(provisioner, record, options)

    def test_up_failing_midway_resumes_without_duplicates(
        self,
        provisioner: Provisioner,
        inventory: Inventory,
        record: ProvisioningRecord,
        options: ProvisioningOptions,
        monkeypatch: pytest.MonkeyPatch,
        full_inventory: Mapping[str, int] | None,
    ) -> None:
        full = self._full(full_inventory, provisioner, inventory, record, options)
        at = self._middle(provisioner)
        interrupt(provisioner, monkeypatch, at=at)
        first = Events()
        with pytest.raises(ProviderUnavailable):
            up(provisioner, record, options, progress=first)
        assert at not in record.completed_steps
        second = Events()
        up(provisioner, record, options, progress=second)
        assert not set(first.actions("created")) & set(second.actions("created"))
        assert dict(inventory()) == full
        down(provisioner, record, options)

    def test_a_crash_between_create_and_record_is_adopted_on_rerun(
        self,
        provisioner: Provisioner,
        inventory: Inventory,
        record: ProvisioningRecord,
        options: ProvisioningOptions,
        monkeypatch: pytest.MonkeyPatch,
        full_inventory: Mapping[str, int] | None,
    ) -> None:
        empty = dict(inventory())
        full = self._full(full_inventory, provisioner, inventory, record, options)
        interrupt(provisioner, monkeypatch, at=self._middle(provisioner), crash_before_record=True)
        with pytest.raises(SimulatedCrash):
            up(provisioner, record, options)
        events = Events()
        up(provisioner, record, options, progress=events)
        assert events.actions("adopted"), "the resource made before the crash was not found again"
        assert dict(inventory()) == full  # found again by name or tag: no duplicate
        down(provisioner, record, options)
        assert dict(inventory()) == empty

    def test_down_after_a_partial_up_removes_what_exists(
        self,
        provisioner: Provisioner,
        inventory: Inventory,
        record: ProvisioningRecord,
        options: ProvisioningOptions,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        empty = dict(inventory())
        interrupt(provisioner, monkeypatch, at=self._middle(provisioner))
        with pytest.raises(ProviderUnavailable):
            up(provisioner, record, options)
        assert dict(inventory()) != empty, "nothing was made before the middle step"
        down(provisioner, record, options)
        assert dict(inventory()) == empty and record.resources == []
