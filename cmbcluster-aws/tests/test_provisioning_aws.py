"""`cmbcluster infra` on AWS against a real moto server: plan, up, status, down, interruptions, DNS, images."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import moto_stand_ins
import pytest
from botocore.exceptions import ClientError

from cmbcluster import provisioning
from cmbcluster.errors import CmbclusterError, ConfigurationError, Conflict, ProviderUnavailable
from cmbcluster.interfaces import ProvisioningOptions, UserRef
from cmbcluster.provisioning import ProvisioningRecord
from cmbcluster.testing.process import clean_environ, run_cli
from cmbcluster.testing.provisioning import Events, Inventory, ProvisionerContract, SimulatedCrash
from cmbcluster_aws.identity import AwsInfra
from cmbcluster_aws.provisioning import ADDONS, TAG_DEPLOYMENT, AwsProvisioner
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import S3Storage, lifecycle_rules

REGION, ACCOUNT_ID = "eu-west-1", "123456789012"  # as in conftest.make_settings

CLUSTER = "cmbtest-eks"
API_STEPS = [
    "cluster-role", "node-role", "vpc", "internet-gateway", "subnets", "nat-gateway", "route-tables",
    "ecr-repositories", "database-bucket", "eks-cluster", "oidc-provider", "network-policy", "launch-template",
    "node-group", "user-boundary", "irsa-roles",
]  # fmt: skip
INFRA_PATH = f"/cmbcluster-infra/{CLUSTER}/"  # the deployment's name is the cluster's by default
ADDON_STEPS = [f"addon-{key}" for key in ADDONS]


@pytest.fixture(autouse=True)
def _managed_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    # Real IAM has AWS managed policies (AmazonEKSClusterPolicy...); moto loads them on request.
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")


@pytest.fixture
def settings(make_settings: Callable[..., AwsSettings]) -> AwsSettings:
    return make_settings(eks_cluster_name=CLUSTER)


@pytest.fixture
def provisioner(settings: AwsSettings) -> Iterator[AwsProvisioner]:
    p = make_provisioner(settings)
    yield p
    p.close()


def make_provisioner(settings: AwsSettings) -> AwsProvisioner:
    return AwsProvisioner(settings, poll_interval=0.01, propagation_delay=0)


@pytest.fixture
def record(tmp_path: Path) -> ProvisioningRecord:
    return ProvisioningRecord.for_deployment(tmp_path / "infra", provider="aws", deployment=CLUSTER)


@pytest.fixture
def aws(moto_reset: str) -> Iterator[Callable[[str], Any]]:
    clients: dict[str, Any] = {}

    def client(service: str) -> Any:
        if service not in clients:
            clients[service] = boto3.client(service, region_name=REGION, endpoint_url=moto_reset)
        return clients[service]

    yield client
    for c in clients.values():
        c.close()


def ours(client: Any, describe: str, key: str, **kwargs: Any) -> list[dict[str, Any]]:
    filters = [{"Name": f"tag:{TAG_DEPLOYMENT}", "Values": [CLUSTER]}]
    found: list[dict[str, Any]] = getattr(client, describe)(Filters=filters, **kwargs)[key]
    return found


def live_nat_gateways(ec2: Any) -> list[dict[str, Any]]:
    return [n for n in ours(ec2, "describe_nat_gateways", "NatGateways") if n["State"] in ("pending", "available")]


def inventory(aws: Callable[[str], Any]) -> dict[str, int]:
    """How many of our resources of each kind moto lists."""
    ec2, iam, s3 = aws("ec2"), aws("iam"), aws("s3")
    clusters = aws("eks").list_clusters()["clusters"]
    return {
        "vpcs": len(ours(ec2, "describe_vpcs", "Vpcs")),
        "subnets": len(ours(ec2, "describe_subnets", "Subnets")),
        "internet_gateways": len(ours(ec2, "describe_internet_gateways", "InternetGateways")),
        "elastic_ips": len(ours(ec2, "describe_addresses", "Addresses")),
        "nat_gateways": len(live_nat_gateways(ec2)),
        "route_tables": len(ours(ec2, "describe_route_tables", "RouteTables")),
        "eks_clusters": len(clusters),
        "node_groups": sum(len(aws("eks").list_nodegroups(clusterName=c)["nodegroups"]) for c in clusters),
        "oidc_providers": len(iam.list_open_id_connect_providers()["OpenIDConnectProviderList"]),
        "iam_roles": len(iam.list_roles(PathPrefix="/cmbcluster-infra/")["Roles"]),
        "iam_policies": len(iam.list_policies(Scope="Local", PathPrefix="/cmbcluster-infra/")["Policies"]),
        "eks_addons": sum(len(aws("eks").list_addons(clusterName=c)["addons"]) for c in clusters),
        "launch_templates": len(ours(ec2, "describe_launch_templates", "LaunchTemplates")),
        "ecr_repositories": len(aws("ecr").describe_repositories()["repositories"]),
        "s3_buckets": len([b for b in s3.list_buckets()["Buckets"] if b["Name"].startswith(CLUSTER)]),
    }


FULL = {
    "vpcs": 1, "subnets": 6, "internet_gateways": 1, "elastic_ips": 1, "nat_gateways": 1, "route_tables": 2,
    "eks_clusters": 1, "node_groups": 1, "oidc_providers": 1, "iam_roles": 6, "iam_policies": 1, "eks_addons": 1,
    "launch_templates": 1, "ecr_repositories": 2, "s3_buckets": 1,
}  # fmt: skip
EMPTY = dict.fromkeys(FULL, 0)
RECORDED = sum(FULL.values())  # each resource counted once in the record


def inject(monkeypatch: pytest.MonkeyPatch, client: Any, method: str, *, after: bool = False) -> None:
    """Make ``client.method`` fail once: before the call (a cloud error) or after it (a crash)."""
    real = getattr(client, method)
    calls = {"n": 0}

    def failing(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 1:
            return real(**kwargs)
        if after:
            real(**kwargs)
            raise SimulatedCrash(method)
        raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, method)

    monkeypatch.setattr(client, method, failing)


class TestAwsProvisionerContract(ProvisionerContract):
    """The provisioner contract on moto: what the deployment holds, counted from the AWS APIs."""

    @pytest.fixture
    def provisioner(self, settings: AwsSettings) -> Iterator[AwsProvisioner]:
        p = make_provisioner(settings)
        yield p
        p.close()

    @pytest.fixture
    def inventory(self, aws: Callable[[str], Any]) -> Inventory:
        return lambda: inventory(aws)

    @pytest.fixture
    def full_inventory(self) -> dict[str, int]:
        return FULL


def test_plan_lists_every_step_in_order_with_names_and_changes_nothing(
    provisioner: AwsProvisioner, aws: Callable[[str], Any]
) -> None:
    steps = provisioner.plan()
    assert [s.name for s in steps] == API_STEPS + ADDON_STEPS
    creates = [item for s in steps for item in s.creates]
    assert f"eks/cluster {CLUSTER}" in creates and f"eks/nodegroup {CLUSTER}-nodes" in creates
    assert f"s3/bucket {CLUSTER}-database-{ACCOUNT_ID}" in creates
    assert {f"ecr/repository {CLUSTER}/controlplane", f"ecr/repository {CLUSTER}/environment"} <= set(creates)
    assert f"iam/policy {INFRA_PATH}{CLUSTER}-user-boundary" in creates
    # every IAM name under the deployment's path, carrying its name
    assert all(c.startswith(("iam/role " + INFRA_PATH, "iam/policy " + INFRA_PATH)) for c in creates
               if c.startswith(("iam/role", "iam/policy")))  # fmt: skip
    subnets = [c for c in creates if c.startswith("ec2/subnet")]
    assert len(subnets) == 6 and len({c.split()[-1] for c in subnets}) == 6  # distinct CIDR blocks
    assert all(s.external for s in steps if s.name.startswith("addon-"))
    assert inventory(aws) == EMPTY


def test_up_creates_every_resource_then_down_removes_exactly_them(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    events = Events()
    provisioning.up(provisioner, record, ProvisioningOptions(addons="print"), progress=events)
    assert inventory(aws) == FULL
    ec2 = aws("ec2")

    subnets = ours(ec2, "describe_subnets", "Subnets")
    assert len({s["AvailabilityZone"] for s in subnets}) == 3
    vpc_id = ours(ec2, "describe_vpcs", "Vpcs")[0]["VpcId"]
    assert {s["VpcId"] for s in subnets} == {vpc_id}
    igw = ours(ec2, "describe_internet_gateways", "InternetGateways")[0]
    assert igw["Attachments"][0]["VpcId"] == vpc_id
    nat = live_nat_gateways(ec2)[0]
    public = {s["SubnetId"] for s in subnets if any(t["Value"] == "1" and t["Key"] == "kubernetes.io/role/elb"
                                                     for t in s["Tags"])}  # fmt: skip
    assert nat["SubnetId"] in public and len(public) == 3
    routes = {
        next(t["Value"] for t in rt["Tags"] if t["Key"] == "Name"): rt
        for rt in ours(ec2, "describe_route_tables", "RouteTables")
    }
    private_default = [r for r in routes[f"{CLUSTER}-private-rt"]["Routes"] if r["DestinationCidrBlock"] == "0.0.0.0/0"]
    assert private_default[0]["NatGatewayId"] == nat["NatGatewayId"]
    public_default = [r for r in routes[f"{CLUSTER}-public-rt"]["Routes"] if r["DestinationCidrBlock"] == "0.0.0.0/0"]
    assert public_default[0]["GatewayId"] == igw["InternetGatewayId"]
    assert {a["SubnetId"] for a in routes[f"{CLUSTER}-public-rt"]["Associations"]} == public

    cluster = aws("eks").describe_cluster(name=CLUSTER)["cluster"]
    assert cluster["status"] == "ACTIVE" and set(cluster["resourcesVpcConfig"]["subnetIds"]) == {
        s["SubnetId"] for s in subnets
    }
    issuer = cluster["identity"]["oidc"]["issuer"]
    providers = aws("iam").list_open_id_connect_providers()["OpenIDConnectProviderList"]
    assert providers[0]["Arn"].endswith(issuer.removeprefix("https://"))
    nodegroup = aws("eks").describe_nodegroup(clusterName=CLUSTER, nodegroupName=f"{CLUSTER}-nodes")["nodegroup"]
    assert set(nodegroup["subnets"]) == {s["SubnetId"] for s in subnets} - public

    iam = aws("iam")
    attached = iam.list_attached_role_policies(RoleName=f"{CLUSTER}-node-role")["AttachedPolicies"]
    assert {p["PolicyName"] for p in attached} >= {"AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy"}
    trust = iam.get_role(RoleName=f"{CLUSTER}-controlplane")["Role"]["AssumeRolePolicyDocument"]
    condition = trust["Statement"][0]["Condition"]["StringEquals"]
    assert (
        condition[f"{issuer.removeprefix('https://')}:sub"]
        == "system:serviceaccount:cmbcluster:cmbcluster-controlplane"
    )

    bucket = f"{CLUSTER}-database-{ACCOUNT_ID}"
    s3 = aws("s3")
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    assert all(s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"].values())
    # Unfinished backup uploads are aborted after a day; deleted old backups expire as users' versions do.
    assert s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"] == lifecycle_rules(30)

    commands = events.actions("command")
    assert len(commands) == len(ADDONS) and all(c.startswith("helm upgrade --install ") for c in commands)
    lbc = commands[0]
    assert f"clusterName={CLUSTER}" in lbc and f"vpcId={vpc_id}" in lbc
    assert f"role{INFRA_PATH}{CLUSTER}-aws-load-balancer-controller" in lbc
    kubeconfig = json.loads(record.path.with_suffix(".kubeconfig").read_text())
    assert kubeconfig["users"][0]["user"]["exec"]["args"][:4] == ["eks", "get-token", "--cluster-name", CLUSTER]

    states = {s.step: s.state for s in provisioning.status(provisioner, record)}
    assert all(states[step] == "done" for step in API_STEPS)
    assert all(states[step] == "pending" for step in ADDON_STEPS)  # printed, not installed

    stored = json.loads(record.path.read_text())
    assert len(stored["resources"]) == RECORDED and stored["completed_steps"] == API_STEPS

    down_events = Events()
    provisioning.down(provisioner, record, progress=down_events)
    assert inventory(aws) == EMPTY
    assert record.resources == [] and json.loads(record.path.read_text())["resources"] == []
    deleted = down_events.actions("deleted")
    # The seed's order: node group, cluster, NAT gateway, Elastic IP, subnets, VPC, S3, ECR, IAM last.
    kinds = ("eks/nodegroup", "eks/cluster", "ec2/nat-gateway", "ec2/elastic-ip", "ec2/subnet", "ec2/vpc",
             "s3/bucket", "ecr/repository", "iam/oidc-provider", "iam/role", "iam/policy")  # fmt: skip
    order = [next(i for i, m in enumerate(deleted) if m.startswith(kind)) for kind in kinds]
    assert order == sorted(order)
    assert deleted.index(next(m for m in deleted if m.startswith("ec2/launch-template"))) > deleted.index(
        next(m for m in deleted if m.startswith("eks/nodegroup"))
    )
    assert deleted[-1].startswith("iam/policy") and not record.path.with_suffix(".kubeconfig").exists()


def test_down_after_a_partial_up_removes_what_exists(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    inject(monkeypatch, provisioner.eks, "create_cluster")
    with pytest.raises(ProviderUnavailable):
        provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    partial = inventory(aws)
    assert partial["vpcs"] == 1 and partial["subnets"] == 6 and partial["eks_clusters"] == 0

    # Someone already deleted one subnet by hand: down treats it as done.
    subnet = record.find("ec2/subnet")[0]
    aws("ec2").delete_subnet(SubnetId=subnet.id)
    events = Events()
    provisioning.down(provisioner, record, progress=events)
    assert inventory(aws) == EMPTY and record.resources == []
    assert any(subnet.id in message for message in events.actions("gone"))


def test_a_database_bucket_holding_backups_is_kept_unless_delete_data(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    bucket = f"{CLUSTER}-database-{ACCOUNT_ID}"
    aws("s3").put_object(Bucket=bucket, Key="backups/db.sqlite", Body=b"data")
    with pytest.raises(Conflict, match=r"nothing was deleted.*--delete-data"):
        provisioning.down(provisioner, record)
    assert inventory(aws) == FULL and len(record.resources) == RECORDED
    provisioning.down(provisioner, record, ProvisioningOptions(delete_data=True))
    assert inventory(aws) == EMPTY


def test_a_role_of_the_same_name_from_elsewhere_is_not_taken_over(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    aws("iam").create_role(RoleName=f"{CLUSTER}-cluster-role", AssumeRolePolicyDocument="{}")
    with pytest.raises(Conflict, match="does not belong to deployment"):
        provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert record.resources == []


def test_down_removes_what_the_load_balancer_controller_made_and_nothing_else(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    ec2, elbv2 = aws("ec2"), aws("elbv2")
    vpc_id = ours(ec2, "describe_vpcs", "Vpcs")[0]["VpcId"]
    public = [r.id for r in record.find("ec2/subnet") if r.attributes["tier"] == "public"]
    tags = [{"Key": "elbv2.k8s.aws/cluster", "Value": CLUSTER}]
    # What the controller makes for an Ingress: a security group, a load balancer, a target group.
    group = ec2.create_security_group(GroupName="k8s-cmb-ingress", Description="alb", VpcId=vpc_id,
                                      TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}])  # fmt: skip
    elbv2.create_load_balancer(Name="k8s-cmb-ingress", Subnets=public[:2], SecurityGroups=[group["GroupId"]], Tags=tags)
    elbv2.create_target_group(Name="k8s-cmb-tg", Protocol="HTTP", Port=80, VpcId=vpc_id, Tags=tags)
    # Someone else's load balancer in the default VPC is not ours to delete.
    default_vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    default_subnets = [s["SubnetId"] for s in ec2.describe_subnets(
        Filters=[{"Name": "vpc-id", "Values": [default_vpc]}])["Subnets"]][:2]  # fmt: skip
    elbv2.create_load_balancer(Name="not-ours", Subnets=default_subnets)

    provisioning.down(provisioner, record)
    assert inventory(aws) == EMPTY
    assert [lb["LoadBalancerName"] for lb in elbv2.describe_load_balancers()["LoadBalancers"]] == ["not-ours"]
    assert elbv2.describe_target_groups()["TargetGroups"] == []
    groups = ec2.describe_security_groups(Filters=[{"Name": "tag:elbv2.k8s.aws/cluster", "Values": [CLUSTER]}])
    assert groups["SecurityGroups"] == []


@pytest.fixture
def fake_helm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `helm` on PATH that records its arguments (no EKS API server exists here to install into),
    and an `aws` beside it: `up` requires the AWS CLI for the kubeconfig it writes (which only a
    real cluster would run); this test relied on the machine's own until a new user had none."""
    bin_dir, log = tmp_path / "bin", tmp_path / "helm.log"
    bin_dir.mkdir()
    for name, body in (("helm", f'echo "$@" >> {log}'), ("aws", 'echo "the AWS CLI is not called here" >&2; exit 1')):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_addons_are_installed_with_helm_and_uninstalled_by_down(
    provisioner: AwsProvisioner, record: ProvisioningRecord, fake_helm: Path, aws: Callable[[str], Any]
) -> None:
    provisioning.up(provisioner, record)
    lines = fake_helm.read_text().splitlines()
    assert [line.split()[2] for line in lines] == [r.name for r in ADDONS.values()]
    assert all(line.startswith("upgrade --install") and "--wait" in line for line in lines)
    assert len(record.find("helm/release")) == len(ADDONS)
    assert all(s.state == "done" for s in provisioning.status(provisioner, record))

    provisioning.down(provisioner, record)
    uninstalls = fake_helm.read_text().splitlines()[len(ADDONS) :]
    assert [line.split()[1] for line in uninstalls] == [r.name for r in reversed(ADDONS.values())]
    assert inventory(aws) == EMPTY


