"""The Helm chart on the real Kubernetes 1.20 API server (tests/k8s/README.md), for both clouds.

- ``helm install --wait`` succeeds: the fake kubelet runs the control plane's pods (no image is
  pulled), the SQLite claim binds, the Deployment becomes available; at API level 1.20 there is no
  policy/v1, so no PodDisruptionBudget.
- The control plane, run outside the cluster with the token of the chart's own ServiceAccount,
  creates, lists and deletes an environment through its HTTP API: the chart's RBAC is enough. And no
  more than rbac.py: the API server's own access reviews, asked as that ServiceAccount, allow exactly
  the rules' verbs.
- ``cmbcluster deploy --dry-run`` prints the helm command and the values, and a real ``cmbcluster
  deploy`` installs, then upgrades, the release on the test API server with those values.
"""

from __future__ import annotations

import base64
import json
import secrets
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kubernetes")

import yaml
from kubernetes import client as k8s

from cmbcluster.commands.deploy import HIDDEN
from cmbcluster.kubernetes import rbac
from cmbcluster.kubernetes.routing import NETWORK_POLICY_NAME
from cmbcluster.testing.process import ServeProcess, clean_environ, run_cli
from tests.helm.helm_chart import AWS_ENV, AWS_VALUES, CHART, GCP_ENV, GCP_VALUES, helm, helm_binary
from tests.k8s.harness import K8sCluster, wait_for
from tests.k8s.test_control_plane_on_kubernetes import (
    Api,
    assert_no_permission_errors,
    objects_of,
    serve_env,
)

RELEASE = "cmb"
STORAGE_CLASS = "manual"  # no provisioner here: the tests give the SQLite claim a volume of this class
# What the test cluster needs on top of each cloud's values: a storage class for the claim.
CLUSTER_VALUES: dict[str, Any] = {"database": {"persistence": {"storageClass": STORAGE_CLASS}}}


@dataclass(frozen=True)
class Release:
    cloud: str
    namespace: str
    name: str
    helm_env: dict[str, str]

    def resource_name(self) -> str:
        return f"{self.name}-cmbcluster"


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    from cmbcluster.commands.deploy import deep_merge

    result: dict[str, Any] = {}
    for part in parts:
        result = deep_merge(result, part)
    return result


@pytest.fixture(scope="module")
def admin_api(k8s_cluster: K8sCluster) -> Iterator[k8s.ApiClient]:
    api = k8s_cluster.api_client()
    yield api
    api.close()


def helm_env(k8s_cluster: K8sCluster, home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return clean_environ({**k8s_cluster.env, "HOME": str(home), "HELM_CACHE_HOME": str(home / "cache")})


def new_namespace(k8s_cluster: K8sCluster, api: k8s.ApiClient, prefix: str) -> str:
    namespace = f"{prefix}-{secrets.token_hex(3)}"
    # Kubernetes 1.21+ labels every namespace with its name; 1.20 does not, so the test does, as the
    # chart's documentation asks operators of such clusters to (the NetworkPolicies select it).
    labels = {"kubernetes.io/metadata.name": namespace}
    k8s.CoreV1Api(api).create_namespace({"metadata": {"name": namespace, "labels": labels}})
    k8s_cluster.wait_for_default_token(namespace)
    return namespace


def volume_for_the_claim(api: k8s.ApiClient, namespace: str, tmp: Path) -> str:
    """A PersistentVolume the chart's SQLite claim can bind (the test cluster has no provisioner)."""
    name = f"{namespace}-data"
    k8s.CoreV1Api(api).create_persistent_volume(
        {
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": STORAGE_CLASS,
                "hostPath": {"path": str(tmp / name)},
                "claimRef": {"namespace": namespace, "name": f"{RELEASE}-cmbcluster-data"},
            },
        }
    )
    return name


