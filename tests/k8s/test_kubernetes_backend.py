"""The ``kubernetes`` compute backend against a real API server (tests/k8s/README.md).

The backend runs with the control-plane user's token bound to exactly the Role and ClusterRole
of :mod:`cmbcluster.kubernetes.rbac`, never as cluster-admin; the admin client only sets up
the namespace and RBAC and inspects what the backend created.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

pytest.importorskip("kubernetes")

from kubernetes import client as k8s

from cmbcluster.errors import CmbclusterError, Conflict, InvalidRequest, NotFound, PermissionDenied, ProviderUnavailable
from cmbcluster.interfaces import (
    CloudIdentity,
    EnvironmentPhase,
    EnvironmentSpec,
    MountedVolume,
    PodContext,
    PodDraft,
    Resources,
    UserRef,
    VolumeSpec,
)
from cmbcluster.kubernetes import rbac
from cmbcluster.kubernetes.backend import KubernetesCompute, KubernetesOptions
from cmbcluster.kubernetes.client import Retries
from cmbcluster.kubernetes.labels import ENVIRONMENT_LABEL, MANAGED_BY
from cmbcluster.kubernetes.manifests import (
    SECRETS_DIR,
    cpu_quantity,
    memory_quantity,
    object_name,
    resource_requirements,
)
from cmbcluster.kubernetes.plugin import KubernetesSettings, build_backend, cmbcluster_compute_backends
from cmbcluster.kubernetes.routing import CONTROL_PLANE_SELECTOR, NETWORK_POLICY_NAME, Exposure
from cmbcluster.registrations import ProviderContext
from cmbcluster.settings import CoreSettings
from tests.k8s.harness import K8sCluster, wait_for

REPO = Path(__file__).resolve().parents[2]
USER = UserRef(id="0123456789abcdef0123456789abcdef", email="ada@example.org")
LABELLED = ("Pod", "Service", "Secret", "PersistentVolumeClaim", "PersistentVolume", "Ingress")
EXPOSURE = Exposure(
    routing="ingress",
    environments_domain="envs.example.org",
    public_url="https://cmb.example.org",
    auth_url="http://cmbcluster.control.svc.cluster.local/api/v1/environments/authorize",
    ingress_namespace="ingress-nginx",
)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def admin(k8s_cluster: K8sCluster) -> Iterator[k8s.CoreV1Api]:
    api = k8s_cluster.api_client()
    yield k8s.CoreV1Api(api)
    api.close()


@pytest.fixture(scope="module")
def namespace(k8s_cluster: K8sCluster) -> str:
    """A fresh namespace whose Role(Binding) and the ClusterRole(Binding) come from rbac.py."""
    return k8s_cluster.control_plane_namespace()


class Recorder:
    def __init__(self) -> None:
        self.contexts: list[PodContext] = []

    def __call__(self, draft: PodDraft, context: PodContext) -> None:
        self.contexts.append(context)
        if context.storage_backend == "aws":
            draft.annotations["example.com/decorated"] = "yes"
            draft.labels["example.com/team"] = "cmb"
            draft.labels[MANAGED_BY] = "someone-else"  # must not win


@pytest.fixture(scope="module")
def decorator() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def backend(k8s_cluster: K8sCluster, namespace: str, decorator: Recorder) -> Iterator[KubernetesCompute]:
    b = KubernetesCompute(
        k8s_cluster.api_client(token=k8s_cluster.cp_token),
        KubernetesOptions(
            namespace=namespace,
            storage_backend="aws",
            infra_provider="aws",
            exposure=EXPOSURE,
            retries=Retries(backoff_seconds=0.05),
        ),
        decorate=decorator,
    )
    yield b
    b.close()


def new_id() -> str:
    return secrets.token_hex(16)


def s3_volume(environment_id: str, mount_path: str = "/home/jovyan/work") -> MountedVolume:
    """The shape cmbcluster-aws's volume_spec returns: a static PV + PVC for s3.csi.aws.com."""
    name = f"cmbcluster-s3-{environment_id[:12]}"
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"example.com/from": "storage"}},
        "spec": {
            "capacity": {"storage": "1200Gi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "mountOptions": ["allow-delete", "uid=1000", "gid=100"],
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": name},
            "csi": {
                "driver": "s3.csi.aws.com",
                "volumeHandle": f"bucket-{name}",
                "volumeAttributes": {"bucketName": "bucket"},
            },
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": name,
            "resources": {"requests": {"storage": "1200Gi"}},
        },
    }
    return MountedVolume(
        mount_path=mount_path,
        spec=VolumeSpec(
            volume={"name": name, "persistentVolumeClaim": {"claimName": name}},
            mount={"name": name, "mountPath": mount_path},
            objects=[pv, pvc],
            pod_annotations={"example.com/volume": "s3"},
        ),
    )


def make_spec(environment_id: str, **overrides: Any) -> EnvironmentSpec:
    fields: dict[str, Any] = {
        "environment_id": environment_id,
        "user": USER,
        "image": "quay.io/jupyter/base-notebook:latest",
        "command": ("start-notebook.py", "--ServerApp.base_url=/"),
        "port": 8888,
        "working_dir": "/home/jovyan",
        "env": {"GREETING": "hello", "EMPTY": ""},
        "secret_files": {"token.txt": b"s3cr3t\n"},
        "resources": Resources(cpu=0.5, memory_mib=2048),
        "volumes": (s3_volume(environment_id),),
        "labels": {"cmbcluster.io/application": "jupyter"},
    }
    fields.update(overrides)
    return EnvironmentSpec(**fields)


