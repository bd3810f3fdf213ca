"""pytest plugin: a real Kubernetes 1.20 API server for CMBCluster's tests (see tests/k8s/README.md).

Load it from the root conftest.py with ``pytest_plugins = ["tests.k8s.harness"]`` or import the fixture
(``from tests.k8s.harness import k8s_cluster``). The session fixture ``k8s_cluster`` runs
``tests/k8s/cluster.sh install`` (a no-op once built) and ``up`` on free 127.0.0.1 ports, yields a
:class:`K8sCluster`, and runs ``down`` at teardown, also when the session fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from cmbcluster.testing.process import BackgroundProcess, free_port

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

CLUSTER_SH = Path(__file__).resolve().parent / "cluster.sh"
CP_USER = "cmbcluster-controlplane"
#: what cluster.sh starts (its COMPONENTS), each with a pid file named after it
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "fake-kubelet")
INSTALL_TIMEOUT = float(os.environ.get("CMBCLUSTER_K8S_INSTALL_TIMEOUT", "2400"))
_OWN_ENV = (
    "K8S_RUN",
    "K8S_PORT",
    "ETCD_PORT",
    "ETCD_PEER_PORT",
    "K8S_TOKEN",
    "K8S_CP_TOKEN",
    "K8S_OWNER_PID",
    "PYTHON",
    "KUBECONFIG",
)


@dataclass(frozen=True)
class K8sCluster:
    server: str  # https://127.0.0.1:PORT
    ca_path: Path  # CA bundle for the apiserver's self-signed certificate
    kubeconfig: Path  # admin user (system:masters)
    cp_kubeconfig: Path  # the cmbcluster-controlplane user
    admin_token: str
    cp_token: str  # user cmbcluster-controlplane: only system:authenticated, no rights until a test binds a Role
    bin_dir: Path  # holds helm 3.18.0
    run_dir: Path  # pid files and component logs
    env: dict[str, str] = field(default_factory=dict)  # KUBECONFIG, PATH with helm, CMBCLUSTER_K8S_CP_TOKEN
    cp_user: str = CP_USER
    script_env: dict[str, str] = field(default_factory=dict, repr=False)  # what cluster.sh was started with

    def restart_apiserver(self) -> None:
        """Kill kube-apiserver (SIGKILL) and start it again on the same port and data: a fault for tests."""
        r = _cluster_sh("restart-apiserver", self.script_env, 120)
        if r.returncode:
            raise RuntimeError(f"cluster.sh restart-apiserver failed:\n{r.stderr}\n{_logs(self.run_dir)}")

    def component_pids(self) -> list[int]:
        """The process ids of the cluster's components (etcd, kube-apiserver, the controller manager,
        the scheduler, the fake kubelet), from the pid files ``cluster.sh up`` wrote."""
        return [int(f.read_text()) for f in sorted(self.run_dir.glob("*.pid")) if f.stem in COMPONENTS]

    def api_client(self, token: str | None = None) -> ApiClient:
        """A kubernetes ApiClient for this cluster, as admin unless another bearer token is given."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(self.ca_path)
        cfg.api_key = {"authorization": f"Bearer {token or self.admin_token}"}
        return client.ApiClient(cfg)

    def control_plane_namespace(self, prefix: str = "cmbcluster") -> str:
        """A fresh namespace where the control-plane user holds exactly the Role of
        :mod:`cmbcluster.kubernetes.rbac` (and its ClusterRole for PersistentVolumes), nothing more."""
        from kubernetes import client

        from cmbcluster.kubernetes import rbac

        ns = f"{prefix}-{secrets.token_hex(3)}"
        api = self.api_client()
        try:
            client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
            self.wait_for_default_token(ns)
            authz = client.RbacAuthorizationV1Api(api)
            subjects = [{"kind": "User", "name": self.cp_user, "apiGroup": "rbac.authorization.k8s.io"}]
            authz.create_namespaced_role(ns, rbac.role_manifest(ns))
            authz.create_namespaced_role_binding(
                ns,
                {
                    "metadata": {"name": rbac.ROLE_NAME},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": rbac.ROLE_NAME},
                    "subjects": subjects,
                },
            )
            cluster_role = rbac.cluster_role_manifest(f"{rbac.CLUSTER_ROLE_NAME}-{ns}")
            name = cluster_role["metadata"]["name"]
            authz.create_cluster_role(cluster_role)
            authz.create_cluster_role_binding(
                {
                    "metadata": {"name": name},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                    "subjects": subjects,
                }
            )
        finally:
            api.close()
        self._wait_until_allowed(ns)
        return ns

    def _wait_until_allowed(self, namespace: str, timeout: float = 30) -> None:
        """The API server's authorizer reads roles and bindings from a cache of its own: a control
        plane started at once could be refused (403) what its Role grants. Wait until the
        authorizer says the control-plane user may list pods there, and PersistentVolumes."""
        from kubernetes import client

        api = self.api_client(self.cp_token)
        try:
            reviews = client.AuthorizationV1Api(api)
            asks = [
                {"namespace": namespace, "verb": "list", "resource": "pods"},
                {"verb": "list", "resource": "persistentvolumes"},
            ]

            def allowed() -> bool:
                return all(
                    reviews.create_self_subject_access_review({"spec": {"resourceAttributes": ask}}).status.allowed
                    for ask in asks
                )

            wait_for(allowed, timeout, f"the control-plane user's Role in {namespace} to take effect")
        finally:
            api.close()

    def wait_for_default_token(self, namespace: str, timeout: float = 30) -> None:
        """Wait until NAMESPACE's default-token secret exists: pods created before it are rejected."""
        from kubernetes import client

        v1 = client.CoreV1Api(self.api_client())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            secrets_ = v1.list_namespaced_secret(namespace, field_selector="type=kubernetes.io/service-account-token")
            if any(s.metadata.name.startswith("default-token-") for s in secrets_.items):
                return
            time.sleep(0.2)
        raise TimeoutError(f"no default-token secret in namespace {namespace} after {timeout}s")


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@contextlib.contextmanager
def images_run_here(core: Any, images: list[str]) -> Iterator[None]:
    """The test kubelet runs pods of ``images`` (prefixes) with this interpreter's folder first on
    PATH, as a real node runs the image (fake_kubelet.py reads kube-system/fake-kubelet-images)."""
    import json

    from kubernetes import client as k8s

    from tests.k8s.fake_kubelet import IMAGES_CONFIGMAP

    namespace, name = IMAGES_CONFIGMAP
    mapping = json.dumps({image: str(Path(sys.executable).parent) for image in images})
    body = {"metadata": {"name": name}, "data": {"images.json": mapping}}
    try:
        core.create_namespaced_config_map(namespace, body)
    except k8s.ApiException as e:
        if e.status != 409:
            raise
        core.replace_namespaced_config_map(name, namespace, body)
    try:
        yield
    finally:
        core.delete_namespaced_config_map(name, namespace)