@pytest.fixture(scope="module", params=["gcp", "aws"])
def release(
    request: pytest.FixtureRequest, k8s_cluster: K8sCluster, admin_api: k8s.ApiClient, tmp_path_factory: Any
) -> Iterator[Release]:
    """The chart installed with `helm install --wait` for one cloud, in a namespace of its own."""
    cloud: str = request.param
    tmp = tmp_path_factory.mktemp(f"helm-{cloud}")
    namespace = new_namespace(k8s_cluster, admin_api, f"helm-{cloud}")
    volume = volume_for_the_claim(admin_api, namespace, tmp) if cloud == "gcp" else None
    env = helm_env(k8s_cluster, tmp / "home")
    values = merged(GCP_VALUES if cloud == "gcp" else AWS_VALUES, CLUSTER_VALUES)
    installed = helm(
        "install", RELEASE, str(CHART), "--namespace", namespace, "--wait", "--timeout", "180s", "--values", "-",
        input_values=values, env=env, timeout=240,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr + installed.stdout
    try:
        yield Release(cloud=cloud, namespace=namespace, name=RELEASE, helm_env=env)
    finally:
        helm("uninstall", RELEASE, "--namespace", namespace, "--wait", env=env)
        core = k8s.CoreV1Api(admin_api)
        core.delete_namespace(namespace)
        if volume:
            core.delete_persistent_volume(volume)


# -- helm install --wait ----------------------------------------------------------------------------
def test_helm_install_waits_until_the_control_plane_is_available(release: Release, admin_api: k8s.ApiClient) -> None:
    status = helm("status", release.name, "--namespace", release.namespace, "-o", "json", env=release.helm_env)
    assert json.loads(status.stdout)["info"]["status"] == "deployed"
    name = release.resource_name()
    deployment = k8s.AppsV1Api(admin_api).read_namespaced_deployment(name, release.namespace)
    replicas = 1 if release.cloud == "gcp" else 2
    assert deployment.spec.replicas == replicas and deployment.status.available_replicas == replicas
    pods = k8s.CoreV1Api(admin_api).list_namespaced_pod(
        release.namespace, label_selector="app.kubernetes.io/component=control-plane"
    )
    assert [p.status.phase for p in pods.items] == ["Running"] * replicas
    manifest = helm("get", "manifest", release.name, "--namespace", release.namespace, env=release.helm_env).stdout
    kinds = {doc["kind"] for doc in yaml.safe_load_all(manifest) if doc}
    assert "PodDisruptionBudget" not in kinds  # API level 1.20: no policy/v1
    assert {"Deployment", "Service", "Ingress", "NetworkPolicy", "Role", "RoleBinding", "ServiceAccount"} <= kinds
    if release.cloud == "gcp":
        claim = k8s.CoreV1Api(admin_api).read_namespaced_persistent_volume_claim(f"{name}-data", release.namespace)
        assert claim.status.phase == "Bound"
        assert deployment.spec.strategy.type == "Recreate"
    else:
        assert deployment.spec.strategy.type == "RollingUpdate"
    role = k8s.RbacAuthorizationV1Api(admin_api).read_namespaced_role(name, release.namespace)
    assert [api_rule(rule) for rule in role.rules] == rbac.NAMESPACED_RULES
    policy = k8s.NetworkingV1Api(admin_api).read_namespaced_network_policy(NETWORK_POLICY_NAME, release.namespace)
    assert policy.spec.policy_types == ["Ingress", "Egress"]


def api_rule(rule: k8s.V1PolicyRule) -> dict[str, list[str]]:
    return {"apiGroups": rule.api_groups, "resources": rule.resources, "verbs": rule.verbs}


# -- the chart's ServiceAccount, used by the control plane outside the cluster ------------------------
def service_account_token(api: k8s.ApiClient, release: Release) -> str:
    """The token of the chart's ServiceAccount (1.20 creates a token Secret for every ServiceAccount):
    the one the cloud identity trusts, whatever the release is called."""
    from cmbcluster.kubernetes.rbac import CONTROL_PLANE_SERVICE_ACCOUNT

    core = k8s.CoreV1Api(api)
    account = CONTROL_PLANE_SERVICE_ACCOUNT

    def token() -> str | None:
        found = core.list_namespaced_secret(
            release.namespace, field_selector="type=kubernetes.io/service-account-token"
        )
        for secret in found.items:
            if (secret.metadata.annotations or {}).get("kubernetes.io/service-account.name") == account:
                return base64.b64decode(secret.data["token"]).decode()
        return None

    value: str = wait_for(token, 30, f"the token Secret of ServiceAccount {account}")
    return value


def kubeconfig_for(k8s_cluster: K8sCluster, token: str, path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "chart-sa",
                "clusters": [
                    {
                        "name": "test",
                        "cluster": {"server": k8s_cluster.server, "certificate-authority": str(k8s_cluster.ca_path)},
                    }
                ],
                "users": [{"name": "chart-sa", "user": {"token": token}}],
                "contexts": [{"name": "chart-sa", "context": {"cluster": "test", "user": "chart-sa"}}],
            }
        )
    )
    return path


