"""CPU and memory of environments' pods, from the cluster's metrics API (``metrics.k8s.io``, served by
metrics-server) when the cluster has it. A cluster without it (or a Role without ``list`` on
``pods.metrics.k8s.io``) answers 404 or 403: the backend then says it cannot measure, and asks
again only after :data:`RECHECK_SECONDS`, so the web UI hides the figures without costing a call
per page view."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from cmbcluster.interfaces import ResourceUse
from cmbcluster.kubernetes.client import KubeClient
from cmbcluster.kubernetes.labels import MANAGED_SELECTOR
from cmbcluster.kubernetes.manifests import object_name

__all__ = ["PodMetrics", "parse_cpu", "parse_memory"]

log = logging.getLogger(__name__)

GROUP, VERSION = "metrics.k8s.io", "v1beta1"
RECHECK_SECONDS = 300.0

_QUANTITY = re.compile(r"^([0-9.]+(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)$")
_CPU_SUFFIX = {"": 1.0, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6}
_MEMORY_SUFFIX = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "m": 0,
}  # fmt: skip


def _quantity(text: str, suffixes: Mapping[str, float]) -> float | None:
    match = _QUANTITY.match(text.strip())
    if match is None or match.group(2) not in suffixes:
        return None
    return float(match.group(1)) * suffixes[match.group(2)]


def parse_cpu(text: str) -> float | None:
    """A Kubernetes CPU quantity in cores: ``250m`` is 0.25, ``12345n`` 0.000012345."""
    return _quantity(text, _CPU_SUFFIX)


def parse_memory(text: str) -> int | None:
    """A Kubernetes memory quantity in bytes: ``128Mi``, ``1G``, ``1024``."""
    value = _quantity(text, _MEMORY_SUFFIX)
    return None if value is None else int(value)


class PodMetrics:
    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._unavailable_until = 0.0

    def resource_use(self, environment_ids: Sequence[str]) -> dict[str, ResourceUse] | None:
        if time.monotonic() < self._unavailable_until:
            return None
        try:
            answer = self._list()
        except ApiException as exc:
            if exc.status in (403, 404):
                log.info(
                    "the cluster's metrics API is not available (HTTP %s): CPU and memory are not shown", exc.status
                )
                with self._lock:
                    self._unavailable_until = time.monotonic() + RECHECK_SECONDS
                return None
            log.warning("reading the pods' metrics failed: HTTP %s", exc.status)
            return {}
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            log.warning("reading the pods' metrics failed: %s", exc)
            return {}
        by_pod = {str((item.get("metadata") or {}).get("name")): item for item in answer.get("items") or []}
        found: dict[str, ResourceUse] = {}
        for environment_id in environment_ids:
            item = by_pod.get(object_name(environment_id))
            if item is not None:
                use = _pod_use(item)
                if use is not None:
                    found[environment_id] = use
        return found

    def _list(self) -> dict[str, Any]:
        api: Any = k8s.CustomObjectsApi(self.client.api_client)
        response = api.list_namespaced_custom_object(
            GROUP, VERSION, self.client.namespace, "pods", label_selector=MANAGED_SELECTOR,
            _preload_content=False, _request_timeout=self.client.request_timeout,
        )  # fmt: skip
        data: dict[str, Any] = json.loads(response.data or b"{}")
        return data


def _pod_use(item: Mapping[str, Any]) -> ResourceUse | None:
    cpu, memory = 0.0, 0
    containers = item.get("containers") or []
    for container in containers:
        usage = container.get("usage") or {}
        cores = parse_cpu(str(usage.get("cpu", "0")))
        size = parse_memory(str(usage.get("memory", "0")))
        if cores is None or size is None:
            return None
        cpu += cores
        memory += size
    return ResourceUse(cpu=round(cpu, 3), memory_bytes=memory) if containers else None
