"""The test cluster's kubelet runs pods of mapped images as real processes: an application that
would crash on a real node crashes here too, and a pod is Ready only when its own probe says so."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from kubernetes import client

from tests.k8s.harness import K8sCluster, images_run_here, wait_for

IMAGE = "cmbcluster-test/python"
PORT = 18765


@pytest.fixture
def runs_here(k8s_cluster: K8sCluster) -> Iterator[client.CoreV1Api]:
    """Pods of IMAGE run with this interpreter's folder first on PATH."""
    core = client.CoreV1Api(k8s_cluster.api_client())
    with images_run_here(core, [IMAGE]):
        yield core


def pod(name: str, command: list[str], *, probe_port: int | None = None, policy: str = "OnFailure") -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "app", "image": f"{IMAGE}:3", "command": command,
        "env": [{"name": "GREETING", "value": "hello from the pod"}],
    }  # fmt: skip
    if probe_port is not None:
        container["readinessProbe"] = {"tcpSocket": {"port": probe_port}, "periodSeconds": 1}
    return {"metadata": {"name": name}, "spec": {"containers": [container], "restartPolicy": policy}}


def _status(core: client.CoreV1Api, namespace: str, name: str) -> client.V1PodStatus:
    return core.read_namespaced_pod(name, namespace).status


def test_a_mapped_pod_runs_is_ready_by_its_probe_and_stops_when_deleted(
    k8s_cluster: K8sCluster, runs_here: client.CoreV1Api
) -> None:
    core = runs_here
    namespace = k8s_cluster.control_plane_namespace("kubelet")
    k8s_cluster.wait_for_default_token(namespace)
    script = (
        "import http.server, os, time\n"
        "time.sleep(1.5)  # not ready at once: the probe must wait\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = os.environ['GREETING'].encode()\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
        f"http.server.HTTPServer(('127.0.0.1', {PORT}), H).serve_forever()\n"
    )
    core.create_namespaced_pod(namespace, pod("web", ["python", "-c", script], probe_port=PORT))
    status = wait_for(lambda: _status(core, namespace, "web").container_statuses and _status(core, namespace, "web"),
                      what="a status")  # fmt: skip
    assert status.phase == "Running" and not status.container_statuses[0].ready  # running, not yet ready
    wait_for(lambda: _status(core, namespace, "web").container_statuses[0].ready, what="ready")
    assert httpx.get(f"http://127.0.0.1:{PORT}/").text == "hello from the pod"
    core.delete_namespaced_pod("web", namespace)
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, what="the pod gone")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{PORT}/", timeout=2)


def test_a_crashing_application_is_reported_as_a_kubelet_would(
    k8s_cluster: K8sCluster, runs_here: client.CoreV1Api
) -> None:
    core = runs_here
    namespace = k8s_cluster.control_plane_namespace("kubelet")
    k8s_cluster.wait_for_default_token(namespace)
    core.create_namespaced_pod(namespace, pod("crash", ["python", "-c", "raise SystemExit(3)"], probe_port=PORT))
    core.create_namespaced_pod(namespace, pod("missing", ["no-such-program"], probe_port=PORT))
    core.create_namespaced_pod(namespace, pod("done", ["python", "-c", "pass"], policy="Never"))

    def state(name: str) -> Any:
        statuses = _status(core, namespace, name).container_statuses
        return statuses[0] if statuses and (statuses[0].state.waiting or statuses[0].state.terminated) else None

    crash = wait_for(lambda: state("crash"), what="the crash reported")
    assert crash.state.waiting.reason == "CrashLoopBackOff" and crash.last_state.terminated.exit_code == 3
    assert not crash.ready
    missing = wait_for(lambda: state("missing"), what="the missing program reported")
    assert missing.last_state.terminated.exit_code == 127 and "no-such-program" in missing.last_state.terminated.message
    done = wait_for(lambda: state("done"), what="the finished pod reported")
    assert done.state.terminated.exit_code == 0 and _status(core, namespace, "done").phase == "Succeeded"
    for name in ("crash", "missing", "done"):
        core.delete_namespaced_pod(name, namespace)
