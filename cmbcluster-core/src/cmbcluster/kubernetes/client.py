"""The Kubernetes API as the backend uses it: JSON in and out, retries, typed errors.

Calls return the API's JSON as dicts (``_preload_content=False``): faster than the client's
models, and the same across versions. Every call the backend makes is safe to repeat (reads,
deletes that ignore 404, creates whose 409 adopts), so server errors, 429, timeouts and
connection errors are retried with backoff, then raised as ProviderUnavailable. Only this
package imports the ``kubernetes`` client, and only its transport modules (this one, the watch
and the lease).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from cmbcluster.errors import (
    CmbclusterError,
    Conflict,
    NotFound,
    ProviderUnavailable,
    error_for_status,
    retry_after_seconds,
)
from cmbcluster.kubernetes.labels import metadata
from cmbcluster.kubernetes.watch import describe_error

__all__ = ["CONNECTION_POOL_SIZE", "AlreadyThere", "KubeClient", "Retries", "api_client_from_config"]

log = logging.getLogger(__name__)

CONNECTION_POOL_SIZE = 32
_RETRYABLE_STATUS = {0, 500, 502, 503, 504}
#: Retried like a 5xx, and reported as what they are once the attempts are used up: an API server
#: that has just started answers 403 until its RBAC caches are filled (PermissionDenied); 429 is
#: the API server's rate limit (LimitExceeded, as every provider's 429: cmbcluster.errors).
_RETRYABLE_THEN_REPORTED = {403, 429}

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


@dataclass(frozen=True, kw_only=True)
class Retries:
    """How calls are retried: ``attempts`` in all, waiting ``backoff_seconds`` (doubled each time)
    between them; ``request_timeout`` is (connect, read) in seconds."""

    attempts: int = 5
    backoff_seconds: float = 0.2
    request_timeout: tuple[float, float] = (5.0, 30.0)


class AlreadyThere(Conflict):
    """A create answered 409 AlreadyExists (the backend adopts or replaces the object)."""


class KubeClient:
    """The calls of one namespace, made with a configured ``kubernetes.client.ApiClient``
    (see :func:`api_client_from_config`)."""

    def __init__(self, api_client: Any, *, namespace: str, retries: Retries | None = None) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.retries = retries or Retries()
        self.apis: dict[str, Any] = {"core": k8s.CoreV1Api(api_client), "networking": k8s.NetworkingV1Api(api_client)}
        self.core = self.apis["core"]
        self._closed = threading.Event()
        self._methods: dict[tuple[str, str], Callable[..., Any]] = {}

    @property
    def request_timeout(self) -> tuple[float, float]:
        return self.retries.request_timeout

    def call(self, method: str, *args: Any, what: str, api: str = "core", **kwargs: Any) -> dict[str, Any]:
        """One API call, as JSON. 5xx, 429, 403, timeouts and connection errors are retried with
        exponential backoff, then raised as ProviderUnavailable (PermissionDenied for a 403)."""
        fn = self._method(api, method)
        attempts = max(1, self.retries.attempts)
        delay = self.retries.backoff_seconds
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                return self._send(fn, args, kwargs)
            except ApiException as exc:
                if exc.status not in _RETRYABLE_STATUS | _RETRYABLE_THEN_REPORTED:
                    raise translate(exc, what) from exc
                last = exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                last = exc
            if attempt + 1 < attempts and not self._closed.is_set():
                log.warning("kubernetes call %s failed (%s); retrying in %.1fs", method, describe_error(last), delay)
                time.sleep(delay)
                delay *= 2
        if isinstance(last, ApiException) and last.status in _RETRYABLE_THEN_REPORTED:
            raise translate(last, what) from last
        raise ProviderUnavailable(
            f"the Kubernetes API did not answer {what} after {attempts} attempts: {describe_error(last)}"
        ) from last

    def _send(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """One request, as JSON. Refused 401 where the credentials can be renewed (a token from a
        kubeconfig's exec plugin, a pod's service account), they are renewed at once and it is
        sent again, once: a token can expire before its renewal is due by the clock the renewal
        reads (RefreshAtMostEvery's, which stands still while a suspended host sleeps)."""
        send = functools.partial(fn, *args, _preload_content=False, _request_timeout=self.request_timeout, **kwargs)
        try:
            response = send()
        except ApiException as exc:
            renewal = self.api_client.configuration.refresh_api_key_hook
            if exc.status != 401 or not isinstance(renewal, RefreshAtMostEvery):
                raise
            renewal.expire()
            response = send()
        data = response.data
        return json.loads(data) if data else {}

    def _method(self, api: str, method: str) -> Callable[..., Any]:
        """The client's method, without its check of every argument where it has one (pydantic's
        validate_call, kubernetes >= 35): that check turned each body dict into the client's models
        and back, a third of the CPU of creating a pod. The API server validates what it is sent."""
        fn = self._methods.get((api, method))
        if fn is None:
            bound = getattr(self.apis[api], method)
            raw = getattr(bound, "raw_function", None)
            fn = self._methods[(api, method)] = functools.partial(raw, self.apis[api]) if callable(raw) else bound
        return fn

    # -- one verb on one kind ------------------------------------------------------------------------
    def _op(self, verb: str, kind: str) -> tuple[str, bool, str]:
        """(method name, namespaced, API client) of ``verb`` on ``kind``."""
        api, suffix, namespaced = _KINDS[kind]
        return (f"{verb}_namespaced_{suffix}" if namespaced else f"{verb}_{suffix}"), namespaced, api

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj``; AlreadyThere (a Conflict) when an object of its name exists."""
        method, namespaced, api = self._op("create", obj["kind"])
        args = (self.namespace,) if namespaced else ()
        return self.call(method, *args, body=obj, api=api, what=f"creating {obj['kind']} {metadata(obj).get('name')}")

    def read(self, kind: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        method, namespaced, api = self._op("read", kind)
        args = (name, self.namespace) if namespaced else (name,)
        try:
            return self.call(method, *args, api=api, what=f"reading {kind} {name}")
        except NotFound:
            return None

    def delete(self, kind: str, name: str, *, grace_period_seconds: int | None = None) -> dict[str, Any]:
        """Delete in the background (dependents are garbage-collected); an absent object is fine.
        The API's answer: the object as deleting (``deletionTimestamp`` set) while it finishes, a
        Status once it is gone; {} when it was absent."""
        method, namespaced, api = self._op("delete", kind)
        args = (name, self.namespace) if namespaced else (name,)
        kwargs: dict[str, Any] = {"propagation_policy": "Background"}
        if grace_period_seconds is not None:
            kwargs["grace_period_seconds"] = grace_period_seconds
        try:
            return self.call(method, *args, api=api, what=f"deleting {kind} {name}", **kwargs)
        except NotFound:
            return {}

    def list(self, kind: str, label_selector: str) -> list[dict[str, Any]]:
        method, namespaced, api = self._op("list", kind)
        args = (self.namespace,) if namespaced else ()
        items = self.call(method, *args, api=api, label_selector=label_selector, what=f"listing {kind}s").get("items")
        return [item for item in items or [] if isinstance(item, dict)]

    def patch(self, kind: str, name: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        method, _, api = self._op("patch", kind)
        return self.call(method, name, self.namespace, body, api=api, what=what)

    def pod_log(self, name: str, *, container: str, tail: int) -> str:
        """The last ``tail`` lines of a pod's container; empty when they cannot be read (logged)."""
        try:
            read_log = self._method("core", "read_namespaced_pod_log")
            response = read_log(
                name, self.namespace, container=container, tail_lines=tail, _preload_content=False,
                _request_timeout=self.request_timeout,
            )  # fmt: skip
            return bytes(response.data).decode("utf-8", errors="replace")
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.info("no logs for pod %s: %s", name, describe_error(exc))
            return ""

    def stop_retrying(self) -> None:
        """A call failing from now on fails at once (while the backend closes its watches)."""
        self._closed.set()

    def close(self) -> None:
        """Stop retrying and release the connections."""
        self._closed.set()
        try:
            self.api_client.close()
        except Exception:  # closing must never raise
            log.debug("closing the kubernetes client failed", exc_info=True)


def _api_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or "")


