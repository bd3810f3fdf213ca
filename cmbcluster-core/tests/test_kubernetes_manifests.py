"""The Kubernetes backend's pure parts, without an API server: the manifests of an environment
(the pod's security above all) and the rules that turn a pod and its events into a status.
tests/k8s/test_kubernetes_backend.py runs the same objects against a real API server."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest

from cmbcluster.errors import InvalidRequest
from cmbcluster.interfaces import (
    CloudIdentity,
    EnvironmentPhase,
    EnvironmentSpec,
    MountedVolume,
    Resources,
    UserRef,
    VolumeSpec,
)
from cmbcluster.kubernetes.labels import COMPONENT_LABEL, ENVIRONMENT_LABEL, MANAGED_BY, USER_LABEL
from cmbcluster.kubernetes.manifests import (
    SECRETS_DIR,
    build_draft,
    build_pod,
    build_secret,
    build_service,
    check_decorated,
    is_ours,
    object_name,
    prepare_extra,
)
from cmbcluster.kubernetes.routing import Exposure
from cmbcluster.kubernetes.status import status_from_pod

USER = UserRef(id="0123456789abcdef0123456789abcdef", email="ada@example.org")
ENV_ID = "fedcba9876543210fedcba9876543210"
NAMESPACE = "cmb"
EXPOSURE = Exposure(routing="ingress", environments_domain="envs.example.org")


def spec(**overrides: Any) -> EnvironmentSpec:
    volume = VolumeSpec(
        volume={"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
        mount={"name": "data", "mountPath": "/home/jovyan/work"},
        objects=[{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"}}],
        pod_annotations={"example.com/volume": "yes"},
    )
    fields: dict[str, Any] = {
        "environment_id": ENV_ID,
        "user": USER,
        "image": "quay.io/jupyter/base-notebook",
        "command": ("start-notebook.py",),
        "port": 8888,
        "working_dir": "/home/jovyan",
        "env": {"GREETING": "hello"},
        "secret_files": {"token.txt": b"s3cr3t\n"},
        "resources": Resources(cpu=0.5, memory_mib=2048),
        "volumes": (MountedVolume(mount_path="/home/jovyan/work", spec=volume),),
        "labels": {"cmbcluster.io/application": "jupyter"},
    }
    fields.update(overrides)
    return EnvironmentSpec(**fields)


def pod_of(environment: EnvironmentSpec) -> dict[str, Any]:
    draft = build_draft(environment, namespace=NAMESPACE, exposure=EXPOSURE)
    check_decorated(draft, environment, namespace=NAMESPACE)
    return build_pod(draft, environment)


# -- the pod ---------------------------------------------------------------------------------------
def test_the_pod_runs_unprivileged_without_a_token() -> None:
    pod = pod_of(spec())
    pod_spec = pod["spec"]
    assert pod_spec["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
        "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    (container,) = pod_spec["containers"]
    assert container["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "allowPrivilegeEscalation": False,
        "privileged": False, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    assert pod_spec["automountServiceAccountToken"] is False and "serviceAccountName" not in pod_spec
    assert pod_spec["enableServiceLinks"] is False
    assert container["readinessProbe"]["tcpSocket"] == {"port": 8888}
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "2048Mi"}, "limits": {"cpu": "500m", "memory": "2048Mi"}
    }  # fmt: skip
    assert "ada@example.org" not in json.dumps(pod)  # ids only, never the person's address


@pytest.mark.parametrize(
    ("exposure", "base_url"),
    [
        (Exposure(routing="ingress", environments_domain="envs.example.org"), "/"),
        (Exposure(routing="ingress", public_url="https://cmb.example.org"), None),
    ],
    ids=["host routing", "path routing"],
)
def test_the_command_is_rendered_as_every_backend_renders_it(exposure: Exposure, base_url: str | None) -> None:
    """{host}, {port} and {base_url} become what the pod listens on and is served under; a
    placeholder left in a command would reach the program literally (its --port={port} fails)."""
    from cmbcluster.services.catalog import JUPYTER_COMMAND

    environment = spec(command=JUPYTER_COMMAND, port=8888)
    draft = build_draft(environment, namespace=NAMESPACE, exposure=exposure)
    container = build_pod(draft, environment)["spec"]["containers"][0]
    expected_base = base_url or f"/environments/{ENV_ID}/"
    assert container["command"] == [
        "jupyter-lab", "--no-browser", "--ip=0.0.0.0", "--port=8888", "--ServerApp.port_retries=0",
        f"--ServerApp.base_url={expected_base}", "--ServerApp.allow_remote_access=True",
        "--IdentityProvider.token=",  # the ingress checks access: JupyterLab must not invent a token
    ]  # fmt: skip
    assert not any("{" in part for part in container["command"])
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["HOST"] == "0.0.0.0" and env["PORT"] == "8888" and env["CMBCLUSTER_BASE_PATH"] == expected_base
    assert "JUPYTER_TOKEN" not in env
    with pytest.raises(InvalidRequest, match="socket"):  # no Unix sockets in a pod: a clear refusal
        build_draft(spec(command=("serve", "{socket}")), namespace=NAMESPACE, exposure=exposure)


def test_a_cloud_identity_gets_its_service_account_and_token() -> None:
    identity = CloudIdentity(user=USER, principal="arn:aws:iam::1:role/x", service_account="cmbcluster-user-0123")
    pod_spec = pod_of(spec(identity=identity))["spec"]
    assert pod_spec["serviceAccountName"] == "cmbcluster-user-0123"
    assert pod_spec["automountServiceAccountToken"] is True


def test_variables_come_from_the_secret_and_files_are_mounted_read_only() -> None:
    environment = spec()
    pod = pod_of(environment)
    name = object_name(ENV_ID)
    assert pod["metadata"]["name"] == name == f"env-{ENV_ID}"
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PORT"]["value"] == "8888" and env["CMBCLUSTER_SECRETS_DIR"]["value"] == SECRETS_DIR
    assert env["CMBCLUSTER_BASE_PATH"]["value"] == "/"  # host routing: served at the root
    assert env["GREETING"] == {"name": "GREETING", "valueFrom": {"secretKeyRef": {"name": name, "key": "env.GREETING"}}}
    secrets_volume = next(v for v in pod["spec"]["volumes"] if "secret" in v)
    assert secrets_volume["secret"] == {
        "secretName": name, "defaultMode": 0o400, "items": [{"key": "file.token.txt", "path": "token.txt"}]
    }  # fmt: skip
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[SECRETS_DIR]["readOnly"] is True and "/home/jovyan/work" in mounts
    assert pod["metadata"]["annotations"]["example.com/volume"] == "yes"

    secret = build_secret(environment, {MANAGED_BY: "cmbcluster"})
    assert base64.b64decode(secret["data"]["env.GREETING"]) == b"hello"
    assert base64.b64decode(secret["data"]["file.token.txt"]) == b"s3cr3t\n"
    with pytest.raises(InvalidRequest, match="secret file name"):
        build_secret(spec(secret_files={"../escape": b"x"}), {})


def test_decorators_may_add_labels_but_never_change_ours() -> None:
    environment = spec()
    draft = build_draft(environment, namespace=NAMESPACE, exposure=EXPOSURE)
    draft.labels[MANAGED_BY] = "someone-else"
    draft.labels[COMPONENT_LABEL] = "sneaky"
    draft.labels["example.com/team"] = "cmb"
    check_decorated(draft, environment, namespace=NAMESPACE)
    assert draft.labels[MANAGED_BY] == "cmbcluster" and draft.labels[COMPONENT_LABEL] == "user-environment"
    assert draft.labels["example.com/team"] == "cmb" and draft.labels["cmbcluster.io/application"] == "jupyter"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.volume_mounts.append({"name": "nope", "mountPath": "/x"}), "refers to no volume"),
        (lambda d: d.volumes.append({"name": "data"}), "unique, non-empty names"),
        (lambda d: d.env.update({"BAD NAME": "x"}), "invalid environment variable name"),
        (lambda d: setattr(d, "name", "other"), "must not change the pod's name"),
        (lambda d: setattr(d, "port", 0), "not a valid container port"),
        (lambda d: d.extra_objects.append({"kind": "ClusterRoleBinding", "metadata": {"name": "x"}}), "cannot create"),
        # the node's folders and another ServiceAccount's rights are never a user pod's
        (lambda d: d.volumes.append({"name": "node", "hostPath": {"path": "/"}}), "folder of the node"),
        (
            lambda d: d.extra_objects.append(
                {"kind": "PersistentVolume", "metadata": {"name": "pv"}, "spec": {"hostPath": {"path": "/etc"}}}
            ),
            "folder of the node",
        ),
        (lambda d: setattr(d, "service_account_name", "cmbcluster-controlplane"), "must not run the pod as"),
    ],
)
def test_what_decorators_produce_is_checked_before_sending(change: Any, message: str) -> None:
    environment = spec()
    draft = build_draft(environment, namespace=NAMESPACE, exposure=EXPOSURE)
    change(draft)
    with pytest.raises(InvalidRequest, match=message):
        check_decorated(draft, environment, namespace=NAMESPACE)


def test_the_service_is_headless_and_storage_objects_are_namespaced() -> None:
    labels = {MANAGED_BY: "cmbcluster", USER_LABEL: USER.id, ENVIRONMENT_LABEL: ENV_ID}
    service = build_service("env-x", labels, 8888)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {MANAGED_BY: "cmbcluster", ENVIRONMENT_LABEL: ENV_ID}
    volume = prepare_extra(
        {"kind": "PersistentVolume", "metadata": {"name": "pv", "namespace": "x", "labels": {"a": "b"}},
         "spec": {"claimRef": {"name": "pvc"}}}, labels, NAMESPACE,
    )  # fmt: skip
    assert "namespace" not in volume["metadata"] and volume["spec"]["claimRef"]["namespace"] == NAMESPACE
    assert volume["metadata"]["labels"] == {"a": "b", **labels}
    claim = prepare_extra({"kind": "PersistentVolumeClaim", "metadata": {"name": "pvc"}}, labels, NAMESPACE)
    assert claim["metadata"]["namespace"] == NAMESPACE


def test_only_our_own_live_objects_are_adopted() -> None:
    labels = {MANAGED_BY: "cmbcluster", USER_LABEL: USER.id, ENVIRONMENT_LABEL: ENV_ID}
    ours = {"metadata": {"labels": dict(labels), "ownerReferences": [{"uid": "root-1"}]}}
    assert is_ours(ours, labels, "root-1")
    assert not is_ours(ours, labels, "root-2")  # owned by an earlier root: replaced
    # a root is adopted only as a root: a pod owned by an earlier start's Secret is that start's
    assert not is_ours(ours, labels, None)
    assert is_ours({"metadata": {"labels": dict(labels)}}, labels, None)
    assert not is_ours({"metadata": {"labels": {**labels, USER_LABEL: "someone"}}}, labels, None)
    assert not is_ours({"metadata": {"labels": labels, "deletionTimestamp": "2025-01-01T00:00:00Z"}}, labels, None)


# -- status ----------------------------------------------------------------------------------------
URL = "https://env-x.envs.example.org/"


def pod(phase: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "env-x", "uid": "pod-1", "annotations": {"cmbcluster.io/user-id": USER.id},
                     "creationTimestamp": "2025-03-01T10:00:00Z"},
        "status": {"phase": phase, **status},
    }  # fmt: skip


def event(reason: str, message: str, uid: str = "pod-1") -> dict[str, Any]:
    return {"involvedObject": {"name": "env-x", "uid": uid}, "reason": reason, "message": message}


def test_a_running_ready_pod_is_running_with_its_url() -> None:
    ready = pod("Running", startTime="2025-03-01T10:00:05Z", conditions=[{"type": "Ready", "status": "True"}])
    status = status_from_pod("x", ready, url=URL)
    assert (status.phase, status.url, status.user_id) == (EnvironmentPhase.RUNNING, URL, USER.id)
    assert status.started_at == dt.datetime(2025, 3, 1, 10, 0, 5, tzinfo=dt.UTC)
    not_ready = status_from_pod("x", pod("Running"), url=URL)
    assert (not_ready.phase, not_ready.url) == (EnvironmentPhase.STARTING, None)
    assert not_ready.message == "waiting for the application to be ready"


def test_an_unscheduled_pod_says_what_the_scheduler_says() -> None:
    unscheduled = pod("Pending", conditions=[{"type": "PodScheduled", "status": "False", "message": "0/1 nodes"}])
    found = status_from_pod("x", unscheduled, url=URL, event=event("FailedScheduling", "0/3 nodes are available"))
    assert (found.phase, found.message) == (EnvironmentPhase.PENDING, "FailedScheduling: 0/3 nodes are available")
    # an event about an earlier pod of the same name is not this pod's
    stale = status_from_pod("x", unscheduled, url=URL, event=event("FailedScheduling", "old", uid="pod-0"))
    assert stale.message == "0/1 nodes"
    assert status_from_pod("x", pod("Pending"), url=URL).message == "waiting for a node"


def test_a_container_that_cannot_start_says_why() -> None:
    waiting = pod(
        "Pending",
        conditions=[{"type": "PodScheduled", "status": "True"}],
        containerStatuses=[{"name": "environment", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                                        "message": "no such image"}}}],
    )  # fmt: skip
    status = status_from_pod("x", waiting, url=URL)
    assert status.phase == EnvironmentPhase.STARTING
    assert status.message == "ImagePullBackOff: no such image (the environment cannot start until this is fixed)"
    pulling = pod("Pending", conditions=[{"type": "PodScheduled", "status": "True"}])
    assert status_from_pod("x", pulling, url=URL, event=event("Pulling", "pulling image")).message == (
        "Pulling: pulling image"
    )


def test_an_application_the_kubelet_keeps_restarting_is_a_failure_with_its_exit_code() -> None:
    """Its pod stays Running (restartPolicy OnFailure): reported starting, the launch dialog waited
    for core's 10-minute start timeout on an application that had failed at once."""
    crashing = pod("Running", containerStatuses=[{
        "name": "environment", "restartCount": 2,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s restarting failed container"}},
        "lastState": {"terminated": {"exitCode": 3, "reason": "Error"}},
    }])  # fmt: skip
    status = status_from_pod("x", crashing, url=URL)
    assert (status.phase, status.url) == (EnvironmentPhase.FAILED, None)
    assert status.message == (
        "the application exited with code 3 (Error), 3 times (CrashLoopBackOff: restarted after a back-off)"
    )
    # another container waiting (pulling its image) is still starting
    pulling = pod("Running", containerStatuses=[{"name": "environment", "state": {"waiting": {"reason": "Pulling"}}}])
    assert status_from_pod("x", pulling, url=URL).phase == EnvironmentPhase.STARTING


def test_ended_and_vanishing_pods() -> None:
    exited = pod("Succeeded", containerStatuses=[{"name": "environment", "state": {"terminated": {"exitCode": 0}}}])
    assert status_from_pod("x", exited, url=URL).phase == EnvironmentPhase.STOPPED
    assert status_from_pod("x", exited, url=URL).message == "exit code 0"
    failed = status_from_pod("x", pod("Failed", reason="Evicted", message="low on memory"), url=URL)
    assert (failed.phase, failed.message) == (EnvironmentPhase.FAILED, "low on memory")
    deleting = pod("Running")
    deleting["metadata"]["deletionTimestamp"] = "2025-03-01T11:00:00Z"
    assert status_from_pod("x", deleting, url=URL).phase == EnvironmentPhase.STOPPING
    assert status_from_pod("x", pod("Unknown"), url=URL).message == "pod phase Unknown"
