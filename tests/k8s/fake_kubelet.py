"""Fake kubelet for CMBCluster's test cluster (started by tests/k8s/cluster.sh).

Registers one Ready node with room for many pods, moves pods bound to it to Running and Ready with a
podIP (no container really runs) and completes graceful deletions, like a kubelet would.
Stops cleanly (exit status 0) on SIGTERM or SIGINT.

usage: KUBECONFIG=... python fake_kubelet.py [NODE_NAME] [--pods N]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import signal
import sys
import threading
from typing import Any

from kubernetes import client, config, watch

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


class Stop(BaseException):
    """Raised in the main thread by the signal handler; not an Exception, so no retry loop swallows it."""


def log(*args: object) -> None:
    print(*args, flush=True)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


class FakeKubelet:
    def __init__(self, v1: client.CoreV1Api, node: str, pods: int) -> None:
        self.v1 = v1
        self.node = node
        self.resources = {"cpu": "64", "memory": "512Gi", "pods": str(pods), "ephemeral-storage": "1Ti"}
        self.ips = itertools.count()
        self.stopping = threading.Event()

    def node_status(self) -> dict[str, Any]:
        t = now()
        return {
            "status": {
                "capacity": self.resources,
                "allocatable": self.resources,
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": self.node},
                ],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "fake kubelet",
                        "lastHeartbeatTime": t,
                        "lastTransitionTime": t,
                    },
                ],
                "nodeInfo": {
                    "machineID": "fake",
                    "systemUUID": "fake",
                    "bootID": "fake",
                    "kernelVersion": "fake",
                    "osImage": "fake",
                    "containerRuntimeVersion": "fake://0",
                    "kubeletVersion": "v1.20.2",
                    "kubeProxyVersion": "v1.20.2",
                    "operatingSystem": "linux",
                    "architecture": ARCH,
                },
            }
        }

    def register(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.node,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": ARCH,
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": ARCH,
            "type": "fake",
        }
        try:
            self.v1.create_node({"metadata": {"name": self.node, "labels": labels}})
        except client.ApiException as e:
            if e.status != 409:
                raise
        self.v1.patch_node_status(self.node, self.node_status())
        # drop node.kubernetes.io/not-ready added at creation (the nodelifecycle controller is off)
        self.v1.patch_node(self.node, {"spec": {"taints": None}})
        log("node registered", self.node)

    def heartbeat(self) -> None:
        while not self.stopping.wait(10):
            try:
                self.v1.patch_node_status(self.node, self.node_status())
            except Exception as e:  # apiserver restarting or going away
                log("heartbeat error:", type(e).__name__, e)

    def pod_status(self, pod: client.V1Pod) -> dict[str, Any]:
        n = next(self.ips)
        t = now()
        cid = f"fake://{pod.metadata.uid}"
        return {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": f"10.244.{n // 250}.{n % 250 + 2}",
            "startTime": t,
            "conditions": [
                {"type": c, "status": "True", "lastTransitionTime": t}
                for c in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "initContainerStatuses": [
                {
                    "name": c.name,
                    "image": c.image,
                    "imageID": "",
                    "containerID": f"{cid}/{c.name}",
                    "ready": True,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": t, "finishedAt": t}},
                }
                for c in pod.spec.init_containers or []
            ],
            "containerStatuses": [
                {
                    "name": c.name,
                    "image": c.image,
                    "imageID": "",
                    "containerID": f"{cid}/{c.name}",
                    "ready": True,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": t}},
                }
                for c in pod.spec.containers
            ],
        }

    def handle(self, event: dict[str, Any]) -> None:
        pod = event["object"]
        name, ns = pod.metadata.name, pod.metadata.namespace
        if event["type"] == "DELETED":
            return
        if pod.metadata.deletion_timestamp:  # like a kubelet: finish the graceful deletion
            try:
                self.v1.delete_namespaced_pod(name, ns, grace_period_seconds=0)
                log("deleted", ns, name)
            except client.ApiException as e:
                if e.status != 404:
                    raise
            return
        if pod.status.phase in ("Running", "Succeeded", "Failed"):
            return
        try:
            self.v1.patch_namespaced_pod_status(name, ns, {"status": self.pod_status(pod)})
            log("running", ns, name)
        except client.ApiException as e:
            if e.status != 404:  # deleted meanwhile
                raise

    def run(self) -> None:
        self.register()
        threading.Thread(target=self.heartbeat, name="heartbeat", daemon=True).start()
        while True:  # list + watch, again after errors: survives apiserver restarts and expired resource versions
            try:
                stream = watch.Watch().stream(
                    self.v1.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={self.node}",
                    timeout_seconds=300,
                )
                for event in stream:
                    try:
                        self.handle(event)
                    except client.ApiException as e:
                        log("pod update failed:", e.status, e.reason)
            except Exception as e:
                log("watch error, retrying:", type(e).__name__, e)
                self.stopping.wait(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("node", nargs="?", default="fake-node-1")
    parser.add_argument("--pods", type=int, default=1000, help="pod capacity of the node (default 1000)")
    parser.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config")
    args = parser.parse_args()

    def on_signal(signum: int, _frame: object) -> None:
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    kubelet = None
    try:
        config.load_kube_config(config_file=args.kubeconfig)
        kubelet = FakeKubelet(client.CoreV1Api(), args.node, args.pods)
        kubelet.run()
    except Stop as s:
        if kubelet:
            kubelet.stopping.set()
        log(f"stopped ({s})")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
