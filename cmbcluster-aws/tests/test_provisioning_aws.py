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
import pytest
from botocore.exceptions import ClientError

from cmbcluster import provisioning
from cmbcluster.errors import CmbclusterError, Conflict, ProviderUnavailable
from cmbcluster.interfaces import ProgressEvent, ProvisioningOptions
from cmbcluster.provisioning import ProvisioningRecord
from cmbcluster.testing.process import clean_environ, run_cli
from cmbcluster_aws.provisioning import ADDONS, TAG_DEPLOYMENT, AwsProvisioner
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import lifecycle_rules

REGION, ACCOUNT_ID = "eu-west-1", "123456789012"  # as in conftest.make_settings

CLUSTER = "cmbtest-eks"
API_STEPS = [
    "cluster-role", "node-role", "vpc", "internet-gateway", "subnets", "nat-gateway", "route-tables",
    "ecr-repositories", "database-bucket", "eks-cluster", "oidc-provider", "node-group", "irsa-roles",
]  # fmt: skip
ADDON_STEPS = [f"addon-{key}" for key in ADDONS]


class SimulatedCrash(Exception):
    """The process dying between a cloud call and the record being written."""


@pytest.fixture(autouse=True)
def _managed_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    # Real IAM has AWS managed policies (AmazonEKSClusterPolicy...); moto loads them on request.
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")


@pytest.fixture
def settings(make_settings: Callable[..., AwsSettings]) -> AwsSettings:
    return make_settings(eks_cluster_name=CLUSTER)


@pytest.fixture
def provisioner(settings: AwsSettings) -> Iterator[AwsProvisioner]:
    p = AwsProvisioner(settings, poll_interval=0.01, propagation_delay=0)
    yield p
    p.close()


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


class Events(list[ProgressEvent]):
    def __call__(self, event: ProgressEvent) -> None:
        self.append(event)

    def actions(self, action: str) -> list[str]:
        return [e.message for e in self if e.action == action]


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
        "ecr_repositories": len(aws("ecr").describe_repositories()["repositories"]),
        "s3_buckets": len([b for b in s3.list_buckets()["Buckets"] if b["Name"].startswith(CLUSTER)]),
    }


FULL = {
    "vpcs": 1, "subnets": 6, "internet_gateways": 1, "elastic_ips": 1, "nat_gateways": 1, "route_tables": 2,
    "eks_clusters": 1, "node_groups": 1, "oidc_providers": 1, "iam_roles": 6, "ecr_repositories": 2, "s3_buckets": 1,
}  # fmt: skip
EMPTY = dict.fromkeys(FULL, 0)


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


def test_plan_lists_every_step_in_order_with_names_and_changes_nothing(
    provisioner: AwsProvisioner, aws: Callable[[str], Any]
) -> None:
    steps = provisioner.plan()
    assert [s.name for s in steps] == API_STEPS + ADDON_STEPS
    creates = [item for s in steps for item in s.creates]
    assert f"eks/cluster {CLUSTER}" in creates and f"eks/nodegroup {CLUSTER}-nodes" in creates
    assert f"s3/bucket {CLUSTER}-database-{ACCOUNT_ID}" in creates
    assert {"ecr/repository cmbcluster/controlplane", "ecr/repository cmbcluster/environment"} <= set(creates)
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
    assert len(commands) == 4 and all(c.startswith("helm upgrade --install ") for c in commands)
    lbc = commands[0]
    assert f"clusterName={CLUSTER}" in lbc and f"vpcId={vpc_id}" in lbc
    assert f"role/cmbcluster-infra/{CLUSTER}-aws-load-balancer-controller" in lbc
    kubeconfig = json.loads(record.path.with_suffix(".kubeconfig").read_text())
    assert kubeconfig["users"][0]["user"]["exec"]["args"][:4] == ["eks", "get-token", "--cluster-name", CLUSTER]

    states = {s.step: s.state for s in provisioning.status(provisioner, record)}
    assert all(states[step] == "done" for step in API_STEPS)
    assert all(states[step] == "pending" for step in ADDON_STEPS)  # printed, not installed

    stored = json.loads(record.path.read_text())
    assert len(stored["resources"]) == sum(FULL.values()) and stored["completed_steps"] == API_STEPS

    down_events = Events()
    provisioning.down(provisioner, record, progress=down_events)
    assert inventory(aws) == EMPTY
    assert record.resources == [] and json.loads(record.path.read_text())["resources"] == []
    deleted = down_events.actions("deleted")
    # The seed's order: node group, cluster, NAT gateway, Elastic IP, subnets, VPC, S3, ECR, IAM last.
    kinds = ("eks/nodegroup", "eks/cluster", "ec2/nat-gateway", "ec2/elastic-ip", "ec2/subnet", "ec2/vpc",
             "s3/bucket", "ecr/repository", "iam/oidc-provider")  # fmt: skip
    order = [next(i for i, m in enumerate(deleted) if m.startswith(kind)) for kind in kinds]
    assert order == sorted(order)
    assert deleted[-1].startswith("iam/role") and not record.path.with_suffix(".kubeconfig").exists()


def test_rerunning_up_creates_nothing_twice(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any]
) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    events = Events()
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"), progress=events)
    assert events.actions("created") == []
    assert len(events.actions("adopted")) == sum(FULL.values())
    assert inventory(aws) == FULL


