"""``cmbcluster infra`` on AWS: the VPC, EKS, IAM, ECR and S3 a CMBCluster deployment runs on.

What ``up`` builds, in order (``cmbcluster infra plan`` lists it with names):

1. IAM roles of the EKS cluster and of its nodes (AWS managed policies attached).
2. A VPC over three availability zones: a public and a private subnet in each, an internet
   gateway, one NAT gateway with its Elastic IP, a public and a private route table.
3. ECR repositories for the images and the S3 database bucket (private, encrypted,
   versioned), before the cluster so that images can be pushed while EKS is being created.
4. The EKS cluster (private and public subnets), its IAM OIDC provider (for IRSA), and a
   managed node group in the private subnets.
5. IRSA roles: the control plane's, and those of the add-ons (load balancer controller, EBS CSI,
   Mountpoint for S3 CSI), each trusted by one ServiceAccount only.
6. The add-ons, installed with helm: AWS Load Balancer Controller, cert-manager, EBS CSI
   driver, Mountpoint for S3 CSI driver (``--addons print`` prints the commands instead).

Every EC2 resource carries the tags ``cmbcluster:deployment`` and ``cmbcluster:resource``
from the moment it is created (TagSpecifications), and every other resource has a
deterministic name, so a rerun of ``up`` finds what an interrupted run made instead of
creating it twice. ``down`` deletes what the record lists, in reverse order: add-ons, node
group, cluster (with the load balancers the controller made), NAT gateway, Elastic IP,
subnets, VPC, S3 bucket, ECR repositories, IAM roles and policies.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from botocore.exceptions import ClientError, WaiterError

from cmbcluster.commands.images import IMAGE_NAMES
from cmbcluster.errors import ConfigurationError, Conflict, InvalidRequest, NotFound, ProviderUnavailable
from cmbcluster.interfaces import (
    DeploymentRecord,
    DnsRecord,
    HelmRelease,
    PlannedStep,
    Provisioner,
    ProvisioningOptions,
    ResourceRecord,
    StepContext,
)
from cmbcluster.kubernetes.rbac import CONTROL_PLANE_SERVICE_ACCOUNT
from cmbcluster.provisioning import (
    CERT_MANAGER,
    data_written_during_down,
    install_release,
    kubeconfig_path,
    refuse_to_delete_data,
    release_step,
    uninstall_release,
    write_kubeconfig,
)
from cmbcluster_aws.clients import close_clients, make_clients
from cmbcluster_aws.errors import aws_errors, error_code, map_aws_error
from cmbcluster_aws.identity import AwsInfra, partition_of, trust_policy
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import S3Storage
from cmbcluster_aws.tags import MANAGED_BY, TAG_MANAGED_BY

__all__ = ["ADDONS", "AwsProvisioner"]

log = logging.getLogger(__name__)
T = TypeVar("T")

TAG_DEPLOYMENT = "cmbcluster:deployment"
TAG_RESOURCE = "cmbcluster:resource"
INFRA_ROLE_PATH = "/cmbcluster-infra/"
ZONES = 3
EKS_OIDC_THUMBPRINT = "9e99a48a9960b14926bb7f3b02e22da2b0ab7280"  # IAM ignores it for EKS issuers; the API wants one
MANAGED = "arn:{partition}:iam::aws:policy/"
CLUSTER_POLICIES = ("AmazonEKSClusterPolicy",)
NODE_POLICIES = ("AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryReadOnly")
ROLE_ANNOTATION_KEY = r"eks\.amazonaws\.com/role-arn"  # helm --set needs the dots escaped

# Chart versions pinned so that two `up` runs months apart install the same add-ons; raise them deliberately.
ADDONS: dict[str, HelmRelease] = {
    "aws-load-balancer-controller": HelmRelease(
        name="aws-load-balancer-controller", chart="aws-load-balancer-controller",
        repo="https://aws.github.io/eks-charts", version="1.14.0", namespace="kube-system",
    ),
    "cert-manager": CERT_MANAGER,
    "ebs-csi-driver": HelmRelease(
        name="aws-ebs-csi-driver", chart="aws-ebs-csi-driver",
        repo="https://kubernetes-sigs.github.io/aws-ebs-csi-driver", version="2.48.0", namespace="kube-system",
    ),
    "mountpoint-s3-csi-driver": HelmRelease(
        name="aws-mountpoint-s3-csi-driver", chart="aws-mountpoint-s3-csi-driver",
        repo="https://awslabs.github.io/mountpoint-s3-csi-driver", version="2.1.0", namespace="kube-system",
    ),
}  # fmt: skip
#: IRSA role suffix -> (namespace or None for core's namespace, ServiceAccount, managed policies, helm value key)
IRSA_ROLES: dict[str, tuple[str | None, str, tuple[str, ...], str]] = {
    "controlplane": (None, CONTROL_PLANE_SERVICE_ACCOUNT, (), ""),
    "aws-load-balancer-controller": (
        "kube-system", "aws-load-balancer-controller", (), f"serviceAccount.annotations.{ROLE_ANNOTATION_KEY}",
    ),
    "ebs-csi-driver": (
        "kube-system", "ebs-csi-controller-sa", ("service-role/AmazonEBSCSIDriverPolicy",),
        f"controller.serviceAccount.annotations.{ROLE_ANNOTATION_KEY}",
    ),
    "mountpoint-s3-csi-driver": (
        "kube-system", "s3-csi-driver-sa", (), f"node.serviceAccount.annotations.{ROLE_ANNOTATION_KEY}",
    ),
}  # fmt: skip


def _statement(actions: Sequence[str], resources: Sequence[str] | str, **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": list(actions), "Resource": resources, **extra}


def control_plane_role_arn(settings: AwsSettings) -> str:
    """The IRSA role ``infra up`` makes for the control plane's ServiceAccount
    (:data:`CONTROL_PLANE_SERVICE_ACCOUNT`); ``cmbcluster deploy`` annotates the chart's with it."""
    return (
        f"arn:{partition_of(settings.aws_region)}:iam::{settings.aws_account_id}:role"
        f"{INFRA_ROLE_PATH}{settings.eks_cluster_name}-controlplane"
    )


