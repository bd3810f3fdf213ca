"""docs/DEPLOYMENT_GCP.md says what the code does: the control plane's roles are those `infra up` binds,
the manual cluster is the one `infra up` makes, and the GitOps ServiceAccount is the one the binding names."""

from __future__ import annotations

import re
from pathlib import Path

from cmbcluster.kubernetes.rbac import CONTROL_PLANE_SERVICE_ACCOUNT
from cmbcluster_gcp.provisioning import CONTROL_PLANE_ROLES, SERVICE_ACCOUNT_MODE_ROLES
from cmbcluster_gcp.settings import GcpSettings

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "DEPLOYMENT_GCP.md"
VALUES = Path(__file__).resolve().parents[2] / "helm" / "cmbcluster" / "values.yaml"


def test_the_roles_table_is_what_infra_up_binds() -> None:
    section = GUIDE.read_text().split("## IAM: what the control plane may do", 1)[1].split("\n## ", 1)[0]
    project_roles = set(re.findall(r"^\| `(roles/[a-zA-Z.]+)` \| the project \|", section, re.M))
    assert project_roles == {*CONTROL_PLANE_ROLES, *SERVICE_ACCOUNT_MODE_ROLES}
    assert f"[NAMESPACE/{CONTROL_PLANE_SERVICE_ACCOUNT}]" in section


def test_the_manual_cluster_is_the_one_infra_up_makes() -> None:
    settings = GcpSettings(_env_file=None, project_id="my-project")  # type: ignore[call-arg]
    manual = GUIDE.read_text().split("## On a cluster you already have", 1)[1]
    assert f"--machine-type {settings.gke_machine_type}" in manual
    assert f"--num-nodes {settings.gke_nodes_per_zone} " in manual
    assert f"--min-nodes 1 --max-nodes {settings.gke_max_nodes_per_zone}" in manual
    for flag in ("--enable-dataplane-v2", "--workload-metadata=GKE_METADATA", "GcsFuseCsiDriver"):
        assert flag in manual
    # the GitOps install renders the ServiceAccount the Workload Identity binding names
    assert f"name: {CONTROL_PLANE_SERVICE_ACCOUNT}" in VALUES.read_text()
    assert f"[$NAMESPACE/{CONTROL_PLANE_SERVICE_ACCOUNT}]" in manual