def labelled_objects(admin: k8s.CoreV1Api, namespace: str, environment_id: str) -> list[str]:
    selector = f"{MANAGED_BY}=cmbcluster,{ENVIRONMENT_LABEL}={environment_id}"
    found = []
    for item in admin.list_namespaced_pod(namespace, label_selector=selector).items:
        found.append(f"Pod/{item.metadata.name}")
    for item in admin.list_namespaced_service(namespace, label_selector=selector).items:
        found.append(f"Service/{item.metadata.name}")
    for item in admin.list_namespaced_secret(namespace, label_selector=selector).items:
        found.append(f"Secret/{item.metadata.name}")
    for item in admin.list_namespaced_persistent_volume_claim(namespace, label_selector=selector).items:
        found.append(f"PersistentVolumeClaim/{item.metadata.name}")
    for item in admin.list_persistent_volume(label_selector=selector).items:
        found.append(f"PersistentVolume/{item.metadata.name}")
    for item in k8s.NetworkingV1Api(admin.api_client).list_namespaced_ingress(namespace, label_selector=selector).items:
        found.append(f"Ingress/{item.metadata.name}")
    return found


def running(backend: KubernetesCompute, environment_id: str, timeout: float = 40) -> Any:
    def check() -> Any:
        status = backend.status(environment_id)
        return status if status.phase == EnvironmentPhase.RUNNING else None

    return wait_for(check, timeout, f"environment {environment_id} to run")


# -- the lifecycle on a real API server --------------------------------------------------------------
@pytest.fixture(scope="module")
def started(backend: KubernetesCompute) -> tuple[str, Any]:
    environment_id = new_id()
    first = backend.start(make_spec(environment_id))
    assert first.environment_id == environment_id
    assert first.phase in (EnvironmentPhase.PENDING, EnvironmentPhase.STARTING, EnvironmentPhase.RUNNING)
    return environment_id, running(backend, environment_id)


def test_environment_runs_with_url(started: tuple[str, Any], namespace: str) -> None:
    environment_id, status = started
    assert status.phase == EnvironmentPhase.RUNNING
    assert status.url == f"https://env-{environment_id}.envs.example.org/"
    assert status.user_id == USER.id
    assert status.started_at is not None


def test_pod_is_secure_labelled_decorated_and_resourced(
    started: tuple[str, Any], admin: k8s.CoreV1Api, namespace: str, decorator: Recorder
) -> None:
    environment_id, _ = started
    name = object_name(environment_id)
    assert name == f"env-{environment_id}" and "@" not in name
    pod = admin.read_namespaced_pod(name, namespace)
    labels = pod.metadata.labels
    assert labels[MANAGED_BY] == "cmbcluster"
    assert labels["cmbcluster.io/user-id"] == USER.id
    assert labels[ENVIRONMENT_LABEL] == environment_id
    assert labels["cmbcluster.io/application"] == "jupyter"
    assert labels["example.com/team"] == "cmb"  # the decorator's label
    assert pod.metadata.annotations["example.com/decorated"] == "yes"
    assert pod.metadata.annotations["example.com/volume"] == "s3"
    ctx = next(c for c in decorator.contexts if c.environment_id == environment_id)
    assert ctx.namespace == namespace and ctx.user == USER and ctx.infra_provider == "aws"
    assert "ada@example.org" not in json.dumps(pod.metadata.to_dict(), default=str)

    spec = pod.spec
    assert spec.automount_service_account_token is False
    assert spec.security_context.run_as_non_root is True
    assert spec.security_context.run_as_user == 1000
    assert spec.security_context.fs_group == 100
    assert spec.security_context.seccomp_profile.type == "RuntimeDefault"
    (container,) = spec.containers
    sc = container.security_context
    assert sc.allow_privilege_escalation is False
    assert sc.capabilities.drop == ["ALL"]
    assert sc.run_as_non_root is True
    assert sc.seccomp_profile.type == "RuntimeDefault"
    assert container.ports[0].container_port == 8888
    assert container.command == ["start-notebook.py", "--ServerApp.base_url=/"]
    assert container.working_dir == "/home/jovyan"
    # sent as 500m / 2048Mi; the API server canonicalises 2048Mi to 2Gi
    assert container.resources.requests == {"cpu": "500m", "memory": "2Gi"}
    assert container.resources.limits == {"cpu": "500m", "memory": "2Gi"}
    env = {e.name: e for e in container.env}
    assert env["PORT"].value == "8888"
    assert env["CMBCLUSTER_SECRETS_DIR"].value == SECRETS_DIR
    assert env["GREETING"].value_from.secret_key_ref.name == name
    assert env["GREETING"].value is None  # the value lives in the Secret, not in the pod spec

    volumes = {v.name: v for v in spec.volumes}
    secret_volume = next(v for v in spec.volumes if v.secret is not None)
    assert secret_volume.secret.secret_name == name
    assert secret_volume.secret.default_mode == 0o400
    assert [(i.key, i.path) for i in secret_volume.secret.items] == [("file.token.txt", "token.txt")]
    mounts = {m.mount_path: m for m in container.volume_mounts}
    assert mounts[SECRETS_DIR].read_only is True
    assert volumes[mounts["/home/jovyan/work"].name].persistent_volume_claim.claim_name.startswith("cmbcluster-s3-")
    assert pod.status.phase == "Running"


