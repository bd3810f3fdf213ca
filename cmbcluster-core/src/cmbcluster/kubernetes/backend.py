"""Environments as Kubernetes objects, kept current by watches: the orchestration.

Per environment ``<id>`` the backend creates, in its namespace:

- a **Pod** ``env-<id>`` built from a :class:`~cmbcluster.interfaces.PodDraft` that the
  pod-decoration hook changes before it is sent (:mod:`cmbcluster.kubernetes.manifests` builds
  it, secure by default); ready once its port accepts connections;
- a **Secret** ``env-<id>`` holding the user's variables and secret files (mounted read-only
  at :data:`~cmbcluster.kubernetes.manifests.SECRETS_DIR`), a **Service** and an **Ingress**
  ``env-<id>`` (see :mod:`cmbcluster.kubernetes.routing`) and the storage volumes' objects
  (PVCs), all owned by the Secret so that deleting it garbage-collects them. An environment
  with nothing secret and no claim has no Secret: its Pod is the root and owns the rest;
- cluster-scoped **PersistentVolumes** when the storage backend asks for them: no owner
  reference is possible, so stop/delete remove them explicitly, found by label;
- the user's **ServiceAccount**, when the infra provider gives users a cloud identity of their
  own: one per user, shared by their environments and kept while the user exists;
- once per namespace, the **NetworkPolicy** that isolates user pods.

Every object carries the labels of :mod:`cmbcluster.kubernetes.labels`. Creation is
idempotent: a 409 adopts the existing object when it is ours (same labels, owned by the
current root, not being deleted) and replaces it otherwise. The API calls, their retries and
error translation are :mod:`cmbcluster.kubernetes.client`'s.

Status comes from a watch of the namespace's managed pods and of their events
(:mod:`cmbcluster.kubernetes.watch`), not from polling each pod, through the rules of
:mod:`cmbcluster.kubernetes.status`; while a watch is down, reads go to the API server directly.
With leader election on, a Lease (:mod:`cmbcluster.kubernetes.lease`) decides which replica
runs the background loops.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cmbcluster.compute.command import REDACTED, takes_token, token_headers
from cmbcluster.errors import Conflict, ProviderUnavailable
from cmbcluster.interfaces import (
    ComputeBackend,
    EnvironmentPhase,
    EnvironmentSpec,
    EnvironmentStatus,
    PodContext,
    PodDraft,
    ResourceUse,
    Upstream,
)
from cmbcluster.kubernetes.client import AlreadyThere, KubeClient, Retries
from cmbcluster.kubernetes.labels import (
    ENVIRONMENT_ANNOTATION,
    ENVIRONMENT_LABEL,
    MANAGED_SELECTOR,
    TOKEN_ANNOTATION,
    USER_LABEL,
    environment_selector,
    identity_labels,
    metadata,
    user_labels,
)
from cmbcluster.kubernetes.lease import LeaseElector
from cmbcluster.kubernetes.manifests import (
    CONTAINER_NAME,
    OBJECT_PREFIX,
    build_draft,
    build_pod,
    build_secret,
    build_service,
    build_service_account,
    check_decorated,
    is_ours,
    object_name,
    owner_reference,
    pod_context,
    prepare_extra,
)
from cmbcluster.kubernetes.metrics import PodMetrics
from cmbcluster.kubernetes.routing import Exposure
from cmbcluster.kubernetes.status import event_pod, event_time, status_from_pod
from cmbcluster.kubernetes.watch import WatchCache

log = logging.getLogger(__name__)

__all__ = ["KubernetesCompute", "KubernetesOptions", "LeaderElection"]

Decorator = Callable[[PodDraft, PodContext], None]

#: what stop/delete remove by name (at once)
_BY_NAME = ("Pod", "Ingress", "Service", "Secret")
#: threads for the independent calls of concurrent starts (Pod, Service and Ingress of each)
PARALLEL_CALLS = 16
#: how long a start waits for the pod watch to be in step before reading pods directly
_SYNC_WAIT_SECONDS = 2.0


@dataclass(frozen=True, kw_only=True)
class LeaderElection:
    """Elect one replica, through a Lease, to run the background loops (several replicas)."""

    #: unique per replica process
    identity: str
    lease_name: str = "cmbcluster-leader"
    #: how long a dead leader's Lease holds before another replica takes over
    lease_seconds: float = 15.0


@dataclass(frozen=True, kw_only=True)
class KubernetesOptions:
    """Everything the backend is configured with (the plugin fills it from KubernetesSettings)."""

    namespace: str
    #: how environments are reached (Ingress, host or path routing) and isolated (NetworkPolicy)
    exposure: Exposure = field(default_factory=Exposure)
    image_pull_policy: str = "IfNotPresent"
    retries: Retries = field(default_factory=Retries)
    #: how long a replaced object may take to be deleted
    delete_wait_seconds: float = 60.0
    leader_election: LeaderElection | None = None
    # What pod decorators read in their PodContext: the active providers and their settings.
    storage_backend: str = ""
    infra_provider: str | None = None
    active_settings: Mapping[type[Any], Any] = field(default_factory=dict)


class KubernetesCompute(ComputeBackend):
    """Runs each environment as a Pod with its Service, Ingress and Secret in one namespace.

    ``api_client`` is a configured ``kubernetes.client.ApiClient`` (see
    :func:`cmbcluster.kubernetes.client.api_client_from_config`); ``decorate`` runs the
    pod-decoration hook (``plugin_manager.decorate_pod``) on every draft before it is sent.
    """

    def __init__(self, api_client: Any, options: KubernetesOptions, *, decorate: Decorator | None = None) -> None:
        self.options = options
        self.decorate = decorate
        self.client = KubeClient(api_client, namespace=options.namespace, retries=options.retries)
        self._network_policy_ready = False
        self._routes_up_to_date = False
        self.metrics = PodMetrics(self.client)
        # for the calls of one start that do not depend on each other; the client's connection
        # pool (urllib3) is sized to match in api_client_from_config
        self._parallel = concurrent.futures.ThreadPoolExecutor(PARALLEL_CALLS, thread_name_prefix="cmbcluster-k8s")
        connect_timeout = options.retries.request_timeout[0]
        # who hears of a change (ComputeBackend.on_status_change): the progress streams' hub
        self._listeners: list[Callable[[str], None]] = []
        self.pods = WatchCache(
            self.client.core.list_namespaced_pod, namespace=options.namespace, what="pods",
            label_selector=MANAGED_SELECTOR, connect_timeout=connect_timeout, on_change=self._pod_changed,
        )  # fmt: skip
        # The newest event of each pod: what the scheduler and the kubelet are doing about it.
        self.events = WatchCache(
            self.client.core.list_namespaced_event, namespace=options.namespace, what="events",
            field_selector="involvedObject.kind=Pod", key=event_pod, order=event_time,
            connect_timeout=connect_timeout, on_change=self._pod_changed,
        )  # fmt: skip
        self.elector: LeaseElector | None = None
        election = options.leader_election
        if election is not None:
            self.elector = LeaseElector(
                api_client, namespace=options.namespace, name=election.lease_name, identity=election.identity,
                lease_seconds=election.lease_seconds, renew_deadline=election.lease_seconds * 2 / 3,
                renew_seconds=election.lease_seconds / 7, request_timeout=connect_timeout,
            )  # fmt: skip

    @property
    def namespace(self) -> str:
        return self.options.namespace

    def on_status_change(self, listener: Callable[[str], None]) -> None:
        """``listener(environment_id)`` at every watch event of its pod (phase, readiness, events)."""
        self._listeners.append(listener)

    def _pod_changed(self, pod_name: str) -> None:
        """From the watch threads: the pod (or one of its events) changed."""
        environment_id = pod_name.removeprefix(OBJECT_PREFIX)
        if environment_id == pod_name:
            return  # not an environment's pod
        for listener in self._listeners:
            try:
                listener(environment_id)
            except Exception:  # one listener's bug must not keep the change from the others
                log.exception("status listener %r failed", listener)

    @property
    def elects_leader(self) -> bool:
        return self.elector is not None

    def leads_background_work(self) -> bool:
        if self.elector is None:
            return True
        self.elector.start()
        return self.elector.is_leader

    # -- building the objects ------------------------------------------------------------------
    def build_draft(self, spec: EnvironmentSpec) -> PodDraft:
        """The pod draft before decoration: storage volumes, identity, secrets, resources, and a
        token of this start's own for an application that checks one."""
        token = secrets.token_urlsafe(32) if spec.command and takes_token(spec.command) else ""
        return build_draft(spec, namespace=self.namespace, exposure=self.options.exposure, token=token)

    def pod_context(self, spec: EnvironmentSpec) -> PodContext:
        return pod_context(
            spec, namespace=self.namespace, storage_backend=self.options.storage_backend,
            infra_provider=self.options.infra_provider, active_settings=self.options.active_settings,
        )  # fmt: skip

    def build_pod(self, draft: PodDraft, spec: EnvironmentSpec) -> dict[str, Any]:
        return build_pod(draft, spec, image_pull_policy=self.options.image_pull_policy)

    # -- idempotent create -----------------------------------------------------------------------
    def _ensure(self, obj: dict[str, Any], labels: dict[str, str], owner_uid: str | None = None) -> dict[str, Any]:
        """Create ``obj``; on 409 adopt the existing object if it is ours, else replace it."""
        kind, name = obj["kind"], metadata(obj)["name"]
        for _ in range(3):
            try:
                return self.client.create(obj)
            except AlreadyThere:
                pass
            existing = self.client.read(kind, name)
            if existing is None:
                continue  # deleted in between: create again
            if metadata(existing).get("deletionTimestamp"):
                # the previous run's, still going away (a restart right after a stop): never
                # adopt it, or the environment would be left with nothing once it is gone
                self._wait_gone(kind, name)
                continue
            if is_ours(existing, labels, owner_uid):
                return existing
            log.info("replacing %s %s that is not this environment's", kind, name)
            self.client.delete(kind, name, grace_period_seconds=0 if kind == "Pod" else None)
            self._wait_gone(kind, name)
        raise Conflict(f"{kind} {name} keeps being re-created by someone else; cannot start the environment")

    def _wait_gone(self, kind: str, name: str) -> None:
        deadline = time.monotonic() + self.options.delete_wait_seconds
        delay = 0.05
        while time.monotonic() < deadline:
            if self.client.read(kind, name) is None:
                return
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise ProviderUnavailable(f"{kind} {name} was not deleted within {self.options.delete_wait_seconds:.0f}s")

    # -- ComputeBackend ----------------------------------------------------------------------------
    def start(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        self._watch()
        draft = self.build_draft(spec)
        if self.decorate is not None:
            self.decorate(draft, self.pod_context(spec))
        check_decorated(draft, spec, namespace=self.namespace)
        labels = identity_labels(spec.user.id, spec.environment_id)
        secret = build_secret(spec, labels)
        pod_manifest = self.build_pod(draft, spec)
        extras = [prepare_extra(json.loads(json.dumps(o)), labels, self.namespace) for o in draft.extra_objects]

        self._ensure_network_policy()
        if spec.identity is not None and spec.identity.service_account:
            self._ensure_service_account(spec)
        for volume in (obj for obj in extras if obj["kind"] == "PersistentVolume"):
            self._ensure(volume, labels)
        owned_extras = [obj for obj in extras if obj["kind"] != "PersistentVolume"]  # claims, Secrets
        # Served through the control plane's proxy, the pod is all the user reaches.
        routes = [] if self.options.exposure.proxied else [
            build_service(draft.name, labels, draft.port),
            self.options.exposure.ingress(draft.name, spec.environment_id, labels),
        ]  # fmt: skip
        if secret["data"] or owned_extras:
            # The Secret is the root object: created first, it owns everything else (created
            # owned, so no second call to set owners), and deleting it garbage-collects the rest.
            # What the pod needs (Secret, volumes, claims) exists before the pod, so neither the
            # scheduler nor the kubelet waits on a missing object. The pod and its routes do not
            # depend on each other: sent at once. PersistentVolumes are cluster-scoped and cannot
            # be owned by a namespaced object: stop/delete remove them by label.
            owner = owner_reference(self._ensure(secret, labels), draft.name)
            self._ensure_owned(owned_extras, labels, owner)  # before the pod, which mounts them
            pod = self._ensure_owned([pod_manifest, *routes], labels, owner)[0]
        else:
            # Nothing secret and nothing else to own first: no Secret (a start makes one API call
            # fewer and waits one round trip less); the pod is the root, its routes follow it.
            pod = self._ensure(pod_manifest, labels)
            self.pods.put(pod)  # readers see it before its watch event arrives
            self._ensure_owned(routes, labels, owner_reference(pod, draft.name))
        return self._status(spec.environment_id, pod)

    def _ensure_owned(
        self, objects: list[dict[str, Any]], labels: dict[str, str], owner: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Create ``objects`` owned by ``owner``, at once (they do not depend on each other); a pod
        among them is put in the watch's cache as soon as it is created."""
        for obj in objects:
            obj["metadata"]["ownerReferences"] = [owner]
        futures = [self._parallel.submit(self._ensure, obj, labels, owner["uid"]) for obj in objects]
        created = []
        for future in futures:
            created.append(future.result())
            if created[-1].get("kind") == "Pod":
                self.pods.put(created[-1])  # readers see it before its watch event arrives
        return created

    def _ensure_network_policy(self) -> None:
        """The namespace's one NetworkPolicy over user pods; an existing one (the Helm chart's) is kept."""
        if self._network_policy_ready:
            return
        try:
            self.client.create(self.options.exposure.network_policy())
        except AlreadyThere:
            pass
        self._network_policy_ready = True

    def _ensure_service_account(self, spec: EnvironmentSpec) -> None:
        """The user's ServiceAccount with their identity's annotations (a role ARN, a Google
        service account); created once, its annotations patched when the identity changes."""
        identity = spec.identity
        assert identity is not None and identity.service_account
        name = identity.service_account
        try:
            self.client.create(build_service_account(name, spec.user.id, identity.annotations))
            return
        except AlreadyThere:
            pass
        meta = metadata(self.client.read("ServiceAccount", name) or {})
        if (meta.get("labels") or {}).get(USER_LABEL) != user_labels(spec.user.id)[USER_LABEL]:
            raise Conflict(
                f"ServiceAccount {name} in namespace {self.namespace} exists but is not this user's; "
                "the infra provider must give each user a service account name of their own"
            )
        current = meta.get("annotations") or {}
        if any(current.get(k) != v for k, v in identity.annotations.items()):
            body = {"metadata": {"annotations": dict(identity.annotations)}}
            self.client.patch("ServiceAccount", name, body, what=f"updating ServiceAccount {name}")

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
        # The root (the Secret, else the Pod) owns whatever else there is (a Service and Ingress of
        # an earlier routing too).
        kinds = ("Pod", "Secret") if self.options.exposure.proxied else _BY_NAME
        for kind, answer in [(kind, self._parallel.submit(self.client.delete, kind, name)) for kind in kinds]:
            deleting = answer.result()
            if kind == "Pod" and deleting.get("kind") == "Pod" and metadata(deleting).get("deletionTimestamp"):
                # Readers (the proxy's upstream) see it deleting now, not when its watch event arrives.
                self.pods.put(deleting)
        claims = None if pod is None else [v for v in (pod.get("spec") or {}).get("volumes") or []
                                           if isinstance(v, dict) and v.get("persistentVolumeClaim")]  # fmt: skip
        if claims is None or claims:  # the pod is gone or unknown, or it had claims: find them by label
            selector = environment_selector(environment_id)
            for kind in ("PersistentVolumeClaim", "PersistentVolume"):
                for obj in self.client.list(kind, selector):
                    meta = metadata(obj)
                    if meta.get("name") and not meta.get("deletionTimestamp"):
                        self.client.delete(kind, str(meta["name"]))

    def forget_user(self, user_id: str) -> None:
        """Delete the user's ServiceAccount(s), found by their user label."""
        selector = ",".join(f"{k}={v}" for k, v in user_labels(user_id).items())
        for account in self.client.list("ServiceAccount", selector):
            name = metadata(account).get("name")
            if name:
                self.client.delete("ServiceAccount", str(name))

    def _watch(self) -> None:
        """Start the pod and event watches (first use); wait briefly for the first list."""
        self.events.start()
        self.pods.wait_synced(_SYNC_WAIT_SECONDS)

    def _pod(self, environment_id: str) -> dict[str, Any] | None:
        self._watch()
        name = object_name(environment_id)
        if self.pods.synced:
            return self.pods.get(name)
        return self.client.read("Pod", name)

    def status(self, environment_id: str) -> EnvironmentStatus:
        pod = self._pod(environment_id)
        if pod is None:
            return EnvironmentStatus(environment_id=environment_id, phase=EnvironmentPhase.MISSING)
        return self._status(environment_id, pod)

    def list_managed(self) -> list[EnvironmentStatus]:
        self._watch()
        self._bring_routes_up_to_date()
        pods = self.pods.items() if self.pods.synced else self.client.list("Pod", MANAGED_SELECTOR)
        statuses = []
        for pod in pods:
            meta = metadata(pod)
            environment_id = (meta.get("annotations") or {}).get(ENVIRONMENT_ANNOTATION) or (
                meta.get("labels") or {}
            ).get(ENVIRONMENT_LABEL)
            if environment_id:
                statuses.append(self._status(str(environment_id), pod))
        return statuses

    def _bring_routes_up_to_date(self) -> None:
        """What an earlier version or routing made for environments still running, made as this one
        would; once per process, from the reconcile loop's listing (errors are logged and tried
        again at the next pass: the listing must go on).

        Behind the proxy, an earlier ``ingress`` routing's Ingresses and Services are removed (the
        default changed): an Ingress would go on sending its path to the pod through the ingress
        controller, which the NetworkPolicy no longer admits (502 until a restart); once they are
        gone the control plane's own Ingress sends those paths to the proxy. With ``ingress``
        routing, each Ingress gets this version's annotations: an earlier one sent a browser on an
        environment's own host to the sign-in page, which no longer leads back there (it signs in
        through ``enter``), so the environment was out of its owner's reach until a restart."""
        if self._routes_up_to_date:
            return
        selector = f"{MANAGED_SELECTOR},{ENVIRONMENT_LABEL}"
        try:
            if self.options.exposure.proxied:
                for kind in ("Ingress", "Service"):
                    for obj in self.client.list(kind, selector):
                        name = metadata(obj).get("name")
                        if name and not metadata(obj).get("deletionTimestamp"):
                            log.info("removing %s %s of the earlier ingress routing", kind, name)
                            self.client.delete(kind, str(name))
            else:
                for obj in self.client.list("Ingress", selector):
                    self._update_annotations(obj)
        except Exception:
            log.warning("could not bring the earlier routes up to date; trying again later", exc_info=True)
            return
        self._routes_up_to_date = True

    def _update_annotations(self, ingress: dict[str, Any]) -> None:
        """This version's annotations on an environment's Ingress (others, an operator's or another
        controller's, are left as they are)."""
        meta = metadata(ingress)
        name, environment_id = meta.get("name"), (meta.get("labels") or {}).get(ENVIRONMENT_LABEL)
        if not name or not environment_id or meta.get("deletionTimestamp"):
            return
        wanted = self.options.exposure.ingress(str(name), str(environment_id), {})["metadata"]["annotations"]
        current = meta.get("annotations") or {}
        changed = {key: value for key, value in wanted.items() if current.get(key) != value}
        if changed:
            log.info("updating the annotations of Ingress %s: %s", name, ", ".join(sorted(changed)))
            body = {"metadata": {"annotations": changed}}
            self.client.patch("Ingress", str(name), body, what=f"updating Ingress {name}")

    def resource_use(self, environment_ids: Sequence[str]) -> Mapping[str, ResourceUse] | None:
        return self.metrics.resource_use(environment_ids)

    def logs(self, environment_id: str, *, tail: int = 200) -> str:
        text = self.client.pod_log(object_name(environment_id), container=CONTAINER_NAME, tail=tail)
        token = _token(self._pod(environment_id))
        return text.replace(token, REDACTED) if token else text  # applications print their URL with it

    def check_ready(self) -> None:
        self.client.call(
            "list_namespaced_pod", self.namespace, limit=1, label_selector=MANAGED_SELECTOR, what="listing pods"
        )

    def close(self) -> None:
        self.client.stop_retrying()
        self._parallel.shutdown(wait=False, cancel_futures=True)
        if self.elector is not None:
            self.elector.close()
        self.pods.close()
        self.events.close()
        self.client.close()

    def upstream(self, environment_id: str) -> Upstream | None:
        """With ``proxy`` routing: the pod's own address, once it is Ready (from the watch, no API
        call per request). With ``ingress`` routing the ingress controller serves environments."""
        if not self.options.exposure.proxied:
            return None
        pod = self._pod(environment_id)
        if pod is None or status_from_pod(environment_id, pod, url="").phase != EnvironmentPhase.RUNNING:
            return None  # Ready, and not being deleted
        address = (pod.get("status") or {}).get("podIP")
        ports = [p.get("containerPort") for c in (pod.get("spec") or {}).get("containers") or []
                 if c.get("name") == CONTAINER_NAME for p in c.get("ports") or []]  # fmt: skip
        if not address or not ports:
            return None
        port = ports[0]
        host = f"[{address}]" if ":" in address else address  # an IPv6 cluster
        return Upstream(url=f"http://{host}:{port}", headers=token_headers(_token(pod)))

    def application_headers(self, environment_id: str) -> Mapping[str, str]:
        """The start's token, which the ``authorize`` check gives the ingress to send (``ingress``
        routing; behind the proxy, :meth:`upstream` has it)."""
        return token_headers(_token(self._pod(environment_id)))

    # -- status ------------------------------------------------------------------------------------
    def environment_url(self, environment_id: str) -> str:
        """What the user opens: through the ingress or the control plane's proxy, behind the
        owner-only check."""
        return self.options.exposure.url(object_name(environment_id), environment_id)

    def _status(self, environment_id: str, pod: dict[str, Any]) -> EnvironmentStatus:
        name = str(metadata(pod).get("name"))
        event = self.events.get(name) if self.events.synced else None
        return status_from_pod(environment_id, pod, url=self.environment_url(environment_id), event=event)


def _token(pod: dict[str, Any] | None) -> str:
    """The application token of the pod's start, else empty."""
    token = (metadata(pod or {}).get("annotations") or {}).get(TOKEN_ANNOTATION)
    return token if isinstance(token, str) else ""
