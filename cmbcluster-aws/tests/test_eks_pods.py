"""The EKS pod decoration (``cmbcluster_decorate_pod``), run through the plugin manager as core runs it,
on the PersistentVolume and claim that S3Storage.volume_spec really builds for the user's identity."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from cmbcluster.interfaces import CloudIdentity, MountRequest, PodContext, PodDraft, StorageBackend, UserRef
from cmbcluster.plugins import PluginManager
from cmbcluster.testing.pods import PodDecorationContract
from cmbcluster_aws.identity import ROLE_ANNOTATION
from cmbcluster_aws.settings import AwsSettings, parse_node_selector
from cmbcluster_aws.storage import S3Storage

REGION = "eu-west-1"
ACCOUNT_ID = "123456789012"
USER = UserRef(id="0f3a9c1e7b2d4e6f8a0b1c2d3e4f5a6b", email="alice@example.org")
NAMESPACE = "cmbcluster-users"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/cmbcluster/cmbcluster-user-0f3a9c1e7b"
IRSA = CloudIdentity(
    user=USER,
    principal=ROLE_ARN,
    service_account="cmbcluster-user-0f3a9c1e7b",
    namespace=NAMESPACE,
    annotations={ROLE_ANNOTATION: ROLE_ARN},
)


class TestEksPodContract(PodDecorationContract):
    """The pod contract on buckets of moto's S3, with the user's IRSA role."""

    provider_name = "aws"

    @pytest.fixture
    def storage_backend(self, aws_settings: AwsSettings) -> Iterator[StorageBackend]:
        storage = S3Storage(aws_settings)
        yield storage
        storage.close()

    @pytest.fixture
    def identity(self, user: UserRef) -> CloudIdentity:
        return CloudIdentity(user=user, principal=ROLE_ARN, service_account=IRSA.service_account,
                             namespace=NAMESPACE, annotations=IRSA.annotations)  # fmt: skip

    @pytest.fixture
    def active_settings(self, aws_settings: AwsSettings) -> Mapping[type[Any], Any]:
        return {AwsSettings: aws_settings}


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> PluginManager:
    """Every installed plugin, as the control plane loads them; the AWS settings from the environment."""
    for name in ("EKS_NODE_SELECTOR", "EKS_TERMINATION_GRACE_SECONDS", "S3_MOUNT_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ACCOUNT_ID", ACCOUNT_ID)
    return PluginManager().load()


def build_draft(settings: AwsSettings, identity: CloudIdentity | None) -> PodDraft:
    """A pod draft mounting one bucket read-write and one read-only as ``identity``, as core builds it."""
    storage = S3Storage(settings)
    draft = PodDraft(
        name="env-e1",
        namespace=NAMESPACE,
        image="quay.io/jupyter/base-notebook",
        service_account_name=identity.service_account if identity else None,
        automount_service_account_token=identity is not None,
    )
    for bucket, path, read_only in (("cmbtest-0f3a9c1e7b-aa", "/data/a", False), ("cmbtest-0f3a9c1e7b-bb", "/b", True)):
        request = MountRequest(
            bucket=bucket, mount_path=path, user=USER, environment_id="e1", read_only=read_only, identity=identity
        )
        spec = storage.volume_spec(request)
        assert spec.volume is not None and spec.mount is not None
        draft.volumes.append(spec.volume)
        draft.volume_mounts.append(spec.mount)
        draft.extra_objects.extend(json.loads(json.dumps(spec.objects)))
    storage.close()
    return draft


@pytest.fixture
def draft(aws_settings: AwsSettings) -> PodDraft:
    return build_draft(aws_settings, IRSA)


def context(storage: str = "aws", infra: str | None = "aws", identity: CloudIdentity | None = IRSA) -> PodContext:
    """What the control plane hands decorators, with its settings as validated from this environment."""
    settings = AwsSettings(_env_file=None)  # type: ignore[call-arg]
    return PodContext(
        user=USER, environment_id="e1", namespace=NAMESPACE, identity=identity, storage_backend=storage,
        infra_provider=infra, active_settings={AwsSettings: settings},
    )  # fmt: skip


def persistent_volumes(draft: PodDraft) -> list[dict[str, Any]]:
    return [o for o in draft.extra_objects if o["kind"] == "PersistentVolume"]


def test_buckets_are_mounted_with_the_users_own_role(manager: PluginManager, draft: PodDraft) -> None:
    volumes = persistent_volumes(draft)
    assert len(volumes) == 2
    for pv in volumes:  # the volume as S3Storage made it for the user's IRSA identity
        attributes = pv["spec"]["csi"]["volumeAttributes"]
        assert attributes["authenticationSource"] == "pod"  # the pod's ServiceAccount: the user's IRSA role
        assert attributes["stsRegion"] == REGION
        assert attributes["bucketName"].startswith("cmbtest-0f3a9c1e7b-")
        assert {"uid=1000", "gid=100", "allow-other"} <= set(pv["spec"]["mountOptions"])
    before = copy.deepcopy(draft)
    manager.decorate_pod(draft, context())
    assert draft.termination_grace_period_seconds == 60  # Mountpoint uploads on close
    assert draft.node_selector == {"kubernetes.io/os": "linux"}
    # the volumes, their objects and what makes the pod non-root and its files the user's are untouched
    assert (draft.volumes, draft.volume_mounts, draft.extra_objects, draft.service_account_name,
            draft.automount_service_account_token, draft.annotations) == (
        before.volumes, before.volume_mounts, before.extra_objects, before.service_account_name,
        before.automount_service_account_token, before.annotations,
    )  # fmt: skip


def test_driver_credentials_when_asked(aws_settings: AwsSettings) -> None:
    draft = build_draft(aws_settings.model_copy(update={"s3_mount_credentials": "driver"}), IRSA)
    assert all("authenticationSource" not in pv["spec"]["csi"]["volumeAttributes"] for pv in persistent_volumes(draft))


@pytest.mark.parametrize(
    "identity",
    [None, CloudIdentity(user=USER, principal="user:someone", service_account="elsewhere", namespace=NAMESPACE)],
    ids=["no identity", "not an IRSA role"],
)
def test_without_an_irsa_identity_the_driver_mounts(
    manager: PluginManager, aws_settings: AwsSettings, identity: CloudIdentity | None
) -> None:
    draft = build_draft(aws_settings, identity)
    assert all("authenticationSource" not in pv["spec"]["csi"]["volumeAttributes"] for pv in persistent_volumes(draft))
    manager.decorate_pod(draft, context(infra="local", identity=identity))
    assert draft.termination_grace_period_seconds == 60


def test_node_selection_and_grace_come_from_the_settings(
    manager: PluginManager, draft: PodDraft, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EKS_NODE_SELECTOR", "eks.amazonaws.com/nodegroup=users, cmbcluster.io/pool=cpu")
    monkeypatch.setenv("EKS_TERMINATION_GRACE_SECONDS", "180")
    manager.decorate_pod(draft, context())
    assert draft.node_selector == {
        "kubernetes.io/os": "linux",
        "eks.amazonaws.com/nodegroup": "users",
        "cmbcluster.io/pool": "cpu",
    }
    assert draft.termination_grace_period_seconds == 180


@pytest.mark.parametrize("bad", ["users", "=x", "a b=c", "k=v=w", "-k=v", "k=" + "v" * 64])
def test_a_malformed_node_selector_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(ValueError, match="EKS_NODE_SELECTOR"):
        AwsSettings(_env_file=None, aws_region=REGION, aws_account_id=ACCOUNT_ID, EKS_NODE_SELECTOR=bad)  # type: ignore[call-arg]
    assert parse_node_selector(" a=b ,, c/d.e=") == {"a": "b", "c/d.e": ""}


@pytest.mark.parametrize(("storage", "infra"), [("local", "local"), ("azure", "azure"), ("azure", None)])
def test_pods_of_other_clouds_are_left_alone(
    manager: PluginManager, draft: PodDraft, storage: str, infra: str | None
) -> None:
    before = copy.deepcopy(draft)
    manager.decorate_pod(draft, context(storage=storage, infra=infra, identity=None))
    assert draft == before