def test_owned_objects_are_labelled_and_garbage_collectable(
    started: tuple[str, Any], admin: k8s.CoreV1Api, namespace: str
) -> None:
    environment_id, _ = started
    name = object_name(environment_id)
    pod = admin.read_namespaced_pod(name, namespace)
    service = admin.read_namespaced_service(name, namespace)
    secret = admin.read_namespaced_secret(name, namespace)
    (pvc,) = admin.list_namespaced_persistent_volume_claim(
        namespace, label_selector=f"{ENVIRONMENT_LABEL}={environment_id}"
    ).items
    (pv,) = admin.list_persistent_volume(label_selector=f"{ENVIRONMENT_LABEL}={environment_id}").items
    # the Secret is the root: it owns everything else of the environment, so deleting it collects the rest
    assert not secret.metadata.owner_references
    for obj in (pod, service, secret, pvc):
        assert obj.metadata.labels[MANAGED_BY] == "cmbcluster"
        assert obj.metadata.labels["cmbcluster.io/user-id"] == USER.id
    for obj in (pod, service, pvc):
        owners = [(o.kind, o.name, o.uid) for o in obj.metadata.owner_references]
        assert owners == [("Secret", name, secret.metadata.uid)]
    assert service.spec.type == "ClusterIP" and service.spec.cluster_ip == "None"  # headless: no virtual IP
    assert [(p.port, p.target_port) for p in service.spec.ports] == [(80, 8888)]
    assert service.spec.selector == {MANAGED_BY: "cmbcluster", ENVIRONMENT_LABEL: environment_id}
    assert secret.type == "Opaque"
    assert base64.b64decode(secret.data["env.GREETING"]) == b"hello"
    assert base64.b64decode(secret.data["file.token.txt"]) == b"s3cr3t\n"
    assert pvc.metadata.namespace == namespace
    assert pv.metadata.owner_references is None  # cluster-scoped: removed explicitly
    assert pv.metadata.labels["example.com/from"] == "storage"  # the storage backend's labels are kept
    assert pv.spec.claim_ref.namespace == namespace
    assert pv.spec.csi.driver == "s3.csi.aws.com"
    wait_for(
        lambda: admin.read_namespaced_persistent_volume_claim(pvc.metadata.name, namespace).status.phase == "Bound",
        what="the claim to bind",
    )


def test_list_managed_finds_it(started: tuple[str, Any], backend: KubernetesCompute) -> None:
    environment_id, _ = started
    found = {s.environment_id: s for s in backend.list_managed()}
    assert found[environment_id].phase == EnvironmentPhase.RUNNING
    assert found[environment_id].user_id == USER.id


def test_ingress_routes_the_owner_only(started: tuple[str, Any], admin: k8s.CoreV1Api, namespace: str) -> None:
    environment_id, _ = started
    name = object_name(environment_id)
    ingress = k8s.NetworkingV1Api(admin.api_client).read_namespaced_ingress(name, namespace)
    secret = admin.read_namespaced_secret(name, namespace)
    assert [(o.kind, o.uid) for o in ingress.metadata.owner_references] == [("Secret", secret.metadata.uid)]
    assert ingress.spec.ingress_class_name == "nginx"
    (rule,) = ingress.spec.rules
    assert rule.host == f"{name}.envs.example.org"
    (path,) = rule.http.paths
    assert (path.path, path.path_type) == ("/", "Prefix")
    assert (path.backend.service.name, path.backend.service.port.number) == (name, 80)
    # one wildcard certificate for every environment, never one per environment
    assert [(t.hosts, t.secret_name) for t in ingress.spec.tls] == [
        (["*.envs.example.org"], "cmbcluster-environments-tls")
    ]
    annotations = ingress.metadata.annotations
    assert annotations["nginx.ingress.kubernetes.io/auth-url"] == (
        f"http://cmbcluster.control.svc.cluster.local/api/v1/environments/authorize?environment_id={environment_id}"
    )
    # a browser without access signs in to the environment's own host through the control plane
    assert annotations["nginx.ingress.kubernetes.io/auth-signin"] == (
        f"https://cmb.example.org/api/v1/environments/{environment_id}/enter"
    )
    # what reaches the pod in place of the request's Cookie and Authorization: the check's answer
    assert annotations["nginx.ingress.kubernetes.io/auth-response-headers"] == "Cookie,Authorization"


def test_network_policy_isolates_user_pods(started: tuple[str, Any], admin: k8s.CoreV1Api, namespace: str) -> None:
    environment_id, _ = started
    policy = k8s.NetworkingV1Api(admin.api_client).read_namespaced_network_policy(NETWORK_POLICY_NAME, namespace)
    pod_labels = admin.read_namespaced_pod(object_name(environment_id), namespace).metadata.labels
    selector = policy.spec.pod_selector.match_labels
    assert selector.items() <= pod_labels.items()  # it selects the user's pod...
    assert not selector.items() <= CONTROL_PLANE_SELECTOR.items()  # ...and not the control plane
    assert sorted(policy.spec.policy_types) == ["Egress", "Ingress"]
    (ingress_rule,) = policy.spec.ingress
    sources = [(p.namespace_selector, p.pod_selector) for p in ingress_rule._from]
    assert len(sources) == 2  # the ingress controller's namespace and the control plane; no other user pod
    assert sources[0][0].match_labels == {"kubernetes.io/metadata.name": "ingress-nginx"}
    assert sources[1][1].match_labels == CONTROL_PLANE_SELECTOR
    (egress_rule,) = policy.spec.egress
    blocks = {b.ip_block.cidr: b.ip_block._except for b in egress_rule.to}
    assert blocks == {"0.0.0.0/0": ["169.254.169.254/32", "169.254.169.252/32"], "::/0": ["fd00:ec2::254/128"]}


