"""The ``kubernetes`` compute backend under the compute contract (:mod:`cmbcluster.testing.compute`),
against the test cluster's real API server (tests/k8s/README.md), as the control-plane user with
exactly the Role of :mod:`cmbcluster.kubernetes.rbac`.

The test kubelet runs the pods of :data:`IMAGE` as processes on this machine (``images_run_here``),
so the contract's applications really run: pods listen on 127.0.0.1 at a port of their own, and
the backend serves them through the control plane (``proxy`` routing: its ``upstream`` is the
pod's address, where the suite reaches them).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence

import pytest

pytest.importorskip("kubernetes")

from kubernetes import client as k8s

from cmbcluster.interfaces import ComputeBackend, EnvironmentPhase, EnvironmentSpec, Resources, UserRef
from cmbcluster.kubernetes.backend import KubernetesCompute, KubernetesOptions
from cmbcluster.kubernetes.client import Retries
from cmbcluster.kubernetes.manifests import SECRETS_DIR, object_name
from cmbcluster.kubernetes.routing import Exposure
from cmbcluster.testing.compute import (
    ComputeBackendContract,
    SpecFactory,
    fetch,
    serving,
    wait_for_phase,
)
from cmbcluster.testing.process import free_port
from tests.k8s.harness import K8sCluster, images_run_here

IMAGE = "cmbcluster-test/contract-python"


@pytest.fixture(scope="module")
def admin(k8s_cluster: K8sCluster) -> Iterator[k8s.CoreV1Api]:
    api = k8s_cluster.api_client()
    core = k8s.CoreV1Api(api)
    with images_run_here(core, [IMAGE]):
        yield core
    api.close()


@pytest.fixture(scope="module")
def namespace(k8s_cluster: K8sCluster) -> str:
    return k8s_cluster.control_plane_namespace("contract")


class TestKubernetesCompute(ComputeBackendContract):
    runs_applications = True  # the test kubelet runs IMAGE's pods (see the module)
    notifies_status_changes = True  # from its pod and event watches

    @pytest.fixture
    def compute_backend(
        self, k8s_cluster: K8sCluster, namespace: str, admin: k8s.CoreV1Api
    ) -> Iterator[ComputeBackend]:
        backend = KubernetesCompute(
            k8s_cluster.api_client(token=k8s_cluster.cp_token),
            KubernetesOptions(
                namespace=namespace,
                exposure=Exposure(routing="proxy", public_url="https://cmb.example.org"),
                retries=Retries(backoff_seconds=0.05),
            ),
        )
        yield backend
        backend.close()

    @pytest.fixture
    def environment_spec(self) -> SpecFactory:
        def spec(environment_id: str, user: UserRef, python_arguments: Sequence[str]) -> EnvironmentSpec:
            # The pod's {host} is 0.0.0.0; here every pod runs on this machine: loopback only.
            arguments = [argument.replace("{host}", "127.0.0.1") for argument in python_arguments]
            return EnvironmentSpec(
                environment_id=environment_id, user=user, image=f"{IMAGE}:3", command=("python", *arguments),
                port=free_port(), resources=Resources(cpu=0.1, memory_mib=256),
            )  # fmt: skip

        return spec

    def test_secret_files_reach_the_application(  # type: ignore[override]
        self, compute_backend: ComputeBackend, environment_spec: SpecFactory, owner: UserRef, admin: k8s.CoreV1Api,
        namespace: str, start_timeout: float,
    ) -> None:  # fmt: skip
        """The test kubelet mounts no volumes: the application is told the folder, and the pod
        mounts there the Secret holding the files' bytes (what a kubelet makes files of)."""
        files = {"gcloud.json": b'{"type": "service_account"}\n', "raw.bin": bytes(range(256))}
        spec = self.spec(environment_spec, owner, serving(), secret_files=files)
        try:
            compute_backend.start(spec)
            wait_for_phase(compute_backend, spec.environment_id, [EnvironmentPhase.RUNNING], start_timeout)
            seen = fetch(self.application_address(compute_backend, spec.environment_id))
            assert seen["env"].get("CMBCLUSTER_SECRETS_DIR") == SECRETS_DIR
            name = object_name(spec.environment_id)
            pod = admin.read_namespaced_pod(name, namespace)
            [mount] = [m for m in pod.spec.containers[0].volume_mounts if m.mount_path == SECRETS_DIR]
            [volume] = [v for v in pod.spec.volumes if v.name == mount.name]
            secret = admin.read_namespaced_secret(volume.secret.secret_name, namespace)
            mounted = {item.path: base64.b64decode(secret.data[item.key]) for item in volume.secret.items}
            assert mounted == files
        finally:
            compute_backend.delete(spec.environment_id)
