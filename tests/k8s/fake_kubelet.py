"""Fake kubelet for CMBCluster's test cluster (started by tests/k8s/cluster.sh).

Registers one Ready node with room for many pods and completes graceful deletions, like a kubelet
would. A pod bound to it either

- **runs for real**, when its image is mapped to this machine in the ConfigMap
  ``kube-system/fake-kubelet-images`` (key ``images.json``: a JSON object, image prefix -> a folder
  put first on PATH, e.g. a virtual environment's ``bin`` with JupyterLab in it): the container's
  command and args run as a local process with the container's environment (``value``, ``secretKeyRef``, ``envFrom``
  Secrets and ConfigMaps), its working directory when it exists here (else a folder of its own,
  also its HOME), on this machine's network (podIP 127.0.0.1, so one such pod per port at a
  time). The pod is Ready only once its own ``readinessProbe`` succeeds (``tcpSocket`` or
  ``httpGet``); an exit becomes the container's terminated state (exit code, Completed/Error) and
  CrashLoopBackOff or a Failed/Succeeded phase, as its restartPolicy says. Output goes to
  ``<state dir>/<namespace>_<pod>.log``. Deleting the pod stops the process group (SIGTERM, then
  SIGKILL after the grace period, at most 5 s here). The process runs as the kubelet's own user:
  a container runtime would switch to the pod's ``runAsUser``, which a kubelet running as root
  cannot do here when the interpreter it runs lives under a private home (``/root``). So that a
  program that refuses to run as root (JupyterLab) behaves as in its non-root pod, such a pod's
  process gets a Jupyter configuration allowing root: the only program-specific line in this file.
- or, for any other image, becomes Running and Ready at once with a podIP, **without running
  anything** (fast, for benchmarks of many pods; the blind spot the mapping above closes).

Stops cleanly (exit status 0) on SIGTERM or SIGINT, ending every process it started.

usage: KUBECONFIG=... python fake_kubelet.py [NODE_NAME] [--pods N] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
IMAGES_CONFIGMAP = ("kube-system", "fake-kubelet-images")
PROBE_PERIOD = 0.5  # faster than a kubelet's: tests wait for it
KILL_AFTER = 5.0


class Stop(BaseException):
    """Raised in the main thread by the signal handler; not an Exception, so no retry loop swallows it."""


def log(*args: object) -> None:
    print(*args, flush=True)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


class FakeKubelet:
    def __init__(self, v1: client.CoreV1Api, node: str, pods: int, state_dir: Path | None = None) -> None:
        self.v1 = v1
        self.node = node
        self.resources = {"cpu": "64", "memory": "512Gi", "pods": str(pods), "ephemeral-storage": "1Ti"}
        self.ips = itertools.count()
        self.stopping = threading.Event()
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="fake-kubelet-"))
        self.processes: dict[str, subprocess.Popen[bytes]] = {}  # pod uid -> its container's process
        self.lock = threading.Lock()

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
            self.stop_process(pod.metadata.uid)
            return
        if pod.metadata.deletion_timestamp:  # like a kubelet: stop it, then finish the graceful deletion
            self.stop_process(pod.metadata.uid)
            # This very pod (a kubelet's uid precondition): a pod of the same name created since, by
            # a start right after a stop, is another pod and must not be deleted with it.
            gone = client.V1DeleteOptions(
                grace_period_seconds=0, preconditions=client.V1Preconditions(uid=pod.metadata.uid)
            )
            try:
                self.v1.delete_namespaced_pod(name, ns, body=gone)
                log("deleted", ns, name)
            except client.ApiException as e:
                if e.status not in (404, 409):  # gone, or the name is another pod's now
                    raise
            return
        if pod.status.phase in ("Running", "Succeeded", "Failed") or pod.metadata.uid in self.processes:
            return
        bin_dir = self.run_folder(pod)
        if bin_dir is not None:
            self.start_process(pod, bin_dir)
            return
        try:
            self.v1.patch_namespaced_pod_status(name, ns, {"status": self.pod_status(pod)})
            log("running", ns, name)
        except client.ApiException as e:
            if e.status != 404:  # deleted meanwhile
                raise

    # -- pods that run for real ---------------------------------------------------------------------
    def run_folder(self, pod: client.V1Pod) -> str | None:
        """The folder the test maps this pod's image to, if any (read at each start: tests change it)."""
        try:
            data = self.v1.read_namespaced_config_map(IMAGES_CONFIGMAP[1], IMAGES_CONFIGMAP[0]).data or {}
            mapping = json.loads(data.get("images.json", "{}"))
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise
        except ValueError as e:
            log("ignoring an invalid images.json:", e)
            return None
        image = pod.spec.containers[0].image
        matches = [prefix for prefix in mapping if image.startswith(prefix)]
        return mapping[max(matches, key=len)] if matches else None

    def container_env(
        self, pod: client.V1Pod, container: client.V1Container, home: Path, bin_dir: str
    ) -> dict[str, str]:
        ns = pod.metadata.namespace
        env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(home), "LANG": "C.UTF-8"}
        if runs_as_root_in_place_of(pod):
            config = home / ".fake-kubelet-jupyter"
            config.mkdir(exist_ok=True)
            (config / "jupyter_server_config.json").write_text(json.dumps({"ServerApp": {"allow_root": True}}))
            env["JUPYTER_CONFIG_DIR"] = str(config)
        for source in container.env_from or []:
            if source.secret_ref is not None:
                data = self.v1.read_namespaced_secret(source.secret_ref.name, ns).data or {}
                env.update({k: base64.b64decode(v).decode() for k, v in data.items()})
            elif source.config_map_ref is not None:
                env.update(self.v1.read_namespaced_config_map(source.config_map_ref.name, ns).data or {})
        for item in container.env or []:
            if item.value is not None:
                env[item.name] = item.value
            elif item.value_from is not None and item.value_from.secret_key_ref is not None:
                ref = item.value_from.secret_key_ref
                data = self.v1.read_namespaced_secret(ref.name, ns).data or {}
                if ref.key in data:
                    env[item.name] = base64.b64decode(data[ref.key]).decode()
        return env

    def start_process(self, pod: client.V1Pod, bin_dir: str) -> None:
        name, ns, uid = pod.metadata.name, pod.metadata.namespace, pod.metadata.uid
        container = pod.spec.containers[0]
        command = [*(container.command or []), *(container.args or [])]
        home = self.state_dir / f"{ns}_{name}"
        home.mkdir(parents=True, exist_ok=True)
        workdir = container.working_dir if container.working_dir and Path(container.working_dir).is_dir() else home
        log_path = self.state_dir / f"{ns}_{name}.log"
        t = now()
        try:
            if not command:
                raise OSError("the container has no command (the image's entrypoint cannot run here)")
            env = self.container_env(pod, container, home, bin_dir)
            with open(log_path, "ab") as out:
                process = subprocess.Popen(
                    command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
        except (OSError, client.ApiException) as exc:
            log("cannot run", ns, name, exc)
            self.patch(pod, self.process_status(pod, t, exited=(127, f"StartError: {exc}")))
            return
        with self.lock:
            self.processes[uid] = process
        log("started", ns, name, "pid", process.pid, command)
        self.patch(pod, self.process_status(pod, t, ready=False))
        threading.Thread(target=self.follow_process, args=(pod, process, t), daemon=True).start()

    def follow_process(self, pod: client.V1Pod, process: subprocess.Popen[bytes], started: str) -> None:
        """Readiness from the pod's own probe, then the exit, reported as a kubelet would."""
        probe = pod.spec.containers[0].readiness_probe
        ready = probe is None
        if ready:
            self.patch(pod, self.process_status(pod, started, ready=True))
        while process.poll() is None and not self.stopping.is_set():
            if not ready and probe_succeeds(probe):
                ready = True
                self.patch(pod, self.process_status(pod, started, ready=True))
                log("ready", pod.metadata.namespace, pod.metadata.name)
            time.sleep(PROBE_PERIOD)
        code = process.wait()
        with self.lock:
            current = self.processes.get(pod.metadata.uid)
            if current is not process:
                return  # stopped on purpose (deletion)
            del self.processes[pod.metadata.uid]
        log("exited", pod.metadata.namespace, pod.metadata.name, code)
        self.patch(pod, self.process_status(pod, started, exited=(code, "Completed" if code == 0 else "Error")))

    def process_status(
        self, pod: client.V1Pod, started: str, *, ready: bool = False, exited: tuple[int, str] | None = None
    ) -> dict[str, Any]:
        container = pod.spec.containers[0]
        t = now()
        state: dict[str, Any]
        phase = "Running"
        last_state: dict[str, Any] = {}
        if exited is None:
            state = {"running": {"startedAt": started}}
        else:
            code, reason = exited
            terminated = {"exitCode": code, "reason": reason.split(":")[0], "message": reason,
                          "startedAt": started, "finishedAt": t}  # fmt: skip
            policy = pod.spec.restart_policy or "Always"
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                state, last_state = (
                    {"waiting": {"reason": "CrashLoopBackOff", "message": reason}},
                    {"terminated": terminated},
                )
            else:
                state, phase = {"terminated": terminated}, "Succeeded" if code == 0 else "Failed"
            ready = False
        conditions = [
            {"type": "Initialized", "status": "True", "lastTransitionTime": started},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
            *({"type": c, "status": "True" if ready else "False", "lastTransitionTime": t}
              for c in ("Ready", "ContainersReady")),
        ]  # fmt: skip
        return {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": started,
            "conditions": conditions,
            "containerStatuses": [
                {
                    "name": container.name, "image": container.image, "imageID": "",
                    "containerID": f"fake://{pod.metadata.uid}/{container.name}", "ready": ready,
                    "restartCount": 1 if last_state else 0, "started": exited is None, "state": state,
                    **({"lastState": last_state} if last_state else {}),
                }
            ],
        }  # fmt: skip

    def patch(self, pod: client.V1Pod, status: dict[str, Any]) -> None:
        try:
            self.v1.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})
        except client.ApiException as e:
            if e.status != 404:  # deleted meanwhile
                log("status update failed:", e.status, e.reason)

    def stop_process(self, uid: str) -> None:
        with self.lock:
            process = self.processes.pop(uid, None)
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, KILL_AFTER), (signal.SIGKILL, KILL_AFTER)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for uid in list(self.processes):
            self.stop_process(uid)

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