def test_up_interrupted_midway_resumes_without_duplicates(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    inject(monkeypatch, provisioner.eks, "create_nodegroup")
    with pytest.raises(ProviderUnavailable, match="injected"):
        provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert record.completed_steps == API_STEPS[: API_STEPS.index("node-group")]
    assert inventory(aws)["node_groups"] == 0 and inventory(aws)["eks_clusters"] == 1

    events = Events()
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"), progress=events)
    assert inventory(aws) == FULL
    created = events.actions("created")
    assert created[0] == f"eks/nodegroup {CLUSTER}-nodes" and not any(c.startswith("ec2/") for c in created)


def test_crash_between_create_and_record_is_adopted_on_rerun(
    provisioner: AwsProvisioner, record: ProvisioningRecord, aws: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The NAT gateway is made, then the process dies before the record is written: tags find it again.
    inject(monkeypatch, provisioner.ec2, "create_nat_gateway", after=True)
    with pytest.raises(SimulatedCrash):
        provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert not record.find("ec2/nat-gateway") and len(live_nat_gateways(aws("ec2"))) == 1

    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert inventory(aws) == FULL
    provisioning.down(provisioner, record)
    assert inventory(aws) == EMPTY


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
    assert inventory(aws) == FULL and len(record.resources) == sum(FULL.values())
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
    """A `helm` on PATH that records its arguments (no EKS API server exists here to install into)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "helm.log"
    bin_dir.mkdir()
    script = bin_dir / "helm"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
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
    assert len(record.find("helm/release")) == 4
    assert all(s.state == "done" for s in provisioning.status(provisioner, record))

    provisioning.down(provisioner, record)
    uninstalls = fake_helm.read_text().splitlines()[4:]
    assert [line.split()[1] for line in uninstalls] == [r.name for r in reversed(ADDONS.values())]
    assert inventory(aws) == EMPTY


def test_missing_helm_is_a_clear_error_and_up_resumes_after_it(
    provisioner: AwsProvisioner, record: ProvisioningRecord, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ProviderUnavailable, match="`helm` is not installed"):
        provisioning.up(provisioner, record)
    assert record.completed_steps == API_STEPS


def test_route53_upsert_points_the_domain_and_its_wildcard(
    provisioner: AwsProvisioner, aws: Callable[[str], Any]
) -> None:
    from cmbcluster.commands.infra import dns_records

    zone = aws("route53").create_hosted_zone(Name="example.org", CallerReference="t")["HostedZone"]["Id"]
    records = dns_records("cmb.example.org", "k8s-lb-123.elb.eu-west-1.amazonaws.com")
    assert provisioner.upsert_dns(records, dry_run=True)[0].startswith("UPSERT CNAME cmb.example.org.")
    assert len(aws("route53").list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]) == 2  # SOA, NS

    provisioner.upsert_dns(records)
    provisioner.upsert_dns(dns_records("cmb.example.org", "k8s-lb-456.elb.eu-west-1.amazonaws.com"))
    sets = {
        (r["Name"], r["Type"]): [v["Value"] for v in r["ResourceRecords"]]
        for r in aws("route53").list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]
    }
    assert sets[("cmb.example.org.", "CNAME")] == ["k8s-lb-456.elb.eu-west-1.amazonaws.com"]
    assert ("\\052.cmb.example.org.", "CNAME") in sets or ("*.cmb.example.org.", "CNAME") in sets
    with pytest.raises(CmbclusterError, match="zone apex"):
        provisioner.upsert_dns(dns_records("example.org", "lb.example.net", wildcard=False))
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
    assert "17 steps" in plan.stdout and f"eks/cluster {CLUSTER}" in plan.stdout
    assert inventory(aws) == EMPTY

    up = run_cli("infra", "up", "--addons", "print", env=cli_env, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert "[10/17] eks-cluster" in up.stdout and "helm upgrade --install cert-manager" in up.stdout
    assert inventory(aws) == FULL
    record = tmp_path / "data" / "infra" / f"aws-{CLUSTER}.json"
    assert len(json.loads(record.read_text())["resources"]) == sum(FULL.values())

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
    assert "cmb.example.org." in names and len(names) == 3  # apex (SOA, NS), the domain, *.domain


def test_cli_images_use_the_ecr_registry(cli_env: dict[str, str], tmp_path: Path) -> None:
    host = f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com"
    build = run_cli("images", "build", "--dry-run", "--tag", "v1", env=cli_env, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    assert build.stdout.splitlines() == [
        f"would run: docker build --file helm/images/controlplane/Dockerfile --tag {host}/cmbcluster/controlplane:v1 "
        "--platform linux/amd64 .",
        f"would run: docker build --file helm/images/environment/Dockerfile --tag {host}/cmbcluster/environment:v1 "
        "--platform linux/amd64 helm/images/environment",
    ]
    push = run_cli("images", "push", "--dry-run", "--tag", "v1", "--image", "environment", env=cli_env, cwd=tmp_path)
    assert push.returncode == 0, push.stderr
    assert push.stdout.splitlines() == [
        f"would run: <aws registry token> | docker login --username AWS --password-stdin {host}",
        f"would run: docker push {host}/cmbcluster/environment:v1",
    ]


def test_cli_errors_are_one_clear_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    cases = [
        ({"VPC_CIDR": "10.0.0.0/8"}, ["infra", "plan"], "VPC_CIDR 10.0.0.0/8 must be between"),
        ({"AWS_ACCOUNT_ID": "999999999999"}, ["infra", "up"], "not AWS_ACCOUNT_ID 999999999999"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, ["infra", "up"], "AWS is unreachable"),
        ({}, ["images", "build", "--image", "nope", "--dry-run"], "unknown image nope"),
        ({}, ["images", "push", "--tag", "-bad", "--dry-run"], "not a valid image tag"),
        ({"PATH": str(tmp_path)}, ["images", "push"], "`docker` is not installed"),
        ({}, ["infra", "dns", "--target", "not a host!", "--domain", "cmb.example.org"], "neither an IPv4"),
    ]
    for extra, args, message in cases:
        result = run_cli(*args, env={**cli_env, **extra}, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