def test_the_control_plane_with_the_charts_service_account_creates_lists_and_deletes_an_environment(
    release: Release, k8s_cluster: K8sCluster, admin_api: k8s.ApiClient, tmp_path: Path
) -> None:
    token = service_account_token(admin_api, release)
    kubeconfig = kubeconfig_for(k8s_cluster, token, tmp_path / "kubeconfig")
    env = serve_env(k8s_cluster, release.namespace, tmp_path / "data", CMBCLUSTER_KUBECONFIG=str(kubeconfig))
    with ServeProcess(env, tmp_path) as server:
        assert server.wait_ready("/readyz").status_code == 200, server.output()
        user = Api(server.url, "ada@example.org")
        try:
            created = user.create(name="from-the-chart")
            assert created.status_code == 201, created.text
            environment_id = created.json()["id"]
            assert user.settled(environment_id)["status"] == "running"
            assert objects_of(admin_api, release.namespace, environment_id)
            listed = user.client.get("/api/v1/environments")
            assert listed.status_code == 200
            assert [e["id"] for e in listed.json()["items"]] == [environment_id]
            deleted = user.client.delete(f"/api/v1/environments/{environment_id}")
            assert deleted.status_code == 204, deleted.text
            wait_for(lambda: not objects_of(admin_api, release.namespace, environment_id), 60, "the delete")
            assert user.client.get("/api/v1/environments").json()["items"] == []
        finally:
            user.close()
        assert_no_permission_errors(server)


def allowed(api: k8s.ApiClient, namespace: str | None, verb: str, resource: str, group: str = "") -> bool:
    """The API server's own answer: may the token of ``api`` do this?"""
    attributes = {"verb": verb, "resource": resource, "group": group}
    if "/" in resource:
        attributes["resource"], attributes["subresource"] = resource.split("/", 1)
    if namespace:
        attributes["namespace"] = namespace
    review = k8s.AuthorizationV1Api(api).create_self_subject_access_review({"spec": {"resourceAttributes": attributes}})
    return bool(review.status.allowed)


VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")


def test_the_charts_rbac_is_exactly_rbac_py(
    release: Release, k8s_cluster: K8sCluster, admin_api: k8s.ApiClient
) -> None:
    api = k8s_cluster.api_client(token=service_account_token(admin_api, release))
    try:
        granted: dict[tuple[str, str], set[str]] = {}
        for rule in rbac.NAMESPACED_RULES:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
        for (group, resource), verbs in granted.items():
            answers = {verb: allowed(api, release.namespace, verb, resource, group) for verb in VERBS}
            assert {v for v, ok in answers.items() if ok} == verbs, f"{group}/{resource}"
            assert not allowed(api, "kube-system", "get", resource, group)  # in its namespace only
        forbidden = [("create", "deployments", "apps"), ("create", "roles", "rbac.authorization.k8s.io"),
                     ("get", "nodes", ""), ("create", "namespaces", "")]  # fmt: skip
        for verb, resource, group in forbidden:
            assert not allowed(api, release.namespace, verb, resource, group), (verb, resource)
        # cluster-wide: CLUSTER_RULES (PersistentVolumes), nothing more
        volumes = {verb for verb in VERBS if allowed(api, None, verb, "persistentvolumes")}
        assert volumes == set(rbac.CLUSTER_RULES[0]["verbs"])
        assert not allowed(api, None, "list", "pods") and not allowed(api, None, "list", "secrets")
    finally:
        api.close()


