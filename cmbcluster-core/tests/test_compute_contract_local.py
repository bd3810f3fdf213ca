"""The embedded default's compute backend, environments as local processes, under the compute
contract (:mod:`cmbcluster.testing.compute`); its own behaviour is tested in test_local_compute.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from cmbcluster.interfaces import ComputeBackend, EnvironmentSpec, UserRef
from cmbcluster.local.compute import LocalProcessCompute
from cmbcluster.testing.compute import ComputeBackendContract, SpecFactory


class TestLocalProcessCompute(ComputeBackendContract):
    runs_applications = True  # real processes on this machine, reached through upstream()

    @pytest.fixture
    def compute_backend(self, tmp_path: Path) -> Iterator[ComputeBackend]:
        backend = LocalProcessCompute(tmp_path / "compute")
        yield backend
        backend.close()

    @pytest.fixture
    def environment_spec(self) -> SpecFactory:
        def spec(environment_id: str, user: UserRef, python_arguments: Sequence[str]) -> EnvironmentSpec:
            # no image: the command runs with the server's own interpreter
            return EnvironmentSpec(
                environment_id=environment_id, user=user, image="", command=(sys.executable, *python_arguments)
            )

        return spec

    @pytest.fixture
    def start_timeout(self) -> float:
        return 20.0
