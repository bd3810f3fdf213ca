"""docs/DEPLOYMENT_AWS.md says what the code does: the control plane's permissions table is its policy,
and the manual path's nodes are those `infra up` makes."""

from __future__ import annotations

import re
from pathlib import Path

from cmbcluster_aws.provisioning import control_plane_policy
from cmbcluster_aws.settings import AwsSettings

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "DEPLOYMENT_AWS.md"


def _settings() -> AwsSettings:
    return AwsSettings(_env_file=None, aws_region="eu-west-1", aws_account_id="123456789012")  # type: ignore[call-arg]


def _table(section: str) -> list[list[str]]:
    text = GUIDE.read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]


def test_the_permissions_table_is_the_policy_infra_up_creates() -> None:
    policy = control_plane_policy(_settings(), database_bucket="cmbcluster-eks-db-123456789012")
    in_policy = {s["Sid"]: (s["Effect"], sorted(s["Action"])) for s in policy["Statement"]}
    in_guide = {row[0]: (row[1], sorted(re.findall(r"`([a-z0-9]+:[A-Za-z*]+)`", row[2]))) for row in
                _table("IAM: what the control plane may do")}  # fmt: skip
    assert in_guide == in_policy


def test_the_manual_nodes_are_those_infra_up_makes() -> None:
    settings = _settings()
    manual = GUIDE.read_text().split("## On a cluster you already have", 1)[1]
    assert f"--node-type {settings.eks_node_instance_type}" in manual
    assert f"--nodes {settings.eks_node_count} --nodes-min 1 --nodes-max {settings.eks_node_max}" in manual
    assert "--disable-pod-imds" in manual and '"enableNetworkPolicy": "true"' in manual
    # the roles the manual path makes live where infra up's do, never under the per-user path
    assert "--path /cmbcluster-infra/$EKS_CLUSTER_NAME/" in manual and "/cmbcluster-users/" not in manual
