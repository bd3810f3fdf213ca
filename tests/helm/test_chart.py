"""The Helm chart, statically: lint, render for GCP, AWS and a third party's cloud, validate every
manifest offline against a current Kubernetes schema (strict), and check what operators rely on:
restricted pods, the exact RBAC of rbac.py, identity annotations, SQLite vs. PostgreSQL, routing,
network isolation, and values.schema.json refusing bad values with a clear message."""

from __future__ import annotations

import copy
import json
from typing import Any

import kubernetes_validate
import pytest
from helm_chart import (  # tests/helm is on sys.path (rootdir-less test folders)
    AWS_VALUES,
    CHART,
    CLOUDS,
    CURRENT_KUBERNETES,
    GCP_VALUES,
    PLUGIN_VALUES,
    by_kind,
    helm,
    manifests,
    one,
    template,
)

from cmbcluster.commands.deploy import rbac_values
from cmbcluster.kubernetes import rbac
from cmbcluster.kubernetes.labels import COMPONENT_LABEL, MANAGED_BY, MANAGED_BY_VALUE, USER_ENVIRONMENT
from cmbcluster.kubernetes.routing import CONTROL_PLANE_SELECTOR, METADATA_ADDRESSES, NETWORK_POLICY_NAME, Exposure


def merged(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``base`` with dotted-path changes: merged(GCP_VALUES, **{"controlPlane.replicas": 2})."""
    values = copy.deepcopy(base)
    for path, value in changes.items():
        node = values
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return values


@pytest.mark.parametrize("cloud", sorted(CLOUDS))
def test_helm_lint(cloud: str, tmp_path: Any) -> None:
    values = tmp_path / "values.json"
    values.write_text(json.dumps(CLOUDS[cloud]))
    result = helm("lint", "--strict", str(CHART), "--values", str(values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("cloud", sorted(CLOUDS))
def test_every_manifest_is_valid_at_a_current_kubernetes_version(cloud: str) -> None:
    objects = manifests(CLOUDS[cloud])
    failures = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, CURRENT_KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not failures, "\n".join(failures)
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "Ingress", "NetworkPolicy"} <= kinds


def test_validation_rejects_what_kubernetes_would() -> None:
    """The offline validation itself catches an unknown field (strict) and a wrong type."""
    deployment = one(manifests(GCP_VALUES), "Deployment")
    deployment["spec"]["replicaz"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, CURRENT_KUBERNETES, strict=True)


@pytest.mark.parametrize("cloud", sorted(CLOUDS))
def test_control_plane_pods_meet_the_restricted_pod_security_standard(cloud: str) -> None:
    pod = one(manifests(CLOUDS[cloud]), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert not any("hostPath" in volume for volume in pod["volumes"])


@pytest.mark.parametrize("cloud", sorted(CLOUDS))
def test_the_role_is_exactly_rbac_py(cloud: str) -> None:
    objects = manifests(CLOUDS[cloud])
    role = one(objects, "Role")
    assert role["rules"] == rbac.NAMESPACED_RULES
    binding = one(objects, "RoleBinding")
    account = one(objects, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "research"}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    # PersistentVolumes are cluster-scoped: created for mountpoint-s3, looked up by label on every
    # stop and delete (tests/k8s/test_helm_chart.py shows a gcsfuse deployment needs them too)
    assert [r["rules"] for r in by_kind(objects, "ClusterRole")] == [rbac.CLUSTER_RULES]
    assert one(objects, "ClusterRoleBinding")["subjects"][0]["name"] == account["metadata"]["name"]


def test_rules_given_as_values_replace_the_generated_file() -> None:
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    role = one(manifests(merged(GCP_VALUES, **{"rbac.namespacedRules": rules})), "Role")
    assert role["rules"] == rules


def test_the_charts_copy_of_the_rbac_rules_is_current() -> None:
    in_chart = json.loads((CHART / "files" / "rbac.json").read_text())
    assert in_chart == rbac_values(), (
        "helm/cmbcluster/files/rbac.json differs from cmbcluster/kubernetes/rbac.py: "
        "regenerate it with `./run nox -s helm-rbac`"
    )


def test_rbac_can_be_left_to_the_operator() -> None:
    assert not by_kind(manifests(merged(GCP_VALUES, **{"rbac.clusterRole.create": False})), "ClusterRole")
    none = manifests(merged(GCP_VALUES, **{"rbac.create": False}))
    assert not by_kind(none, "Role") and not by_kind(none, "ClusterRole")


def test_the_service_account_is_the_one_the_cloud_identity_trusts_without_the_cli() -> None:
    """GitOps (helm without `cmbcluster deploy`) renders the ServiceAccount that `infra up`'s IRSA role and
    Workload Identity binding name, not the release's name."""
    from cmbcluster.kubernetes.rbac import CONTROL_PLANE_SERVICE_ACCOUNT

    objects = manifests(GCP_VALUES)
    assert one(objects, "ServiceAccount")["metadata"]["name"] == CONTROL_PLANE_SERVICE_ACCOUNT
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == CONTROL_PLANE_SERVICE_ACCOUNT


@pytest.mark.parametrize(
    ("cloud", "annotation", "value"),
    [
        ("gcp", "iam.gke.io/gcp-service-account", "cmbcluster-controlplane@cmb-research.iam.gserviceaccount.com"),
        ("aws", "eks.amazonaws.com/role-arn", "arn:aws:iam::123456789012:role/cmbcluster-infra/cmbcluster-eks/cmbcluster-eks-controlplane"),
        ("azure", "azure.workload.identity/client-id", "00000000-0000-0000-0000-000000000000"),
    ],
)
def test_service_account_carries_the_cloud_identity(cloud: str, annotation: str, value: str) -> None:
    objects = manifests(CLOUDS[cloud])
    account = one(objects, "ServiceAccount")
    assert account["metadata"]["annotations"] == {annotation: value}
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def _env(objects: list[dict[str, Any]]) -> dict[str, str]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item["value"] for item in container["env"]}


