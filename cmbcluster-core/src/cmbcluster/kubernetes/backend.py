"""Environments as Kubernetes objects, kept current by watches.

Per environment ``<id>`` the backend creates, in its namespace:

- a **Pod** ``env-<id>`` built from a :class:`~cmbcluster.interfaces.PodDraft` that the
  pod-decoration hook changes before it is sent; secure by default (non-root, no privilege
  escalation, capabilities dropped, seccomp ``RuntimeDefault``, no service-account token
  unless the user's cloud identity needs a ServiceAccount); ready once its port accepts
  connections;
- a **Secret** ``env-<id>`` holding the user's variables and secret files (mounted read-only
  at :data:`SECRETS_DIR`), a **Service** and an **Ingress** ``env-<id>`` (see
  :mod:`cmbcluster.kubernetes.routing`) and the storage volumes' objects (PVCs), all owned by
  the Pod so that deleting the Pod garbage-collects them;
- cluster-scoped **PersistentVolumes** when the storage backend asks for them: no owner
  reference is possible, so stop/delete remove them explicitly, found by label;
- the user's **ServiceAccount**, when the infra provider gives users a cloud identity of their
  own: one per user, shared by their environments and kept while the user exists;
- once per namespace, the **NetworkPolicy** that isolates user pods.

Every object carries the labels of :mod:`cmbcluster.kubernetes.labels`. Creation is
idempotent: a 409 adopts the existing object when it is ours (same labels, owned by the
current Pod, not being deleted) and replaces it otherwise. Server errors, timeouts and
connection errors are retried with backoff, then raised as ProviderUnavailable.

Status comes from a watch of the namespace's managed pods and of their events
(:mod:`cmbcluster.kubernetes.watch`), not from polling each pod; while a watch is down, reads
go to the API server directly. With leader election on, a Lease
(:mod:`cmbcluster.kubernetes.lease`) decides which replica runs the background loops.

Only this package imports the ``kubernetes`` client. Calls return the API's JSON as dicts
(``_preload_content=False``): faster than the client's models, and the same across versions.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from cmbcluster.errors import (
    CmbclusterError,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ProviderUnavailable,
)
from cmbcluster.interfaces import (
    ComputeBackend,
    EnvironmentPhase,
    EnvironmentSpec,
    EnvironmentStatus,
    PodContext,
    PodDraft,
    Resources,
)
from cmbcluster.kubernetes.labels import (
    COMPONENT_LABEL,
    ENVIRONMENT_ANNOTATION,
    ENVIRONMENT_LABEL,
    MANAGED_BY,
    MANAGED_BY_VALUE,
    MANAGED_SELECTOR,
    USER_ANNOTATION,
    USER_ENVIRONMENT,
    USER_LABEL,
    environment_selector,
    identity_labels,
    user_labels,
)
from cmbcluster.kubernetes.lease import LeaseElector
from cmbcluster.kubernetes.routing import SERVICE_PORT, Exposure
from cmbcluster.kubernetes.watch import WatchCache, describe_error
from cmbcluster.naming import dns_label

log = logging.getLogger(__name__)

__all__ = [
    "ENVIRONMENT_LABEL",
    "MANAGED_BY",
    "MANAGED_BY_VALUE",
    "USER_LABEL",
    "KubernetesCompute",
    "api_client_from_config",
]

CONTAINER_NAME = "environment"
SECRETS_DIR = "/var/run/cmbcluster/secrets"
SECRETS_VOLUME = "cmbcluster-secrets"
SECRET_FILE_MODE = 0o400
RUN_AS_USER = 1000
RUN_AS_GROUP = 100
FS_GROUP = 100

Decorator = Callable[[PodDraft, PodContext], None]

_RETRYABLE_STATUS = {0, 429, 500, 502, 503, 504}
#: An API server that has just started answers 403 until its RBAC caches are filled: retried
#: like a 5xx, and reported as the permission error it is once the attempts are used up.
_RETRYABLE_THEN_REPORTED = {403}
_KEY_SAFE = re.compile(r"[-._a-zA-Z0-9]+")
_FAILED_WAITING = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"}

#: kind -> (API group client, suffix of its methods, namespaced)
_KINDS: dict[str, tuple[str, str, bool]] = {
    "Pod": ("core", "pod", True),
    "Service": ("core", "service", True),
    "Secret": ("core", "secret", True),
    "ServiceAccount": ("core", "service_account", True),
    "PersistentVolumeClaim": ("core", "persistent_volume_claim", True),
    "PersistentVolume": ("core", "persistent_volume", False),
    "Ingress": ("networking", "ingress", True),
    "NetworkPolicy": ("networking", "network_policy", True),
}
#: what stop/delete remove by name (at once)
_BY_NAME = ("Pod", "Ingress", "Service", "Secret")
#: threads for the independent calls of concurrent starts (Pod, Service and Ingress of each)
PARALLEL_CALLS = 16
CONNECTION_POOL_SIZE = 32
#: how long a start waits for the pod watch to be in step before reading pods directly
_SYNC_WAIT_SECONDS = 2.0


# -- helpers --------------------------------------------------------------------------------------
def object_name(environment_id: str) -> str:
    """The name of every namespaced object of an environment: ``env-<id>``, DNS-safe."""
    return dns_label("env", environment_id)


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


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


# -- the backend ----------------------------------------------------------------------------------
class KubernetesCompute(ComputeBackend):
    """Runs each environment as a Pod with its Service, Ingress and Secret in one namespace.

    ``api_client`` is a configured ``kubernetes.client.ApiClient`` (see
    :func:`api_client_from_config`); ``decorate`` runs the pod-decoration hook
    (``plugin_manager.decorate_pod``) on every draft before it is sent; ``exposure`` says how
    environments are reached; ``leader_identity`` turns leader election on (several replicas).
    """

    def __init__(
        self,
        api_client: Any,
        *,
        namespace: str,
        decorate: Decorator | None = None,
        storage_backend: str = "",
        infra_provider: str | None = None,
        exposure: Exposure | None = None,
        image_pull_policy: str = "IfNotPresent",
        attempts: int = 5,
        backoff_seconds: float = 0.2,
        request_timeout: tuple[float, float] = (5.0, 30.0),
        delete_wait_seconds: float = 60.0,
        leader_identity: str | None = None,
        lease_name: str = "cmbcluster-leader",
        lease_seconds: float = 15.0,
        active_settings: Mapping[type[Any], Any] | None = None,
    ) -> None:
        self.api_client = api_client
        self.apis: dict[str, Any] = {"core": k8s.CoreV1Api(api_client), "networking": k8s.NetworkingV1Api(api_client)}
        self.core = self.apis["core"]
        self.namespace = namespace
        self.decorate = decorate
        self.storage_backend = storage_backend
        self.infra_provider = infra_provider
        self.exposure = exposure or Exposure()
        self.active_settings = dict(active_settings or {})  # what pod decorators read (PodContext.settings)
        self.image_pull_policy = image_pull_policy
        self.attempts = max(1, attempts)
        self.backoff_seconds = backoff_seconds
        self.request_timeout = request_timeout
        self.delete_wait_seconds = delete_wait_seconds
        self._closed = threading.Event()
        self._network_policy_ready = False
        # for the calls of one start that do not depend on each other; the client's connection
        # pool (urllib3) is sized to match in api_client_from_config
        self._parallel = concurrent.futures.ThreadPoolExecutor(PARALLEL_CALLS, thread_name_prefix="cmbcluster-k8s")
        self.pods = WatchCache(
            self.core.list_namespaced_pod, namespace=namespace, what="pods", label_selector=MANAGED_SELECTOR,
            connect_timeout=request_timeout[0],
        )  # fmt: skip
        # The newest event of each pod: what the scheduler and the kubelet are doing about it.
        self.events = WatchCache(
            self.core.list_namespaced_event, namespace=namespace, what="events",
            field_selector="involvedObject.kind=Pod", key=_event_pod, order=_event_time,
            connect_timeout=request_timeout[0],
        )  # fmt: skip
        self.elector: LeaseElector | None = None
        if leader_identity:
            self.elector = LeaseElector(
                api_client, namespace=namespace, name=lease_name, identity=leader_identity,
                lease_seconds=lease_seconds, renew_deadline=lease_seconds * 2 / 3, renew_seconds=lease_seconds / 7,
                request_timeout=request_timeout[0],
            )  # fmt: skip

    @property
    def elects_leader(self) -> bool:
        return self.elector is not None

    def leads_background_work(self) -> bool:
        if self.elector is None:
            return True
        self.elector.start()
        return self.elector.is_leader

    # -- API calls ---------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, what: str, api: str = "core", **kwargs: Any) -> dict[str, Any]:
        """One API call, as JSON. Every call this backend makes is safe to repeat (reads,
        deletes that ignore 404, creates whose 409 adopts), so 5xx, 429, 403, timeouts and
        connection errors are retried with exponential backoff, then raised as
        ProviderUnavailable (PermissionDenied for a 403)."""
        fn = getattr(self.apis[api], method)
        delay = self.backoff_seconds
        last: Exception | None = None
        for attempt in range(self.attempts):
            try:
                response = fn(*args, _preload_content=False, _request_timeout=self.request_timeout, **kwargs)
                data = response.data
                return json.loads(data) if data else {}
            except ApiException as exc:
                if exc.status not in _RETRYABLE_STATUS | _RETRYABLE_THEN_REPORTED:
                    raise _translate(exc, what) from exc
                last = exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                last = exc
            if attempt + 1 < self.attempts and not self._closed.is_set():
                log.warning("kubernetes call %s failed (%s); retrying in %.1fs", method, describe_error(last), delay)
                time.sleep(delay)
                delay *= 2
        if isinstance(last, ApiException) and last.status in _RETRYABLE_THEN_REPORTED:
            raise _translate(last, what) from last
        raise ProviderUnavailable(
            f"the Kubernetes API did not answer {what} after {self.attempts} attempts: {describe_error(last)}"
        ) from last

    def _op(self, verb: str, kind: str) -> tuple[str, bool, str]:
        """(method name, namespaced, API client) of ``verb`` on ``kind``."""
        api, suffix, namespaced = _KINDS[kind]
        return (f"{verb}_namespaced_{suffix}" if namespaced else f"{verb}_{suffix}"), namespaced, api

    def _create(self, obj: dict[str, Any]) -> dict[str, Any]:
        method, namespaced, api = self._op("create", obj["kind"])
        args = (self.namespace,) if namespaced else ()
        return self._call(method, *args, body=obj, api=api, what=f"creating {obj['kind']} {_meta(obj).get('name')}")

    def _read(self, kind: str, name: str) -> dict[str, Any] | None:
        method, namespaced, api = self._op("read", kind)
        args = (name, self.namespace) if namespaced else (name,)
        try:
            return self._call(method, *args, api=api, what=f"reading {kind} {name}")
        except NotFound:
            return None

    def _delete(self, kind: str, name: str, *, grace_period_seconds: int | None = None) -> None:
        method, namespaced, api = self._op("delete", kind)
        args = (name, self.namespace) if namespaced else (name,)
        kwargs: dict[str, Any] = {"propagation_policy": "Background"}
        if grace_period_seconds is not None:
            kwargs["grace_period_seconds"] = grace_period_seconds
        try:
            self._call(method, *args, api=api, what=f"deleting {kind} {name}", **kwargs)
        except NotFound:
            pass

    def _list(self, kind: str, label_selector: str) -> list[dict[str, Any]]:
        method, namespaced, api = self._op("list", kind)
        args = (self.namespace,) if namespaced else ()
        items = self._call(method, *args, api=api, label_selector=label_selector, what=f"listing {kind}s").get("items")
        return [item for item in items or [] if isinstance(item, dict)]

    def _patch(self, kind: str, name: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        method, _, api = self._op("patch", kind)
        return self._call(method, name, self.namespace, body, api=api, what=what)

    # -- building the objects ------------------------------------------------------------------
    def build_draft(self, spec: EnvironmentSpec) -> PodDraft:
        """The pod draft before decoration: storage volumes, identity, secrets, resources."""
        name = object_name(spec.environment_id)
        labels = {**spec.labels, **identity_labels(spec.user.id, spec.environment_id)}
        labels[COMPONENT_LABEL] = USER_ENVIRONMENT
        env = {"PORT": str(spec.port), "HOST": "0.0.0.0", "CMBCLUSTER_ENVIRONMENT_ID": spec.environment_id}
        # path routing serves the environment under /environments/<id>/: the application needs to know
        env["CMBCLUSTER_BASE_PATH"] = self.exposure.path(spec.environment_id)
        draft = PodDraft(
            name=name,
            namespace=self.namespace,
            image=spec.image,
            command=list(spec.command),
            labels=labels,
            annotations={ENVIRONMENT_ANNOTATION: spec.environment_id, USER_ANNOTATION: spec.user.id},
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

    def pod_context(self, spec: EnvironmentSpec) -> PodContext:
        return PodContext(
            user=spec.user,
            environment_id=spec.environment_id,
            namespace=self.namespace,
            identity=spec.identity,
            storage_backend=self.storage_backend,
            infra_provider=self.infra_provider,
            # EnvironmentSpec carries volume specs, not bucket names: nothing to report here yet
            buckets=(),
            active_settings=self.active_settings,
        )

    def _validate(self, draft: PodDraft, spec: EnvironmentSpec) -> None:
        """What the decorators produced, checked before anything is sent."""
        ours = identity_labels(spec.user.id, spec.environment_id)
        draft.labels.update(ours)  # decorators may add labels, never change ours
        draft.labels[COMPONENT_LABEL] = USER_ENVIRONMENT  # the NetworkPolicy selects user pods by it
        if draft.name != object_name(spec.environment_id) or draft.namespace != self.namespace:
            raise InvalidRequest("pod decorators must not change the pod's name or namespace")
        if not draft.image:
            raise InvalidRequest("the environment has no image")
        if not 1 <= draft.port <= 65535:
            raise InvalidRequest(f"port {draft.port} is not a valid container port")
        volume_names = [str(v.get("name", "")) for v in draft.volumes]
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
            if obj.get("kind") not in ("PersistentVolume", "PersistentVolumeClaim", "Secret"):
                raise InvalidRequest(
                    f"the kubernetes compute backend cannot create a {obj.get('kind')!r} for an environment "
                    "(it creates PersistentVolumes, PersistentVolumeClaims and Secrets)"
                )
            if not _meta(obj).get("name"):
                raise InvalidRequest(f"a {obj.get('kind')} of the environment has no name")

    def build_secret(self, spec: EnvironmentSpec, labels: dict[str, str]) -> dict[str, Any]:
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

    def build_pod(self, draft: PodDraft, spec: EnvironmentSpec) -> dict[str, Any]:
        env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(draft.env.items())]
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": draft.name, "key": f"env.{key}"}}}
            for key in sorted(spec.env)
            if key not in draft.env
        ]
        container: dict[str, Any] = {
            "name": CONTAINER_NAME,
            "image": draft.image,
            "imagePullPolicy": self.image_pull_policy,
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

    def build_service(self, name: str, labels: dict[str, str], port: int) -> dict[str, Any]:
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

    def _prepare_extra(self, obj: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta["labels"] = {**(meta.get("labels") or {}), **labels}
        if obj["kind"] == "PersistentVolume":
            meta.pop("namespace", None)
            claim_ref = obj.get("spec", {}).get("claimRef")
            if isinstance(claim_ref, dict):
                claim_ref["namespace"] = self.namespace
        else:
            meta["namespace"] = self.namespace
        return obj

    # -- idempotent create -----------------------------------------------------------------------
    def _ensure(self, obj: dict[str, Any], labels: dict[str, str], owner_uid: str | None = None) -> dict[str, Any]:
        """Create ``obj``; on 409 adopt the existing object if it is ours, else replace it."""
        kind, name = obj["kind"], _meta(obj)["name"]
        for _ in range(3):
            try:
                return self._create(obj)
            except _AlreadyThere:
                pass
            existing = self._read(kind, name)
            if existing is None:
                continue  # deleted in between: create again
            if self._is_ours(existing, labels, owner_uid):
                return existing
            log.info("replacing %s %s that is not this environment's", kind, name)
            self._delete(kind, name, grace_period_seconds=0 if kind == "Pod" else None)
            self._wait_gone(kind, name)
        raise Conflict(f"{kind} {name} keeps being re-created by someone else; cannot start the environment")

    @staticmethod
    def _is_ours(existing: dict[str, Any], labels: dict[str, str], owner_uid: str | None) -> bool:
        meta = _meta(existing)
        if meta.get("deletionTimestamp"):
            return False
        found = meta.get("labels") or {}
        if any(found.get(k) != v for k, v in labels.items() if k in (MANAGED_BY, USER_LABEL, ENVIRONMENT_LABEL)):
            return False
        return owner_uid is None or _owned_by(existing, owner_uid)

    def _wait_gone(self, kind: str, name: str) -> None:
        deadline = time.monotonic() + self.delete_wait_seconds
        delay = 0.05
        while time.monotonic() < deadline:
            if self._read(kind, name) is None:
                return
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise ProviderUnavailable(f"{kind} {name} was not deleted within {self.delete_wait_seconds:.0f}s")

    # -- ComputeBackend ----------------------------------------------------------------------------
    def start(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        self._watch()
        draft = self.build_draft(spec)
        if self.decorate is not None:
            self.decorate(draft, self.pod_context(spec))
        self._validate(draft, spec)
        labels = identity_labels(spec.user.id, spec.environment_id)
        secret = self.build_secret(spec, labels)
        pod_manifest = self.build_pod(draft, spec)
        extras = [self._prepare_extra(json.loads(json.dumps(o)), labels) for o in draft.extra_objects]

        self._ensure_network_policy()
        if spec.identity is not None and spec.identity.service_account:
            self._ensure_service_account(spec)
        # The Secret is the environment's root object: created first, it owns everything else
        # (created owned, so no second call to set owners), and deleting it garbage-collects the
        # rest. What the pod needs (Secret, volumes, claims) exists before the pod, so neither
        # the scheduler nor the kubelet waits on a missing object; Service and Ingress follow the
        # pod, which is what the user waits for. PersistentVolumes are cluster-scoped and cannot
        # be owned by a namespaced object: stop/delete remove them by label.
        for volume in (obj for obj in extras if obj["kind"] == "PersistentVolume"):
            self._ensure(volume, labels)
        root = self._ensure(secret, labels)
        root_meta = _meta(root)
        owner = {
            "apiVersion": "v1",
            "kind": "Secret",
            "name": root_meta.get("name", draft.name),
            "uid": root_meta.get("uid", ""),
            "blockOwnerDeletion": False,
        }
        for obj in (o for o in extras if o["kind"] != "PersistentVolume"):  # claims: before the pod
            obj["metadata"]["ownerReferences"] = [owner]
            self._ensure(obj, labels, owner_uid=owner["uid"])
        # The pod, its Service and its Ingress do not depend on each other: sent at once.
        together = [
            pod_manifest,
            self.build_service(draft.name, labels, draft.port),
            self.exposure.ingress(draft.name, spec.environment_id, labels),
        ]
        for obj in together:
            obj["metadata"]["ownerReferences"] = [owner]
        futures = [self._parallel.submit(self._ensure, obj, labels, owner["uid"]) for obj in together]
        pod = futures[0].result()
        self.pods.put(pod)  # readers see it before its watch event arrives
        for future in futures[1:]:
            future.result()
        return self._status_from_pod(spec.environment_id, pod)

    def _ensure_network_policy(self) -> None:
        """The namespace's one NetworkPolicy over user pods; an existing one (the Helm chart's) is kept."""
        if self._network_policy_ready:
            return
        try:
            self._create(self.exposure.network_policy())
        except _AlreadyThere:
            pass
        self._network_policy_ready = True

    def _ensure_service_account(self, spec: EnvironmentSpec) -> None:
        """The user's ServiceAccount with their identity's annotations (a role ARN, a Google
        service account); created once, its annotations patched when the identity changes."""
        identity = spec.identity
        assert identity is not None and identity.service_account
        name = identity.service_account
        labels = user_labels(spec.user.id)
        manifest = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "labels": labels, "annotations": dict(identity.annotations)},
            "automountServiceAccountToken": False,  # pods that need the token ask for it themselves
        }
        try:
            self._create(manifest)
            return
        except _AlreadyThere:
            pass
        existing = self._read("ServiceAccount", name) or {}
        meta = _meta(existing)
        if (meta.get("labels") or {}).get(USER_LABEL) != labels[USER_LABEL]:
            raise Conflict(
                f"ServiceAccount {name} in namespace {self.namespace} exists but is not this user's; "
                "the infra provider must give each user a service account name of their own"
            )
        current = meta.get("annotations") or {}
        if any(current.get(k) != v for k, v in identity.annotations.items()):
            body = {"metadata": {"annotations": dict(identity.annotations)}}
            self._patch("ServiceAccount", name, body, what=f"updating ServiceAccount {name}")

    def stop(self, environment_id: str) -> None:
        self._remove(environment_id)

    def delete(self, environment_id: str) -> None:
        self._remove(environment_id)

    def _remove(self, environment_id: str) -> None:
        """Delete the environment's objects by name, the pod first (no waiting on the garbage
        collector), and its claims and volumes by label; deleting the root Secret also
        garbage-collects anything left. 404s are ignored: removing twice is fine."""
        name = object_name(environment_id)
        pod = self._pod(environment_id)
        for future in [self._parallel.submit(self._delete, kind, name) for kind in _BY_NAME]:
            future.result()
        claims = None if pod is None else [v for v in (pod.get("spec") or {}).get("volumes") or []
                                           if isinstance(v, dict) and v.get("persistentVolumeClaim")]  # fmt: skip
        if claims is None or claims:  # the pod is gone or unknown, or it had claims: find them by label
            selector = environment_selector(environment_id)
            for kind in ("PersistentVolumeClaim", "PersistentVolume"):
                for obj in self._list(kind, selector):
                    meta = _meta(obj)
                    if meta.get("name") and not meta.get("deletionTimestamp"):
                        self._delete(kind, str(meta["name"]))

    def forget_user(self, user_id: str) -> None:
        """Delete the user's ServiceAccount(s), found by their user label."""
        selector = ",".join(f"{k}={v}" for k, v in user_labels(user_id).items())
        for account in self._list("ServiceAccount", selector):
            name = _meta(account).get("name")
            if name:
                self._delete("ServiceAccount", str(name))

    def _watch(self) -> None:
        """Start the pod and event watches (first use); wait briefly for the first list."""
        self.events.start()
        self.pods.wait_synced(_SYNC_WAIT_SECONDS)

    def _pod(self, environment_id: str) -> dict[str, Any] | None:
        self._watch()
        name = object_name(environment_id)
        if self.pods.synced:
            return self.pods.get(name)
        return self._read("Pod", name)

    def status(self, environment_id: str) -> EnvironmentStatus:
        pod = self._pod(environment_id)
        if pod is None:
            return EnvironmentStatus(environment_id=environment_id, phase=EnvironmentPhase.MISSING)
        return self._status_from_pod(environment_id, pod)

    def list_managed(self) -> list[EnvironmentStatus]:
        self._watch()
        pods = self.pods.items() if self.pods.synced else self._list("Pod", MANAGED_SELECTOR)
        statuses = []
        for pod in pods:
            meta = _meta(pod)
            environment_id = (meta.get("annotations") or {}).get(ENVIRONMENT_ANNOTATION) or (
                meta.get("labels") or {}
            ).get(ENVIRONMENT_LABEL)
            if environment_id:
                statuses.append(self._status_from_pod(str(environment_id), pod))
        return statuses

    def logs(self, environment_id: str, *, tail: int = 200) -> str:
        try:
            read_log: Any = self.core.read_namespaced_pod_log
            response = read_log(
                object_name(environment_id),
                self.namespace,
                container=CONTAINER_NAME,
                tail_lines=tail,
                _preload_content=False,
                _request_timeout=self.request_timeout,
            )
            return bytes(response.data).decode("utf-8", errors="replace")
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.info("no logs for environment %s: %s", environment_id, describe_error(exc))
            return ""

    def check_ready(self) -> None:
        self._call("list_namespaced_pod", self.namespace, limit=1, label_selector=MANAGED_SELECTOR, what="listing pods")

    def close(self) -> None:
        self._closed.set()
        self._parallel.shutdown(wait=False, cancel_futures=True)
        if self.elector is not None:
            self.elector.close()
        self.pods.close()
        self.events.close()
        try:
            self.api_client.close()
        except Exception:  # closing must never raise
            log.debug("closing the kubernetes client failed", exc_info=True)

    # -- status ------------------------------------------------------------------------------------
    def environment_url(self, environment_id: str) -> str:
        """What the user opens: through the ingress, behind the owner-only auth check."""
        return self.exposure.url(object_name(environment_id), environment_id)

    def _status_from_pod(self, environment_id: str, pod: dict[str, Any]) -> EnvironmentStatus:
        meta = _meta(pod)
        status = pod.get("status") or {}
        phase = status.get("phase") or "Pending"
        user_id = (meta.get("annotations") or {}).get(USER_ANNOTATION) or (meta.get("labels") or {}).get(USER_LABEL)
        started_at = _parse_time(status.get("startTime")) or _parse_time(meta.get("creationTimestamp"))
        conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, dict)}

        def result(p: EnvironmentPhase, message: str = "", url: str | None = None) -> EnvironmentStatus:
            return EnvironmentStatus(
                environment_id=environment_id, phase=p, url=url, message=message,
                started_at=started_at, user_id=str(user_id) if user_id else None,
            )  # fmt: skip

        if meta.get("deletionTimestamp"):
            return result(EnvironmentPhase.STOPPING, "stopping")
        waiting, terminated = _container_states(status)
        if phase == "Pending":
            event = self._latest_event(meta)
            scheduled = conditions.get("PodScheduled")
            if scheduled is None or scheduled.get("status") != "True":
                message = event or (scheduled or {}).get("message") or "waiting for a node"
                return result(EnvironmentPhase.PENDING, str(message))
            return result(EnvironmentPhase.STARTING, waiting or event or "starting the container")
        if phase == "Running":
            ready = conditions.get("Ready")
            if ready is not None and ready.get("status") == "True":
                return result(EnvironmentPhase.RUNNING, "", self.environment_url(environment_id))
            return result(
                EnvironmentPhase.STARTING,
                waiting or self._latest_event(meta) or "waiting for the application to be ready",
            )
        if phase == "Succeeded":
            return result(EnvironmentPhase.STOPPED, terminated or "the application exited")
        if phase == "Failed":
            message = status.get("message") or status.get("reason") or terminated or "the pod failed"
            return result(EnvironmentPhase.FAILED, str(message))
        return result(EnvironmentPhase.STARTING, f"pod phase {phase}")

    def _latest_event(self, pod_meta: dict[str, Any]) -> str:
        """The newest Kubernetes event about this very pod (same uid), as ``Reason: message``."""
        event = self.events.get(str(pod_meta.get("name"))) if self.events.synced else None
        if event is None or (event.get("involvedObject") or {}).get("uid") != pod_meta.get("uid"):
            return ""
        reason, message = event.get("reason") or "", event.get("message") or ""
        return f"{reason}: {message}" if reason and message else str(reason or message)


