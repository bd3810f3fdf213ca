"""Leader election over a ``coordination.k8s.io/v1`` Lease: one replica runs the background loops.

With several control-plane replicas (PostgreSQL), the reconcile and culling loops must run on
one replica at a time. :class:`LeaseElector` follows client-go's leader election:

- a replica takes the Lease when it has no holder, or when its record has not changed for
  ``leaseDurationSeconds`` *as observed by this replica's own monotonic clock* (no trust in
  clocks agreeing between machines);
- every write is a compare-and-swap on the Lease's resourceVersion, so two replicas can never
  both believe they took it;
- the holder renews every ``renew_seconds``; if it cannot renew within ``renew_deadline``
  it stops acting as leader before anyone else may take over (``renew_deadline`` <
  ``lease_seconds``);
- :meth:`close` releases the Lease (empty holder), so a replica that shuts down hands over at
  once; one that dies hands over after ``lease_seconds``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from cmbcluster.kubernetes.watch import describe_error

log = logging.getLogger(__name__)


def _micro_time(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(
        self,
        api_client: Any,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: float = 15.0,
        renew_deadline: float = 10.0,
        renew_seconds: float = 2.0,
        request_timeout: float = 5.0,
    ) -> None:
        if not renew_seconds < renew_deadline < lease_seconds:
            raise ValueError("leader election needs renew_seconds < renew_deadline < lease_seconds")
        self.api = k8s.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_deadline = renew_deadline
        self.renew_seconds = renew_seconds
        self.request_timeout = request_timeout
        self._leader_until = 0.0  # monotonic; leader while now < this
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime, transitions) last seen
        self._observed_at = 0.0
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def is_leader(self) -> bool:
        return time.monotonic() < self._leader_until

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="cmbcluster-leader-election", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop renewing and, if leading, release the Lease so another replica takes over at once."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(self.request_timeout * 2)
        if self.is_leader:
            self._leader_until = 0.0
            try:
                self._release()
            except Exception as exc:  # noqa: BLE001 - the lease then expires on its own
                log.warning("releasing the leader lease failed (%s); it expires by itself", describe_error(exc))

    def _run(self) -> None:
        while not self._closed.is_set():
            began = time.monotonic()
            try:
                if self.try_acquire_or_renew():
                    self._leader_until = began + self.renew_deadline
            except Exception as exc:  # noqa: BLE001 - keep trying; leadership lapses at the deadline
                log.warning("leader election: %s", describe_error(exc))
            self._closed.wait(self.renew_seconds)

    # -- one round ---------------------------------------------------------------------------------
    def try_acquire_or_renew(self) -> bool:
        """Take or renew the Lease once; True when this replica holds it afterwards."""
        now = dt.datetime.now(dt.UTC)
        lease = self._read()
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "labels": {"app.kubernetes.io/managed-by": "cmbcluster"}},
                "spec": self._spec(now, acquired=now, transitions=0),
            }
            try:
                self._send("create_namespaced_lease", self.namespace, body)
            except ApiException as exc:
                if exc.status == 409:
                    return False  # another replica created it first
                raise
            self._became_leader(previous=None)
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        expired = time.monotonic() > self._observed_at + duration
        if holder and holder != self.identity and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if holder == self.identity else 1)
        acquired = spec.get("acquireTime") if holder == self.identity else _micro_time(now)
        lease["spec"] = self._spec(now, acquired=acquired, transitions=transitions)
        try:
            self._send("replace_namespaced_lease", self.name, self.namespace, lease)
        except ApiException as exc:
            if exc.status == 409:
                return False  # changed under us: someone else renewed or took it
            raise
        if holder != self.identity:
            self._became_leader(previous=holder or None)
        return True

    def _spec(self, now: dt.datetime, *, acquired: Any, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": round(self.lease_seconds),
            "acquireTime": acquired if isinstance(acquired, str) else _micro_time(acquired),
            "renewTime": _micro_time(now),
            "leaseTransitions": transitions,
        }

    def _became_leader(self, previous: str | None) -> None:
        log.info(
            "this replica (%s) now leads the background work%s",
            self.identity, f", taking over from {previous}" if previous else "",
        )  # fmt: skip

    def _release(self) -> None:
        lease = self._read()
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        spec = lease["spec"]
        spec["holderIdentity"] = ""
        spec["leaseDurationSeconds"] = 1
        spec["renewTime"] = _micro_time(dt.datetime.now(dt.UTC))
        self._send("replace_namespaced_lease", self.name, self.namespace, lease)
        log.info("released the leader lease %s/%s", self.namespace, self.name)

    def _read(self) -> dict[str, Any] | None:
        try:
            return self._send("read_namespaced_lease", self.name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _send(self, method: str, *args: Any) -> dict[str, Any]:
        response = getattr(self.api, method)(*args, _preload_content=False, _request_timeout=self.request_timeout)
        data = response.data
        result = json.loads(data) if data else {}
        return result if isinstance(result, dict) else {}
