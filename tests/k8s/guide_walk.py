"""Walking a deployment guide: its marked shell blocks, run in order, the way an operator runs them.

A guide marks each block an operator runs with ``<!-- walk: <step> -->`` just before its ```` ```sh ````
fence. :func:`walk_blocks` extracts them in order; :class:`GuideWalk` runs each command of a block in
``bash`` with the environment the previous commands left (``export`` carries over, as in a terminal),
in the deployment's working folder (where ``.env`` is written and read).

The stand-ins cannot do everything a real account does (no Docker engine, no network to clone from,
no ``kubectl exec`` into a pod that runs for real). Each test declares, by a regular expression over
the command line, what it does instead and why (:class:`StandIn`); a command that neither runs as it is
nor matches a declared stand-in fails the walk, so the guide cannot grow a step the test ignores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BLOCK = re.compile(r"<!-- walk: ([a-z-]+) -->\n```sh\n(.*?)\n```", re.S)
_ENV_MARK = "\n@@CMBCLUSTER-WALK-ENV@@\n"
#: The ingress controller's load balancer as the stand-in for the cloud reports it.
LB_HOSTNAME = "k8s-ingressn-ingressn-0123456789.elb.eu-west-1.amazonaws.com"
LB_ADDRESS = "203.0.113.20"


@dataclass(frozen=True)
class Block:
    step: str
    text: str


def walk_blocks(guide: Path) -> list[Block]:
    """Every marked block of ``guide``, in order."""
    return [Block(step=m.group(1), text=m.group(2)) for m in _BLOCK.finditer(guide.read_text())]


def commands(text: str) -> list[str]:
    """The commands of a block: one per line, a here-document with its body, ``\\`` continuations
    joined; comments and blank lines dropped."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            i += 1
            continue
        if "<<EOF" in line:
            body = [line]
            i += 1
            while lines[i] != "EOF":
                body.append(lines[i])
                i += 1
            found.append("\n".join([*body, "EOF"]))
            i += 1
            continue
        while line.endswith("\\"):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        found.append(re.sub(r"\s+#\s.*$", "", line).strip())
        i += 1
    return found


@dataclass(frozen=True)
class StandIn:
    """What a test does instead of a command the stand-ins cannot run (``pattern`` matches the command
    line after the shell's variables are expanded), and ``why``."""

    pattern: str
    why: str
    run: Callable[[re.Match[str], GuideWalk], subprocess.CompletedProcess[str]]