def _event_pod(event: dict[str, Any]) -> str | None:
    name = (event.get("involvedObject") or {}).get("name")
    return str(name) if name else None


def _event_time(event: dict[str, Any]) -> str:
    return str(event.get("lastTimestamp") or event.get("eventTime") or _meta(event).get("creationTimestamp") or "")


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    owners = _meta(obj).get("ownerReferences") or []
    return any(isinstance(ref, dict) and ref.get("uid") == uid for ref in owners)


class _AlreadyThere(Conflict):
    """A create answered 409 AlreadyExists (handled by ``_ensure``)."""


def _container_states(status: dict[str, Any]) -> tuple[str, str]:
    """(waiting reason: message, terminated reason) of the environment's container."""
    waiting = terminated = ""
    for container in status.get("containerStatuses") or []:
        if not isinstance(container, dict) or container.get("name") != CONTAINER_NAME:
            continue
        state = container.get("state") or {}
        if state.get("waiting"):
            reason = state["waiting"].get("reason") or "waiting"
            message = state["waiting"].get("message")
            waiting = f"{reason}: {message}" if message else str(reason)
            if reason in _FAILED_WAITING:
                waiting = f"{waiting} (the environment cannot start until this is fixed)"
        if state.get("terminated"):
            term = state["terminated"]
            terminated = str(term.get("message") or term.get("reason") or f"exit code {term.get('exitCode')}")
    return waiting, terminated