def test_cloud_settings_become_the_control_planes_environment() -> None:
    gcp = _env(manifests(GCP_VALUES))
    assert gcp["CMBCLUSTER_CLOUD_PROVIDER"] == "gcp" and gcp["PROJECT_ID"] == "cmb-research"
    assert gcp["CMBCLUSTER_ENVIRONMENTS_DOMAIN"] == "envs.example.org"
    assert gcp["CMBCLUSTER_NAMESPACE"] == "research"
    assert gcp["CMBCLUSTER_PUBLIC_URL"] == "https://cmb.example.org"
    assert "AWS_REGION" not in gcp
    aws = _env(manifests(AWS_VALUES))
    assert (aws["AWS_REGION"], aws["AWS_ACCOUNT_ID"]) == ("eu-west-1", "123456789012")
    assert "PROJECT_ID" not in aws and "REGION" not in aws
    plugin = _env(manifests(merged(PLUGIN_VALUES, **{"auth.provider": "azure,oidc"})))
    assert plugin["CMBCLUSTER_CLOUD_PROVIDER"] == "azure"
    assert plugin["CMBCLUSTER_AUTH_PROVIDERS"] == "azure,oidc"


def test_config_passes_settings_but_not_where_the_process_listens() -> None:
    values = merged(GCP_VALUES, config={"CMBCLUSTER_ADMIN_EMAILS": "pi@example.org", "CMBCLUSTER_HOST": "127.0.0.1"})
    env = _env(manifests(values))
    assert env["CMBCLUSTER_ADMIN_EMAILS"] == "pi@example.org"
    assert env["CMBCLUSTER_HOST"] == "0.0.0.0"  # the chart's: a pod must listen beyond loopback


def test_secrets_stay_in_the_secret() -> None:
    values = merged(AWS_VALUES, secretConfig={"COGNITO_CLIENT_SECRET": "s3cr3t-value"})
    objects = manifests(values)
    deployment = json.dumps(one(objects, "Deployment"))
    assert "s3cr3t-value" not in deployment and "a-password" not in deployment
    secret = one(objects, "Secret")
    assert {"COGNITO_CLIENT_SECRET", "CMBCLUSTER_DATABASE_URL", "CMBCLUSTER_SECRET_KEY"} <= set(secret["data"])
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]


