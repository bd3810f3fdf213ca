"""The built-in ``local`` provider, and core's own folder provisioner, under every contract suite
of :mod:`cmbcluster.testing` that applies to them (storage runs in test_local_storage.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from cmbcluster.config import resolve
from cmbcluster.interfaces import CloudIdentity, InfraProvider, ProvisioningOptions, StorageBackend, UserRef
from cmbcluster.local.infra import LocalInfra
from cmbcluster.local.storage import LocalStorage
from cmbcluster.plugins import PluginManager
from cmbcluster.provisioning import ProvisioningRecord
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.deploy import chart_values, schema_problems
from cmbcluster.testing.infra import InfraProviderContract
from cmbcluster.testing.lifecycle import LifecycleContract
from cmbcluster.testing.pods import PodDecorationContract
from cmbcluster.testing.provisioning import FolderProvisioner, Inventory, ProvisionerContract


class TestLocalInfraContract(InfraProviderContract):
    gives_identities = False  # environments run as the control plane's own operating-system user

    @pytest.fixture
    def infra_provider(self) -> InfraProvider:
        return LocalInfra("localhost")

    @pytest.fixture
    def storage_backend(self, tmp_path: Path) -> StorageBackend:
        return LocalStorage(tmp_path / "buckets")

    def reachable_buckets(self, identity: CloudIdentity, candidates: Sequence[str]) -> set[str]:
        raise AssertionError("local gives no identities: never asked")


class TestLocalLifecycleContract(LifecycleContract):
    gives_identities = False

    @pytest.fixture
    def infra_provider(self) -> InfraProvider:
        return LocalInfra("localhost")


class IdentityGivingInfra(LocalInfra):
    """The local infra with a (pretend) identity per user: core's calls for a cloud that gives them."""

    def ensure_user_identity(self, user: UserRef, *, namespace: str) -> CloudIdentity | None:
        return CloudIdentity(user=user, principal=f"user:{user.id}")


class TestIdentityLifecycleContract(LifecycleContract):
    @pytest.fixture
    def infra_provider(self) -> InfraProvider:
        return IdentityGivingInfra("localhost")


class TestLocalPodContract(PodDecorationContract):
    """Pods on local folders: every installed plugin's decorator leaves them valid (and alone)."""

    provider_name = "local"

    @pytest.fixture
    def storage_backend(self, tmp_path: Path) -> StorageBackend:
        return LocalStorage(tmp_path / "buckets")


class TestFolderProvisionerContract(ProvisionerContract):
    """The suite itself, and core's engine under it, on the provisioner a plugin starts from."""

    @pytest.fixture
    def provisioner(self, tmp_path: Path) -> FolderProvisioner:
        return FolderProvisioner(tmp_path / "cloud")

    @pytest.fixture
    def inventory(self, provisioner: FolderProvisioner) -> Inventory:
        return provisioner.inventory


class ForgetfulProvisioner(FolderProvisioner):
    """A provisioner that does not look before it creates: every rerun makes the resource again."""

    def _path(self, kind: str, name: str) -> Path:
        path = super()._path(kind, name)
        n = 0
        while path.with_suffix(f".{n}.json").exists():
            n += 1
        return path.with_suffix(f".{n}.json")


def test_the_suite_catches_a_provisioner_that_creates_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    provisioner = ForgetfulProvisioner(tmp_path / "cloud")
    record = ProvisioningRecord.for_deployment(tmp_path / "infra", provider="folder", deployment="cmbcluster")
    with pytest.raises(AssertionError, match="not found again"):
        TestFolderProvisionerContract().test_a_crash_between_create_and_record_is_adopted_on_rerun(
            provisioner, provisioner.inventory, record, ProvisioningOptions(addons="skip"), monkeypatch, None
        )


def test_the_deploy_suite_refuses_values_the_chart_does_not_know(tmp_path: Path) -> None:
    config = resolve(CoreSettings(data_dir=tmp_path / "data"), PluginManager(entry_points_enabled=False))
    labels = {"controlPlane": {"podLabels": {"azure.workload.identity/use": "true"}}}
    assert schema_problems(chart_values(config, labels)) == []
    problems = schema_problems(chart_values(config, {"controlPlane": {"podLabelz": {"a": "b"}}}))
    assert len(problems) == 1 and "podLabelz" in problems[0]