@dataclass
class GuideWalk:
    """Runs a guide's blocks in ``workdir`` with ``env``; ``stand_ins`` replace what cannot run here."""

    guide: Path
    workdir: Path
    env: dict[str, str]
    stand_ins: list[StandIn] = field(default_factory=list)
    transcript: list[tuple[str, subprocess.CompletedProcess[str]]] = field(default_factory=list)

    def block(self, step: str) -> Block:
        found = [b for b in walk_blocks(self.guide) if b.step == step]
        assert len(found) == 1, f"{self.guide.name} has {len(found)} blocks marked {step!r}"
        return found[0]

    def expand(self, command: str) -> str:
        """``command`` with its ``$VARIABLE``s replaced by their values (command substitutions are left
        alone): what a stand-in's pattern is matched against."""
        return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: self.env.get(m.group(1), ""), command)

    def run(self, step: str, *, stdin: str = "y\n", timeout: float = 600) -> list[subprocess.CompletedProcess[str]]:
        """Every command of the block ``step``, in order; each must succeed."""
        results = []
        for command in commands(self.block(step).text):
            result = self.run_command(command, stdin=stdin, timeout=timeout)
            assert result.returncode == 0, (
                f"`{command}` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
            results.append(result)
        return results

    def run_command(
        self, command: str, *, stdin: str = "y\n", timeout: float = 600, stand_ins: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``command`` in bash, or what its stand-in does (``stand_ins=False``: as it is, for a stand-in)."""
        expanded = self.expand(command) if "<<EOF" not in command else command
        for stand_in in self.stand_ins if stand_ins else []:
            match = re.fullmatch(stand_in.pattern, expanded)
            if match:
                result = stand_in.run(match, self)
                self.transcript.append((f"{command}  [stand-in: {stand_in.why}]", result))
                return result
        script = f"set -eo pipefail\n{command}\nprintf '{_ENV_MARK}'\nenv -0\n"
        result = subprocess.run(["bash", "-c", script], env=self.env, cwd=self.workdir, input=stdin,
                                capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
        if _ENV_MARK in result.stdout:
            shown, _mark, dumped = result.stdout.partition(_ENV_MARK)
            self.env = dict(item.split("=", 1) for item in dumped.split("\0") if "=" in item)
            result = subprocess.CompletedProcess(result.args, result.returncode, shown, result.stderr)
        self.transcript.append((command, result))
        return result


def completed(stdout: str = "", returncode: int = 0, stderr: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["stand-in"], returncode, stdout, stderr)


# -- stand-ins shared by the clouds' walks ------------------------------------------------------------

HELM_STAND_IN = '''#!{python}
"""helm for the guide walks: the chart repositories are out of reach here, so a chart from a repository
is recorded instead of installed (and what the rest of the walk relies on from it is made: cert-manager's
ClusterIssuer type, ingress-nginx's namespace and load-balanced Service with the cloud's address); a
chart on this machine (CMBCluster's own) is installed for real by the real helm."""
import json, os, sys
args = sys.argv[1:]
with open(os.environ["WALK_HELM_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
remote = os.environ["WALK_HELM_REMOTE"]
installed = set(json.load(open(remote))) if os.path.exists(remote) else set()
if args[:2] == ["upgrade", "--install"] and "--repo" in args:
    sys.path.insert(0, {tests!r})
    from tests.k8s.guide_walk import stand_in_release
    stand_in_release(args[2], args[args.index("--namespace") + 1], args[args.index("--kubeconfig") + 1])
    json.dump(sorted(installed | {{args[2]}}), open(remote, "w"))
    sys.exit(0)
if args[:1] == ["uninstall"] and args[1] in installed:
    json.dump(sorted(installed - {{args[1]}}), open(remote, "w"))
    sys.exit(0)
os.execv({helm!r}, [{helm!r}, *args])
'''

CLUSTER_ISSUER_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "clusterissuers.cert-manager.io"},
    "spec": {
        "group": "cert-manager.io", "scope": "Cluster",
        "names": {"plural": "clusterissuers", "singular": "clusterissuer", "kind": "ClusterIssuer"},
        "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
            "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
    },
}  # fmt: skip


def stand_in_release(name: str, namespace: str, kubeconfig: str) -> None:
    """What the walk needs from a chart it cannot download: cert-manager's ClusterIssuer type; the
    ingress controller's namespace (labelled as Kubernetes 1.21+ does) and its Service, load-balanced at
    the address the cloud would give it."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kubeconfig)
    try:
        core = client.CoreV1Api(api)
        if name == "cert-manager":
            extensions = client.ApiextensionsV1Api(api)
            try:
                extensions.create_custom_resource_definition(CLUSTER_ISSUER_CRD)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                crd = extensions.read_custom_resource_definition("clusterissuers.cert-manager.io")
                if any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or [])):
                    break
                time.sleep(0.2)
        if name == "ingress-nginx":
            try:
                core.create_namespace(
                    {"metadata": {"name": namespace, "labels": {"kubernetes.io/metadata.name": namespace}}}
                )
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
            service = {"metadata": {"name": "ingress-nginx-controller"}, "spec": {
                "type": "LoadBalancer", "selector": {"app.kubernetes.io/name": "ingress-nginx"},
                "ports": [{"name": "https", "port": 443, "targetPort": 443}]}}  # fmt: skip
            try:
                core.create_namespaced_service(namespace, service)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
            address = os.environ.get("WALK_LB", LB_HOSTNAME)
            entry = {"ip": address} if address[0].isdigit() else {"hostname": address}
            core.patch_namespaced_service_status("ingress-nginx-controller", namespace,
                                                 {"status": {"loadBalancer": {"ingress": [entry]}}})  # fmt: skip
    finally:
        api.close()


def install_helm_stand_in(bin_dir: Path, real_helm: Path, state: Path) -> dict[str, str]:
    """A ``helm`` on PATH that installs local charts for real and records remote ones; its environment."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "helm"
    tests = str(Path(__file__).resolve().parents[2])
    script.write_text(HELM_STAND_IN.format(python=sys.executable, helm=str(real_helm), tests=tests))
    script.chmod(0o755)
    return {"WALK_HELM_LOG": str(state / "helm.log"), "WALK_HELM_REMOTE": str(state / "remote.json")}


def helm_calls(env: Mapping[str, str]) -> list[list[str]]:
    path = Path(env["WALK_HELM_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class VolumeProvisioner:
    """The cloud's CSI driver for the walk: a claim of ``storage_class`` that the scheduler placed on a node
    (WaitForFirstConsumer) gets a volume, as EBS CSI or the persistent disk CSI driver would make it;
    ``made`` is called with the claim and the volume's name (to record the cloud's disk)."""

    def __init__(self, api: Any, storage_class: str, made: Callable[[Any, str], None] | None = None) -> None:
        self.api, self.storage_class, self.made = api, storage_class, made
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="volume-provisioner", daemon=True)

    def __enter__(self) -> VolumeProvisioner:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api)
        while not self.stop_event.wait(0.3):
            try:
                for claim in core.list_persistent_volume_claim_for_all_namespaces().items:
                    annotations = claim.metadata.annotations or {}
                    if (claim.spec.storage_class_name != self.storage_class or claim.spec.volume_name
                            or "volume.kubernetes.io/selected-node" not in annotations):  # fmt: skip
                        continue
                    name = f"pvc-{claim.metadata.uid}"
                    core.create_persistent_volume({
                        "metadata": {"name": name},
                        "spec": {
                            "capacity": {"storage": claim.spec.resources.requests["storage"]},
                            "accessModes": claim.spec.access_modes, "storageClassName": self.storage_class,
                            "persistentVolumeReclaimPolicy": "Retain",
                            "hostPath": {"path": f"/tmp/cmbcluster-walk-{name}"},
                            "claimRef": {"namespace": claim.metadata.namespace, "name": claim.metadata.name,
                                         "uid": claim.metadata.uid},
                        },
                    })  # fmt: skip
                    if self.made is not None:
                        self.made(claim, name)
            except Exception as exc:
                print(f"volume provisioner: {exc}", file=sys.stderr)


APPLICATION_STAND_IN = '''#!{python}
"""An environment's application for the walk (the image's program, run by the test kubelet): it serves
HTTP where its command line says, as JupyterLab would, and refuses a command that was not templated."""
import http.server, re, sys
args = " ".join(sys.argv[1:])
port = re.search(r"--(?:ServerApp\\.)?port[= ](\\S+)", args)
if not port or not port.group(1).isdigit():
    sys.exit(f"no port to listen on in {{sys.argv[1:]}}: the command was not templated")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"the environment answers")
http.server.HTTPServer(("127.0.0.1", int(port.group(1))), Handler).serve_forever()
'''


def install_application_stand_in(bin_dir: Path, names: tuple[str, ...] = ("jupyter-lab", "jupyter")) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        script = bin_dir / name
        script.write_text(APPLICATION_STAND_IN.format(python=sys.executable))
        script.chmod(0o755)
    return bin_dir


def control_plane_environment(api: Any, namespace: str, deployment: str = "cmbcluster") -> dict[str, str]:
    """The control plane's environment as its pod gets it: the Deployment's variables and the Secrets
    it reads (``envFrom``), read back from the API server."""
    import base64

    from kubernetes import client

    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    container = apps.read_namespaced_deployment(deployment, namespace).spec.template.spec.containers[0]
    env: dict[str, str] = {}
    for source in container.env_from or []:
        if source.secret_ref is not None:
            data = core.read_namespaced_secret(source.secret_ref.name, namespace).data or {}
            env.update({k: base64.b64decode(v).decode() for k, v in data.items()})
    env.update({item.name: item.value for item in container.env or [] if item.value is not None})
    return env


def service_account_kubeconfig(api: Any, namespace: str, account: str, server: str, ca: Path, path: Path) -> Path:
    """A kubeconfig with the token of ``account``: what the control plane's pod is, in RBAC's eyes."""
    import base64

    from kubernetes import client

    core = client.CoreV1Api(api)
    deadline = time.monotonic() + 30
    while True:
        secrets = core.list_namespaced_secret(namespace, field_selector="type=kubernetes.io/service-account-token")
        tokens = [s for s in secrets.items if (s.metadata.annotations or {}).get(
            "kubernetes.io/service-account.name") == account]  # fmt: skip
        if tokens:
            break
        assert time.monotonic() < deadline, f"no token for ServiceAccount {namespace}/{account}"
        time.sleep(0.2)
    token = base64.b64decode(tokens[0].data["token"]).decode()
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "walk",
        "clusters": [{"name": "walk", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "walk", "context": {"cluster": "walk", "user": account, "namespace": namespace}}],
    }))  # fmt: skip
    return path


def base_path() -> str:
    """PATH for the walk: this interpreter's scripts (cmbcluster), then the system's."""
    return os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
