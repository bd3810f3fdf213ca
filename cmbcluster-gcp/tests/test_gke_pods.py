"""The GKE pod decoration (``cmbcluster_decorate_pod``), run through the plugin manager as core runs it."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest

from cmbcluster.interfaces import CloudIdentity, MountRequest, PodContext, PodDraft, StorageBackend, UserRef
from cmbcluster.plugins import PluginManager
from cmbcluster.testing.pods import PodDecorationContract
from cmbcluster_gcp.pods import METADATA_SERVER_NODE_LABEL
from cmbcluster_gcp.settings import GcpSettings
from cmbcluster_gcp.storage import GcsStorage

USER = UserRef(id="0f3a9c1e7b2d4e6f8a0b1c2d3e4f5a6b", email="alice@example.org")
NAMESPACE = "cmbcluster-users"
IDENTITY = CloudIdentity(
    user=USER,
    principal="principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/"
    "p.svc.id.goog/subject/ns/cmbcluster-users/sa/cmbcluster-user-0f3a9c1e7b",
    service_account="cmbcluster-user-0f3a9c1e7b",
    namespace=NAMESPACE,
)
DEFAULT_SIDECAR = {
    "gke-gcsfuse/cpu-request": "250m",
    "gke-gcsfuse/memory-request": "256Mi",
    "gke-gcsfuse/ephemeral-storage-request": "5Gi",
}


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> PluginManager:
    """Every installed plugin, as the control plane loads them; the GCP settings from the environment."""
    monkeypatch.setenv("PROJECT_ID", "cmbcluster-test")
    return PluginManager().load()


class TestGkePodContract(PodDecorationContract):
    """The pod contract on buckets of the GCS emulator, with the user's Workload Identity."""

    provider_name = "gcp"

    @pytest.fixture
    def storage_backend(self, gcs: GcsStorage) -> StorageBackend:
        return gcs

    @pytest.fixture
    def identity(self, user: UserRef) -> CloudIdentity:
        return CloudIdentity(user=user, principal=IDENTITY.principal, service_account="cmbcluster-user-x",
                             namespace=NAMESPACE)  # fmt: skip

    @pytest.fixture
    def active_settings(self) -> Mapping[type[Any], Any]:
        return {GcpSettings: GcpSettings(_env_file=None, project_id="cmbcluster-test")}  # type: ignore[call-arg]


def gcs_volume(bucket: str = "cmbcluster-user-0f3a9c1e7b-1a2b3c4d") -> dict[str, Any]:
    """The volume GcsStorage.volume_spec builds (no client call is involved)."""
    spec = GcsStorage.volume_spec(
        GcsStorage.__new__(GcsStorage),
        MountRequest(bucket=bucket, mount_path="/home/jovyan/data", user=USER, environment_id="e1"),
    )
    assert spec.volume is not None
    return spec.volume


def draft_with(*volumes: dict[str, Any]) -> PodDraft:
    return PodDraft(
        name="env-e1",
        namespace=NAMESPACE,
        image="quay.io/jupyter/base-notebook",
        volumes=list(volumes),
        volume_mounts=[{"name": v["name"], "mountPath": f"/data/{i}"} for i, v in enumerate(volumes)],
        service_account_name="cmbcluster-user-0f3a9c1e7b",
    )


def context(storage: str = "gcp", infra: str | None = "gcp", identity: CloudIdentity | None = IDENTITY) -> PodContext:
    """What the control plane hands decorators, with its settings as validated from this environment."""
    return PodContext(
        user=USER,
        environment_id="e1",
        namespace=NAMESPACE,
        identity=identity,
        storage_backend=storage,
        infra_provider=infra,
        active_settings={GcpSettings: GcpSettings(_env_file=None)},  # type: ignore[call-arg]
    )