class AwsProvisioner(Provisioner):
    """:class:`~cmbcluster.interfaces.Provisioner` for AWS.

    ``clients`` replaces boto3 clients by service name (tests); ``poll_interval`` is the delay
    between checks while waiting on EKS and NAT gateways; ``propagation_delay`` the pause before
    retrying a call that failed because a new IAM role was not visible yet.
    """

    provider = "aws"

    def __init__(
        self,
        settings: AwsSettings,
        *,
        namespace: str = "cmbcluster",
        clients: dict[str, Any] | None = None,
        database_bucket: str | None = None,
        poll_interval: float = 20.0,
        propagation_delay: float = 10.0,
        max_attempts: int = 5,
    ) -> None:
        self.settings = settings
        self.namespace = namespace
        self.configured_database_bucket = database_bucket
        self.poll_interval = poll_interval
        self.propagation_delay = propagation_delay
        self.partition = partition_of(settings.aws_region)
        self._clients: dict[str, Any] = make_clients(
            settings, ("ec2", "eks", "iam", "ecr", "s3", "sts", "elbv2", "route53"), given=clients,
            max_attempts=max_attempts, user_agent="cmbcluster-infra",
        )  # fmt: skip
        self.ec2: Any = self._clients["ec2"]
        self.eks: Any = self._clients["eks"]
        self.iam: Any = self._clients["iam"]
        self.ecr: Any = self._clients["ecr"]
        self.s3: Any = self._clients["s3"]
        self.sts: Any = self._clients["sts"]
        self.elbv2: Any = self._clients["elbv2"]
        self.route53: Any = self._clients["route53"]
        self._infra = AwsInfra(settings, clients={k: self._clients[k] for k in ("iam", "eks", "ecr", "sts")})
        self._zones: list[str] | None = None

    # -- names -------------------------------------------------------------------------------
    @property
    def deployment(self) -> str:
        return self.settings.eks_cluster_name

    def _name(self, suffix: str) -> str:
        return f"{self.deployment}-{suffix}"

    def role_name(self, suffix: str) -> str:
        name = self._name(suffix)
        if len(name) > 64:
            raise InvalidRequest(f"IAM role name {name} is longer than 64 characters: shorten EKS_CLUSTER_NAME")
        return name

    @property
    def database_bucket(self) -> str:
        name = self.configured_database_bucket or f"{self.deployment}-database-{self.settings.aws_account_id}"
        return name.lower()

    @property
    def repositories(self) -> list[str]:
        prefix = self._infra.registry().repository_prefix
        return [f"{prefix}/{image}" for image in IMAGE_NAMES]

    @property
    def nodegroup_name(self) -> str:
        return self._name("nodes")

    def _subnet_cidrs(self) -> tuple[list[str], list[str]]:
        try:
            network = ipaddress.ip_network(self.settings.vpc_cidr)
        except ValueError as exc:
            raise ConfigurationError([f"VPC_CIDR {self.settings.vpc_cidr!r} is not a network: {exc}"]) from None
        if not 16 <= network.prefixlen <= 24:
            raise ConfigurationError([f"VPC_CIDR {network} must be between a /16 and a /24 (AWS's VPC limits)"])
        blocks = [str(b) for b in network.subnets(new_prefix=network.prefixlen + 3)]  # 8 blocks: 3 public, 3 private
        return blocks[:ZONES], blocks[4 : 4 + ZONES]

    def _tags(self, resource: str, name: str) -> list[dict[str, str]]:
        return [
            {"Key": "Name", "Value": name},
            {"Key": TAG_DEPLOYMENT, "Value": self.deployment},
            {"Key": TAG_RESOURCE, "Value": resource},
            {"Key": TAG_MANAGED_BY, "Value": MANAGED_BY},
        ]

    def _tag_map(self, resource: str, name: str) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in self._tags(resource, name)}

    def _managed(self, policy: str) -> str:
        return MANAGED.format(partition=self.partition) + policy

    # -- plan --------------------------------------------------------------------------------
    def plan(self) -> list[PlannedStep]:
        public, private = self._subnet_cidrs()
        region = self.settings.aws_region
        steps = [
            PlannedStep(name="cluster-role", description="IAM role the EKS control plane assumes",
                        creates=(f"iam/role {self.role_name('cluster-role')}",)),
            PlannedStep(name="node-role", description="IAM role of the worker nodes",
                        creates=(f"iam/role {self.role_name('node-role')}",)),
            PlannedStep(name="vpc", description=f"VPC {self.settings.vpc_cidr} in {region}",
                        creates=(f"ec2/vpc {self._name('vpc')}",)),
            PlannedStep(name="internet-gateway", description="Internet gateway attached to the VPC",
                        creates=(f"ec2/internet-gateway {self._name('igw')}",)),
            PlannedStep(name="subnets", description=f"{ZONES} public and {ZONES} private subnets over {ZONES} zones",
                        creates=tuple(f"ec2/subnet {self._name(f'public-{i}')} {c}" for i, c in enumerate(public))
                        + tuple(f"ec2/subnet {self._name(f'private-{i}')} {c}" for i, c in enumerate(private))),
            PlannedStep(name="nat-gateway", description="NAT gateway with an Elastic IP, in the first public subnet",
                        creates=(f"ec2/elastic-ip {self._name('nat-eip')}", f"ec2/nat-gateway {self._name('nat')}")),
            PlannedStep(name="route-tables", description="Public routes via the internet gateway, private via NAT",
                        creates=(f"ec2/route-table {self._name('public-rt')}",
                                 f"ec2/route-table {self._name('private-rt')}")),
            # Before EKS, so that `cmbcluster images push` can run while the cluster is being created.
            PlannedStep(name="ecr-repositories", description="ECR repositories for the images",
                        creates=tuple(f"ecr/repository {r}" for r in self.repositories)),
            PlannedStep(name="database-bucket", description="S3 bucket for database backups",
                        creates=(f"s3/bucket {self.database_bucket}",)),
            PlannedStep(name="eks-cluster",
                        description=f"EKS cluster {self.deployment}, Kubernetes {self.settings.eks_kubernetes_version}",
                        creates=(f"eks/cluster {self.deployment}",)),
            PlannedStep(name="oidc-provider", description="IAM OIDC provider of the cluster's issuer (IRSA)",
                        creates=("iam/oidc-provider <cluster issuer>",)),
            PlannedStep(name="node-group",
                        description=f"Managed node group: {self.settings.eks_node_count} x "
                        f"{self.settings.eks_node_instance_type} (up to {self.settings.eks_node_max})",
                        creates=(f"eks/nodegroup {self.nodegroup_name}",)),
            PlannedStep(name="irsa-roles", description="IRSA roles: control plane and add-ons, one ServiceAccount each",
                        creates=tuple(f"iam/role {self.role_name(s)}" for s in IRSA_ROLES)),
        ]  # fmt: skip
        return steps + [release_step(key, release) for key, release in ADDONS.items()]

    # -- up ----------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Refuse to touch an account other than AWS_ACCOUNT_ID."""
        with aws_errors("STS caller identity"):
            account = str(self.sts.get_caller_identity().get("Account", ""))
        if account != self.settings.aws_account_id:
            raise ConfigurationError(
                [f"the AWS credentials belong to account {account}, not AWS_ACCOUNT_ID {self.settings.aws_account_id}"]
            )

    def apply_step(self, step: PlannedStep, job: StepContext) -> None:
        if step.name.startswith("addon-"):
            self._addon(step.name.removeprefix("addon-"), job)
            return
        handlers: dict[str, Callable[[StepContext], object]] = {
            "cluster-role": lambda c: self._role(c, "cluster-role", self._service_trust("eks"), CLUSTER_POLICIES),
            "node-role": lambda c: self._role(c, "node-role", self._service_trust("ec2"), NODE_POLICIES),
            "vpc": self._vpc,
            "internet-gateway": self._internet_gateway,
            "subnets": self._subnets,
            "nat-gateway": self._nat_gateway,
            "route-tables": self._route_tables,
            "eks-cluster": self._cluster,
            "oidc-provider": self._oidc_provider,
            "node-group": self._node_group,
            "irsa-roles": self._irsa_roles,
            "ecr-repositories": self._repositories,
            "database-bucket": self._bucket,
        }
        with aws_errors(step.description):
            handlers[step.name](job)

    def _service_trust(self, service: str) -> dict[str, Any]:
        return {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"Service": f"{service}.amazonaws.com"}, "Action": "sts:AssumeRole"}
            ],
        }

    def _role(
        self,
        job: StepContext,
        suffix: str,
        trust: dict[str, Any],
        managed: Sequence[str],
        inline: dict[str, Any] | None = None,
    ) -> str:
        name = self.role_name(suffix)
        document = json.dumps(trust)
        tags = [t for t in self._tags(suffix, name) if t["Key"] != "Name"]
        try:
            arn = str(self.iam.get_role(RoleName=name)["Role"]["Arn"])
            owned = {t["Key"]: t["Value"] for t in self.iam.list_role_tags(RoleName=name).get("Tags", [])}
            if owned.get(TAG_DEPLOYMENT) != self.deployment:
                raise Conflict(f"IAM role {name} exists but does not belong to deployment {self.deployment}")
            self.iam.update_assume_role_policy(RoleName=name, PolicyDocument=document)
            job.adopted(self._role_record(job.step, name, arn))
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
            role = self.iam.create_role(
                RoleName=name, Path=INFRA_ROLE_PATH, AssumeRolePolicyDocument=document, Tags=tags,
                Description=f"CMBCluster deployment {self.deployment}: {suffix}",
            )["Role"]  # fmt: skip
            arn = str(role["Arn"])
            job.created(self._role_record(job.step, name, arn))
        for policy in managed:
            with aws_errors(f"managed policy {self._managed(policy)} (for IAM role {name})"):
                self.iam.attach_role_policy(RoleName=name, PolicyArn=self._managed(policy))  # idempotent in IAM
        if inline is not None:
            self.iam.put_role_policy(RoleName=name, PolicyName="cmbcluster", PolicyDocument=json.dumps(inline))
        return arn

    @staticmethod
    def _role_record(step: str, name: str, arn: str) -> ResourceRecord:
        return ResourceRecord(step=step, kind="iam/role", id=name, name=name, attributes={"arn": arn})

    def _find_tagged(self, describe: str, key: str, resource: str, extra: Sequence[dict[str, Any]] = ()) -> list[Any]:
        filters = [
            {"Name": f"tag:{TAG_DEPLOYMENT}", "Values": [self.deployment]},
            {"Name": f"tag:{TAG_RESOURCE}", "Values": [resource]},
            *extra,
        ]
        found: list[Any] = getattr(self.ec2, describe)(Filters=filters)[key]
        return found

    def _spec(self, kind: str, resource: str, name: str) -> list[dict[str, Any]]:
        return [{"ResourceType": kind, "Tags": self._tags(resource, name)}]

    def _recorded_id(self, job: StepContext, kind: str, name: str) -> str:
        found = job.record.find(kind, name=name)
        if not found:
            raise ConfigurationError([f"{kind} {name} is not in the record: run `cmbcluster infra up` from the start"])
        return found[0].id

    def _tagged(
        self,
        job: StepContext,
        *,
        kind: str,
        name: str,
        tag: str,
        describe: tuple[str, str],
        id_key: str,
        create: Callable[[], dict[str, Any]],
        extra: Sequence[dict[str, Any]] = (),
        attributes: dict[str, str] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """The EC2 resource this deployment tagged ``tag`` (adopted), or the one ``create`` makes (recorded
        as created as soon as EC2 returns it); and whether it was adopted. ``describe`` is the
        describe call and the key of its list, ``id_key`` the resource's id field."""
        found = self._find_tagged(*describe, tag, extra)
        resource = found[0] if found else create()
        record = ResourceRecord(step=job.step, kind=kind, id=str(resource[id_key]), name=name,
                                attributes=attributes or {})  # fmt: skip
        (job.adopted if found else job.created)(record)
        return resource, bool(found)

    def _vpc(self, job: StepContext) -> None:
        name = self._name("vpc")
        vpc, _ = self._tagged(
            job, kind="ec2/vpc", name=name, tag="vpc", describe=("describe_vpcs", "Vpcs"), id_key="VpcId",
            create=lambda: self.ec2.create_vpc(
                CidrBlock=self.settings.vpc_cidr, TagSpecifications=self._spec("vpc", "vpc", name)
            )["Vpc"],
        )  # fmt: skip
        vpc_id = str(vpc["VpcId"])
        # EKS nodes need both to register with the cluster's private endpoint.
        self.ec2.modify_vpc_attribute(VpcId=vpc_id, EnableDnsSupport={"Value": True})
        self.ec2.modify_vpc_attribute(VpcId=vpc_id, EnableDnsHostnames={"Value": True})

    def _internet_gateway(self, job: StepContext) -> None:
        name = self._name("igw")
        vpc_id = self._recorded_id(job, "ec2/vpc", self._name("vpc"))
        igw, adopted = self._tagged(
            job, kind="ec2/internet-gateway", name=name, tag="igw",
            describe=("describe_internet_gateways", "InternetGateways"), id_key="InternetGatewayId",
            create=lambda: self.ec2.create_internet_gateway(
                TagSpecifications=self._spec("internet-gateway", "igw", name)
            )["InternetGateway"],
            attributes={"vpc_id": vpc_id},
        )  # fmt: skip
        if not (adopted and any(a.get("VpcId") == vpc_id for a in igw.get("Attachments", []))):
            self.ec2.attach_internet_gateway(InternetGatewayId=str(igw["InternetGatewayId"]), VpcId=vpc_id)

    def availability_zones(self) -> list[str]:
        if self._zones is None:
            with aws_errors("availability zones"):
                zones = self.ec2.describe_availability_zones(
                    Filters=[{"Name": "state", "Values": ["available"]},
                             {"Name": "zone-type", "Values": ["availability-zone"]}]
                )["AvailabilityZones"]  # fmt: skip
            names = sorted(str(z["ZoneName"]) for z in zones)
            if len(names) < ZONES:
                raise ConfigurationError(
                    [f"region {self.settings.aws_region} has fewer than {ZONES} availability zones"]
                )
            self._zones = names[:ZONES]
        return self._zones

    def _subnets(self, job: StepContext) -> None:
        vpc_id = self._recorded_id(job, "ec2/vpc", self._name("vpc"))
        public, private = self._subnet_cidrs()
        cluster_tag = {"Key": f"kubernetes.io/cluster/{self.deployment}", "Value": "shared"}
        for tier, cidrs, role_tag in (
            ("public", public, {"Key": "kubernetes.io/role/elb", "Value": "1"}),
            ("private", private, {"Key": "kubernetes.io/role/internal-elb", "Value": "1"}),
        ):
            for index, (cidr, zone) in enumerate(zip(cidrs, self.availability_zones(), strict=True)):
                resource, name = f"subnet/{tier}/{index}", self._name(f"{tier}-{index}")
                attributes = {"tier": tier, "zone": zone, "cidr": cidr}
                tags = [*self._tags(resource, name), cluster_tag, role_tag]
                subnet, _ = self._tagged(
                    job, kind="ec2/subnet", name=name, tag=resource, describe=("describe_subnets", "Subnets"),
                    id_key="SubnetId", attributes=attributes,
                    create=functools.partial(self._create_subnet, vpc_id, cidr, zone, tags),
                )  # fmt: skip
                if tier == "public":
                    self.ec2.modify_subnet_attribute(SubnetId=str(subnet["SubnetId"]),
                                                     MapPublicIpOnLaunch={"Value": True})  # fmt: skip

    def _create_subnet(self, vpc_id: str, cidr: str, zone: str, tags: list[dict[str, str]]) -> dict[str, Any]:
        subnet: dict[str, Any] = self.ec2.create_subnet(
            VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=zone,
            TagSpecifications=[{"ResourceType": "subnet", "Tags": tags}],
        )["Subnet"]  # fmt: skip
        return subnet

    def _create_route_table(self, vpc_id: str, resource: str, name: str) -> dict[str, Any]:
        table: dict[str, Any] = self.ec2.create_route_table(
            VpcId=vpc_id, TagSpecifications=self._spec("route-table", resource, name)
        )["RouteTable"]
        return table

    def _subnet_ids(self, job: StepContext, tier: str) -> list[str]:
        return [r.id for r in job.record.find("ec2/subnet") if r.attributes.get("tier") == tier]

    def _nat_gateway(self, job: StepContext) -> None:
        eip_name, nat_name = self._name("nat-eip"), self._name("nat")
        address, _ = self._tagged(
            job, kind="ec2/elastic-ip", name=eip_name, tag="eip", describe=("describe_addresses", "Addresses"),
            id_key="AllocationId",
            create=lambda: self.ec2.allocate_address(
                Domain="vpc", TagSpecifications=self._spec("elastic-ip", "eip", eip_name)
            ),
        )  # fmt: skip
        allocation = str(address["AllocationId"])
        nat, _ = self._tagged(
            job, kind="ec2/nat-gateway", name=nat_name, tag="nat", describe=("describe_nat_gateways", "NatGateways"),
            id_key="NatGatewayId", extra=[{"Name": "state", "Values": ["pending", "available"]}],
            create=lambda: self.ec2.create_nat_gateway(
                SubnetId=self._subnet_ids(job, "public")[0], AllocationId=allocation,
                TagSpecifications=self._spec("natgateway", "nat", nat_name),
            )["NatGateway"],
        )  # fmt: skip
        nat_id = str(nat["NatGatewayId"])
        job.note(f"waiting for NAT gateway {nat_id} (1-2 minutes on AWS)")
        self._wait("ec2", "nat_gateway_available", f"NAT gateway {nat_id}", NatGatewayIds=[nat_id])

    def _route_tables(self, job: StepContext) -> None:
        vpc_id = self._recorded_id(job, "ec2/vpc", self._name("vpc"))
        igw = self._recorded_id(job, "ec2/internet-gateway", self._name("igw"))
        nat = self._recorded_id(job, "ec2/nat-gateway", self._name("nat"))
        for tier, target in (("public", {"GatewayId": igw}), ("private", {"NatGatewayId": nat})):
            resource, name = f"rtb/{tier}", self._name(f"{tier}-rt")
            table, _ = self._tagged(
                job, kind="ec2/route-table", name=name, tag=resource,
                describe=("describe_route_tables", "RouteTables"), id_key="RouteTableId",
                create=functools.partial(self._create_route_table, vpc_id, resource, name),
            )  # fmt: skip
            table_id = str(table["RouteTableId"])
            if not any(r.get("DestinationCidrBlock") == "0.0.0.0/0" for r in table.get("Routes", [])):
                self.ec2.create_route(RouteTableId=table_id, DestinationCidrBlock="0.0.0.0/0", **target)
            associated = {a.get("SubnetId") for a in table.get("Associations", [])}
            for subnet in self._subnet_ids(job, tier):
                if subnet not in associated:
                    self.ec2.associate_route_table(RouteTableId=table_id, SubnetId=subnet)

    def _retrying_propagation(self, call: Callable[[], T], what: str, attempts: int = 8) -> T:
        """IAM is eventually consistent: EKS may not see a role made seconds ago. Retry that case only."""
        for attempt in range(attempts):
            try:
                return call()
            except ClientError as exc:
                message = str(exc.response.get("Error", {}).get("Message", ""))
                if error_code(exc) != "InvalidParameterException" or "role" not in message.lower():
                    raise
                if attempt == attempts - 1:
                    raise map_aws_error(exc, what) from exc
                time.sleep(self.propagation_delay)
        raise AssertionError("unreachable")

    def _cluster(self, job: StepContext) -> None:
        name = self.deployment
        try:
            cluster = self.eks.describe_cluster(name=name)["cluster"]
            if cluster.get("tags", {}).get(TAG_DEPLOYMENT) != self.deployment:
                raise Conflict(f"EKS cluster {name} exists but was not made by `cmbcluster infra up`")
            if cluster.get("status") in ("DELETING", "FAILED"):
                raise Conflict(f"EKS cluster {name} is {cluster.get('status')}; delete it and rerun")
            job.adopted(ResourceRecord(step=job.step, kind="eks/cluster", id=name, name=name))
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            role_arn = job.record.find("iam/role", name=self.role_name("cluster-role"))[0].attributes["arn"]
            subnets = self._subnet_ids(job, "private") + self._subnet_ids(job, "public")
            self._retrying_propagation(
                lambda: self.eks.create_cluster(
                    name=name, version=self.settings.eks_kubernetes_version, roleArn=role_arn,
                    resourcesVpcConfig={"subnetIds": subnets, "endpointPublicAccess": True,
                                        "endpointPrivateAccess": True},
                    accessConfig={"authenticationMode": "API_AND_CONFIG_MAP",
                                  "bootstrapClusterCreatorAdminPermissions": True},
                    tags=self._tag_map("eks-cluster", name),
                ),
                f"EKS cluster {name}",
            )  # fmt: skip
            job.created(ResourceRecord(step=job.step, kind="eks/cluster", id=name, name=name))
        job.note(f"waiting for EKS cluster {name} to be ACTIVE (about 10-15 minutes on AWS)")
        self._wait("eks", "cluster_active", f"EKS cluster {name}", name=name)
        self._write_kubeconfig(job)

    def _write_kubeconfig(self, job: StepContext) -> None:
        with aws_errors(f"EKS cluster {self.deployment}"):
            cluster = self.eks.describe_cluster(name=self.deployment)["cluster"]
        write_kubeconfig(
            kubeconfig_path(job.record),
            name=self.deployment,
            server=str(cluster.get("endpoint") or ""),
            certificate_authority_data=str(cluster.get("certificateAuthority", {}).get("data") or ""),
            command="aws",
            args=["eks", "get-token", "--cluster-name", self.deployment, "--region", self.settings.aws_region,
                  "--output", "json"],
        )  # fmt: skip

    def _issuer(self) -> str:
        cluster = self.eks.describe_cluster(name=self.deployment)["cluster"]
        issuer = str(cluster.get("identity", {}).get("oidc", {}).get("issuer") or "")
        if not issuer.startswith("https://"):
            raise ProviderUnavailable(f"EKS cluster {self.deployment} reports no OIDC issuer yet; rerun `up`")
        return issuer

    def _oidc_provider(self, job: StepContext) -> None:
        issuer = self._issuer()
        host_path = issuer.removeprefix("https://")
        arn = f"arn:{self.partition}:iam::{self.settings.aws_account_id}:oidc-provider/{host_path}"
        record = ResourceRecord(step=job.step, kind="iam/oidc-provider", id=arn, name=host_path)
        try:
            self.iam.get_open_id_connect_provider(OpenIDConnectProviderArn=arn)
            job.adopted(record)
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
            self.iam.create_open_id_connect_provider(
                Url=issuer, ClientIDList=["sts.amazonaws.com"], ThumbprintList=[EKS_OIDC_THUMBPRINT],
                Tags=[t for t in self._tags("oidc-provider", host_path) if t["Key"] != "Name"],
            )  # fmt: skip
            job.created(record)

    def _node_group(self, job: StepContext) -> None:
        name = self.nodegroup_name
        record = ResourceRecord(step=job.step, kind="eks/nodegroup", id=name, name=name,
                                attributes={"cluster": self.deployment})  # fmt: skip
        try:
            self.eks.describe_nodegroup(clusterName=self.deployment, nodegroupName=name)
            job.adopted(record)
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            role_arn = job.record.find("iam/role", name=self.role_name("node-role"))[0].attributes["arn"]
            settings = self.settings
            self._retrying_propagation(
                lambda: self.eks.create_nodegroup(
                    clusterName=self.deployment, nodegroupName=name, nodeRole=role_arn,
                    subnets=self._subnet_ids(job, "private"), instanceTypes=[settings.eks_node_instance_type],
                    scalingConfig={"minSize": 1, "desiredSize": settings.eks_node_count,
                                   "maxSize": max(settings.eks_node_max, settings.eks_node_count)},
                    amiType="AL2023_x86_64_STANDARD", capacityType="ON_DEMAND", diskSize=50,
                    tags=self._tag_map("node-group", name),
                ),
                f"EKS node group {name}",
            )  # fmt: skip
            job.created(record)
        job.note(f"waiting for node group {name} to be ACTIVE (about 3-5 minutes on AWS)")
        self._wait("eks", "nodegroup_active", f"node group {name}", clusterName=self.deployment, nodegroupName=name)

    def _irsa_roles(self, job: StepContext) -> None:
        oidc = job.record.find("iam/oidc-provider")
        if not oidc:
            raise ConfigurationError(["the cluster's OIDC provider is not in the record: rerun `cmbcluster infra up`"])
        provider_arn, issuer_id = oidc[0].id, oidc[0].name
        for suffix, (namespace, service_account, managed, _value) in IRSA_ROLES.items():
            trust = trust_policy(provider_arn, issuer_id, namespace or self.namespace, service_account)
            self._role(job, suffix, trust, managed, self._irsa_policy(suffix))

    def _irsa_policy(self, suffix: str) -> dict[str, Any] | None:
        p, account = self.partition, self.settings.aws_account_id
        user_buckets = f"arn:{p}:s3:::{self.settings.s3_user_bucket_prefix}-*"
        database = f"arn:{p}:s3:::{self.database_bucket}"
        statements: list[dict[str, Any]]
        if suffix == "controlplane":
            statements = [
                _statement(["s3:ListAllMyBuckets"], "*"),
                _statement(["s3:CreateBucket", "s3:DeleteBucket", "s3:ListBucket", "s3:ListBucketVersions",
                            "s3:GetBucket*", "s3:PutBucket*", "s3:DeleteBucketPolicy", "s3:GetEncryptionConfiguration",
                            "s3:PutEncryptionConfiguration", "s3:PutBucketPublicAccessBlock",
                            "s3:ListBucketMultipartUploads"], [user_buckets, database]),
                _statement(["s3:GetObject*", "s3:PutObject*", "s3:DeleteObject*", "s3:AbortMultipartUpload",
                            "s3:ListMultipartUploadParts"], [f"{user_buckets}/*", f"{database}/*"]),
                _statement(["iam:CreateRole", "iam:DeleteRole", "iam:GetRole", "iam:TagRole", "iam:ListRoleTags",
                            "iam:UpdateAssumeRolePolicy", "iam:PutRolePolicy", "iam:DeleteRolePolicy",
                            "iam:GetRolePolicy"], f"arn:{p}:iam::{account}:role/cmbcluster/*"),
                _statement(["iam:GetOpenIDConnectProvider"], f"arn:{p}:iam::{account}:oidc-provider/*"),
                _statement(["eks:DescribeCluster"],
                           f"arn:{p}:eks:{self.settings.aws_region}:{account}:cluster/{self.deployment}"),
            ]  # fmt: skip
        elif suffix == "mountpoint-s3-csi-driver":
            statements = [
                _statement(["s3:ListBucket"], [user_buckets]),
                _statement(["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                           [f"{user_buckets}/*"]),
            ]  # fmt: skip
        elif suffix == "aws-load-balancer-controller":
            # A condensed form of the controller's published policy: the services it calls, ELB writes limited
            # to what it tags, service-linked role creation limited to ELB.
            statements = [
                _statement(["iam:CreateServiceLinkedRole"], "*",
                           Condition={"StringEquals": {"iam:AWSServiceName": "elasticloadbalancing.amazonaws.com"}}),
                _statement(["ec2:Describe*", "ec2:GetSecurityGroupsForVpc", "elasticloadbalancing:Describe*",
                            "acm:ListCertificates", "acm:DescribeCertificate", "cognito-idp:DescribeUserPoolClient",
                            "wafv2:GetWebACL*", "wafv2:AssociateWebACL", "wafv2:DisassociateWebACL",
                            "shield:GetSubscriptionState", "shield:DescribeProtection"], "*"),
                _statement(["ec2:CreateSecurityGroup", "ec2:CreateTags", "ec2:DeleteTags", "ec2:DeleteSecurityGroup",
                            "ec2:AuthorizeSecurityGroupIngress", "ec2:RevokeSecurityGroupIngress"], "*"),
                _statement(["elasticloadbalancing:*"], "*"),
            ]  # fmt: skip
        else:
            return None
        return {"Version": "2012-10-17", "Statement": statements}

    def _repositories(self, job: StepContext) -> None:
        for name in self.repositories:
            try:
                found = self.ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
                job.adopted(ResourceRecord(step=job.step, kind="ecr/repository", id=name, name=name,
                                           attributes={"uri": str(found["repositoryUri"])}))  # fmt: skip
            except ClientError as exc:
                if error_code(exc) != "RepositoryNotFoundException":
                    raise
                repo = self.ecr.create_repository(
                    repositoryName=name, imageScanningConfiguration={"scanOnPush": True},
                    imageTagMutability="MUTABLE", encryptionConfiguration={"encryptionType": "AES256"},
                    tags=[t for t in self._tags("ecr", name) if t["Key"] != "Name"],
                )["repository"]  # fmt: skip
                job.created(ResourceRecord(step=job.step, kind="ecr/repository", id=name, name=name,
                                           attributes={"uri": str(repo["repositoryUri"])}))  # fmt: skip

    def _storage(self) -> S3Storage:
        return S3Storage(self.settings, client=self.s3)

    def _bucket(self, job: StepContext) -> None:
        name = self.database_bucket
        record = ResourceRecord(step=job.step, kind="s3/bucket", id=name, name=name)
        kwargs: dict[str, Any] = {"ObjectOwnership": "BucketOwnerEnforced"}
        if self.settings.aws_region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.aws_region}
        try:
            self.s3.create_bucket(Bucket=name, **kwargs)
            job.created(record)
        except ClientError as exc:
            if error_code(exc) == "BucketAlreadyExists":
                raise Conflict(f"S3 bucket name {name} is taken by another account: set S3_DATABASE_BUCKET") from exc
            if error_code(exc) != "BucketAlreadyOwnedByYou":
                raise
            job.adopted(record)
        # The same settings as every user bucket: all public access blocked, encrypted, versioned, tagged.
        self._storage().configure_bucket(name, versioning=True, tags=self._tag_map("database-bucket", name))

    def _addon(self, key: str, job: StepContext) -> None:
        release = ADDONS[key]
        values = dict(release.values)
        if key in IRSA_ROLES:
            roles = job.record.find("iam/role", name=self.role_name(key))
            if not roles:
                raise ConfigurationError([f"the IRSA role of {key} is not in the record: rerun `cmbcluster infra up`"])
            values[IRSA_ROLES[key][3]] = roles[0].attributes["arn"]
        if key == "aws-load-balancer-controller":
            values.update({"clusterName": self.deployment, "region": self.settings.aws_region,
                           "vpcId": self._recorded_id(job, "ec2/vpc", self._name("vpc"))})  # fmt: skip
        if not kubeconfig_path(job.record).exists():
            self._write_kubeconfig(job)
        install_release(job, dataclasses.replace(release, values=values), kubeconfig_path(job.record))

    def _wait(self, service: str, waiter: str, what: str, **kwargs: Any) -> None:
        attempts = max(1, int(1800 / max(self.poll_interval, 0.001)))  # at most 30 minutes
        try:
            self._clients[service].get_waiter(waiter).wait(
                WaiterConfig={"Delay": self.poll_interval, "MaxAttempts": min(attempts, 10_000)}, **kwargs
            )
        except WaiterError as exc:
            raise ProviderUnavailable(f"{what} did not reach the expected state: {exc}") from exc

    # -- down --------------------------------------------------------------------------------
    def delete_resource(self, resource: ResourceRecord, job: StepContext) -> None:
        deleters: dict[str, Callable[[ResourceRecord, StepContext], None]] = {
            "helm/release": self._delete_release,
            "eks/nodegroup": self._delete_nodegroup,
            "eks/cluster": self._delete_cluster,
            "iam/oidc-provider": lambda r, c: self.iam.delete_open_id_connect_provider(OpenIDConnectProviderArn=r.id),
            "iam/role": lambda r, c: self._delete_role(r.id),
            "ec2/route-table": self._delete_route_table,
            "ec2/nat-gateway": self._delete_nat,
            "ec2/elastic-ip": lambda r, c: self.ec2.release_address(AllocationId=r.id),
            "ec2/subnet": lambda r, c: self.ec2.delete_subnet(SubnetId=r.id),
            "ec2/internet-gateway": self._delete_internet_gateway,
            "ec2/vpc": lambda r, c: self.ec2.delete_vpc(VpcId=r.id),
            "ecr/repository": lambda r, c: self.ecr.delete_repository(repositoryName=r.id, force=True),
            "s3/bucket": lambda r, c: self._storage().delete_bucket(r.id, force=c.options.delete_data),
        }
        deleter = deleters.get(resource.kind)
        if deleter is None:
            raise InvalidRequest(f"the record lists {resource.label}, a kind this version cannot delete")
        try:
            with aws_errors(f"deleting {resource.label}"):
                deleter(resource, job)
        except Conflict as exc:
            if resource.kind == "s3/bucket" and not job.options.delete_data:
                raise data_written_during_down(f"S3 bucket {resource.id}") from exc
            raise
        except Exception as exc:
            if _gone(exc):
                job.emit("gone", f"{resource.label} was already gone")
                return
            raise

    def check_down(self, record: DeploymentRecord, options: ProvisioningOptions) -> None:
        refuse_to_delete_data(record, options, kind="s3/bucket", holds_objects=self._holds_objects, what="S3 bucket")

    def _holds_objects(self, bucket: ResourceRecord) -> bool:
        """Whether the bucket holds any object version or delete marker (False when it is gone)."""
        try:
            with aws_errors(f"S3 bucket {bucket.id}"):
                listing = self.s3.list_object_versions(Bucket=bucket.id, MaxKeys=1)
        except NotFound:
            return False
        return bool(listing.get("Versions") or listing.get("DeleteMarkers"))

    def deletion_order(self, resources: Sequence[ResourceRecord]) -> list[ResourceRecord]:
        """The order of the original cleanup script: add-ons, node group, cluster, NAT gateway, Elastic IP,
        subnets, VPC, then S3 buckets, ECR repositories, and IAM (roles, OIDC provider) last, so that
        nothing still running loses its permissions first. Within each group, reverse creation."""
        last = ("s3/bucket", "ecr/repository", "iam/oidc-provider", "iam/role")
        ordered = list(reversed(resources))
        rest = [r for r in ordered if r.kind not in last]
        return rest + [r for kind in last for r in ordered if r.kind == kind]

    def _delete_release(self, resource: ResourceRecord, job: StepContext) -> None:
        kubeconfig = kubeconfig_path(job.record)
        if kubeconfig.exists() or self._cluster_exists():
            if not kubeconfig.exists():
                self._write_kubeconfig(job)
            uninstall_release(job, resource, kubeconfig)

    def _delete_controller_leftovers(self, job: StepContext) -> None:
        """What the load balancer controller made for Ingresses and Services lives outside the cluster:
        load balancers, target groups and security groups tagged ``elbv2.k8s.aws/cluster=<cluster>``.
        They would outlive the cluster and keep the VPC from being deleted, so they go with it (once the
        node group is gone, no controller can make them again)."""
        tag = "elbv2.k8s.aws/cluster"
        for kind, paginator, key, arn_key in (
            ("load balancer", "describe_load_balancers", "LoadBalancers", "LoadBalancerArn"),
            ("target group", "describe_target_groups", "TargetGroups", "TargetGroupArn"),
        ):
            arns = [item[arn_key] for page in self.elbv2.get_paginator(paginator).paginate()
                    for item in page.get(key, [])]  # fmt: skip
            for start in range(0, len(arns), 20):  # DescribeTags takes 20 ARNs at most
                for description in self.elbv2.describe_tags(ResourceArns=arns[start : start + 20])["TagDescriptions"]:
                    tags = {t["Key"]: t["Value"] for t in description.get("Tags", [])}
                    if tags.get(tag) != self.deployment:
                        continue
                    job.note(f"deleting {kind} {description['ResourceArn']} made by the load balancer controller")
                    if kind == "load balancer":
                        self.elbv2.delete_load_balancer(LoadBalancerArn=description["ResourceArn"])
                    else:
                        self.elbv2.delete_target_group(TargetGroupArn=description["ResourceArn"])
        groups = self.ec2.describe_security_groups(Filters=[{"Name": f"tag:{tag}", "Values": [self.deployment]}])
        for group in groups["SecurityGroups"]:
            job.note(f"deleting security group {group['GroupId']} made by the load balancer controller")
            self._retry_dependency(functools.partial(self.ec2.delete_security_group, GroupId=group["GroupId"]))

    def _retry_dependency(self, call: Callable[[], object], attempts: int = 30) -> None:
        """A just-deleted load balancer keeps its network interfaces for a minute: retry DependencyViolation."""
        for attempt in range(attempts):
            try:
                call()
                return
            except ClientError as exc:
                if error_code(exc) != "DependencyViolation" or attempt == attempts - 1:
                    raise
                time.sleep(self.poll_interval)

    def _cluster_exists(self) -> bool:
        try:
            self.eks.describe_cluster(name=self.deployment)
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return False
            raise
        return True

    def _delete_nodegroup(self, resource: ResourceRecord, job: StepContext) -> None:
        cluster = resource.attributes.get("cluster", self.deployment)
        self.eks.delete_nodegroup(clusterName=cluster, nodegroupName=resource.id)
        job.note(f"waiting for node group {resource.id} to be deleted")
        self._wait("eks", "nodegroup_deleted", f"node group {resource.id}", clusterName=cluster,
                   nodegroupName=resource.id)  # fmt: skip

    def _delete_cluster(self, resource: ResourceRecord, job: StepContext) -> None:
        self._delete_controller_leftovers(job)
        self.eks.delete_cluster(name=resource.id)
        job.note(f"waiting for EKS cluster {resource.id} to be deleted")
        self._wait("eks", "cluster_deleted", f"EKS cluster {resource.id}", name=resource.id)
        kubeconfig_path(job.record).unlink(missing_ok=True)

    def _delete_role(self, name: str) -> None:
        for page in self.iam.get_paginator("list_attached_role_policies").paginate(RoleName=name):
            for policy in page.get("AttachedPolicies", []):
                self.iam.detach_role_policy(RoleName=name, PolicyArn=policy["PolicyArn"])
        for page in self.iam.get_paginator("list_role_policies").paginate(RoleName=name):
            for policy in page.get("PolicyNames", []):
                self.iam.delete_role_policy(RoleName=name, PolicyName=policy)
        for profile in self.iam.list_instance_profiles_for_role(RoleName=name).get("InstanceProfiles", []):
            self.iam.remove_role_from_instance_profile(InstanceProfileName=profile["InstanceProfileName"],
                                                       RoleName=name)  # fmt: skip
        self.iam.delete_role(RoleName=name)

    def _delete_route_table(self, resource: ResourceRecord, job: StepContext) -> None:
        tables = self.ec2.describe_route_tables(RouteTableIds=[resource.id])["RouteTables"]
        for association in tables[0].get("Associations", []) if tables else []:
            if not association.get("Main"):
                self.ec2.disassociate_route_table(AssociationId=association["RouteTableAssociationId"])
        self.ec2.delete_route_table(RouteTableId=resource.id)

    def _delete_nat(self, resource: ResourceRecord, job: StepContext) -> None:
        self.ec2.delete_nat_gateway(NatGatewayId=resource.id)
        job.note(f"waiting for NAT gateway {resource.id} to be deleted (about a minute on AWS)")
        self._wait("ec2", "nat_gateway_deleted", f"NAT gateway {resource.id}", NatGatewayIds=[resource.id])

    def _delete_internet_gateway(self, resource: ResourceRecord, job: StepContext) -> None:
        gateways = self.ec2.describe_internet_gateways(InternetGatewayIds=[resource.id])["InternetGateways"]
        for attachment in gateways[0].get("Attachments", []) if gateways else []:
            self.ec2.detach_internet_gateway(InternetGatewayId=resource.id, VpcId=attachment["VpcId"])
        self.ec2.delete_internet_gateway(InternetGatewayId=resource.id)

    # -- status ------------------------------------------------------------------------------
    def resource_exists(self, resource: ResourceRecord) -> bool:
        checks: dict[str, Callable[[ResourceRecord], Any]] = {
            "eks/cluster": lambda r: self.eks.describe_cluster(name=r.id),
            "eks/nodegroup": lambda r: self.eks.describe_nodegroup(
                clusterName=r.attributes.get("cluster", self.deployment), nodegroupName=r.id),
            "iam/role": lambda r: self.iam.get_role(RoleName=r.id),
            "iam/oidc-provider": lambda r: self.iam.get_open_id_connect_provider(OpenIDConnectProviderArn=r.id),
            "ec2/vpc": lambda r: self.ec2.describe_vpcs(VpcIds=[r.id])["Vpcs"],
            "ec2/subnet": lambda r: self.ec2.describe_subnets(SubnetIds=[r.id])["Subnets"],
            "ec2/internet-gateway": lambda r: self.ec2.describe_internet_gateways(InternetGatewayIds=[r.id])[
                "InternetGateways"],
            "ec2/route-table": lambda r: self.ec2.describe_route_tables(RouteTableIds=[r.id])["RouteTables"],
            "ec2/elastic-ip": lambda r: self.ec2.describe_addresses(AllocationIds=[r.id])["Addresses"],
            "ec2/nat-gateway": lambda r: [n for n in self.ec2.describe_nat_gateways(NatGatewayIds=[r.id])[
                "NatGateways"] if n.get("State") in ("pending", "available")],
            "ecr/repository": lambda r: self.ecr.describe_repositories(repositoryNames=[r.id]),
            "s3/bucket": lambda r: self.s3.head_bucket(Bucket=r.id),
            "helm/release": lambda r: self._cluster_exists(),
        }  # fmt: skip
        check = checks.get(resource.kind)
        if check is None:
            return False
        try:
            with aws_errors(f"checking {resource.label}"):
                return bool(check(resource) or resource.kind in ("iam/oidc-provider", "s3/bucket"))
        except Exception as exc:
            if _gone(exc):
                return False
            raise

    # -- DNS ---------------------------------------------------------------------------------
    def upsert_dns(self, records: Sequence[DnsRecord], *, dry_run: bool = False) -> list[str]:
        from cmbcluster_aws.dns import Route53Dns

        return Route53Dns(self.route53, hosted_zone_id=self.settings.route53_hosted_zone_id).upsert(
            records, dry_run=dry_run
        )

    def close(self) -> None:
        close_clients(self._clients.values())


_GONE_CODES = frozenset(
    {
        "NoSuchEntity", "NoSuchBucket", "ResourceNotFoundException", "RepositoryNotFoundException",
        "InvalidVpcID.NotFound", "InvalidSubnetID.NotFound", "InvalidInternetGatewayID.NotFound",
        "InvalidRouteTableID.NotFound", "InvalidAllocationID.NotFound", "NatGatewayNotFound",
        "InvalidNatGatewayID.NotFound", "InvalidAssociationID.NotFound",
    }
)  # fmt: skip


def _gone(exc: BaseException) -> bool:
    """Whether a failure says the resource no longer exists (deleting it again is then done)."""
    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, ClientError) and error_code(candidate) in _GONE_CODES:
            return True
    return False
