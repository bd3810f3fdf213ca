"""200 environments created at once through the control-plane API, against the real test API server.

In one run, on one fresh Kubernetes test cluster (tests/k8s/harness.py):

1. **Direct** (the limit): the same 200 pods, as the kubernetes backend builds them, created
   with the kubernetes client from 16 threads; time until all are Running.
2. **Control plane**: `cmbcluster serve` (kubernetes compute backend, the control-plane user's
   token bound to exactly the Role of rbac.py) gets 200 concurrent `POST /api/v1/environments`;
   each environment counts as ready when its pod is Running (seen by a watch in this script).
   Reported: time until all 200 are ready, p50/p95 per environment (from its request), the control
   plane's CPU seconds, and the time to stop all 200 (concurrent `POST .../stop` until every pod is gone).

Target (issue 4): all 200 ready within 1.5 x the direct client's time. Exits 1 when missed.

    python tests/benchmarks/bench_k8s_environments.py [--count 200]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.k8s.harness

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

from cmbcluster.interfaces import EnvironmentSpec, Resources, UserRef
from cmbcluster.kubernetes.client import CONNECTION_POOL_SIZE
from cmbcluster.kubernetes.manifests import build_draft, build_pod
from cmbcluster.kubernetes.routing import Exposure
from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.process import ServeProcess, clean_environ
from tests.k8s.harness import K8sCluster, running_cluster

TARGET_RATIO = 1.5
DIRECT_THREADS = 16


class PodClock:
    """Watches a namespace's pods and records when each first runs and when it is gone."""

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        self.core = k8s.CoreV1Api(api)
        self.namespace = namespace
        self.running: dict[str, float] = {}
        self.gone: dict[str, float] = {}
        self.changed = threading.Condition()
        self._watch = k8s_watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._stopped = False
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        try:
            self._follow()
        except Exception as exc:  # the cluster stopping under the watch at the end is expected
            if not self._stopped:
                print(f"pod watch failed: {exc}", file=sys.stderr)

    def _follow(self) -> None:
        version = self.core.list_namespaced_pod(self.namespace).metadata.resource_version
        self._ready.set()
        for event in self._watch.stream(
            self.core.list_namespaced_pod, self.namespace, resource_version=version, timeout_seconds=600
        ):
            pod, now = event["object"], time.monotonic()
            with self.changed:
                if event["type"] == "DELETED":
                    self.gone.setdefault(pod.metadata.name, now)
                elif pod.status.phase == "Running":
                    self.running.setdefault(pod.metadata.name, now)
                self.changed.notify_all()

    def wait(self, table: dict[str, float], names: set[str], timeout: float = 300) -> float:
        """The time the last of ``names`` entered ``table``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not names <= table.keys():
                if not self.changed.wait(max(0.0, deadline - time.monotonic())):
                    missing = len(names - table.keys())
                    raise TimeoutError(f"{missing} of {len(names)} pods did not get there within {timeout}s")
            return max(table[n] for n in names)

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()


def pod_manifests(count: int, namespace: str) -> list[dict[str, Any]]:
    """The pods the kubernetes backend would create for ``count`` environments (no API call)."""
    manifests = []
    for i in range(count):
        spec = EnvironmentSpec(
            environment_id=f"direct{i:026d}", user=UserRef(id="0" * 32), image="quay.io/jupyter/scipy-notebook",
            port=8888, env={"GREETING": "hello"}, resources=Resources(cpu=0.1, memory_mib=128),
        )  # fmt: skip
        manifests.append(build_pod(build_draft(spec, namespace=namespace, exposure=Exposure()), spec))
    return manifests


def direct(cluster: K8sCluster, count: int) -> float:
    namespace = cluster.control_plane_namespace("direct")
    api = cluster.api_client(token=cluster.cp_token)
    api.configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE  # as the backend's: a connection per thread
    api.rest_client = type(api.rest_client)(api.configuration)
    clock = PodClock(cluster.api_client(), namespace)
    core = k8s.CoreV1Api(api)
    manifests = pod_manifests(count, namespace)
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(DIRECT_THREADS) as pool:
        list(pool.map(lambda m: core.create_namespaced_pod(namespace, m, _preload_content=False), manifests))
    last = clock.wait(clock.running, {m["metadata"]["name"] for m in manifests})
    elapsed = last - began
    with concurrent.futures.ThreadPoolExecutor(DIRECT_THREADS) as pool:
        list(pool.map(lambda m: core.delete_namespaced_pod(m["metadata"]["name"], namespace), manifests))
    clock.wait(clock.gone, {m["metadata"]["name"] for m in manifests})
    clock.stop()
    api.close()
    return elapsed


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def create_all(base_url: str, headers: dict[str, str], count: int) -> tuple[float, dict[str, float]]:
    """POST ``count`` environments at once; the start time and environment id -> request sent."""
    sent: dict[str, float] = {}
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=300, limits=limits) as http:

        async def one(i: int) -> None:
            at = time.monotonic()
            response = await http.post("/api/v1/environments", json={"application": "jupyterlab", "name": f"b{i}",
                                                                      "cpu": 0.1, "memory_mib": 128})  # fmt: skip
            if response.status_code != 201:
                raise RuntimeError(f"create failed: {response.status_code} {response.text}")
            sent[response.json()["id"]] = at

        began = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(count)))
    return began, sent


async def stop_all(base_url: str, headers: dict[str, str], ids: list[str]) -> None:
    limits = httpx.Limits(max_connections=len(ids))
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=300, limits=limits) as http:
        answers = await asyncio.gather(*(http.post(f"/api/v1/environments/{i}/stop") for i in ids))
    failed = [a for a in answers if a.status_code != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} stops failed, e.g. {failed[0].status_code} {failed[0].text}")


def through_control_plane(cluster: K8sCluster, count: int, workdir: Path) -> dict[str, float]:
    namespace = cluster.control_plane_namespace("bench")
    clock = PodClock(cluster.api_client(), namespace)
    env = clean_environ(
        {
            "CMBCLUSTER_DATA_DIR": str(workdir / "data"),
            "CMBCLUSTER_COMPUTE_BACKEND": "kubernetes",
            "CMBCLUSTER_KUBECONFIG": str(cluster.cp_kubeconfig),
            "CMBCLUSTER_NAMESPACE": namespace,
            "CMBCLUSTER_MAX_CONCURRENT_STARTS": str(count),
            "CMBCLUSTER_MAX_ENVIRONMENTS_PER_USER": str(count),
            "CMBCLUSTER_LOG_LEVEL": "WARNING",
        }
    )
    with ServeProcess(env, workdir) as server:
        server.wait_ready("/readyz", timeout=60)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            headers = dev_sign_in(http, "bench@example.org")
        cpu_before = cpu_seconds(server.process.pid)
        try:
            began, sent = asyncio.run(create_all(server.url, headers, count))
        except RuntimeError:
            print(server.output()[-6000:], file=sys.stderr)
            raise
        names = {f"env-{i}": i for i in sent}
        last = clock.wait(clock.running, set(names))
        cpu_used = cpu_seconds(server.process.pid) - cpu_before
        per_env = sorted(clock.running[name] - sent[i] for name, i in names.items())
        stop_began = time.monotonic()
        asyncio.run(stop_all(server.url, headers, list(sent)))
        stopped = clock.wait(clock.gone, set(names))
        clock.stop()
        return {
            "all_ready_s": last - began,
            "p50_s": statistics.median(per_env),
            "p95_s": per_env[max(0, round(0.95 * len(per_env)) - 1)],
            "cpu_s": cpu_used,
            "stop_all_s": stopped - stop_began,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    with running_cluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        direct_s = direct(cluster, args.count)
        figures = through_control_plane(cluster, args.count, Path(tmp))
    ratio = figures["all_ready_s"] / direct_s
    print(f"{args.count} environments on the Kubernetes test API server")
    print(f"  direct kubernetes client ({DIRECT_THREADS} threads): all pods Running in {direct_s:.2f} s")
    print(f"  through the control-plane API: all ready in {figures['all_ready_s']:.2f} s "
          f"(ratio {ratio:.2f}, target <= {TARGET_RATIO})")  # fmt: skip
    print(f"  per environment: p50 {figures['p50_s']:.2f} s, p95 {figures['p95_s']:.2f} s")
    print(f"  control-plane CPU: {figures['cpu_s']:.1f} s; stopping all: {figures['stop_all_s']:.2f} s")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