def test_missing_tools_are_named_before_anything_is_created(
    provisioner: AwsProvisioner, record: ProvisioningRecord, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    aws: Callable[[str], Any],
) -> None:  # fmt: skip
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigurationError) as refused:
        provisioning.up(provisioner, record)
    assert "`helm` is not installed" in str(refused.value) and "`aws` is not installed" in str(refused.value)
    assert "aws eks get-token" in str(refused.value)  # why: the kubeconfig's credentials
    assert inventory(aws) == EMPTY and record.resources == []
    # with another kubeconfig the AWS CLI is not needed; printing the add-ons needs neither
    assert [t.name for t in provisioner.required_tools(ProvisioningOptions(kubeconfig=tmp_path / "k"))] == ["helm"]
    provisioning.up(provisioner, record, ProvisioningOptions(addons="print"))
    assert record.completed_steps == API_STEPS


def test_missing_permissions_are_named_before_anything_is_created(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    """The IAM policy simulator, asked about the caller's own policies, says what `up` would be refused."""
    moto_stand_ins.DENIED.update({"eks:CreateCluster", "iam:CreatePolicy"})
    with pytest.raises(ConfigurationError) as refused:
        provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    message = str(refused.value)
    assert "may not eks:CreateCluster" in message and "may not iam:CreatePolicy" in message
    assert "nothing was created" in message
    assert inventory(aws) == EMPTY and record.resources == []


def test_a_region_or_instance_type_that_cannot_hold_the_cluster_is_named_before_anything_is_created(
    make_settings: Callable[..., AwsSettings], record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    """us-west-1 offers new accounts two availability zones (moto too), and the subnets step needs three:
    `up` made the IAM roles, the VPC and its gateway, then stopped there. A node type the region does
    not offer was refused only at the node group, after the EKS cluster (15 minutes)."""
    settings = make_settings(eks_cluster_name=CLUSTER, aws_region="us-west-1", eks_node_instance_type="m5.larg")
    provisioner = make_provisioner(settings)
    try:
        with pytest.raises(ConfigurationError) as refused:
            provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    finally:
        provisioner.close()
    message = str(refused.value)
    assert "region us-west-1 has fewer than 3 availability zones" in message
    assert "EKS_NODE_INSTANCE_TYPE m5.larg is not offered in us-west-1" in message
    assert "nothing was created" in message
    assert record.resources == [] and aws("iam").list_roles(PathPrefix="/cmbcluster-infra/")["Roles"] == []


def test_permissions_that_cannot_be_checked_are_said_and_up_goes_on(
    provisioner: AwsProvisioner, record: ProvisioningRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(**_kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no simulator for you"}}, "Simulate")

    monkeypatch.setattr(provisioner.iam, "simulate_principal_policy", refused)
    events = Events()
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"), progress=events)
    assert any("cannot check the permissions in advance" in note for note in events.actions("note"))
    assert record.completed_steps == API_STEPS


def test_route53_upsert_points_the_domain_and_its_wildcard(
    provisioner: AwsProvisioner, aws: Callable[[str], Any]
) -> None:
    from cmbcluster.commands.infra import dns_records

    zone = aws("route53").create_hosted_zone(Name="example.org", CallerReference="t")["HostedZone"]["Id"]
    records = dns_records("cmb.example.org", "k8s-lb-123.elb.eu-west-1.amazonaws.com",
                          environments_domain="cmb.example.org")  # fmt: skip
    assert provisioner.upsert_dns(records, dry_run=True)[0].startswith("UPSERT CNAME cmb.example.org.")
    assert len(aws("route53").list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]) == 2  # SOA, NS

    provisioner.upsert_dns(records)
    provisioner.upsert_dns(dns_records("cmb.example.org", "k8s-lb-456.elb.eu-west-1.amazonaws.com",
                                       environments_domain="cmb.example.org"))  # fmt: skip
    sets = {
        (r["Name"], r["Type"]): [v["Value"] for v in r["ResourceRecords"]]
        for r in aws("route53").list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]
    }
    assert sets[("cmb.example.org.", "CNAME")] == ["k8s-lb-456.elb.eu-west-1.amazonaws.com"]
    assert ("\\052.cmb.example.org.", "CNAME") in sets or ("*.cmb.example.org.", "CNAME") in sets
    with pytest.raises(CmbclusterError, match="zone apex"):
        provisioner.upsert_dns(dns_records("example.org", "lb.example.net"))
    with pytest.raises(CmbclusterError, match="no public Route53 hosted zone"):
        provisioner.upsert_dns(dns_records("cmb.example.com", "10.0.0.1"))


# -- the command line, as an operator runs it -----------------------------------------------


@pytest.fixture
def cli_env(moto_reset: str, tmp_path: Path) -> dict[str, str]:
    return {
        **clean_environ(),
        "CLOUD_PROVIDER": "aws",
        "CMBCLUSTER_AUTH_PROVIDERS": "local",
        "CMBCLUSTER_DATA_DIR": str(tmp_path / "data"),
        "AWS_REGION": REGION,
        "AWS_ACCOUNT_ID": ACCOUNT_ID,
        "AWS_ENDPOINT_URL": moto_reset,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "EKS_CLUSTER_NAME": CLUSTER,
    }


def test_cli_plan_up_status_down(cli_env: dict[str, str], tmp_path: Path, aws: Callable[[str], Any]) -> None:
    plan = run_cli("infra", "plan", env=cli_env, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert f"{len(API_STEPS) + len(ADDONS)} steps" in plan.stdout and f"eks/cluster {CLUSTER}" in plan.stdout
    assert inventory(aws) == EMPTY

    up = run_cli("infra", "up", "--addons", "print", env=cli_env, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert f"[10/{len(API_STEPS) + len(ADDONS)}] eks-cluster" in up.stdout
    assert "helm upgrade --install cert-manager" in up.stdout
    assert inventory(aws) == FULL
    record = tmp_path / "data" / "infra" / f"aws-{CLUSTER}.json"
    assert len(json.loads(record.read_text())["resources"]) == RECORDED

    status = run_cli("infra", "status", "--json", env=cli_env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    states = {s["step"]: s["state"] for s in json.loads(status.stdout)}
    assert states["eks-cluster"] == "done" and states["addon-cert-manager"] == "pending"

    refused = subprocess.run(
        [sys.executable, "-m", "cmbcluster.cli", "infra", "down"], env=cli_env, cwd=tmp_path, input="n\n",
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 1 and inventory(aws) == FULL

    down = run_cli("infra", "down", "--yes", env=cli_env, cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert inventory(aws) == EMPTY and "down: done" in down.stdout


def test_cli_dns_upserts_route53_records(cli_env: dict[str, str], tmp_path: Path, aws: Callable[[str], Any]) -> None:
    zone = aws("route53").create_hosted_zone(Name="example.org", CallerReference="cli")["HostedZone"]["Id"]
    env = {**cli_env, "CMBCLUSTER_PUBLIC_URL": "https://cmb.example.org"}
    dry = run_cli("infra", "dns", "--target", "203.0.113.5", "--dry-run", env=env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would UPSERT A cmb.example.org. -> 203.0.113.5")
    assert len(aws("route53").list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]) == 2
    done = run_cli("infra", "dns", "--target", "203.0.113.5", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    names = {r["Name"] for r in aws("route53").list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]}
    assert "cmb.example.org." in names and len(names) == 2  # apex (SOA, NS), the domain: no environments domain


def test_cli_images_use_the_ecr_registry(cli_env: dict[str, str], tmp_path: Path) -> None:
    host = f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com/{CLUSTER}"  # the deployment's repositories
    build = run_cli("images", "build", "--dry-run", "--tag", "v1", env=cli_env, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    assert build.stdout.splitlines() == [
        f"would run: docker build --file helm/images/controlplane/Dockerfile --tag {host}/controlplane:v1 "
        "--platform linux/amd64 .",
        f"would run: docker build --file helm/images/environment/Dockerfile --tag {host}/environment:v1 "
        "--platform linux/amd64 helm/images/environment",
    ]
    push = run_cli("images", "push", "--dry-run", "--tag", "v1", "--image", "environment", env=cli_env, cwd=tmp_path)
    assert push.returncode == 0, push.stderr
    assert push.stdout.splitlines() == [
        f"would run: <aws registry token> | docker login --username AWS --password-stdin {host.split('/')[0]}",
        f"would run: docker push {host}/environment:v1",
    ]


def test_cli_errors_are_one_clear_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    cases = [
        ({"VPC_CIDR": "10.0.0.0/8"}, ["infra", "plan"], "VPC_CIDR 10.0.0.0/8 must be between"),
        # refused by `config check` too, as every setting, not first by `infra up`
        ({"VPC_CIDR": "10.0.0.1/16"}, ["config", "check"], "VPC_CIDR '10.0.0.1/16' is not a network"),
        (
            {"EKS_NODE_COUNT": "4", "EKS_NODE_MAX": "2"},
            ["config", "check"],
            "EKS_NODE_MAX (2) is below EKS_NODE_COUNT (4)",
        ),
        ({"AWS_ACCOUNT_ID": "999999999999"}, ["infra", "up", "--addons", "print"], "not AWS_ACCOUNT_ID 999999999999"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, ["infra", "up", "--addons", "print"], "AWS is unreachable"),
        ({"PATH": str(tmp_path)}, ["infra", "up"], "`helm` is not installed"),
        ({"AWS_REGION": "mars"}, ["infra", "plan"], "AWS_REGION 'mars' is not an AWS region code"),
        ({"AWS_ACCOUNT_ID": "12345"}, ["infra", "plan"], "AWS_ACCOUNT_ID '12345' is not an AWS account id"),
        ({"EKS_CLUSTER_NAME": "Big_Cluster"}, ["infra", "plan"], "set CMBCLUSTER_DEPLOYMENT_NAME"),
        ({}, ["images", "build", "--image", "nope", "--dry-run"], "unknown image nope"),
        ({}, ["images", "push", "--tag", "-bad", "--dry-run"], "not a valid image tag"),
        ({"PATH": str(tmp_path)}, ["images", "push"], "`docker` is not installed"),
        ({}, ["infra", "dns", "--target", "not a host!", "--domain", "cmb.example.org"], "neither an IPv4"),
        # a database bucket S3 would refuse: said by `config check` on the operator's machine (which has no
        # cluster yet), and by `plan` rather than made under another name (it was lower-cased) or refused mid-`up`
        ({"S3_DATABASE_BUCKET": "My_Backups"}, ["config", "check"], "CMBCLUSTER_DATABASE_BUCKET: 'My_Backups' is not"),
        ({"S3_DATABASE_BUCKET": "Lab-Backups"}, ["infra", "plan"], "'Lab-Backups' is not a valid bucket name"),
    ]
    for extra, args, message in cases:
        result = run_cli(*args, env={**cli_env, **extra}, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


# -- what the cluster enforces, and what the control plane may do --------------------------------


def test_the_cluster_enforces_network_policies_and_keeps_pods_off_the_node_role(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    # the VPC CNI's network policy agent: without it the chart's NetworkPolicies are accepted and ignored
    addon = aws("eks").describe_addon(clusterName=CLUSTER, addonName="vpc-cni")["addon"]
    assert json.loads(addon["configurationValues"]) == {"enableNetworkPolicy": "true"}
    # IMDSv2 only with a hop limit of 1: a pod is one hop further than the node, so it gets no answer
    ec2 = aws("ec2")
    (template,) = ours(ec2, "describe_launch_templates", "LaunchTemplates")
    data = ec2.describe_launch_template_versions(LaunchTemplateId=template["LaunchTemplateId"])[
        "LaunchTemplateVersions"][0]["LaunchTemplateData"]  # fmt: skip
    assert data["MetadataOptions"] == {
        "HttpTokens": "required",
        "HttpPutResponseHopLimit": 1,
        "HttpEndpoint": "enabled",
    }
    assert data["BlockDeviceMappings"][0]["Ebs"]["Encrypted"] is True
    nodegroup = aws("eks").describe_nodegroup(clusterName=CLUSTER, nodegroupName=f"{CLUSTER}-nodes")["nodegroup"]
    assert nodegroup["launchTemplate"]["id"] == template["LaunchTemplateId"]


def test_an_adopted_launch_template_that_lets_pods_reach_imds_is_fixed(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    ec2 = aws("ec2")
    (template,) = ours(ec2, "describe_launch_templates", "LaunchTemplates")
    template_id = template["LaunchTemplateId"]
    loose = ec2.create_launch_template_version(LaunchTemplateId=template_id, LaunchTemplateData={
        "MetadataOptions": {"HttpTokens": "optional", "HttpPutResponseHopLimit": 2}})  # fmt: skip
    ec2.modify_launch_template(LaunchTemplateId=template_id,
                               DefaultVersion=str(loose["LaunchTemplateVersion"]["VersionNumber"]))  # fmt: skip
    events = Events()
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"), progress=events)
    assert any("let pods reach the metadata service" in n for n in events.actions("note"))
    default = ec2.describe_launch_template_versions(LaunchTemplateId=template_id, Versions=["$Default"])
    assert default["LaunchTemplateVersions"][0]["LaunchTemplateData"]["MetadataOptions"]["HttpPutResponseHopLimit"] == 1


def _policy(aws: Callable[[str], Any], role: str) -> dict[str, Any]:
    document = aws("iam").get_role_policy(RoleName=role, PolicyName="cmbcluster")["PolicyDocument"]
    return document if isinstance(document, dict) else json.loads(document)


def _statements(document: dict[str, Any], effect: str, action: str) -> list[dict[str, Any]]:
    return [s for s in document["Statement"] if s["Effect"] == effect and action in s["Action"]]


def test_the_control_plane_may_create_only_bounded_roles_under_its_own_path(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    boundary = f"arn:aws:iam::{ACCOUNT_ID}:policy{INFRA_PATH}{CLUSTER}-user-boundary"
    policy = _policy(aws, f"{CLUSTER}-controlplane")
    user_roles = f"arn:aws:iam::{ACCOUNT_ID}:role/cmbcluster-users/{CLUSTER}/*"
    for action in ("iam:CreateRole", "iam:PutRolePolicy"):
        (allow,) = _statements(policy, "Allow", action)
        assert allow["Resource"] == user_roles  # only the deployment's per-user path: not its own role, nor others'
        assert allow["Condition"] == {"StringEquals": {"iam:PermissionsBoundary": boundary}}
        (deny,) = _statements(policy, "Deny", action)
        assert deny["Condition"] == {"StringNotEquals": {"iam:PermissionsBoundary": boundary}}
    assert not _statements(policy, "Allow", "iam:AttachRolePolicy")
    for action in ("iam:DeleteRolePermissionsBoundary", "iam:PutRolePermissionsBoundary", "iam:CreatePolicyVersion"):
        assert _statements(policy, "Deny", action) and not _statements(policy, "Allow", action)
    role_statements = [
        s
        for s in policy["Statement"]
        if s["Effect"] == "Allow" and any(a.startswith("iam:") and "Role" in a for a in s["Action"])
    ]
    assert all("/cmbcluster-users/" in str(s["Resource"]) for s in role_statements)  # fmt: skip
    # the boundary: users' buckets, nothing else
    iam = aws("iam")
    version = iam.get_policy(PolicyArn=boundary)["Policy"]["DefaultVersionId"]
    document = iam.get_policy_version(PolicyArn=boundary, VersionId=version)["PolicyVersion"]["Document"]
    document = document if isinstance(document, dict) else json.loads(document)
    resources = {r for s in document["Statement"] for r in s["Resource"]}
    assert resources == {"arn:aws:s3:::cmbtest-*", "arn:aws:s3:::cmbtest-*/*"}
    # a user's role made by the control plane carries it
    infra = AwsInfra(provisioner.settings)
    identity = infra.ensure_user_identity(UserRef(id="0f3a9c1e7b2d4e6f8a0b1c2d3e4f5a6b"), namespace="cmbcluster")
    role = iam.get_role(RoleName=identity.principal.rsplit("/", 1)[-1])["Role"]
    assert role["PermissionsBoundary"]["PermissionsBoundaryArn"] == boundary
    assert role["Path"] == f"/cmbcluster-users/{CLUSTER}/"
    infra.close()


def test_the_control_plane_cannot_erase_the_backup_history(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    policy = _policy(aws, f"{CLUSTER}-controlplane")
    database = f"arn:aws:s3:::{CLUSTER}-database-{ACCOUNT_ID}"

    def allowed_on(resource: str) -> set[str]:
        return {a for s in policy["Statement"] if s["Effect"] == "Allow"
                for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])
                if r in (resource, f"{resource}/*") for a in s["Action"]}  # fmt: skip

    granted = allowed_on(database)
    assert "s3:DeleteObject" in granted  # pruning old backups leaves delete markers...
    assert not {a for a in granted if "*" in a or a in ("s3:DeleteObjectVersion", "s3:PutBucketVersioning")}
    (deny,) = [s for s in policy["Statement"] if s["Effect"] == "Deny" and database in s["Resource"]]
    assert {"s3:DeleteObjectVersion", "s3:PutBucketVersioning", "s3:PutLifecycleConfiguration"} <= set(deny["Action"])


@pytest.fixture
def with_domain(settings: AwsSettings, aws: Callable[[str], Any]) -> Iterator[AwsProvisioner]:
    """A deployment with its names in a Route53 zone: cert-manager gets a role for that zone, and a ClusterIssuer."""
    aws("route53").create_hosted_zone(Name="example.org", CallerReference="zone")
    p = AwsProvisioner(settings, poll_interval=0.01, propagation_delay=0,
                       domains=["cmb.example.org", "envs.example.org"], ingress_namespace="edge")  # fmt: skip
    yield p
    p.close()


def test_up_installs_what_the_chart_needs_with_a_dns01_identity(
    with_domain: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    events = Events()
    provisioning.up(with_domain, record, ProvisioningOptions(addons="print"), progress=events)
    zone = aws("route53").list_hosted_zones()["HostedZones"][0]["Id"].removeprefix("/hostedzone/")
    # cert-manager's role: trusted by its ServiceAccount only, allowed TXT challenges in this zone only
    role = aws("iam").get_role(RoleName=f"{CLUSTER}-cert-manager")["Role"]
    trust = json.dumps(role["AssumeRolePolicyDocument"])
    assert "system:serviceaccount:cert-manager:cert-manager" in trust
    policy = _policy(aws, f"{CLUSTER}-cert-manager")
    (change,) = _statements(policy, "Allow", "route53:ChangeResourceRecordSets")
    assert change["Resource"] == [f"arn:aws:route53:::hostedzone/{zone}"]
    assert change["Condition"]["ForAllValues:StringEquals"] == {"route53:ChangeResourceRecordSetsRecordTypes": ["TXT"]}

    commands = {c.split()[3]: c for c in events.actions("command")}
    assert f"role{INFRA_PATH}{CLUSTER}-cert-manager" in commands["cert-manager"]
    # ingress-nginx in the namespace the chart's NetworkPolicies admit, class nginx, behind an NLB
    assert (
        "--namespace edge" in commands["ingress-nginx"]
        and "ingressClassResource.name=nginx" in commands["ingress-nginx"]
    )
    # environments on the control plane's host cannot send headers that reach the whole site
    assert (
        "controller.config.hide-headers=" in commands["ingress-nginx"]
        and "service-worker-allowed" in (commands["ingress-nginx"])
    )
    assert "aws-load-balancer-type=external" in commands["ingress-nginx"]
    config = commands["cmbcluster-cluster-config"]
    storage_class = json.loads(config.split("storageClass=", 1)[1].split(" --set-json")[0].strip("'"))
    assert storage_class["provisioner"] == "ebs.csi.aws.com" and storage_class["default"] is True
    assert storage_class["parameters"]["type"] == "gp3" and storage_class["reclaimPolicy"] == "Retain"
    dns01 = json.loads(config.split("issuer.dns01=", 1)[1].strip("'"))
    assert dns01 == {"route53": {"region": REGION, "hostedZoneID": zone}}


def test_a_domain_without_a_hosted_zone_is_refused_before_anything_is_created(
    settings: AwsSettings, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    p = AwsProvisioner(settings, poll_interval=0.01, propagation_delay=0, domains=["cmb.example.org"])
    with pytest.raises(ConfigurationError, match=r"no public Route53 hosted zone holds cmb\.example\.org"):
        provisioning.up(p, record, ProvisioningOptions(addons="print"))
    p.close()
    assert inventory(aws) == EMPTY


def test_the_same_name_in_another_region_is_refused(
    make_settings: Callable[..., AwsSettings], record: ProvisioningRecord, aws: Callable[[str], Any], tmp_path: Path
) -> None:
    """IAM is global: a deployment of the same name in another region must not adopt (and rewrite) these roles."""
    first = AwsProvisioner(make_settings(eks_cluster_name=CLUSTER), poll_interval=0.01, propagation_delay=0)
    provisioning.up(first, record, ProvisioningOptions(addons="skip"))
    first.close()
    elsewhere = AwsProvisioner(make_settings(eks_cluster_name=CLUSTER, aws_region="eu-central-1"), poll_interval=0.01,
                               propagation_delay=0)  # fmt: skip
    other = ProvisioningRecord.for_deployment(tmp_path / "other", provider="aws", deployment=CLUSTER)
    with pytest.raises(Conflict, match="in eu-west-1: two deployments of one account need distinct names"):
        provisioning.up(elsewhere, other, ProvisioningOptions(addons="skip"))
    elsewhere.close()


def test_down_lists_what_it_keeps_and_deletes_it_only_when_told(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    # what the running deployment made: a user's role and bucket, the control plane's disk
    user = UserRef(id="0f3a9c1e7b2d4e6f8a0b1c2d3e4f5a6b")
    infra = AwsInfra(provisioner.settings)
    infra.ensure_user_identity(user, namespace="cmbcluster")
    infra.close()
    storage = S3Storage(provisioner.settings)
    from cmbcluster.interfaces import BucketOptions

    bucket = storage.create_bucket(user, BucketOptions(display_name="maps")).name
    storage.upload_object(bucket, "map.fits", [b"data"])
    storage.close()
    volume = aws("ec2").create_volume(Size=1, AvailabilityZone=f"{REGION}a", TagSpecifications=[{
        "ResourceType": "volume", "Tags": [{"Key": TAG_DEPLOYMENT, "Value": CLUSTER},
                                           {"Key": "kubernetes.io/created-for/pvc/name", "Value": "cmbcluster-data"}]}],
    )["VolumeId"]  # fmt: skip
    unrelated = aws("ec2").create_volume(Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"]

    kept = {(r.kind, r.id) for r in provisioning.retained(provisioner, record)}
    assert kept == {("iam/user-role", f"{CLUSTER}-user-0f3a9c1e7b"), ("s3/user-bucket", bucket),
                    ("ec2/volume", volume)}  # fmt: skip
    events = Events()
    provisioning.down(provisioner, record, progress=events)
    assert inventory(aws) == {**EMPTY, "iam_policies": 0}
    notes = [n for n in events.actions("note") if n.startswith("kept on purpose")]
    assert (
        len(notes) == 3 and any("with all its data" in n for n in notes) and any("cmbcluster-data" in n for n in notes)
    )
    assert aws("iam").get_role(RoleName=f"{CLUSTER}-user-0f3a9c1e7b") and aws("s3").head_bucket(Bucket=bucket)

    # explicitly: they go too (the role before nothing else needs it), and nothing that is not ours
    provisioning.down(provisioner, record, ProvisioningOptions(delete_retained=True))
    assert provisioning.retained(provisioner, record) == []
    volumes = {v["VolumeId"] for v in aws("ec2").describe_volumes()["Volumes"]}
    assert volume not in volumes and unrelated in volumes


def test_dns_replaces_what_a_cname_cannot_live_beside_and_down_removes_the_records(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    from cmbcluster.commands.infra import dns_records

    route53 = aws("route53")
    zone = route53.create_hosted_zone(Name="example.org", CallerReference="dns")["HostedZone"]["Id"]
    # an address pointed by hand earlier
    route53.change_resource_record_sets(HostedZoneId=zone, ChangeBatch={"Changes": [{"Action": "CREATE",
        "ResourceRecordSet": {"Name": "cmb.example.org", "Type": "A", "TTL": 60,
                              "ResourceRecords": [{"Value": "198.51.100.7"}]}}]})  # fmt: skip

    def records() -> dict[tuple[str, str], list[str]]:
        sets = route53.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]
        return {(r["Name"].replace("\\052", "*"), r["Type"]): [v["Value"] for v in r.get("ResourceRecords", [])]
                for r in sets if r["Type"] not in ("SOA", "NS")}  # fmt: skip

    lines = provisioning.dns(provisioner, record, dns_records(
        "cmb.example.org", "k8s-nlb.elb.eu-west-1.amazonaws.com", environments_domain="envs.example.org"))  # fmt: skip
    assert any(line.startswith("DELETE A cmb.example.org.") for line in lines)
    assert records() == {
        ("cmb.example.org.", "CNAME"): ["k8s-nlb.elb.eu-west-1.amazonaws.com"],
        ("*.envs.example.org.", "CNAME"): ["k8s-nlb.elb.eu-west-1.amazonaws.com"],  # the environments' domain
    }
    assert {r.name for r in record.find("dns/record")} == {"cmb.example.org.", "*.envs.example.org."}
    # and back to an address: the CNAME goes in the same change
    provisioning.dns(provisioner, record, dns_records("cmb.example.org", "203.0.113.9"))
    assert records()[("cmb.example.org.", "A")] == ["203.0.113.9"] and ("cmb.example.org.", "CNAME") not in records()
    # someone points the wildcard elsewhere: `down` leaves that one alone, deletes the other
    route53.change_resource_record_sets(HostedZoneId=zone, ChangeBatch={"Changes": [{"Action": "UPSERT",
        "ResourceRecordSet": {"Name": "*.envs.example.org", "Type": "CNAME", "TTL": 60,
                              "ResourceRecords": [{"Value": "elsewhere.example.net"}]}}]})  # fmt: skip
    events = Events()
    provisioning.down(provisioner, record, progress=events)
    assert records() == {("*.envs.example.org.", "CNAME"): ["elsewhere.example.net"]}
    assert any("points elsewhere now" in g for g in events.actions("gone")) and record.resources == []