def test_status_comes_from_the_watch_not_from_reads(
    started: tuple[str, Any], backend: KubernetesCompute, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment_id, _ = started
    assert backend.pods.synced

    def no_reads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("status() read the pod from the API server")

    monkeypatch.setattr(backend.client.core, "read_namespaced_pod", no_reads)
    monkeypatch.setattr(
        backend.client.core, "list_namespaced_pod", no_reads
    )  # the watch thread holds its own reference
    for _ in range(50):
        assert backend.status(environment_id).phase == EnvironmentPhase.RUNNING
    assert environment_id in {s.environment_id for s in backend.list_managed()}


def test_second_start_adopts(started: tuple[str, Any], backend: KubernetesCompute, admin: k8s.CoreV1Api) -> None:
    environment_id, _ = started
    name = object_name(environment_id)
    before = {
        kind: read(name, backend.namespace).metadata.uid
        for kind, read in (
            ("pod", admin.read_namespaced_pod),
            ("service", admin.read_namespaced_service),
            ("secret", admin.read_namespaced_secret),
        )
    }
    status = backend.start(make_spec(environment_id))
    assert status.phase == EnvironmentPhase.RUNNING
    assert admin.read_namespaced_pod(name, backend.namespace).metadata.uid == before["pod"]
    assert admin.read_namespaced_service(name, backend.namespace).metadata.uid == before["service"]
    assert admin.read_namespaced_secret(name, backend.namespace).metadata.uid == before["secret"]


def test_foreign_object_of_our_name_is_replaced(backend: KubernetesCompute, admin: k8s.CoreV1Api) -> None:
    environment_id = new_id()
    name = object_name(environment_id)
    admin.create_namespaced_secret(
        backend.namespace, {"metadata": {"name": name, "labels": {"app": "other"}}, "data": {"x": "eQ=="}}
    )
    backend.start(make_spec(environment_id, volumes=(), secret_files={}))
    secret = admin.read_namespaced_secret(name, backend.namespace)
    assert secret.metadata.labels[ENVIRONMENT_LABEL] == environment_id
    assert "x" not in (secret.data or {})
    running(backend, environment_id)
    backend.delete(environment_id)
    wait_for(lambda: not labelled_objects(admin, backend.namespace, environment_id), what="cleanup")


def test_deleting_the_root_secret_collects_the_rest(backend: KubernetesCompute, admin: k8s.CoreV1Api) -> None:
    """If everything but the ownership were lost, Kubernetes' garbage collector still cleans up."""
    environment_id = new_id()
    backend.start(make_spec(environment_id))
    running(backend, environment_id)
    admin.delete_namespaced_secret(object_name(environment_id), backend.namespace, propagation_policy="Background")

    def left() -> list[str]:
        return [o for o in labelled_objects(admin, backend.namespace, environment_id) if "PersistentVolume/" not in o]

    wait_for(lambda: not left(), 60, "the garbage collector to remove the owned objects")
    backend.delete(environment_id)  # the cluster-scoped volume, by label
    wait_for(lambda: not labelled_objects(admin, backend.namespace, environment_id), 60, "every object to go")


def test_with_nothing_secret_the_pod_is_the_root(backend: KubernetesCompute, admin: k8s.CoreV1Api) -> None:
    """No variables, no secret files, no claim: no Secret (one API call fewer per start). The pod is
    the root: its Service and Ingress are owned by it, so deleting it collects them; a pod left by a
    start that had a Secret (owned by it) is replaced, never adopted as this start's root."""
    environment_id = new_id()
    name = object_name(environment_id)
    networking = k8s.NetworkingV1Api(admin.api_client)
    try:
        backend.start(make_spec(environment_id, volumes=()))  # with a Secret, which owns the pod
        running(backend, environment_id)
        earlier = admin.read_namespaced_pod(name, backend.namespace)
        assert [o.kind for o in earlier.metadata.owner_references] == ["Secret"]
        backend.start(make_spec(environment_id, env={}, secret_files={}, volumes=()))  # a start again, over it
        pod = admin.read_namespaced_pod(name, backend.namespace)
        assert pod.metadata.uid != earlier.metadata.uid and not pod.metadata.owner_references
        admin.delete_namespaced_secret(name, backend.namespace)  # the earlier start's, owning nothing now
        running(backend, environment_id)
        assert sorted(labelled_objects(admin, backend.namespace, environment_id)) == [
            f"Ingress/{name}", f"Pod/{name}", f"Service/{name}"
        ]  # fmt: skip
        service = admin.read_namespaced_service(name, backend.namespace)
        ingress = networking.read_namespaced_ingress(name, backend.namespace)
        for obj in (service, ingress):
            assert [(o.kind, o.name, o.uid) for o in obj.metadata.owner_references] == [("Pod", name, pod.metadata.uid)]
        admin.delete_namespaced_pod(name, backend.namespace, grace_period_seconds=0, propagation_policy="Background")
        wait_for(
            lambda: not labelled_objects(admin, backend.namespace, environment_id), 60,
            "the garbage collector to remove the pod's Service and Ingress",
        )  # fmt: skip
    finally:
        backend.delete(environment_id)


def test_stop_and_delete_leave_nothing(
    started: tuple[str, Any], backend: KubernetesCompute, admin: k8s.CoreV1Api
) -> None:
    environment_id, _ = started
    assert len(labelled_objects(admin, backend.namespace, environment_id)) == len(LABELLED)
    backend.stop(environment_id)
    assert backend.status(environment_id).phase in (EnvironmentPhase.STOPPING, EnvironmentPhase.MISSING)
    wait_for(lambda: not labelled_objects(admin, backend.namespace, environment_id), 60, "every object to go")
    # the backend learns of the pod's deletion from its watch, a moment after the API server lists
    # it gone (a fresh-clone run read `stopping` in between): it must come, soon
    wait_for(lambda: backend.status(environment_id).phase == EnvironmentPhase.MISSING, 10, "the watch to see it gone")
    assert environment_id not in {s.environment_id for s in backend.list_managed()}
    backend.stop(environment_id)  # idempotent
    backend.delete(environment_id)


def test_restart_after_stop(backend: KubernetesCompute, admin: k8s.CoreV1Api) -> None:
    environment_id = new_id()
    backend.start(make_spec(environment_id))
    running(backend, environment_id)
    backend.stop(environment_id)
    backend.start(make_spec(environment_id))  # while the old pod may still be terminating
    running(backend, environment_id)
    assert len(labelled_objects(admin, backend.namespace, environment_id)) == len(LABELLED)
    backend.delete(environment_id)
    wait_for(lambda: not labelled_objects(admin, backend.namespace, environment_id), 60, "every object to go")


def test_proxy_routing_makes_a_pod_and_a_secret_and_gives_the_pods_address(
    k8s_cluster: K8sCluster, backend: KubernetesCompute, admin: k8s.CoreV1Api
) -> None:
    """Served through the control plane: no Service, no Ingress; the proxy's upstream is the pod's
    own address once it is Ready, and nothing once it stops. An application that checks a token
    gets one of its start's own, which only the proxy sends (a pod that reaches it where the
    NetworkPolicy is not enforced has none)."""
    namespace = k8s_cluster.control_plane_namespace()  # its own NetworkPolicy, made by this backend
    proxied = KubernetesCompute(
        k8s_cluster.api_client(token=k8s_cluster.cp_token),
        KubernetesOptions(namespace=namespace, exposure=Exposure(routing="proxy", public_url="https://cmb.example.org"),
                          retries=Retries(backoff_seconds=0.05)),
    )  # fmt: skip
    environment_id = new_id()
    try:
        assert proxied.upstream(environment_id) is None
        proxied.start(make_spec(environment_id, volumes=(), command=("jupyter-lab", "--port={port}")))
        status = running(proxied, environment_id)
        assert status.url == f"https://cmb.example.org/environments/{environment_id}/"
        assert sorted(labelled_objects(admin, namespace, environment_id)) == [
            f"Pod/env-{environment_id}", f"Secret/env-{environment_id}"
        ]  # fmt: skip
        pod = admin.read_namespaced_pod(f"env-{environment_id}", namespace)
        upstream = proxied.upstream(environment_id)
        assert upstream is not None and upstream.url == f"http://{pod.status.pod_ip}:8888"
        token = pod.metadata.annotations["cmbcluster.io/application-token"]
        assert len(token) >= 32 and dict(upstream.headers) == {"Authorization": f"token {token}"}
        (container,) = pod.spec.containers
        assert {e.name: e.value for e in container.env}["JUPYTER_TOKEN"] == token  # never on its command line
        command = [*(container.command or []), *(container.args or [])]
        assert command and token not in " ".join(command) and "--IdentityProvider.token=" not in command
        assert backend.upstream(environment_id) is None  # ingress routing: the ingress serves it
        policy = k8s.NetworkingV1Api(admin.api_client).read_namespaced_network_policy(NETWORK_POLICY_NAME, namespace)
        assert [peer.pod_selector.match_labels for peer in policy.spec.ingress[0]._from] == [CONTROL_PLANE_SELECTOR]
        proxied.stop(environment_id)
        assert proxied.upstream(environment_id) is None  # being deleted: no more traffic
        wait_for(lambda: not labelled_objects(admin, namespace, environment_id), 60, "every object to go")
    finally:
        proxied.delete(environment_id)
        proxied.close()


def test_after_a_switch_to_proxy_routing_a_running_environment_loses_its_ingress_and_is_proxied(
    k8s_cluster: K8sCluster, admin: k8s.CoreV1Api
) -> None:
    """Upgrading a deployment with path routing changes its default routing from ingress to proxy:
    an environment left running keeps its Ingress, which goes on sending its path to the pod through
    the ingress controller that the new NetworkPolicy refuses (502 until its owner restarts it). The
    proxied backend's first listing removes such Ingresses and Services; the proxy serves the pod."""
    namespace = k8s_cluster.control_plane_namespace()

    def backend_with(routing: Literal["ingress", "proxy"]) -> KubernetesCompute:
        exposure = Exposure(routing=routing, public_url="https://cmb.example.org")
        options = KubernetesOptions(namespace=namespace, exposure=exposure, retries=Retries(backoff_seconds=0.05))
        return KubernetesCompute(k8s_cluster.api_client(token=k8s_cluster.cp_token), options)

    before, after = backend_with("ingress"), backend_with("proxy")
    environment_id = new_id()
    try:
        before.start(make_spec(environment_id, volumes=(), secret_files={}, env={}))
        running(before, environment_id)
        assert sorted(labelled_objects(admin, namespace, environment_id)) == [
            f"Ingress/env-{environment_id}", f"Pod/env-{environment_id}", f"Service/env-{environment_id}"
        ]  # fmt: skip
        assert [s.environment_id for s in after.list_managed() if s.environment_id == environment_id]
        wait_for(lambda: labelled_objects(admin, namespace, environment_id) == [f"Pod/env-{environment_id}"],
                 60, "the earlier routing's Ingress and Service to go")  # fmt: skip
        assert after.upstream(environment_id) is not None  # the pod itself is left running, proxied
    finally:
        after.delete(environment_id)
        before.close()
        after.close()


def test_an_upgrade_brings_a_running_environments_ingress_to_its_annotations(
    k8s_cluster: K8sCluster, admin: k8s.CoreV1Api
) -> None:
    """An earlier version's Ingress sent a browser on an environment's own host to the sign-in page,
    which no longer leads back there: the environment was out of its owner's reach until a restart.
    The first listing of the upgraded control plane (with the Role's patch, nothing more) gives each
    such Ingress this version's annotations, and leaves others' annotations alone."""
    namespace = k8s_cluster.control_plane_namespace()
    exposure = Exposure(routing="ingress", public_url="https://cmb.example.org", environments_domain="envs.example.org")
    options = KubernetesOptions(namespace=namespace, exposure=exposure, retries=Retries(backoff_seconds=0.05))
    earlier = KubernetesCompute(k8s_cluster.api_client(token=k8s_cluster.cp_token), options)
    environment_id = new_id()
    name = object_name(environment_id)
    net = k8s.NetworkingV1Api(admin.api_client)
    upgraded = None
    try:
        earlier.start(make_spec(environment_id, volumes=(), secret_files={}, env={}))
        running(earlier, environment_id)
        earlier.close()
        net.patch_namespaced_ingress(name, namespace, {"metadata": {"annotations": {
            "nginx.ingress.kubernetes.io/auth-signin": "https://cmb.example.org/signin/?next=$scheme://$host$request_uri",
            "nginx.ingress.kubernetes.io/auth-signin-redirect-param": None,
            "nginx.ingress.kubernetes.io/auth-method": None,
            "nginx.ingress.kubernetes.io/auth-always-set-cookie": None,
            "example.org/operators-own": "kept",
        }}})  # fmt: skip
        upgraded = KubernetesCompute(k8s_cluster.api_client(token=k8s_cluster.cp_token), options)
        assert [s.environment_id for s in upgraded.list_managed() if s.environment_id == environment_id]
        annotations = net.read_namespaced_ingress(name, namespace).metadata.annotations
        wanted = exposure.ingress(name, environment_id, {})["metadata"]["annotations"]
        assert {key: annotations.get(key) for key in wanted} == wanted
        assert annotations["nginx.ingress.kubernetes.io/auth-signin"].endswith(f"/environments/{environment_id}/enter")
        assert annotations["example.org/operators-own"] == "kept"
    finally:
        (upgraded or earlier).delete(environment_id)
        earlier.close()
        if upgraded is not None:
            upgraded.close()


def test_a_start_never_adopts_the_pod_a_stop_is_still_removing(
    backend: KubernetesCompute, admin: k8s.CoreV1Api
) -> None:
    """A restart right after a stop: the old pod is still terminating (held here by a finalizer,
    as a slow kubelet or a volume would). The start waits for it to go and makes a new one;
    adopting it would leave the environment with nothing once it is gone."""
    import threading

    environment_id = new_id()
    backend.start(make_spec(environment_id))
    running(backend, environment_id)
    name = object_name(environment_id)
    old_uid = admin.read_namespaced_pod(name, backend.namespace).metadata.uid
    admin.patch_namespaced_pod(name, backend.namespace, {"metadata": {"finalizers": ["cmbcluster.io/test-hold"]}})
    backend.stop(environment_id)
    release = threading.Timer(
        1.5, lambda: admin.patch_namespaced_pod(name, backend.namespace, {"metadata": {"finalizers": None}})
    )
    release.start()
    backend.start(make_spec(environment_id))
    release.join()
    status = running(backend, environment_id)
    assert status.phase == EnvironmentPhase.RUNNING
    assert admin.read_namespaced_pod(name, backend.namespace).metadata.uid != old_uid
    backend.delete(environment_id)
    wait_for(lambda: not labelled_objects(admin, backend.namespace, environment_id), 60, "every object to go")


def test_service_account_identity(backend: KubernetesCompute, admin: k8s.CoreV1Api) -> None:
    """The user's own ServiceAccount is created with the identity's annotations, kept across
    environments, updated when the identity changes; the pod runs as it, with its token."""
    first, second = new_id(), new_id()
    sa_name = f"cmbcluster-user-{USER.id[:12]}"
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/cmbcluster-user-a"}
    identity = CloudIdentity(user=USER, principal=role["eks.amazonaws.com/role-arn"], service_account=sa_name,
                             annotations=role)  # fmt: skip
    backend.start(make_spec(first, identity=identity, volumes=()))
    pod = admin.read_namespaced_pod(object_name(first), backend.namespace)
    assert pod.spec.service_account_name == sa_name
    assert pod.spec.automount_service_account_token is True
    sa = admin.read_namespaced_service_account(sa_name, backend.namespace)
    assert sa.metadata.annotations == role
    assert sa.metadata.labels == {MANAGED_BY: "cmbcluster", "cmbcluster.io/user-id": USER.id}
    assert not sa.metadata.owner_references  # outlives the environment
    uid = sa.metadata.uid

    moved = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/cmbcluster-user-b"}
    backend.start(make_spec(second, identity=CloudIdentity(user=USER, principal="b", service_account=sa_name,
                                                           annotations=moved), volumes=()))  # fmt: skip
    sa = admin.read_namespaced_service_account(sa_name, backend.namespace)
    assert sa.metadata.uid == uid and sa.metadata.annotations == moved
    for environment_id in (first, second):
        backend.delete(environment_id)
    wait_for(lambda: not labelled_objects(admin, backend.namespace, first), 60, "cleanup")
    assert admin.read_namespaced_service_account(sa_name, backend.namespace).metadata.uid == uid
    backend.forget_user(USER.id)  # the user is deleted: their ServiceAccount goes, with the Role's rights alone
    wait_for(lambda: not admin.list_namespaced_service_account(backend.namespace,
             label_selector=f"cmbcluster.io/user-id={USER.id}").items, 30, "the ServiceAccount to go")  # fmt: skip
    backend.forget_user(USER.id)  # idempotent


def test_someone_elses_service_account_is_not_taken(backend: KubernetesCompute, admin: k8s.CoreV1Api) -> None:
    admin.create_namespaced_service_account(backend.namespace, {"metadata": {"name": "shared-sa"}})
    identity = CloudIdentity(user=USER, principal="p", service_account="shared-sa")
    environment_id = new_id()
    with pytest.raises(Conflict, match="not this user's"):
        backend.start(make_spec(environment_id, identity=identity, volumes=()))
    assert backend.status(environment_id).phase == EnvironmentPhase.MISSING
    assert not admin.read_namespaced_service_account("shared-sa", backend.namespace).metadata.labels


def test_path_routing_under_the_public_url() -> None:
    exposure = Exposure(routing="ingress", public_url="https://cmb.example.org:8443", tls_secret="cmb-tls")
    assert exposure.url("env-x", "x") == "https://cmb.example.org:8443/environments/x/"
    ingress = exposure.ingress("env-x", "x", {})
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "cmb.example.org"
    assert rule["http"]["paths"][0]["path"] == "/environments/x/"
    assert ingress["spec"]["tls"] == [{"hosts": ["cmb.example.org"], "secretName": "cmb-tls"}]


def test_unschedulable_pod_reports_the_scheduler_event(
    k8s_cluster: K8sCluster, namespace: str, admin: k8s.CoreV1Api
) -> None:
    """Kubernetes events feed the status message (and so the progress stream)."""

    def nowhere(draft: PodDraft, context: PodContext) -> None:
        draft.node_selector["example.com/no-such-node"] = "true"

    b = KubernetesCompute(
        k8s_cluster.api_client(token=k8s_cluster.cp_token), KubernetesOptions(namespace=namespace), decorate=nowhere
    )
    environment_id = new_id()
    try:
        b.start(make_spec(environment_id, volumes=()))
        status = wait_for(
            lambda: (s := b.status(environment_id)).message.startswith("FailedScheduling") and s,
            30, "the scheduler's event",
        )  # fmt: skip
        assert status.phase == EnvironmentPhase.PENDING
        assert "node" in status.message
    finally:
        b.delete(environment_id)
        b.close()


def test_unknown_environment_is_missing(backend: KubernetesCompute) -> None:
    assert backend.status(new_id()).phase == EnvironmentPhase.MISSING
    backend.stop(new_id())
    backend.delete(new_id())
    assert backend.logs(new_id()) == ""


def test_check_ready_with_the_role(backend: KubernetesCompute) -> None:
    backend.check_ready()


def test_invalid_decoration_is_refused_before_sending(
    k8s_cluster: K8sCluster, backend: KubernetesCompute, admin: k8s.CoreV1Api
) -> None:
    def bad(draft: PodDraft, context: PodContext) -> None:
        draft.volume_mounts.append({"name": "nope", "mountPath": "/x"})

    api = k8s_cluster.api_client(token=k8s_cluster.cp_token)
    other = KubernetesCompute(api, KubernetesOptions(namespace=backend.namespace), decorate=bad)
    environment_id = new_id()
    try:
        with pytest.raises(InvalidRequest, match="nope"):
            other.start(make_spec(environment_id, volumes=()))
    finally:
        other.close()
    assert labelled_objects(admin, backend.namespace, environment_id) == []


def test_token_without_role_is_denied(k8s_cluster: K8sCluster) -> None:
    # the control-plane user has no RoleBinding in "default"
    b = KubernetesCompute(k8s_cluster.api_client(token=k8s_cluster.cp_token), KubernetesOptions(namespace="default"))
    try:
        with pytest.raises(PermissionDenied):
            b.check_ready()
        with pytest.raises(PermissionDenied):
            b.status(new_id())
        with pytest.raises(PermissionDenied):
            b.start(make_spec(new_id(), volumes=()))
    finally:
        b.close()


def test_unreachable_api_server_is_provider_unavailable(k8s_cluster: K8sCluster) -> None:
    api = k8s_cluster.api_client()
    api.configuration.host = "https://127.0.0.1:9"  # nothing listens there
    retries = Retries(attempts=3, backoff_seconds=0.01, request_timeout=(1, 1))
    b = KubernetesCompute(api, KubernetesOptions(namespace="default", retries=retries))
    try:
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="3 attempts"):
            b.status(new_id())
        assert time.monotonic() - started < 10
    finally:
        b.close()