def test_sqlite_runs_one_replica_on_a_claim_with_recreate() -> None:
    objects = manifests(GCP_VALUES)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    claim = one(objects, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert by_kind(objects, "PodDisruptionBudget") == []  # one replica: a budget would only block drains


def test_an_external_database_runs_several_replicas_with_a_budget_where_the_api_has_one() -> None:
    objects = manifests(AWS_VALUES)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert by_kind(objects, "PersistentVolumeClaim") == []
    budget = one(objects, "PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    # (Kubernetes 1.20 has no policy/v1 and gets no budget: helm template always offers policy/v1,
    # so tests/k8s/test_helm_chart.py checks that on the real 1.20 API server.)


def test_ingress_serves_the_ui_and_the_wildcard_environment_host_with_cert_manager() -> None:
    ingress = one(manifests(GCP_VALUES), "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert [rule["host"] for rule in ingress["spec"]["rules"]] == ["cmb.example.org", "*.envs.example.org"]
    assert [tls["hosts"] for tls in ingress["spec"]["tls"]] == [["cmb.example.org"], ["*.envs.example.org"]]
    issuer = one(
        manifests(
            merged(GCP_VALUES, **{"ingress.certManager.issuer": "dns01", "ingress.certManager.issuerKind": "Issuer"})
        ),
        "Ingress",
    )
    assert issuer["metadata"]["annotations"]["cert-manager.io/issuer"] == "dns01"
    assert "cert-manager.io/cluster-issuer" not in issuer["metadata"]["annotations"]
    assert not by_kind(manifests(merged(GCP_VALUES, **{"ingress.enabled": False})), "Ingress")


def test_network_policies_isolate_users_and_block_the_metadata_address() -> None:
    objects = manifests(GCP_VALUES)
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(objects, "NetworkPolicy")}
    # the control plane's own policy of the namespace (routing.py): it keeps the chart's
    users = policies[NETWORK_POLICY_NAME]
    assert users["podSelector"] == {"matchLabels": {MANAGED_BY: MANAGED_BY_VALUE, COMPONENT_LABEL: USER_ENVIRONMENT}}
    assert users["policyTypes"] == ["Ingress", "Egress"]
    sources = users["ingress"][0]["from"]
    # only the ingress controller and the control plane reach a user pod: never another user's pod
    assert sources[0] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    control_plane_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert sources[1] == {"podSelector": {"matchLabels": control_plane_labels}}
    assert CONTROL_PLANE_SELECTOR.items() <= control_plane_labels.items()  # what the backend's policy admits
    assert control_plane_labels.get(MANAGED_BY) != MANAGED_BY_VALUE
    blocks = [to["ipBlock"] for to in users["egress"][0]["to"]]
    # every cloud's metadata endpoint, GKE Dataplane V2's metadata server (port 988) included; the same
    # policy as the one the control plane would create (routing.py)
    assert blocks == [
        {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32", "169.254.169.252/32"]},
        {"cidr": "::/0", "except": ["fd00:ec2::254/128"]},
    ]
    assert blocks == [to["ipBlock"] for to in Exposure().network_policy()["spec"]["egress"][0]["to"]]
    assert set(METADATA_ADDRESSES) == {"169.254.169.254/32", "169.254.169.252/32", "fd00:ec2::254/128"}
    control_plane = policies["cmb-cmbcluster"]
    assert control_plane["podSelector"]["matchLabels"] == control_plane_labels
    assert control_plane["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_proxy_routing_reaches_the_control_plane_and_lets_only_it_reach_user_pods() -> None:
    objects = manifests(merged(GCP_VALUES, **{"environments.domain": ""}))  # the default without host routing
    assert _env(objects)["CMBCLUSTER_ROUTING"] == "proxy"
    assert _env(manifests(GCP_VALUES))["CMBCLUSTER_ROUTING"] == "ingress"  # a domain: host routing, the ingress's
    asked = manifests(merged(GCP_VALUES, **{"environments.routing": "ingress", "environments.domain": ""}))
    assert _env(asked)["CMBCLUSTER_ROUTING"] == "ingress"
    users = {p["metadata"]["name"]: p["spec"] for p in by_kind(objects, "NetworkPolicy")}[NETWORK_POLICY_NAME]
    control_plane_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    # the ingress controller no longer reaches user pods: all their traffic passes the control plane
    assert users["ingress"][0]["from"] == [{"podSelector": {"matchLabels": control_plane_labels}}]
    backend_policy = Exposure(routing="proxy").network_policy()["spec"]["ingress"][0]["from"]
    assert backend_policy == [{"podSelector": {"matchLabels": CONTROL_PLANE_SELECTOR}}]


def test_the_control_plane_knows_the_charts_names() -> None:
    env = _env(manifests(merged(GCP_VALUES, **{"ingress.controllerNamespace": "ingress"})))
    assert env["CMBCLUSTER_CONTROL_PLANE_URL"] == "http://cmb-cmbcluster.research.svc.cluster.local:80"
    assert env["CMBCLUSTER_TLS_SECRET"] == "cmb-cmbcluster-environments-tls"  # the Ingress's wildcard secret
    assert env["CMBCLUSTER_INGRESS_NAMESPACE"] == "ingress"
    path_routing = _env(manifests(merged(GCP_VALUES, **{"environments.domain": ""})))
    assert path_routing["CMBCLUSTER_TLS_SECRET"] == "cmb-cmbcluster-tls"
    no_tls = _env(manifests(merged(GCP_VALUES, **{"ingress.tls.enabled": False})))
    assert no_tls["CMBCLUSTER_TLS_SECRET"] == ""


def test_environments_in_another_namespace_get_the_role_and_policy_there() -> None:
    objects = manifests(merged(GCP_VALUES, **{"environments.namespace": "users"}))
    assert one(objects, "Role")["metadata"]["namespace"] == "users"
    assert one(objects, "RoleBinding")["subjects"][0]["namespace"] == "research"
    policy = next(p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == NETWORK_POLICY_NAME)
    assert policy["metadata"]["namespace"] == "users"
    control_plane_source = policy["spec"]["ingress"][0]["from"][1]
    assert control_plane_source["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "research"}}
    assert _env(objects)["CMBCLUSTER_NAMESPACE"] == "users"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"global.cloudProvider": "AWS"}, "global.cloudProvider: Does not match pattern"),
        ({"global.cloudProvider": ""}, "global.cloudProvider: Does not match pattern"),
        ({"global.gcp.projectId": "Not A Project"}, "global.gcp.projectId: Does not match pattern"),
        ({"global.aws.accountId": 123456789012}, "global.aws.accountId: Invalid type. Expected: string"),
        ({"global.aws.controlPlaneRoleArn": "my-role"}, "global.aws.controlPlaneRoleArn: Does not match pattern"),
        ({"controlPlane.replicas": 0}, "controlPlane.replicas: Must be greater than or equal to 1"),
        ({"controlPlane.port": 80}, "controlPlane.port: Must be greater than or equal to 1024"),
        ({"image.pullPolicy": "Sometimes"}, "image.pullPolicy: image.pullPolicy must be one of the following"),
        ({"database.url": "mysql://db/cmb"}, "database.url: Does not match pattern"),
        ({"ingress.host": "https://cmb.example.org/"}, "ingress.host: Does not match pattern"),
        ({"environments.domain": "*.envs.example.org"}, "environments.domain: Does not match pattern"),
        ({"config.CMBCLUSTER_MAX_CPU": 8}, "config.CMBCLUSTER_MAX_CPU: Invalid type. Expected: string"),
        ({"ingress.certManager.issuerKind": "Cluster"}, "issuerKind must be one of the following"),
        ({"networkPolicy.blockedCidrs": ["169.254.169.254"]}, "networkPolicy.blockedCidrs.0: Does not match pattern"),
        ({"rbac.namespacedRules": [{"resources": ["pods"]}]}, "apiGroups is required"),
        ({"controlPlane.replicaCount": 2}, "Additional property replicaCount is not allowed"),
        # Rules across values: the templates' own messages.
        ({"global.gcp.projectId": ""}, "global.gcp.projectId is required when global.cloudProvider is gcp"),
        ({"controlPlane.replicas": 2}, "SQLite allows one replica: set database.url (PostgreSQL)"),
        ({"image.tag": "latest"}, "image.tag must be an exact version, not latest"),
        ({"environments.routing": "nodeport"}, "environments.routing must be one of the following"),
        ({"environments.routing": "proxy"}, "environments.domain (host routing) needs environments.routing ingress"),
        ({"secretKey.value": "too-short"}, "secretKey.value must be at least 32 random characters"),
        (
            {"storage.driver": "mountpoint-s3", "rbac.clusterRole.create": False},
            "storage.driver mountpoint-s3 mounts buckets through PersistentVolumes the control plane creates",
        ),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(changes: dict[str, Any], message: str) -> None:
    result = template(merged(GCP_VALUES, **changes))
    assert result.returncode != 0, f"{changes} was accepted"
    assert message in result.stderr, result.stderr


def test_aws_needs_its_region_and_account() -> None:
    values = merged(AWS_VALUES, **{"global.aws.region": ""})
    assert "global.aws.region is required when global.cloudProvider is aws" in template(values).stderr
    values = merged(AWS_VALUES, **{"global.aws.accountId": ""})
    assert "global.aws.accountId is required when global.cloudProvider is aws" in template(values).stderr


def test_kubernetes_1_20_is_the_oldest_accepted() -> None:
    assert template(GCP_VALUES, kube_version="1.20.2", api_versions=()).returncode == 0  # the test cluster's
    too_old = template(GCP_VALUES, kube_version="1.19.16", api_versions=())
    assert too_old.returncode != 0 and "chart requires kubeVersion: >=1.20.0-0" in too_old.stderr
