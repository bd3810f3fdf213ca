"""The Kubernetes objects of one environment, as JSON manifests: pure code, no API call.

From an :class:`~cmbcluster.interfaces.EnvironmentSpec` come the pod draft that pod decorators
change (:func:`build_draft`), the checks of what they produced (:func:`check_decorated`), and the
manifests the backend sends: the Pod (secure by default: non-root, no privilege escalation,
capabilities dropped, seccomp ``RuntimeDefault``, no service-account token unless the user's
cloud identity needs a ServiceAccount), its Secret (the user's variables and secret files), its
headless Service, the user's ServiceAccount and the storage volumes' objects. The Ingress and the
namespace's NetworkPolicy come from :mod:`cmbcluster.kubernetes.routing`.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

from cmbcluster.compute.command import LaunchValues, render_command, standard_variables, without_token_arguments
from cmbcluster.errors import InvalidRequest
from cmbcluster.interfaces import EnvironmentSpec, PodContext, PodDraft, Resources
from cmbcluster.kubernetes.labels import (
    COMPONENT_LABEL,
    ENVIRONMENT_ANNOTATION,
    ENVIRONMENT_LABEL,
    MANAGED_BY,
    MANAGED_BY_VALUE,
    TOKEN_ANNOTATION,
    USER_ANNOTATION,
    USER_ENVIRONMENT,
    USER_LABEL,
    identity_labels,
    metadata,
    user_labels,
)
from cmbcluster.kubernetes.routing import SERVICE_PORT, Exposure
from cmbcluster.naming import dns_label

__all__ = [
    "CONTAINER_NAME",
    "OBJECT_PREFIX",
    "SECRETS_DIR",
    "build_draft",
    "build_pod",
    "build_secret",
    "build_service",
    "build_service_account",
    "check_decorated",
    "cpu_quantity",
    "is_ours",
    "memory_quantity",
    "object_name",
    "owner_reference",
    "pod_context",
    "prepare_extra",
    "resource_requirements",
]

CONTAINER_NAME = "environment"
SECRETS_DIR = "/var/run/cmbcluster/secrets"
SECRETS_VOLUME = "cmbcluster-secrets"
SECRET_FILE_MODE = 0o400
RUN_AS_USER = 1000
RUN_AS_GROUP = 100
FS_GROUP = 100
#: The kinds a storage backend or a pod decorator may add to an environment (``extra_objects``).
EXTRA_KINDS = ("PersistentVolume", "PersistentVolumeClaim", "Secret")

_KEY_SAFE = re.compile(r"[-._a-zA-Z0-9]+")


OBJECT_PREFIX = "env-"


def object_name(environment_id: str) -> str:
    """The name of every namespaced object of an environment: ``env-<id>``, DNS-safe (our ids are
    lower-case hex, so the id is the name without :data:`OBJECT_PREFIX`)."""
    return dns_label(OBJECT_PREFIX.rstrip("-"), environment_id)


def cpu_quantity(cores: float) -> str:
    """Cores as a Kubernetes quantity: ``0.5`` -> ``"500m"``, ``2`` -> ``"2"``."""
    millis = round(cores * 1000)
    if millis < 1:
        raise InvalidRequest(f"CPU {cores!r} is below the smallest amount Kubernetes accepts (0.001)")
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def memory_quantity(mib: int) -> str:
    """MiB as a Kubernetes quantity: ``2048`` -> ``"2048Mi"``."""
    if mib < 1:
        raise InvalidRequest(f"memory {mib!r} MiB must be at least 1 MiB")
    return f"{int(mib)}Mi"


def resource_requirements(resources: Resources) -> dict[str, dict[str, str]]:
    """Requests and limits (limits default to the requests, so pods are Guaranteed)."""
    cpu_limit = resources.cpu_limit if resources.cpu_limit is not None else resources.cpu
    memory_limit = resources.memory_limit_mib if resources.memory_limit_mib is not None else resources.memory_mib
    if cpu_limit < resources.cpu or memory_limit < resources.memory_mib:
        raise InvalidRequest("resource limits must not be below the requests")
    requests = {"cpu": cpu_quantity(resources.cpu), "memory": memory_quantity(resources.memory_mib)}
    limits = {"cpu": cpu_quantity(cpu_limit), "memory": memory_quantity(memory_limit)}
    if resources.gpu:
        if resources.gpu < 0:
            raise InvalidRequest("gpu must not be negative")
        limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = str(resources.gpu)
    return {"requests": requests, "limits": limits}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- the pod draft ---------------------------------------------------------------------------------
def build_draft(spec: EnvironmentSpec, *, namespace: str, exposure: Exposure, token: str = "") -> PodDraft:
    """The pod draft before decoration: storage volumes, identity, secrets, resources. ``token``:
    the application's token for this start, which only the proxy (or the ingress) sends."""
    name = object_name(spec.environment_id)
    labels = {**spec.labels, **identity_labels(spec.user.id, spec.environment_id)}
    labels[COMPONENT_LABEL] = USER_ENVIRONMENT
    # The one templating every backend shares (cmbcluster.compute.command): listen on every
    # address of the pod, on the container port, under the path the ingress serves it at (path
    # routing: /environments/<id>/, host routing: /). An application that checks a token gets one
    # of its start's own, which only the control plane's proxy, or the ingress as the control
    # plane's check answers it, sends: a pod elsewhere in a cluster that does not enforce the
    # NetworkPolicy cannot use the application either.
    launch = LaunchValues(
        environment_id=spec.environment_id, host="0.0.0.0", port=spec.port,
        base_url=exposure.path(spec.environment_id), token=token,
    )  # fmt: skip
    env = standard_variables(launch, spec.command)
    command = render_command(spec.command, launch) if spec.command else []
    if command and not token:
        command += without_token_arguments(spec.command)
    annotations = {ENVIRONMENT_ANNOTATION: spec.environment_id, USER_ANNOTATION: spec.user.id}
    if token:
        annotations[TOKEN_ANNOTATION] = token
    draft = PodDraft(
        name=name,
        namespace=namespace,
        image=spec.image,
        command=command,
        labels=labels,
        annotations=annotations,
        env=env,
        port=spec.port,
        working_dir=spec.working_dir,
        resources=resource_requirements(spec.resources),
    )
    if spec.secret_files:
        draft.env["CMBCLUSTER_SECRETS_DIR"] = SECRETS_DIR
        draft.volumes.append(
            {
                "name": SECRETS_VOLUME,
                "secret": {
                    "secretName": name,
                    "defaultMode": SECRET_FILE_MODE,
                    "items": [{"key": f"file.{f}", "path": f} for f in sorted(spec.secret_files)],
                },
            }
        )
        draft.volume_mounts.append({"name": SECRETS_VOLUME, "mountPath": SECRETS_DIR, "readOnly": True})
    for mounted in spec.volumes:
        volume = mounted.spec
        if volume.volume is not None:
            draft.volumes.append(dict(volume.volume))
        if volume.mount is not None:
            draft.volume_mounts.append(dict(volume.mount))
        draft.extra_objects.extend(json.loads(json.dumps(obj)) for obj in volume.objects)
        draft.annotations.update(volume.pod_annotations)
    if spec.identity is not None and spec.identity.service_account:
        draft.service_account_name = spec.identity.service_account
        draft.automount_service_account_token = True
    return draft