@contextlib.contextmanager
def no_pods_allowed(core: Any, namespace: str) -> Iterator[None]:
    """A ResourceQuota of no pods in ``namespace``, in force for the block's length. The API server's
    quota admission reads quotas from a cache of its own, so a quota just made (or just deleted) may
    not yet refuse (or still refuse) a pod: wait until a dry-run pod shows it, both ways."""
    from kubernetes import client as k8s

    probe = {"metadata": {"generateName": "quota-probe-"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}

    def refused() -> bool:
        try:
            core.create_namespaced_pod(namespace, probe, dry_run="All")
        except k8s.ApiException as e:
            if e.status != 403 or "quota" not in str(e.body):  # refused for something else: say so
                raise
            return True
        return False

    core.create_namespaced_resource_quota(namespace, {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}})
    try:
        wait_for(refused, 30, "the quota to refuse a pod")
        yield
    finally:
        core.delete_namespaced_resource_quota("no-pods", namespace)
        wait_for(lambda: not refused(), 30, "the quota's end to admit a pod")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_sh(
    cmd: str, env: dict[str, str], timeout: float, capture: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), cmd],
        env=env,
        timeout=timeout,
        text=True,
        stdin=subprocess.DEVNULL,
        capture_output=capture,
    )


def _installed_stamp(env: dict[str, str]) -> Path:
    home = env.get("K8S_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cmbcluster-k8s"
    )
    return Path(home) / "bin" / ".installed"


class ClusterError(RuntimeError):
    """The test cluster could not be installed, started or stopped (the message says why)."""


def _install(env: dict[str, str], live_output: Callable[[], contextlib.AbstractContextManager[object]]) -> None:
    if _installed_stamp(env).exists():
        r = _cluster_sh("install", env, 60)
        if r.returncode:
            raise ClusterError(f"tests/k8s/cluster.sh install failed:\n{r.stderr}")
        return
    # first build (minutes): show its progress live instead of capturing it
    with live_output():
        print("\nbuilding the Kubernetes test cluster once (about 4 minutes on 2 cores)", file=sys.stderr, flush=True)
        r = _cluster_sh("install", env, INSTALL_TIMEOUT, capture=False)
    if r.returncode:
        raise ClusterError("tests/k8s/cluster.sh install failed: see its output above")