def translate(exc: ApiException, what: str) -> CmbclusterError:
    """The typed error of a refused call on ``what`` ("creating Pod env-1", "reading Secret x"), by
    core's one policy (:func:`cmbcluster.errors.error_for_status`); a create answered 409 is
    AlreadyThere, which the backend adopts or replaces."""
    reason = _api_message(exc)
    if exc.status == 409 and what.startswith("creating"):
        return AlreadyThere(f"{what}: {reason}")
    return error_for_status(
        exc.status or 0, what, service="the Kubernetes API", reason=reason,
        retry_after=retry_after_seconds((exc.headers or {}).get("Retry-After")),
        forbidden="the control plane's Kubernetes role does not allow {what}",
    )  # fmt: skip


def api_client_from_config(
    *, kubeconfig: str | None = None, context: str | None = None, in_cluster: bool | None = None
) -> Any:
    """A ``kubernetes.client.ApiClient``: in-cluster when asked (or, when ``in_cluster`` is None,
    when running in a pod and no kubeconfig is given), else from the kubeconfig file."""
    from kubernetes import config as kube_config

    config: Any = kube_config  # typed differently by each client version
    configuration = ThrottledConfiguration()
    if in_cluster or (in_cluster is None and not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST")):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    # One connection per thread that may call at once (worker threads, parallel calls, watches):
    # the default (5 x CPUs) makes urllib3 open and drop a TLS connection per call under load.
    configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
    return k8s.ApiClient(configuration)


#: How often, at most, the client's credentials are checked for renewal (see RefreshAtMostEvery).
TOKEN_REFRESH_SECONDS = 10.0


class RefreshAtMostEvery:
    """A kubeconfig's or a pod's token refresh hook (``Configuration.refresh_api_key_hook``), run at
    most once every ``seconds``. The client runs the hook before every call, and both loaders' hooks
    apply their whole configuration again each time, whatever the token's expiry (the host's setter
    reads the environment's proxy variables): 4 % of the control plane's CPU in a burst of starts.
    The tokens they renew are renewed early, so checking every few seconds changes nothing: a
    kubeconfig's (an exec plugin's, EKS and GKE) 5 minutes before they expire, a pod's service
    account token re-read every minute while the kubelet rotates it long before its expiry; and a
    call refused 401 renews at once (KubeClient). Installed by :class:`ThrottledConfiguration`."""

    def __init__(self, hook: Callable[[Any], None], seconds: float | None = None) -> None:
        self.hook = hook
        self.seconds = TOKEN_REFRESH_SECONDS if seconds is None else seconds
        self._due = -float("inf")  # the first call runs it
        self._lock = threading.Lock()

    def __call__(self, configuration: Any) -> None:
        if time.monotonic() < self._due:
            return
        with self._lock:  # one thread renews; the others go on with the current token
            if time.monotonic() < self._due:
                return
            self.hook(configuration)  # a failure is the call's, and the next call tries again
            self._due = time.monotonic() + self.seconds

    def expire(self) -> None:
        """Run the hook at the next call, due or not."""
        self._due = -float("inf")

    def __deepcopy__(self, memo: dict[int, Any]) -> RefreshAtMostEvery:
        # a copied configuration (Configuration.set_default copies) gets its own lock and clock
        return RefreshAtMostEvery(self.hook, self.seconds)


class ThrottledConfiguration(k8s.Configuration):  # type: ignore[misc]
    """The client's configuration, whose token refresh hook, whoever sets it, runs through
    :class:`RefreshAtMostEvery`. Each run of a loader's hook sets a new hook of its own (its
    ``_set_config``): that one is run next, and the throttle stays in place for every thread
    meanwhile (swapped back after the run, another thread could take the loader's own hook and keep
    it installed)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "refresh_api_key_hook" and value is not None and not isinstance(value, RefreshAtMostEvery):
            installed = self.__dict__.get(name)
            if isinstance(installed, RefreshAtMostEvery):
                installed.hook = value
                return
            value = RefreshAtMostEvery(value)
        super().__setattr__(name, value)