def test_a_gke_pod_with_a_bucket_gets_the_gcsfuse_sidecar_and_workload_identity(manager: PluginManager) -> None:
    draft = draft_with(gcs_volume())
    manager.decorate_pod(draft, context())
    assert draft.annotations == {"gke-gcsfuse/volumes": "true", **DEFAULT_SIDECAR}
    assert draft.termination_grace_period_seconds == 60  # time for the sidecar to flush
    assert draft.node_selector == {METADATA_SERVER_NODE_LABEL: "true"}
    # nothing else changes: volumes, identity, security-relevant fields
    assert draft.volumes == [gcs_volume()]
    assert draft.service_account_name == "cmbcluster-user-0f3a9c1e7b"
    assert draft.automount_service_account_token is False
    assert draft.extra_objects == []


def test_sidecar_resources_and_grace_come_from_the_settings(
    manager: PluginManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GCSFUSE_CPU_LIMIT", "2")
    monkeypatch.setenv("GCSFUSE_MEMORY_LIMIT", "4Gi")
    monkeypatch.setenv("GCSFUSE_EPHEMERAL_STORAGE_LIMIT", "0")  # 0: no limit, for very large files
    monkeypatch.setenv("GCSFUSE_CPU_REQUEST", "500m")
    monkeypatch.setenv("GCSFUSE_TERMINATION_GRACE_SECONDS", "300")
    draft = draft_with(gcs_volume())
    manager.decorate_pod(draft, context())
    assert draft.annotations == {
        "gke-gcsfuse/volumes": "true",
        "gke-gcsfuse/cpu-request": "500m",
        "gke-gcsfuse/memory-request": "256Mi",
        "gke-gcsfuse/ephemeral-storage-request": "5Gi",
        "gke-gcsfuse/cpu-limit": "2",
        "gke-gcsfuse/memory-limit": "4Gi",
        "gke-gcsfuse/ephemeral-storage-limit": "0",
    }
    assert draft.termination_grace_period_seconds == 300


def test_a_longer_grace_period_already_chosen_is_kept(manager: PluginManager) -> None:
    draft = draft_with(gcs_volume())
    draft.termination_grace_period_seconds = 900
    manager.decorate_pod(draft, context())
    assert draft.termination_grace_period_seconds == 900


@pytest.mark.parametrize("bad", ["lots", "1 Gi", "-1", "2Gb"])
def test_a_malformed_sidecar_quantity_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(ValueError, match="GCSFUSE_MEMORY_LIMIT"):
        GcpSettings(_env_file=None, project_id="cmb-project", GCSFUSE_MEMORY_LIMIT=bad)  # type: ignore[call-arg]


def test_a_pod_without_a_bucket_gets_no_sidecar(manager: PluginManager) -> None:
    draft = draft_with({"name": "scratch", "emptyDir": {}})
    manager.decorate_pod(draft, context())
    assert draft.annotations == {}
    assert draft.termination_grace_period_seconds == 30
    assert draft.node_selector == {METADATA_SERVER_NODE_LABEL: "true"}  # the identity still needs it


def test_the_node_selector_can_be_turned_off_for_autopilot(
    manager: PluginManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GKE_WORKLOAD_IDENTITY_NODE_SELECTOR", "false")
    draft = draft_with(gcs_volume())
    manager.decorate_pod(draft, context())
    assert draft.node_selector == {}
    assert draft.annotations["gke-gcsfuse/volumes"] == "true"


def test_gcs_storage_under_another_infra_gets_the_sidecar_but_no_gke_identity(manager: PluginManager) -> None:
    draft = draft_with(gcs_volume())
    manager.decorate_pod(draft, context(infra="local", identity=None))
    assert draft.annotations["gke-gcsfuse/volumes"] == "true"
    assert draft.node_selector == {}


@pytest.mark.parametrize(("storage", "infra"), [("local", "local"), ("azure", "azure"), ("azure", None)])
def test_pods_of_other_clouds_are_left_alone(manager: PluginManager, storage: str, infra: str | None) -> None:
    draft = draft_with(gcs_volume())  # even a gcsfuse volume: not this deployment's storage
    before = copy.deepcopy(draft)
    manager.decorate_pod(draft, context(storage=storage, infra=infra, identity=None))
    assert draft.annotations == before.annotations
    assert draft.node_selector == before.node_selector
    assert draft.termination_grace_period_seconds == before.termination_grace_period_seconds