def pod_context(
    spec: EnvironmentSpec,
    *,
    namespace: str,
    storage_backend: str,
    infra_provider: str | None,
    active_settings: Mapping[type[Any], Any],
) -> PodContext:
    """What pod decorators are handed beside the draft of ``spec``'s pod."""
    return PodContext(
        user=spec.user,
        environment_id=spec.environment_id,
        namespace=namespace,
        identity=spec.identity,
        storage_backend=storage_backend,
        infra_provider=infra_provider,
        buckets=tuple(v.bucket for v in spec.volumes if v.bucket),
        active_settings=active_settings,
    )


def check_decorated(draft: PodDraft, spec: EnvironmentSpec, *, namespace: str) -> None:
    """What the decorators produced, checked before anything is sent; core's own labels are put
    back (decorators may add labels, never change ours)."""
    ours = identity_labels(spec.user.id, spec.environment_id)
    draft.labels.update(ours)
    draft.labels[COMPONENT_LABEL] = USER_ENVIRONMENT  # the NetworkPolicy selects user pods by it
    if draft.name != object_name(spec.environment_id) or draft.namespace != namespace:
        raise InvalidRequest("pod decorators must not change the pod's name or namespace")
    if not draft.image:
        raise InvalidRequest("the environment has no image")
    if not 1 <= draft.port <= 65535:
        raise InvalidRequest(f"port {draft.port} is not a valid container port")
    expected_account = spec.identity.service_account if spec.identity is not None else None
    if draft.service_account_name not in (None, expected_account):
        # any other ServiceAccount (the control plane's, another user's) would lend the pod its rights
        raise InvalidRequest(
            f"pod decorators must not run the pod as ServiceAccount {draft.service_account_name!r}: "
            "a user's pod runs as the user's cloud identity or none"
        )
    volume_names = [str(v.get("name", "")) for v in draft.volumes]
    for volume in draft.volumes:
        if "hostPath" in volume:
            raise InvalidRequest(f"pod volume {volume.get('name')!r} mounts a folder of the node (hostPath)")
    if len(set(volume_names)) != len(volume_names) or "" in volume_names:
        raise InvalidRequest(f"pod volumes must have unique, non-empty names: {volume_names}")
    for mount in draft.volume_mounts:
        if mount.get("name") not in volume_names:
            raise InvalidRequest(f"volume mount {mount.get('name')!r} refers to no volume of the pod")
        if not str(mount.get("mountPath", "")).startswith("/"):
            raise InvalidRequest(f"volume mount {mount.get('name')!r} needs an absolute mountPath")
    for name in draft.env:
        if not _KEY_SAFE.fullmatch(name):
            raise InvalidRequest(f"invalid environment variable name {name!r}")
    for obj in draft.extra_objects:
        if obj.get("kind") not in EXTRA_KINDS:
            raise InvalidRequest(
                f"the kubernetes compute backend cannot create a {obj.get('kind')!r} for an environment "
                "(it creates PersistentVolumes, PersistentVolumeClaims and Secrets)"
            )
        if not metadata(obj).get("name"):
            raise InvalidRequest(f"a {obj.get('kind')} of the environment has no name")
        volume_spec = obj.get("spec")
        if (
            obj.get("kind") == "PersistentVolume"
            and isinstance(volume_spec, dict)
            and {"hostPath", "local"} & set(volume_spec)
        ):
            raise InvalidRequest(f"PersistentVolume {metadata(obj).get('name')!r} mounts a folder of the node")