# -- cmbcluster deploy --------------------------------------------------------------------------------
def test_cmbcluster_deploy_dry_run_then_install_and_upgrade(
    k8s_cluster: K8sCluster, admin_api: k8s.ApiClient, tmp_path: Path
) -> None:
    for cloud, cloud_env in (("gcp", GCP_ENV), ("aws", AWS_ENV)):
        namespace = new_namespace(k8s_cluster, admin_api, f"deploy-{cloud}")
        volume = volume_for_the_claim(admin_api, namespace, tmp_path) if cloud == "gcp" else None
        extra = tmp_path / f"{cloud}-cluster.yaml"
        extra.write_text(yaml.safe_dump(CLUSTER_VALUES))
        env = {**helm_env(k8s_cluster, tmp_path / f"home-{cloud}"), **cloud_env}
        args = ("deploy", "--namespace", namespace, "--release", RELEASE, "--values", str(extra), "--timeout", "180s")
        try:
            dry = run_cli(*args, "--dry-run", env=env, cwd=tmp_path)
            assert dry.returncode == 0, dry.stderr
            lines = dry.stdout.splitlines()
            command = shlex.split(lines[1])
            assert command[1:] == ["upgrade", "--install", RELEASE, str(CHART), "--namespace", namespace,
                                   "--create-namespace", "--wait", "--timeout", "180s",
                                   "--values", "-", "--values", str(extra)]  # fmt: skip
            printed = yaml.safe_load("\n".join(lines[3:]))
            assert printed["global"]["cloudProvider"] == cloud
            assert not k8s.AppsV1Api(admin_api).list_namespaced_deployment(namespace).items  # a dry run changes nothing

            for revision in (1, 2):  # install, then upgrade with the same configuration
                done = run_cli(*args, env=env, cwd=tmp_path, timeout=300)
                assert done.returncode == 0, done.stderr + done.stdout
                assert "STATUS: deployed" in done.stdout and f"REVISION: {revision}" in done.stdout
                if revision == 1:
                    secret = k8s.CoreV1Api(admin_api).read_namespaced_secret(f"{RELEASE}-cmbcluster", namespace)
                    first_key = secret.data["CMBCLUSTER_SECRET_KEY"]
            # What helm holds is what the dry run printed, with the secrets themselves instead of <hidden>.
            got = helm("get", "values", RELEASE, "--namespace", namespace, "-o", "json", env=env)
            stored = json.loads(got.stdout)
            for key in ("global", "storage", "auth", "rbac", "config", "ingress", "serviceAccount"):
                assert stored.get(key) == printed.get(key), key
            assert set(stored["secretConfig"]) == {
                "GOOGLE_CLIENT_SECRET" if cloud == "gcp" else "COGNITO_CLIENT_SECRET"
            }
            assert "secretConfig" not in printed  # left out of what is printed, named in a comment
            assert HIDDEN not in json.dumps(stored)
            secret = k8s.CoreV1Api(admin_api).read_namespaced_secret(f"{RELEASE}-cmbcluster", namespace)
            client_secret = "GOOGLE_CLIENT_SECRET" if cloud == "gcp" else "COGNITO_CLIENT_SECRET"
            assert base64.b64decode(secret.data[client_secret]).decode() == cloud_env[client_secret]
            if cloud == "gcp":  # generated at install, kept by the upgrade: sessions survive upgrades
                assert secret.data["CMBCLUSTER_SECRET_KEY"] == first_key
            # named as the cloud identity's trust requires (infra up's IRSA role; the Workload Identity binding)
            assert printed["serviceAccount"]["name"] == "cmbcluster-controlplane"
            account = k8s.CoreV1Api(admin_api).read_namespaced_service_account("cmbcluster-controlplane", namespace)
            annotations = account.metadata.annotations
            if cloud == "gcp":
                expected = {"iam.gke.io/gcp-service-account": printed["global"]["gcp"]["serviceAccountEmail"]}
            else:
                expected = {"eks.amazonaws.com/role-arn": printed["global"]["aws"]["controlPlaneRoleArn"]}
            assert expected.items() <= annotations.items()
        finally:
            helm("uninstall", RELEASE, "--namespace", namespace, "--wait", env=env)
            k8s.CoreV1Api(admin_api).delete_namespace(namespace)
            if volume:
                k8s.CoreV1Api(admin_api).delete_persistent_volume(volume)


def test_helm_is_the_test_clusters(k8s_cluster: K8sCluster) -> None:
    """The static chart tests and these use one helm: the harness's 3.18.0."""
    assert Path(helm_binary()).resolve() == (k8s_cluster.bin_dir / "helm").resolve()


def test_deploy_names_what_would_keep_the_control_plane_from_starting(
    k8s_cluster: K8sCluster, admin_api: k8s.ApiClient, tmp_path: Path
) -> None:
    """Before helm: a SQLite claim no StorageClass can bind is refused at once (EKS has no default
    class). While helm waits: a pod no node can take is named within the patience given, helm is
    stopped, and the way back is said, instead of a 10-minute 'context deadline exceeded'."""
    namespace = new_namespace(k8s_cluster, admin_api, "deploy-stuck")
    env = {**helm_env(k8s_cluster, tmp_path / "home"), **GCP_ENV}
    base = ("deploy", "--namespace", namespace, "--release", RELEASE, "--timeout", "600s")
    started = time.monotonic()
    no_class = run_cli(*base, env=env, cwd=tmp_path, timeout=120)
    assert no_class.returncode == 1
    assert "the cluster has no default StorageClass" in no_class.stderr, no_class.stderr
    assert not k8s.AppsV1Api(admin_api).list_namespaced_deployment(namespace).items  # nothing was installed

    volume_for_the_claim(admin_api, namespace, tmp_path)
    too_big = tmp_path / "too-big.yaml"
    too_big.write_text(yaml.safe_dump(merged(CLUSTER_VALUES, {
        "controlPlane": {"resources": {"requests": {"cpu": "500"}, "limits": {"cpu": "500"}}}
    })))  # fmt: skip
    stuck = run_cli(*base, "--values", str(too_big), "--stuck-after", "5", env=env, cwd=tmp_path, timeout=300)
    assert stuck.returncode == 1
    assert "cannot be scheduled" in stuck.stderr and "Insufficient cpu" in stuck.stderr, stuck.stderr
    assert "helm rollback" in stuck.stderr and "helm uninstall" in stuck.stderr
    assert time.monotonic() - started < 120  # not helm's 600 s timeout
    helm("uninstall", RELEASE, "--namespace", namespace, env=env)
