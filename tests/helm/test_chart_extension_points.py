"""The chart's extension points for any cloud (issue 17): pod labels and annotations, extra env and
volumes, ServiceAccount annotations, global.<cloud> of a third-party plugin, a storage driver's
PersistentVolume needs; validated by values.schema.json, and used by an installed third-party plugin."""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import CHART, GCP_ENV, helm, manifests, one, template  # tests/helm is on sys.path

from cmbcluster.testing.process import clean_environ, run_cli

AZURE: dict[str, Any] = {
    "global": {
        "cloudProvider": "azure",
        "azure": {
            "env": {"AZURE_STORAGE_ACCOUNT": "cmbusers", "AZURE_BLOB_PROTOCOL": "fuse2"},
            "podLabels": {"azure.workload.identity/use": "true"},
            "podAnnotations": {"azure.workload.identity/inject-proxy-sidecar": "false"},
            "serviceAccountAnnotations": {"azure.workload.identity/client-id": "00000000-0000-0000-0000-000000000000"},
        },
    },
    "storage": {"driver": "blob-csi"},
}


def pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    template: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]
    return template


def env_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod(objects)["spec"]["containers"]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_a_third_party_cloud_global_values_reach_the_pod_and_its_service_account() -> None:
    objects = manifests(AZURE)
    labels = pod(objects)["metadata"]["labels"]
    assert labels["azure.workload.identity/use"] == "true"
    assert pod(objects)["metadata"]["annotations"]["azure.workload.identity/inject-proxy-sidecar"] == "false"
    env = env_of(objects)
    assert (env["AZURE_STORAGE_ACCOUNT"], env["CMBCLUSTER_CLOUD_PROVIDER"]) == ("cmbusers", "azure")
    account = one(objects, "ServiceAccount")["metadata"]["annotations"]
    assert account == {"azure.workload.identity/client-id": "00000000-0000-0000-0000-000000000000"}


def test_global_values_of_a_cloud_not_selected_are_not_read() -> None:
    values = copy.deepcopy(AZURE)
    values["global"]["cloudProvider"] = "other"
    objects = manifests(values)
    assert "azure.workload.identity/use" not in pod(objects)["metadata"]["labels"]
    assert "AZURE_STORAGE_ACCOUNT" not in env_of(objects)


def test_control_plane_labels_env_and_volumes_for_any_cloud() -> None:
    values = copy.deepcopy(AZURE)
    values["controlPlane"] = {
        "podLabels": {"team": "cosmo", "app.kubernetes.io/name": "hijack"},
        "extraEnv": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tokens", "key": "t"}}}],
        "extraVolumes": [{"name": "ca", "configMap": {"name": "ca-bundle"}}],
        "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/extra", "readOnly": True}],
    }
    objects = manifests(values)
    spec = pod(objects)
    assert spec["metadata"]["labels"]["team"] == "cosmo"
    # the selector's labels win: a pod label cannot detach the pod from its Deployment
    selector = one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert all(spec["metadata"]["labels"][k] == v for k, v in selector.items())
    assert env_of(objects)["TOKEN"] == {"secretKeyRef": {"name": "tokens", "key": "t"}}
    assert {"name": "ca", "configMap": {"name": "ca-bundle"}} in spec["spec"]["volumes"]
    (container,) = spec["spec"]["containers"]
    assert {"name": "ca", "mountPath": "/etc/ssl/extra", "readOnly": True} in container["volumeMounts"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"controlPlane": {"podLabels": {"team": "not a label value"}}}, "podLabels"),
        ({"controlPlane": {"extraEnv": [{"name": "1BAD"}]}}, "extraEnv"),
        ({"controlPlane": {"extraVolumes": [{"name": "data", "emptyDir": {}}]}}, "extraVolumes"),
        ({"controlPlane": {"extraVolumeMounts": [{"name": "ca"}]}}, "mountPath"),
        ({"global": {"azure": {"podLables": {"a": "b"}}}}, "podLables"),  # a plugin's typo is refused, not ignored
        ({"global": {"azure": {"env": {"A": 1}}}}, "env"),
    ],
)
def test_the_schema_refuses_bad_extension_values(change: dict[str, Any], message: str) -> None:
    values = copy.deepcopy(AZURE)
    for key, value in change.items():
        values[key] = {**values.get(key, {}), **value}
    values["global"]["cloudProvider"] = "azure"
    result = template(values)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_a_driver_mounting_through_persistent_volumes_keeps_the_cluster_role() -> None:
    values = {**copy.deepcopy(AZURE), "storage": {"driver": "blob-csi", "persistentVolumes": True}}
    values["rbac"] = {"clusterRole": {"create": False}}
    refused = template(values)
    assert refused.returncode != 0
    assert "storage.driver blob-csi mounts buckets through PersistentVolumes" in refused.stderr
    values["storage"]["persistentVolumes"] = False  # inline CSI volumes: no ClusterRole needed for mounting
    assert template(values).returncode == 0


# -- a third-party plugin, installed, deploying with pod labels through the public API only ------------
PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "podlabels" / "cmbcluster_podlabels.py"
#: The modules docs/plugins name as public (cmbcluster/__init__.py says the same).
PUBLIC = {"cmbcluster", "cmbcluster.interfaces", "cmbcluster.errors", "cmbcluster.oidc", "cmbcluster.naming",
          "cmbcluster.provisioning", "cmbcluster.testing"}  # fmt: skip


def test_the_plugin_fixture_imports_only_public_modules() -> None:
    imported = set()
    for node in ast.walk(ast.parse(PLUGIN.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    ours = {m for m in imported if m.split(".")[0] == "cmbcluster"}
    assert ours and ours <= PUBLIC, ours - PUBLIC


def test_an_installed_third_party_plugin_deploys_with_pod_labels(tmp_path: Path) -> None:
    site = tmp_path / "site"
    info = site / "cmbcluster_podlabels-0.1.dist-info"
    info.mkdir(parents=True)
    (site / PLUGIN.name).write_text(PLUGIN.read_text())
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cmbcluster-podlabels\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cmbcluster]\npodlabels = cmbcluster_podlabels\n")
    env = clean_environ({**GCP_ENV, "PYTHONPATH": str(site), "CMBCLUSTER_DATA_DIR": str(tmp_path / "data")})
    printed = run_cli("deploy", "--print-values", env=env, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    values = yaml.safe_load(printed.stdout)
    rendered = helm("template", "cmbcluster", str(CHART), "--namespace", "cmbcluster", "--values", "-",
                    input_values=values)  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    objects = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert pod(objects)["metadata"]["labels"]["example.org/workload-identity"] == "true"
    assert pod(objects)["metadata"]["annotations"]["example.org/team"] == "cosmology"
    assert env_of(objects)["PODLABELS_MODE"] == "strict"
    account = one(objects, "ServiceAccount")["metadata"]["annotations"]
    assert account["example.org/client-id"] == "00000000-0000-0000-0000-000000000000"
    assert "iam.gke.io/gcp-service-account" in account  # merged with the cloud's own identity