def _api_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or "")


def _translate(exc: ApiException, what: str) -> CmbclusterError:
    message = f"{what}: {_api_message(exc)}"
    if exc.status == 404:
        return NotFound(message)
    if exc.status == 409:
        return _AlreadyThere(message) if what.startswith("creating") else Conflict(message)
    if exc.status == 403:
        return PermissionDenied(f"the control plane's Kubernetes role does not allow {message}")
    if exc.status == 401:
        return ProviderUnavailable(f"the Kubernetes API refused the control plane's credentials ({message})")
    if exc.status in (400, 422):
        return InvalidRequest(f"Kubernetes rejected {message}")
    return ProviderUnavailable(f"the Kubernetes API failed {message} (HTTP {exc.status})")


def api_client_from_config(
    *, kubeconfig: str | None = None, context: str | None = None, in_cluster: bool | None = None
) -> Any:
    """A ``kubernetes.client.ApiClient``: in-cluster when asked (or, when ``in_cluster`` is None,
    when running in a pod and no kubeconfig is given), else from the kubeconfig file."""
    import os

    from kubernetes import config as kube_config

    config: Any = kube_config  # typed differently by each client version
    configuration = k8s.Configuration()
    if in_cluster or (in_cluster is None and not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST")):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    # One connection per thread that may call at once (worker threads, parallel calls, watches):
    # the default (5 x CPUs) makes urllib3 open and drop a TLS connection per call under load.
    configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
    return k8s.ApiClient(configuration)