# -- the manifests ---------------------------------------------------------------------------------
def build_secret(spec: EnvironmentSpec, labels: dict[str, str]) -> dict[str, Any]:
    """The environment's root object: the user's variables (``env.<name>``) and secret files (``file.<name>``)."""
    data: dict[str, str] = {}
    for key, value in spec.env.items():
        if not _KEY_SAFE.fullmatch(key):
            raise InvalidRequest(f"invalid environment variable name {key!r}")
        data[f"env.{key}"] = _b64(value.encode())
    for filename, content in spec.secret_files.items():
        if not _KEY_SAFE.fullmatch(filename) or filename in {".", ".."} or filename.startswith(".."):
            raise InvalidRequest(f"invalid secret file name {filename!r}")
        data[f"file.{filename}"] = _b64(content)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": object_name(spec.environment_id), "labels": dict(labels)},
        "type": "Opaque",
        "data": data,
    }


def build_pod(draft: PodDraft, spec: EnvironmentSpec, *, image_pull_policy: str = "IfNotPresent") -> dict[str, Any]:
    """The Pod of a (decorated, checked) draft; the user's variables come from the Secret."""
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(draft.env.items())]
    env += [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": draft.name, "key": f"env.{key}"}}}
        for key in sorted(spec.env)
        if key not in draft.env
    ]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": draft.image,
        "imagePullPolicy": image_pull_policy,
        "ports": [{"name": "http", "containerPort": draft.port, "protocol": "TCP"}],
        "env": env,
        "resources": draft.resources,
        "volumeMounts": draft.volume_mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_GROUP,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    # Ready once the application accepts connections: a TCP check suits any application
    # (an HTTP one would need to know its paths and redirects).
    container["readinessProbe"] = {
        "tcpSocket": {"port": draft.port}, "periodSeconds": 2, "failureThreshold": 3, "timeoutSeconds": 2,
    }  # fmt: skip
    if draft.command:
        container["command"] = draft.command
    if draft.working_dir:
        container["workingDir"] = draft.working_dir
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": draft.volumes,
        "restartPolicy": "OnFailure",
        "automountServiceAccountToken": bool(draft.automount_service_account_token),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": draft.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_GROUP,
            "fsGroup": FS_GROUP,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if draft.service_account_name:
        pod_spec["serviceAccountName"] = draft.service_account_name
    if draft.node_selector:
        pod_spec["nodeSelector"] = draft.node_selector
    if draft.tolerations:
        pod_spec["tolerations"] = draft.tolerations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": draft.name, "labels": draft.labels, "annotations": draft.annotations},
        "spec": pod_spec,
    }