def runs_as_root_in_place_of(pod: client.V1Pod) -> bool:
    """Whether this kubelet (root) runs a pod that asked not to run as root."""
    if os.geteuid() != 0:
        return False
    contexts = [pod.spec.security_context, *(c.security_context for c in pod.spec.containers)]
    return any(c is not None and (c.run_as_non_root or (c.run_as_user or 0) > 0) for c in contexts)


def probe_succeeds(probe: client.V1Probe) -> bool:
    """One try of a readinessProbe against this machine (pods that run here share its network)."""
    try:
        if probe.tcp_socket is not None:
            with socket.create_connection(("127.0.0.1", int(probe.tcp_socket.port)), timeout=1):
                return True
        if probe.http_get is not None:
            url = f"http://127.0.0.1:{int(probe.http_get.port)}{probe.http_get.path or '/'}"
            with urllib.request.urlopen(url, timeout=1) as answer:
                status: int = answer.status
                return 200 <= status < 400
    except (OSError, ValueError):
        return False
    return True  # a probe of a kind this fake does not know (exec): as if it passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("node", nargs="?", default="fake-node-1")
    parser.add_argument("--pods", type=int, default=1000, help="pod capacity of the node (default 1000)")
    parser.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config")
    parser.add_argument("--state-dir", type=Path, help="logs and homes of the pods that run here (default: a temp dir)")
    args = parser.parse_args()

    def on_signal(signum: int, _frame: object) -> None:
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    kubelet = None
    try:
        config.load_kube_config(config_file=args.kubeconfig)
        kubelet = FakeKubelet(client.CoreV1Api(), args.node, args.pods, args.state_dir)
        kubelet.run()
    except Stop as s:
        if kubelet:
            kubelet.stopping.set()
            kubelet.stop_all()
        log(f"stopped ({s})")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