EXEC_PLUGIN = """
import datetime, json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
run = len(runs.read_text()) if runs.exists() else 0
runs.write_text("x" * (run + 1))
token = sys.argv[2 + min(run, 1)]
# the client renews a token 5 minutes before it expires: this one is due 1.5 s from now
expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5, seconds=1.5)
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                  "status": {"token": token, "expirationTimestamp": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}}))
"""


def exec_plugin_kubeconfig(k8s_cluster: K8sCluster, tmp_path: Path) -> tuple[Path, Path]:
    """A kubeconfig whose token comes from EXEC_PLUGIN: first one the API server refuses, then the
    control plane's; and the file that counts the plugin's runs."""
    plugin, runs = tmp_path / "plugin.py", tmp_path / "runs"
    plugin.write_text(EXEC_PLUGIN)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": k8s_cluster.server,
                                                   "certificate-authority": str(k8s_cluster.ca_path)}}],
        "users": [{"name": "cp", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
            "args": [str(plugin), str(runs), "not-a-token-of-this-cluster", k8s_cluster.cp_token],
        }}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "cp"}}],
    }))  # fmt: skip
    return kubeconfig, runs


def test_an_expiring_exec_plugin_token_is_renewed(
    k8s_cluster: K8sCluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As EKS and GKE kubeconfigs: the token comes from a command and expires. The client's refresh
    runs at most every TOKEN_REFRESH_SECONDS (it re-applied the whole kubeconfig before every call);
    a token due for renewal is still renewed and used. The plugin's first token is refused by the
    API server, the one it gives once that has expired is the control plane's."""
    from cmbcluster.kubernetes import client as kube_client

    monkeypatch.setattr(kube_client, "TOKEN_REFRESH_SECONDS", 0.5)
    kubeconfig, runs = exec_plugin_kubeconfig(k8s_cluster, tmp_path)
    api = kube_client.api_client_from_config(kubeconfig=str(kubeconfig))
    try:
        core = k8s.CoreV1Api(api)
        for _ in range(3):  # the first token, refused
            with pytest.raises(k8s.ApiException) as refused:
                core.list_namespaced_pod(namespace)
            assert refused.value.status == 401
        assert runs.read_text() == "x"
        time.sleep(2)  # past the token's renewal time and the refresh interval
        core.list_namespaced_pod(namespace)  # the renewed token
        for _ in range(20):
            core.list_namespaced_pod(namespace)
        assert runs.read_text() == "xx"
    finally:
        api.close()


def test_a_token_refused_before_its_renewal_is_due_is_renewed_at_once(
    k8s_cluster: K8sCluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh interval is long here, as when the clock it reads stood still (a suspended host)
    while the token expired: the backend's call refused 401 renews the token and is sent again."""
    from cmbcluster.kubernetes import client as kube_client

    monkeypatch.setattr(kube_client, "TOKEN_REFRESH_SECONDS", 3600)
    kubeconfig, runs = exec_plugin_kubeconfig(k8s_cluster, tmp_path)
    client = kube_client.KubeClient(kube_client.api_client_from_config(kubeconfig=str(kubeconfig)),
                                    namespace=namespace, retries=Retries(attempts=1))  # fmt: skip
    try:
        with pytest.raises(CmbclusterError):  # not expired yet: the loader keeps it, refused again
            client.list("Pod", "app=none")
        assert runs.read_text() == "x"
        time.sleep(2)  # the token is past its renewal time; the interval is not over
        assert client.list("Pod", "app=none") == []
        assert runs.read_text() == "xx"
    finally:
        client.close()


# -- plugin and pure helpers -----------------------------------------------------------------------
def test_plugin_registration_builds_a_working_backend(k8s_cluster: K8sCluster, namespace: str) -> None:
    (registration,) = list(cmbcluster_compute_backends())
    assert registration.name == "kubernetes" and registration.settings_model is KubernetesSettings
    settings = KubernetesSettings(kubeconfig=k8s_cluster.cp_kubeconfig)
    core = CoreSettings(namespace=namespace, cloud_provider="aws")
    seen: list[str] = []
    b = build_backend(
        ProviderContext(core=core, provider_settings=settings), decorate=lambda d, c: seen.append(c.storage_backend)
    )
    try:
        assert isinstance(b, KubernetesCompute)
        assert b.namespace == namespace and b.options.storage_backend == "aws" and b.options.infra_provider == "aws"
        b.check_ready()
        with pytest.raises(NotFound):
            b.client.call("read_namespaced_pod", "absent", namespace, what="reading")
    finally:
        b.close()


def test_plugin_module_does_not_import_the_client() -> None:
    probe = (
        "import sys, cmbcluster.kubernetes.plugin, cmbcluster.kubernetes.rbac; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


def test_quantities() -> None:
    assert cpu_quantity(0.5) == "500m"
    assert cpu_quantity(2) == "2"
    assert cpu_quantity(1.25) == "1250m"
    assert cpu_quantity(0.1) == "100m"
    assert memory_quantity(2048) == "2048Mi"
    with pytest.raises(InvalidRequest):
        cpu_quantity(0.0001)
    limits = resource_requirements(Resources(cpu=1, memory_mib=512, cpu_limit=2.5, memory_limit_mib=1024, gpu=1))
    assert limits == {
        "requests": {"cpu": "1", "memory": "512Mi", "nvidia.com/gpu": "1"},
        "limits": {"cpu": "2500m", "memory": "1024Mi", "nvidia.com/gpu": "1"},
    }
    with pytest.raises(InvalidRequest):
        resource_requirements(Resources(cpu=2, cpu_limit=1))


def test_rbac_is_minimal() -> None:
    for rule in rbac.NAMESPACED_RULES + rbac.CLUSTER_RULES:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])
        if "update" in rule["verbs"]:  # only the compare-and-swap of the leader Lease
            assert rule["resources"] == ["leases"]
        if "patch" in rule["verbs"]:  # a user's identity annotations; an upgrade's on Ingresses, which the
            # Role may create and delete anyway (patch gives it nothing more); nothing else
            assert rule["resources"] in (["serviceaccounts"], ["ingresses"])
        assert "roles" not in rule["resources"] and "rolebindings" not in rule["resources"]
    assert rbac.CLUSTER_RULES == [
        {"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["get", "list", "create", "delete"]}
    ]


def test_listeners_hear_of_every_pod_change_from_the_watch(backend: KubernetesCompute) -> None:
    """What wakes the progress streams at once (ComputeBackend.on_status_change)."""
    import threading

    heard: list[str] = []
    changed = threading.Event()

    def listener(environment_id: str) -> None:
        heard.append(environment_id)
        changed.set()

    backend.on_status_change(listener)
    environment_id = new_id()
    backend.start(make_spec(environment_id))
    running(backend, environment_id)
    assert changed.wait(10) and environment_id in heard and all(h == environment_id for h in heard)
    count = len(heard)
    backend.delete(environment_id)
    wait_for(lambda: len(heard) > count, 30, "the deletion to be heard")