def _logs(run_dir: Path) -> str:
    out = []
    for log in sorted(run_dir.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-15:]
        out.append(f"--- {log.name} (last {len(lines)} lines)\n" + "\n".join(lines))
    return "\n".join(out)


@contextlib.contextmanager
def running_cluster(
    live_output: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
) -> Iterator[K8sCluster]:
    """Install (once), start a cluster on free 127.0.0.1 ports, and stop it on leaving, also on errors.

    For pytest use the ``k8s_cluster`` fixture; benchmarks and scripts use this directly. Its state
    directory is removed afterwards unless something failed (its logs are kept for reading).
    """
    # Not under pytest's basetemp: other pytest sessions of the same user prune it, PID files included.
    run_dir = Path(tempfile.mkdtemp(prefix="cmbcluster-k8s-"))
    api_port, etcd_port, peer_port = _free_ports(3)
    admin_token, cp_token = secrets.token_hex(16), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in _OWN_ENV}
    env.update(
        PYTHON=sys.executable,
        K8S_RUN=str(run_dir),
        K8S_PORT=str(api_port),
        ETCD_PORT=str(etcd_port),
        ETCD_PEER_PORT=str(peer_port),
        K8S_TOKEN=admin_token,
        K8S_CP_TOKEN=cp_token,
        K8S_OWNER_PID=str(os.getpid()),  # its watchdog stops the cluster if this process dies before teardown
    )
    _install(env, live_output)
    failed = True
    try:
        r = _cluster_sh("up", env, 300)
        if r.returncode:
            raise ClusterError(f"tests/k8s/cluster.sh up failed:\n{r.stderr}\n{_logs(run_dir)}")
        exports = dict(
            line[len("export ") :].split("=", 1) for line in r.stdout.splitlines() if line.startswith("export ")
        )
        if exports.get("CMBCLUSTER_K8S_CP_TOKEN") != cp_token:
            raise ClusterError(f"cluster.sh up printed an unexpected control-plane token:\n{r.stdout}")
        bin_dir = _installed_stamp(env).parent
        kubeconfig = run_dir / "kubeconfig"
        yield K8sCluster(
            server=f"https://127.0.0.1:{api_port}",
            ca_path=run_dir / "pki" / "apiserver.crt",
            kubeconfig=kubeconfig,
            cp_kubeconfig=run_dir / "kubeconfig-controlplane",
            admin_token=admin_token,
            cp_token=cp_token,
            bin_dir=bin_dir,
            run_dir=run_dir,
            env={
                "KUBECONFIG": str(kubeconfig),
                "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "CMBCLUSTER_K8S_CP_TOKEN": cp_token,
            },
            script_env=env,
        )
        failed = False
    finally:
        r = _cluster_sh("down", env, 120)
        if r.returncode:
            raise ClusterError(
                f"tests/k8s/cluster.sh down failed (processes may be left; PIDs in {run_dir}):\n{r.stderr}"
            )
        if not failed:
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest) -> Iterator[K8sCluster]:
    """A running Kubernetes 1.20 control plane with one fake node, shared by the whole test session."""
    capman = request.config.pluginmanager.getplugin("capturemanager")

    def live_output() -> contextlib.AbstractContextManager[object]:
        return capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()

    try:
        with running_cluster(live_output) as cluster:
            yield cluster
            if request.session.testsfailed:
                raise _KeepLogs  # a failed test's cluster logs stay in its run directory
    except _KeepLogs:
        pass
    except ClusterError as exc:
        pytest.fail(str(exc), pytrace=False)


class _KeepLogs(Exception):
    pass


# -- Cloud Storage: gcp-storage-emulator, for the tests that run GCP's control plane on the cluster ----------
class GcsEmulator(BackgroundProcess):
    """gcp-storage-emulator in memory on a free loopback port."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        executable = Path(sys.executable).with_name("gcp-storage-emulator")
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(executable), "start", "-H", "127.0.0.1", "--port", str(self.port), "--in-memory", "-q"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            wait_for(self._answers, 15, "gcp-storage-emulator to start")
        except AssertionError:
            self.stop()
            raise

    def _answers(self) -> bool:
        try:
            return httpx.get(self.url + "/", timeout=0.5).status_code == 200
        except httpx.TransportError:
            return self.process.poll() is not None  # exited: stop waiting, the check below fails

    def json(self, path: str) -> Any:
        return httpx.get(self.url + path, timeout=10).raise_for_status().json()