def build_service(name: str, labels: dict[str, str], port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            # Headless: the ingress controller routes to the pod's endpoint directly, so a
            # virtual IP would only cost an allocation (serialised in the API server: it was
            # the slowest call of a start) and a set of kube-proxy rules per environment.
            "type": "ClusterIP",
            "clusterIP": "None",
            "selector": {MANAGED_BY: MANAGED_BY_VALUE, ENVIRONMENT_LABEL: labels[ENVIRONMENT_LABEL]},
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": port, "protocol": "TCP"}],
        },
    }


def build_service_account(name: str, user_id: str, annotations: dict[str, str]) -> dict[str, Any]:
    """The user's ServiceAccount, with their cloud identity's annotations (a role ARN, a Google service account)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "labels": user_labels(user_id), "annotations": dict(annotations)},
        "automountServiceAccountToken": False,  # pods that need the token ask for it themselves
    }


def prepare_extra(obj: dict[str, Any], labels: dict[str, str], namespace: str) -> dict[str, Any]:
    """A storage object of the environment, labelled as its own; a PersistentVolume (cluster-scoped)
    gets its claim's namespace, every other object the environment's."""
    meta = obj.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **labels}
    if obj["kind"] == "PersistentVolume":
        meta.pop("namespace", None)
        claim_ref = obj.get("spec", {}).get("claimRef")
        if isinstance(claim_ref, dict):
            claim_ref["namespace"] = namespace
    else:
        meta["namespace"] = namespace
    return obj


def owner_reference(root: dict[str, Any], fallback_name: str) -> dict[str, Any]:
    """The reference to the environment's root object (its Secret, or its Pod when it has no
    Secret) every other namespaced object carries, so that deleting the root garbage-collects them."""
    meta = metadata(root)
    return {
        "apiVersion": "v1",
        "kind": root.get("kind", "Secret"),
        "name": meta.get("name", fallback_name),
        "uid": meta.get("uid", ""),
        "blockOwnerDeletion": False,
    }


def is_ours(existing: dict[str, Any], labels: dict[str, str], owner_uid: str | None) -> bool:
    """Whether an object found under our name is this environment's (same labels, owned by the
    current root, or by nothing when it is a root itself: ``owner_uid`` None; not being deleted),
    so a create answered 409 may adopt it."""
    meta = metadata(existing)
    if meta.get("deletionTimestamp"):
        return False
    found = meta.get("labels") or {}
    if any(found.get(k) != v for k, v in labels.items() if k in (MANAGED_BY, USER_LABEL, ENVIRONMENT_LABEL)):
        return False
    owners = [ref.get("uid") for ref in meta.get("ownerReferences") or [] if isinstance(ref, dict)]
    # a root owned by something (the pod of a start that had a Secret) belongs to another start
    return not owners if owner_uid is None else owner_uid in owners
