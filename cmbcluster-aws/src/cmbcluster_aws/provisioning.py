"""``cmbcluster infra`` on AWS: the VPC, EKS, IAM, ECR and S3 a CMBCluster deployment runs on.

What ``up`` builds, in order (``cmbcluster infra plan`` lists it with names):

1. IAM roles of the EKS cluster and of its nodes (AWS managed policies attached).
2. A VPC over three availability zones: a public and a private subnet in each, an internet
   gateway, one NAT gateway with its Elastic IP, a public and a private route table.
3. ECR repositories for the images and the S3 database bucket (private, encrypted,
   versioned), before the cluster so that images can be pushed while EKS is being created.
4. The EKS cluster (private and public subnets) and its IAM OIDC provider (for IRSA).
5. Isolation: the VPC CNI as an EKS add-on with its network policy agent enabled (without it the
   chart's NetworkPolicies are not enforced), and a launch template whose instances require IMDSv2
   with a hop limit of 1 (pods cannot reach the node's role through the metadata service).
6. A managed node group in the private subnets, from that launch template.
7. The permissions boundary of per-user roles, and the IRSA roles: the control plane's (per-user
   roles only under its path and only with that boundary), the add-ons' (load balancer controller,
   EBS CSI, Mountpoint for S3 CSI, and cert-manager's, limited to the deployment's hosted zones),
   each trusted by one ServiceAccount only.
8. The add-ons, installed with helm: AWS Load Balancer Controller, EBS CSI driver, Mountpoint for
   S3 CSI driver, cert-manager, ingress-nginx (behind an NLB), and CMBCluster's own cluster-config
   chart: the default StorageClass (gp3, EBS CSI; EKS has none) and the Let's Encrypt ClusterIssuer
   (DNS-01 through Route53). ``--addons print`` prints the commands instead.

Every EC2 resource carries the tags ``cmbcluster:deployment`` and ``cmbcluster:resource``
from the moment it is created (TagSpecifications), and every other resource has a
deterministic name carrying the deployment's name (:mod:`cmbcluster_aws.names`), so a rerun of
``up`` finds what an interrupted run made instead of creating it twice. ``down`` deletes what the
record lists, in reverse order: add-ons, node group, cluster (with the load balancers the controller
made), NAT gateway, Elastic IP, subnets, VPC, S3 bucket, ECR repositories, IAM roles and policies;
and lists what it keeps on purpose (users' buckets and roles, the disks of the cluster's volumes),
which ``--delete-retained`` deletes too.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from botocore.exceptions import ClientError, WaiterError

from cmbcluster.commands.images import IMAGE_NAMES
from cmbcluster.errors import (
    ConfigurationError,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ProviderUnavailable,
)
from cmbcluster.interfaces import (
    DeploymentRecord,
    DnsRecord,
    HelmRelease,
    PlannedStep,
    Provisioner,
    ProvisioningOptions,
    ResourceRecord,
    StepContext,
    Tool,
)
from cmbcluster.kubernetes.rbac import CONTROL_PLANE_SERVICE_ACCOUNT
from cmbcluster.provisioning import (
    CERT_MANAGER,
    INGRESS_NGINX,
    addon_kubeconfig,
    cluster_config_release,
    data_written_during_down,
    install_release,
    refuse_to_delete_data,
    release_step,
    uninstall_release,
    write_kubeconfig,
)
from cmbcluster_aws.clients import close_clients, make_clients, retry_while_propagating
from cmbcluster_aws.errors import aws_errors, error_code, map_aws_error
from cmbcluster_aws.identity import AwsInfra, trust_policy
from cmbcluster_aws.names import (
    S3_BUCKET_NAMES,
    boundary_arn,
    boundary_name,
    control_plane_role_arn,
    infra_path,
    infra_role_name,
    partition_of,
    user_path,
)
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import S3Storage
from cmbcluster_aws.tags import MANAGED_BY, TAG_DEPLOYMENT, TAG_MANAGED_BY

__all__ = ["ADDONS", "TAG_DEPLOYMENT", "AwsProvisioner", "control_plane_role_arn"]

log = logging.getLogger(__name__)
T = TypeVar("T")

TAG_RESOURCE = "cmbcluster:resource"
#: The region a deployment's IAM objects belong to: IAM is global, a deployment is regional, and two
#: deployments of one name in two regions must not adopt each other's roles.
TAG_REGION = "cmbcluster:region"
ZONES = 3
EKS_OIDC_THUMBPRINT = "9e99a48a9960b14926bb7f3b02e22da2b0ab7280"  # IAM ignores it for EKS issuers; the API wants one
MANAGED = "arn:{partition}:iam::aws:policy/"
CLUSTER_POLICIES = ("AmazonEKSClusterPolicy",)
NODE_POLICIES = ("AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryReadOnly")
ROLE_ANNOTATION_KEY = r"eks\.amazonaws\.com/role-arn"  # helm --set needs the dots escaped
NODE_DISK_GIB = 50
#: The VPC CNI's own setting that starts its network policy agent (EKS add-on configuration values).
NETWORK_POLICY_CONFIGURATION = {"enableNetworkPolicy": "true"}
#: The default StorageClass infra up makes: EKS 1.30+ has none, and the chart's claim needs one.
STORAGE_CLASS = "gp3"
EBS_CSI = "ebs.csi.aws.com"
_NLB = r"controller.service.annotations.service\.beta\.kubernetes\.io/aws-load-balancer-"

# Chart versions pinned so that two `up` runs months apart install the same add-ons; raise them
# deliberately. The order is the install order: the load balancer controller first (its webhook
# serves ingress-nginx's Service), cert-manager before the cluster-config chart (its ClusterIssuer).
ADDONS: dict[str, HelmRelease] = {
    "aws-load-balancer-controller": HelmRelease(
        name="aws-load-balancer-controller", chart="aws-load-balancer-controller",
        repo="https://aws.github.io/eks-charts", version="1.14.0", namespace="kube-system",
    ),
    "ebs-csi-driver": HelmRelease(
        name="aws-ebs-csi-driver", chart="aws-ebs-csi-driver",
        repo="https://kubernetes-sigs.github.io/aws-ebs-csi-driver", version="2.48.0", namespace="kube-system",
    ),
    "mountpoint-s3-csi-driver": HelmRelease(
        name="aws-mountpoint-s3-csi-driver", chart="aws-mountpoint-s3-csi-driver",
        repo="https://awslabs.github.io/mountpoint-s3-csi-driver", version="2.1.0", namespace="kube-system",
    ),
    "cert-manager": dataclasses.replace(
        CERT_MANAGER, values={**CERT_MANAGER.values, "securityContext.fsGroup": "1001"}
    ),
    # behind a Network Load Balancer that the load balancer controller makes (IP targets)
    "ingress-nginx": dataclasses.replace(INGRESS_NGINX, values={
        **INGRESS_NGINX.values, f"{_NLB}type": "external", f"{_NLB}nlb-target-type": "ip",
        f"{_NLB}scheme": "internet-facing",
    }),
    "cluster-config": cluster_config_release(deployment=""),  # filled per deployment in _addon
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
    # only with a domain: DNS-01 challenges in the deployment's hosted zones
    "cert-manager": ("cert-manager", "cert-manager", (), f"serviceAccount.annotations.{ROLE_ANNOTATION_KEY}"),
}  # fmt: skip
#: What a sample of `up`'s calls needs, checked with the IAM policy simulator before anything is made.
UP_ACTIONS = (
    "iam:CreateRole", "iam:PutRolePolicy", "iam:AttachRolePolicy", "iam:CreatePolicy", "iam:PassRole",
    "iam:CreateOpenIDConnectProvider", "iam:TagRole", "ec2:CreateVpc", "ec2:CreateSubnet", "ec2:CreateNatGateway",
    "ec2:AllocateAddress", "ec2:CreateInternetGateway", "ec2:CreateRouteTable", "ec2:CreateLaunchTemplate",
    "ec2:CreateTags", "eks:CreateCluster", "eks:CreateNodegroup", "eks:CreateAddon", "eks:DescribeCluster",
    "ecr:CreateRepository", "s3:CreateBucket", "s3:PutBucketPolicy", "s3:PutEncryptionConfiguration",
    "route53:ListHostedZones",
)  # fmt: skip


def _statement(actions: Sequence[str], resources: Sequence[str] | str, **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": list(actions), "Resource": resources, **extra}


def _deny(actions: Sequence[str], resources: Sequence[str] | str, **extra: Any) -> dict[str, Any]:
    return {"Effect": "Deny", "Action": list(actions), "Resource": resources, **extra}


def user_boundary_policy(settings: AwsSettings) -> dict[str, Any]:
    """The most a per-user role may ever do: list users' buckets, read and write their objects."""
    buckets = f"arn:{partition_of(settings.aws_region)}:s3:::{settings.s3_user_bucket_prefix}-*"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "UsersBuckets", **_statement(["s3:ListBucket"], [buckets])},
            {"Sid": "UsersObjects", **_statement(
                ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"], [f"{buckets}/*"]
            )},
        ],
    }  # fmt: skip


def control_plane_policy(settings: AwsSettings, *, database_bucket: str) -> dict[str, Any]:
    """The control plane's permissions (its IRSA role's inline policy; docs/DEPLOYMENT_AWS.md shows them).

    Users' buckets: created safe, used, deleted with every version. The database bucket: backups
    written, read and pruned with delete markers only, never a version deleted nor versioning
    changed, so the backup history survives whatever the control plane does. IAM: roles only under
    the deployment's per-user path, created and written only with its permissions boundary, which
    it can neither remove nor change."""
    p, account, region = partition_of(settings.aws_region), settings.aws_account_id, settings.aws_region
    user_buckets = f"arn:{p}:s3:::{settings.s3_user_bucket_prefix}-*"
    database = f"arn:{p}:s3:::{database_bucket}"
    user_roles = f"arn:{p}:iam::{account}:role{user_path(settings)}*"
    boundary = {"StringEquals": {"iam:PermissionsBoundary": boundary_arn(settings)}}
    statements = [
        {"Sid": "ListBuckets", **_statement(["s3:ListAllMyBuckets"], "*")},
        {"Sid": "UsersBuckets", **_statement(
            ["s3:CreateBucket", "s3:DeleteBucket", "s3:ListBucket", "s3:ListBucketVersions", "s3:GetBucket*",
             "s3:PutBucket*", "s3:DeleteBucketPolicy", "s3:GetEncryptionConfiguration",
             "s3:PutEncryptionConfiguration", "s3:ListBucketMultipartUploads"], [user_buckets])},
        {"Sid": "UsersObjects", **_statement(
            ["s3:GetObject*", "s3:PutObject*", "s3:DeleteObject*", "s3:AbortMultipartUpload",
             "s3:ListMultipartUploadParts"], [f"{user_buckets}/*"])},
        {"Sid": "DatabaseBucket", **_statement(
            ["s3:ListBucket", "s3:GetBucketTagging", "s3:GetBucketLocation"], [database])},
        {"Sid": "DatabaseBackups", **_statement(
            ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
             "s3:ListMultipartUploadParts"], [f"{database}/*"])},
        # even if the database bucket's name matched the users' prefix
        {"Sid": "DatabaseHistoryStays", **_deny(
            ["s3:DeleteObjectVersion", "s3:DeleteBucket", "s3:PutBucketVersioning", "s3:PutLifecycleConfiguration",
             "s3:PutBucketPolicy", "s3:DeleteBucketPolicy", "s3:PutBucketObjectLockConfiguration",
             "s3:BypassGovernanceRetention"], [database, f"{database}/*"])},
        {"Sid": "UserRolesWithTheBoundary", **_statement(
            ["iam:CreateRole", "iam:PutRolePolicy"], user_roles, Condition=boundary)},
        {"Sid": "UserRoles", **_statement(
            ["iam:DeleteRole", "iam:GetRole", "iam:TagRole", "iam:ListRoleTags", "iam:UpdateAssumeRolePolicy",
             "iam:DeleteRolePolicy", "iam:GetRolePolicy", "iam:ListRolePolicies"], user_roles)},
        {"Sid": "NoRoleWithoutTheBoundary", **_deny(
            ["iam:CreateRole", "iam:PutRolePolicy", "iam:AttachRolePolicy"], "*",
            Condition={"StringNotEquals": {"iam:PermissionsBoundary": boundary_arn(settings)}})},
        {"Sid": "TheBoundaryStays", **_deny(
            ["iam:DeleteRolePermissionsBoundary", "iam:PutRolePermissionsBoundary", "iam:CreatePolicyVersion",
             "iam:DeletePolicy", "iam:DeletePolicyVersion", "iam:SetDefaultPolicyVersion"], "*")},
        {"Sid": "Irsa", **_statement(["iam:GetOpenIDConnectProvider"], f"arn:{p}:iam::{account}:oidc-provider/*")},
        {"Sid": "Cluster", **_statement(
            ["eks:DescribeCluster"], f"arn:{p}:eks:{region}:{account}:cluster/{settings.eks_cluster_name}")},
    ]  # fmt: skip
    return {"Version": "2012-10-17", "Statement": statements}


class AwsProvisioner(Provisioner):
    """:class:`~cmbcluster.interfaces.Provisioner` for AWS.

    ``clients`` replaces boto3 clients by service name (tests); ``poll_interval`` is the delay
    between checks while waiting on EKS and NAT gateways; ``propagation_delay`` the longest pause
    between retries of a call that failed because a new IAM role was not visible yet.
    ``domains`` are the deployment's names (the web UI's host, the environments' domain): their
    Route53 zones are where cert-manager answers DNS-01 challenges; ``ingress_namespace`` is where
    ingress-nginx goes (the one namespace the chart's NetworkPolicies admit).
    """

    provider = "aws"

    def __init__(
        self,
        settings: AwsSettings,
        *,
        namespace: str = "cmbcluster",
        clients: dict[str, Any] | None = None,
        database_bucket: str | None = None,
        domains: Sequence[str] = (),
        ingress_namespace: str = "ingress-nginx",
        poll_interval: float = 20.0,
        propagation_delay: float = 10.0,
        max_attempts: int = 5,
    ) -> None:
        problems = S3_BUCKET_NAMES.database_bucket_problems(
            database_bucket, "CMBCLUSTER_DATABASE_BUCKET (S3_DATABASE_BUCKET)"
        )
        if problems:  # before anything is made: S3 would refuse it at the database-bucket step
            raise ConfigurationError(problems)
        self.settings = settings
        self.namespace = namespace
        self.configured_database_bucket = database_bucket
        self.domains = tuple(dict.fromkeys(d.strip(".").lower() for d in domains if d))
        self.ingress_namespace = ingress_namespace
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
        self._hosted_zones: list[tuple[str, str]] | None = None

    # -- names -------------------------------------------------------------------------------
    @property
    def deployment(self) -> str:
        """The deployment's name (CMBCLUSTER_DEPLOYMENT_NAME, else the EKS cluster's): in every name."""
        return self.settings.deployment

    @property
    def cluster(self) -> str:
        """The EKS cluster's name (EKS_CLUSTER_NAME)."""
        return self.settings.eks_cluster_name

    def _name(self, suffix: str) -> str:
        return f"{self.deployment}-{suffix}"

    def role_name(self, suffix: str) -> str:
        name = infra_role_name(self.settings, suffix)
        if len(name) > 64:
            raise InvalidRequest(f"IAM role name {name} is longer than 64 characters: shorten the deployment's name")
        return name

    @property
    def role_path(self) -> str:
        return infra_path(self.settings)

    @property
    def database_bucket(self) -> str:
        return self.configured_database_bucket or f"{self.deployment}-database-{self.settings.aws_account_id}"

    @property
    def repositories(self) -> list[str]:
        prefix = self._infra.registry().repository_prefix
        return [f"{prefix}/{image}" for image in IMAGE_NAMES]

    @property
    def nodegroup_name(self) -> str:
        return self._name("nodes")

    @property
    def launch_template_name(self) -> str:
        return self._name("nodes")

    @property
    def irsa_roles(self) -> list[str]:
        """The IRSA roles of this deployment: cert-manager's only when it has names to certify."""
        return [suffix for suffix in IRSA_ROLES if suffix != "cert-manager" or self.domains]

    def _subnet_cidrs(self) -> tuple[list[str], list[str]]:
        network = ipaddress.ip_network(self.settings.vpc_cidr)  # a /16 to a /24: checked with the settings
        blocks = [str(b) for b in network.subnets(new_prefix=network.prefixlen + 3)]  # 8 blocks: 3 public, 3 private
        return blocks[:ZONES], blocks[4 : 4 + ZONES]

    def _tags(self, resource: str, name: str) -> list[dict[str, str]]:
        return [
            {"Key": "Name", "Value": name},
            {"Key": TAG_DEPLOYMENT, "Value": self.deployment},
            {"Key": TAG_RESOURCE, "Value": resource},
            {"Key": TAG_MANAGED_BY, "Value": MANAGED_BY},
        ]

    def _iam_tags(self, resource: str) -> list[dict[str, str]]:
        return [t for t in self._tags(resource, "") if t["Key"] != "Name"] + [
            {"Key": TAG_REGION, "Value": self.settings.aws_region}
        ]

    def _tag_map(self, resource: str, name: str) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in self._tags(resource, name)}

    def _managed(self, policy: str) -> str:
        return MANAGED.format(partition=self.partition) + policy

    # -- plan --------------------------------------------------------------------------------
    def plan(self) -> list[PlannedStep]:
        public, private = self._subnet_cidrs()
        region, s = self.settings.aws_region, self.settings
        issuer = "the ClusterIssuer letsencrypt (DNS-01, Route53)" if self.domains else "no ClusterIssuer (no domain)"
        steps = [
            PlannedStep(name="cluster-role", description="IAM role the EKS control plane assumes",
                        creates=(f"iam/role {self.role_path}{self.role_name('cluster-role')}",)),
            PlannedStep(name="node-role", description="IAM role of the worker nodes",
                        creates=(f"iam/role {self.role_path}{self.role_name('node-role')}",)),
            PlannedStep(name="vpc", description=f"VPC {s.vpc_cidr} in {region}",
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
                        description=f"EKS cluster {self.cluster}, Kubernetes {s.eks_kubernetes_version}",
                        creates=(f"eks/cluster {self.cluster}",)),
            PlannedStep(name="oidc-provider", description="IAM OIDC provider of the cluster's issuer (IRSA)",
                        creates=("iam/oidc-provider <cluster issuer>",)),
            PlannedStep(name="network-policy",
                        description="VPC CNI as an EKS add-on with its network policy agent (NetworkPolicies enforced)",
                        creates=("eks/addon vpc-cni (enableNetworkPolicy)",)),
            PlannedStep(name="launch-template",
                        description="Launch template of the nodes: IMDSv2 only, hop limit 1 (pods cannot reach "
                        f"the node's role), {NODE_DISK_GIB} GiB encrypted gp3 disk",
                        creates=(f"ec2/launch-template {self.launch_template_name}",)),
            PlannedStep(name="node-group",
                        description=f"Managed node group: {s.eks_node_count} x {s.eks_node_instance_type} "
                        f"(1 to {s.eks_node_max})",
                        creates=(f"eks/nodegroup {self.nodegroup_name}",)),
            PlannedStep(name="user-boundary",
                        description="Permissions boundary of per-user roles: users' buckets at most",
                        creates=(f"iam/policy {self.role_path}{boundary_name(s)}",)),
            PlannedStep(name="irsa-roles", description="IRSA roles: control plane and add-ons, one ServiceAccount each",
                        creates=tuple(f"iam/role {self.role_path}{self.role_name(r)}" for r in self.irsa_roles)),
        ]  # fmt: skip
        whats = {
            "ingress-nginx": f"the ingress controller (class nginx) in {self.ingress_namespace}, behind an NLB",
            "cluster-config": f"the default StorageClass {STORAGE_CLASS} (EBS CSI) and {issuer}",
        }
        return steps + [release_step(key, self._release(key), whats.get(key, "")) for key in ADDONS]

    def _release(self, key: str) -> HelmRelease:
        release = ADDONS[key]
        if key == "ingress-nginx":
            return dataclasses.replace(release, namespace=self.ingress_namespace)
        return release

    def documents(self) -> dict[str, str]:
        """The IAM documents of the manual path (docs/DEPLOYMENT_AWS.md): the control plane's policy, the
        per-user boundary, cert-manager's Route53 policy, and the IRSA trust policies once the cluster exists."""
        files = {
            "controlplane-policy.json": control_plane_policy(self.settings, database_bucket=self.database_bucket),
            "user-boundary.json": user_boundary_policy(self.settings),
        }
        if self.domains:
            files["cert-manager-policy.json"] = self._irsa_policy("cert-manager") or {}
        try:
            with aws_errors(f"EKS cluster {self.cluster}"):
                issuer = self._issuer().removeprefix("https://")
        except (NotFound, ProviderUnavailable):
            issuer = ""  # no cluster yet: no trust policies
        if issuer:
            provider = f"arn:{self.partition}:iam::{self.settings.aws_account_id}:oidc-provider/{issuer}"
            for suffix in ("controlplane", "cert-manager"):
                namespace, account, _managed, _value = IRSA_ROLES[suffix]
                files[f"{suffix}-trust.json"] = trust_policy(provider, issuer, namespace or self.namespace, account)
        return {name: json.dumps(document, indent=2) + "\n" for name, document in files.items()}

    # -- checks before anything is made ------------------------------------------------------
    def preflight(self) -> None:
        """Refuse to touch an account other than AWS_ACCOUNT_ID."""
        with aws_errors("STS caller identity"):
            account = str(self.sts.get_caller_identity().get("Account", ""))
        if account != self.settings.aws_account_id:
            raise ConfigurationError(
                [f"the AWS credentials belong to account {account}, not AWS_ACCOUNT_ID {self.settings.aws_account_id}"]
            )

    def required_tools(self, options: ProvisioningOptions) -> list[Tool]:
        if options.addons != "install":
            return []
        tools = [Tool(name="helm", why="it installs the cluster's add-ons (Helm 3.10 or newer)")]
        if options.kubeconfig is None:
            tools.append(
                Tool(name="aws", why="the kubeconfig `up` writes gets EKS credentials from `aws eks get-token`")
            )
        return tools

    def check_up(self, note: Callable[[str], None]) -> list[str]:
        """The permissions ``up`` needs (the IAM policy simulator on the caller's own policies) and the
        hosted zones of the deployment's names."""
        problems = [f"the credentials may not {action} (IAM policy simulator)" for action in self._denied(note)]
        problems += self._region_problems(note)
        try:
            self.hosted_zones()
        except NotFound as exc:
            problems.append(exc.message)
        return problems

    def _region_problems(self, note: Callable[[str], None]) -> list[str]:
        """What the region cannot give the cluster: the subnets' zones, the nodes' instance type (else the
        first is refused after the VPC is made, the second after the EKS cluster)."""
        problems = []
        try:
            self.availability_zones()
        except ConfigurationError as exc:
            problems += exc.problems
        instance_type, region = self.settings.eks_node_instance_type, self.settings.aws_region
        try:
            with aws_errors("EC2 instance type offerings"):
                offered = self.ec2.describe_instance_type_offerings(
                    LocationType="region", Filters=[{"Name": "instance-type", "Values": [instance_type]}]
                )["InstanceTypeOfferings"]
        except (ProviderUnavailable, PermissionDenied) as exc:
            note(f"cannot check EKS_NODE_INSTANCE_TYPE in advance ({exc.message}); `up` stops at the node group")
            return problems
        if not offered:
            problems.append(f"EKS_NODE_INSTANCE_TYPE {instance_type} is not offered in {region}")
        return problems

    def _denied(self, note: Callable[[str], None]) -> list[str]:
        with aws_errors("STS caller identity"):
            arn = str(self.sts.get_caller_identity().get("Arn", ""))
        account, resource = (arn.split(":", 5) + [""] * 6)[4:6]
        try:
            if resource == "root":
                return []  # the account's root user may do everything
            if resource.startswith("assumed-role/"):
                with aws_errors("IAM role of the credentials"):
                    source = str(self.iam.get_role(RoleName=resource.split("/")[1])["Role"]["Arn"])
            elif resource.startswith("user/"):
                source = f"arn:{self.partition}:iam::{account}:{resource}"
            else:
                note(f"cannot check the permissions of {arn} in advance; `up` stops at the first refusal")
                return []
            with aws_errors("IAM policy simulator"):
                answer = self.iam.simulate_principal_policy(PolicySourceArn=source, ActionNames=list(UP_ACTIONS))
        except (ProviderUnavailable, PermissionDenied) as exc:
            note(f"cannot check the permissions in advance ({exc.message}); `up` stops at the first refusal")
            return []
        return [
            str(r["EvalActionName"]) for r in answer.get("EvaluationResults", []) if r.get("EvalDecision") != "allowed"
        ]

    def hosted_zones(self) -> list[tuple[str, str]]:
        """(zone id, zone name) of each Route53 zone holding one of the deployment's names."""
        if self._hosted_zones is None:
            from cmbcluster_aws.dns import Route53Dns

            dns = Route53Dns(self.route53, hosted_zone_id=self.settings.route53_hosted_zone_id)
            self._hosted_zones = list(dict.fromkeys(dns.zone_for(domain) for domain in self.domains))
        return self._hosted_zones

    # -- up ----------------------------------------------------------------------------------
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
            "network-policy": self._network_policy,
            "launch-template": self._launch_template,
            "node-group": self._node_group,
            "user-boundary": self._user_boundary,
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
        try:
            arn = str(self.iam.get_role(RoleName=name)["Role"]["Arn"])
            owned = {t["Key"]: t["Value"] for t in self.iam.list_role_tags(RoleName=name).get("Tags", [])}
            self._check_owned(f"IAM role {name}", owned)
            self.iam.update_assume_role_policy(RoleName=name, PolicyDocument=document)
            job.adopted(self._role_record(job.step, name, arn))
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
            role = self.iam.create_role(
                RoleName=name, Path=self.role_path, AssumeRolePolicyDocument=document, Tags=self._iam_tags(suffix),
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

    def _check_owned(self, what: str, tags: dict[str, str]) -> None:
        """An IAM object of this name is adopted only when this deployment, in this region, made it."""
        if tags.get(TAG_DEPLOYMENT) != self.deployment:
            raise Conflict(f"{what} exists but does not belong to deployment {self.deployment}")
        region = tags.get(TAG_REGION)
        if region is not None and region != self.settings.aws_region:
            raise Conflict(
                f"{what} belongs to deployment {self.deployment} in {region}: two deployments of one account need "
                "distinct names (set CMBCLUSTER_DEPLOYMENT_NAME)"
            )

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
        cluster_tag = {"Key": f"kubernetes.io/cluster/{self.cluster}", "Value": "shared"}
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

    def _retrying_propagation(self, call: Callable[[], T], what: str) -> T:
        """IAM is eventually consistent: EKS may not see a role made seconds ago. Retry that case only."""

        def pending(exc: ClientError) -> bool:
            message = str(exc.response.get("Error", {}).get("Message", ""))
            return error_code(exc) == "InvalidParameterException" and "role" in message.lower()

        try:
            return retry_while_propagating(
                call, pending=pending, what=what, window=self.propagation_delay * 8, first_delay=self.propagation_delay,
                max_delay=self.propagation_delay,
            )  # fmt: skip
        except ClientError as exc:
            if pending(exc):
                raise map_aws_error(exc, what) from exc
            raise

    def _cluster(self, job: StepContext) -> None:
        name = self.cluster
        try:
            cluster = self.eks.describe_cluster(name=name)["cluster"]
            if cluster.get("tags", {}).get(TAG_DEPLOYMENT) != self.deployment:
                raise Conflict(
                    f"EKS cluster {name} exists but was not made by `cmbcluster infra up` for {self.deployment}"
                )
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
        if addon_kubeconfig(job)[1]:
            self._write_kubeconfig(job)

    def _write_kubeconfig(self, job: StepContext) -> None:
        with aws_errors(f"EKS cluster {self.cluster}"):
            cluster = self.eks.describe_cluster(name=self.cluster)["cluster"]
        write_kubeconfig(
            addon_kubeconfig(job)[0],
            name=self.cluster,
            server=str(cluster.get("endpoint") or ""),
            certificate_authority_data=str(cluster.get("certificateAuthority", {}).get("data") or ""),
            command="aws",
            args=["eks", "get-token", "--cluster-name", self.cluster, "--region", self.settings.aws_region,
                  "--output", "json"],
        )  # fmt: skip

    def _issuer(self) -> str:
        cluster = self.eks.describe_cluster(name=self.cluster)["cluster"]
        issuer = str(cluster.get("identity", {}).get("oidc", {}).get("issuer") or "")
        if not issuer.startswith("https://"):
            raise ProviderUnavailable(f"EKS cluster {self.cluster} reports no OIDC issuer yet; rerun `up`")
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

    def _network_policy(self, job: StepContext) -> None:
        """The VPC CNI as a managed add-on with its network policy agent: NetworkPolicies enforced."""
        wanted = json.dumps(NETWORK_POLICY_CONFIGURATION, sort_keys=True)
        record = ResourceRecord(step=job.step, kind="eks/addon", id="vpc-cni", name="vpc-cni",
                                attributes={"cluster": self.cluster})  # fmt: skip
        try:
            addon = self.eks.describe_addon(clusterName=self.cluster, addonName="vpc-cni")["addon"]
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            self.eks.create_addon(
                clusterName=self.cluster, addonName="vpc-cni", configurationValues=wanted,
                resolveConflicts="OVERWRITE", tags=self._tag_map("network-policy", "vpc-cni"),
            )  # fmt: skip
            job.created(record)
        else:
            job.adopted(record)
            current = json.loads(addon.get("configurationValues") or "{}")
            if current.get("enableNetworkPolicy") != "true":
                job.note("the VPC CNI add-on ran without its network policy agent: enabling it")
                self.eks.update_addon(
                    clusterName=self.cluster, addonName="vpc-cni", resolveConflicts="OVERWRITE",
                    configurationValues=json.dumps({**current, **NETWORK_POLICY_CONFIGURATION}, sort_keys=True),
                )  # fmt: skip
        self._wait("eks", "addon_active", "the VPC CNI add-on", clusterName=self.cluster, addonName="vpc-cni")

    def _launch_template_data(self) -> dict[str, Any]:
        node_tags = [t for t in self._tags("node", self._name("node")) if t["Key"] != TAG_RESOURCE]
        return {
            # IMDSv2 only, and a hop limit of 1: the metadata service answers the node, never a pod
            # (each pod is one network hop further), so no pod can take the node's IAM role.
            "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"},
            "BlockDeviceMappings": [{"DeviceName": "/dev/xvda", "Ebs": {
                "VolumeSize": NODE_DISK_GIB, "VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True}}],
            "TagSpecifications": [{"ResourceType": "instance", "Tags": node_tags},
                                  {"ResourceType": "volume", "Tags": node_tags}],
        }  # fmt: skip

    def _launch_template(self, job: StepContext) -> None:
        name = self.launch_template_name
        data = self._launch_template_data()
        template, adopted = self._tagged(
            job, kind="ec2/launch-template", name=name, tag="launch-template",
            describe=("describe_launch_templates", "LaunchTemplates"), id_key="LaunchTemplateId",
            create=lambda: self.ec2.create_launch_template(
                LaunchTemplateName=name, LaunchTemplateData=data,
                TagSpecifications=self._spec("launch-template", "launch-template", name),
            )["LaunchTemplate"],
        )  # fmt: skip
        if adopted:
            template_id = str(template["LaunchTemplateId"])
            versions = self.ec2.describe_launch_template_versions(LaunchTemplateId=template_id, Versions=["$Default"])
            current = versions["LaunchTemplateVersions"][0]["LaunchTemplateData"].get("MetadataOptions", {})
            if {k: current.get(k) for k in data["MetadataOptions"]} != data["MetadataOptions"]:
                job.note(f"launch template {name} let pods reach the metadata service: a new default version fixes it")
                version = self.ec2.create_launch_template_version(LaunchTemplateId=template_id, LaunchTemplateData=data)
                number = str(version["LaunchTemplateVersion"]["VersionNumber"])
                self.ec2.modify_launch_template(LaunchTemplateId=template_id, DefaultVersion=number)

    def _node_group(self, job: StepContext) -> None:
        name = self.nodegroup_name
        record = ResourceRecord(step=job.step, kind="eks/nodegroup", id=name, name=name,
                                attributes={"cluster": self.cluster})  # fmt: skip
        try:
            self.eks.describe_nodegroup(clusterName=self.cluster, nodegroupName=name)
            job.adopted(record)
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            role_arn = job.record.find("iam/role", name=self.role_name("node-role"))[0].attributes["arn"]
            template = self._recorded_id(job, "ec2/launch-template", self.launch_template_name)
            settings = self.settings
            self._retrying_propagation(
                lambda: self.eks.create_nodegroup(
                    clusterName=self.cluster, nodegroupName=name, nodeRole=role_arn,
                    subnets=self._subnet_ids(job, "private"), instanceTypes=[settings.eks_node_instance_type],
                    scalingConfig={"minSize": 1, "desiredSize": settings.eks_node_count,
                                   "maxSize": settings.eks_node_max},
                    amiType="AL2023_x86_64_STANDARD", capacityType="ON_DEMAND",
                    launchTemplate={"id": template},  # its default version: IMDS hop limit 1, the disk
                    tags=self._tag_map("node-group", name),
                ),
                f"EKS node group {name}",
            )  # fmt: skip
            job.created(record)
        job.note(f"waiting for node group {name} to be ACTIVE (about 3-5 minutes on AWS)")
        self._wait("eks", "nodegroup_active", f"node group {name}", clusterName=self.cluster, nodegroupName=name)

    def _user_boundary(self, job: StepContext) -> None:
        """The managed policy every per-user role carries as its permissions boundary."""
        arn, name = boundary_arn(self.settings), boundary_name(self.settings)
        document = json.dumps(user_boundary_policy(self.settings), sort_keys=True)
        record = ResourceRecord(step=job.step, kind="iam/policy", id=arn, name=name)
        try:
            policy = self.iam.get_policy(PolicyArn=arn)["Policy"]
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
            self.iam.create_policy(
                PolicyName=name, Path=self.role_path, PolicyDocument=document, Tags=self._iam_tags("user-boundary"),
                Description=f"CMBCluster deployment {self.deployment}: the most a user's role may do",
            )  # fmt: skip
            job.created(record)
            return
        tags = {t["Key"]: t["Value"] for t in self.iam.list_policy_tags(PolicyArn=arn).get("Tags", [])}
        self._check_owned(f"IAM policy {name}", tags)
        job.adopted(record)
        version = self.iam.get_policy_version(PolicyArn=arn, VersionId=policy["DefaultVersionId"])["PolicyVersion"]
        current = version["Document"]
        current = current if isinstance(current, dict) else json.loads(urllib.parse.unquote(str(current)))
        if json.dumps(current, sort_keys=True) != document:
            versions = self.iam.list_policy_versions(PolicyArn=arn)["Versions"]
            old = [v for v in versions if not v.get("IsDefaultVersion")]
            if len(versions) >= 5 and old:  # IAM keeps five versions at most
                self.iam.delete_policy_version(PolicyArn=arn, VersionId=old[-1]["VersionId"])
            self.iam.create_policy_version(PolicyArn=arn, PolicyDocument=document, SetAsDefault=True)
            job.note(f"IAM policy {name} updated to the users' bucket prefix {self.settings.s3_user_bucket_prefix}")

    def _irsa_roles(self, job: StepContext) -> None:
        oidc = job.record.find("iam/oidc-provider")
        if not oidc:
            raise ConfigurationError(["the cluster's OIDC provider is not in the record: rerun `cmbcluster infra up`"])
        provider_arn, issuer_id = oidc[0].id, oidc[0].name
        for suffix in self.irsa_roles:
            namespace, service_account, managed, _value = IRSA_ROLES[suffix]
            trust = trust_policy(provider_arn, issuer_id, namespace or self.namespace, service_account)
            self._role(job, suffix, trust, managed, self._irsa_policy(suffix))

    def _irsa_policy(self, suffix: str) -> dict[str, Any] | None:
        p = self.partition
        user_buckets = f"arn:{p}:s3:::{self.settings.s3_user_bucket_prefix}-*"
        statements: list[dict[str, Any]]
        if suffix == "controlplane":
            return control_plane_policy(self.settings, database_bucket=self.database_bucket)
        if suffix == "mountpoint-s3-csi-driver":
            statements = [
                _statement(["s3:ListBucket"], [user_buckets]),
                _statement(["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                           [f"{user_buckets}/*"]),
            ]  # fmt: skip
        elif suffix == "cert-manager":
            # cert-manager's documented Route53 policy, limited to the deployment's zones and to the TXT
            # records of ACME challenges.
            zones = [f"arn:{p}:route53:::hostedzone/{zone_id}" for zone_id, _name in self.hosted_zones()]
            statements = [
                _statement(["route53:GetChange"], f"arn:{p}:route53:::change/*"),
                _statement(["route53:ListResourceRecordSets"], zones),
                _statement(["route53:ChangeResourceRecordSets"], zones, Condition={
                    "ForAllValues:StringEquals": {"route53:ChangeResourceRecordSetsRecordTypes": ["TXT"]},
                    "ForAllValues:StringLike": {"route53:ChangeResourceRecordSetsNormalizedRecordNames":
                                                ["_acme-challenge.*"]},
                }),
                _statement(["route53:ListHostedZonesByName"], "*"),
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
                continue
            # `down` deletes what it adopted, images and all: never another deployment's repository
            tags = self.ecr.list_tags_for_resource(resourceArn=found["repositoryArn"]).get("tags", [])
            if {t["Key"]: t["Value"] for t in tags}.get(TAG_DEPLOYMENT) != self.deployment:
                raise Conflict(f"ECR repository {name} exists but does not belong to deployment {self.deployment}")
            job.adopted(ResourceRecord(step=job.step, kind="ecr/repository", id=name, name=name,
                                       attributes={"uri": str(found["repositoryUri"])}))  # fmt: skip

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
        release = self._release(key)
        values = dict(release.values)
        if key in IRSA_ROLES:
            roles = job.record.find("iam/role", name=self.role_name(key))
            if roles:
                values[IRSA_ROLES[key][3]] = roles[0].attributes["arn"]
            elif key in self.irsa_roles:
                raise ConfigurationError([f"the IRSA role of {key} is not in the record: rerun `cmbcluster infra up`"])
        if key == "aws-load-balancer-controller":
            values.update({"clusterName": self.cluster, "region": self.settings.aws_region,
                           "vpcId": self._recorded_id(job, "ec2/vpc", self._name("vpc"))})  # fmt: skip
        if key == "ebs-csi-driver":
            values["controller.k8sTagClusterId"] = self.cluster  # tags the disks it makes with the cluster
        if key == "cluster-config":
            release = self._cluster_config()
            values = dict(release.values)
        kubeconfig, ours = addon_kubeconfig(job)
        if ours and not kubeconfig.exists():
            self._write_kubeconfig(job)
        install_release(job, dataclasses.replace(release, values=values), kubeconfig)

    def _cluster_config(self) -> HelmRelease:
        """The default StorageClass (EKS has none: the control plane's claim would stay Pending) and the
        ClusterIssuer answering DNS-01 in Route53 with cert-manager's IRSA role."""
        dns01: dict[str, Any] | None = None
        if self.domains:
            route53: dict[str, Any] = {"region": self.settings.aws_region}
            zones = self.hosted_zones()
            if len(zones) == 1:
                route53["hostedZoneID"] = zones[0][0]
            dns01 = {"route53": route53}
        return cluster_config_release(
            deployment=self.deployment,
            storage_class={
                "name": STORAGE_CLASS, "provisioner": EBS_CSI, "default": True, "reclaimPolicy": "Retain",
                # every disk tagged with the deployment: `down` finds what the cluster leaves behind
                "parameters": {"type": "gp3", "encrypted": "true",
                               "tagSpecification_1": f"{TAG_DEPLOYMENT}={self.deployment}"},
            },
            dns01=dns01, email=self.settings.letsencrypt_email, acme_server=self.settings.acme_server,
        )  # fmt: skip

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
            # the add-on goes with the cluster; its DaemonSet keeps running until then
            "eks/addon": lambda r, c: self.eks.delete_addon(clusterName=r.attributes.get("cluster", self.cluster),
                                                            addonName=r.id, preserve=True),
            "eks/cluster": self._delete_cluster,
            "ec2/launch-template": lambda r, c: self.ec2.delete_launch_template(LaunchTemplateId=r.id),
            "iam/oidc-provider": lambda r, c: self.iam.delete_open_id_connect_provider(OpenIDConnectProviderArn=r.id),
            "iam/role": lambda r, c: self._delete_role(r.id),
            "iam/policy": lambda r, c: self._delete_policy(r.id),
            "ec2/route-table": self._delete_route_table,
            "ec2/nat-gateway": self._delete_nat,
            "ec2/elastic-ip": lambda r, c: self.ec2.release_address(AllocationId=r.id),
            "ec2/subnet": lambda r, c: self.ec2.delete_subnet(SubnetId=r.id),
            "ec2/internet-gateway": self._delete_internet_gateway,
            "ec2/vpc": lambda r, c: self.ec2.delete_vpc(VpcId=r.id),
            "ecr/repository": lambda r, c: self.ecr.delete_repository(repositoryName=r.id, force=True),
            "s3/bucket": lambda r, c: self._storage().delete_bucket(r.id, force=c.options.delete_data),
        }  # fmt: skip
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

    # -- what `down` keeps unless told -------------------------------------------------------
    def retained(self, record: DeploymentRecord) -> list[ResourceRecord]:
        """Per-user IAM roles (under the deployment's path), users' buckets (the deployment's prefix,
        managed by CMBCluster) and the EBS volumes of the cluster's claims (tagged with the deployment)."""
        found: list[ResourceRecord] = []
        with aws_errors("the deployment's per-user IAM roles"):
            for page in self.iam.get_paginator("list_roles").paginate(PathPrefix=user_path(self.settings)):
                for role in page.get("Roles", []):
                    found.append(ResourceRecord(step="retained", kind="iam/user-role", id=str(role["RoleName"]),
                                                name=str(role["RoleName"]),
                                                attributes={"why": "a user's IAM role (no data)"}))  # fmt: skip
        storage = self._storage()
        prefix = f"{self.settings.s3_user_bucket_prefix}-"
        with aws_errors("the deployment's users' buckets"):
            names = [str(b["Name"]) for b in self.s3.list_buckets().get("Buckets", []) if b["Name"].startswith(prefix)]
        ours = {self.database_bucket, *(r.id for r in record.find("s3/bucket"))}
        for name in names:
            try:
                if name in ours or storage.owner_of(name) is None:
                    continue
            except NotFound:
                continue
            found.append(ResourceRecord(step="retained", kind="s3/user-bucket", id=name, name=name,
                                        attributes={"why": "a user's bucket, with all its data"}))  # fmt: skip
        with aws_errors("the deployment's EBS volumes"):
            volumes = self.ec2.describe_volumes(
                Filters=[{"Name": f"tag:{TAG_DEPLOYMENT}", "Values": [self.deployment]}]
            )
        for volume in volumes.get("Volumes", []):
            tags = {t["Key"]: t["Value"] for t in volume.get("Tags", [])}
            claim = tags.get("kubernetes.io/created-for/pvc/name", "")
            found.append(ResourceRecord(
                step="retained", kind="ec2/volume", id=str(volume["VolumeId"]), name=claim or str(volume["VolumeId"]),
                attributes={"why": f"a disk of the cluster ({volume.get('Size', '?')} GiB"
                                   + (f", claim {claim}" if claim else "") + "), kept by its StorageClass"},
            ))  # fmt: skip
        return found

    def delete_retained(self, resource: ResourceRecord, job: StepContext) -> None:
        try:
            with aws_errors(f"deleting {resource.label}"):
                if resource.kind == "iam/user-role":
                    self._delete_role(resource.id)
                elif resource.kind == "s3/user-bucket":
                    self._storage().delete_bucket(resource.id, force=True)
                elif resource.kind == "ec2/volume":
                    self._retry_dependency(functools.partial(self.ec2.delete_volume, VolumeId=resource.id),
                                           codes=("VolumeInUse",))  # fmt: skip
                else:
                    raise InvalidRequest(f"{resource.label} is not something `down` can delete")
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
        subnets, VPC, then disks, S3 buckets, ECR repositories, and IAM (users' roles, the OIDC provider,
        roles, the boundary policy) last, so that nothing still running loses its permissions first.
        Within each group, reverse creation."""
        last = ("ec2/volume", "s3/user-bucket", "s3/bucket", "ecr/repository", "iam/user-role", "iam/oidc-provider",
                "iam/role", "iam/policy")  # fmt: skip
        ordered = list(reversed(resources))
        rest = [r for r in ordered if r.kind not in last]
        return rest + [r for kind in last for r in ordered if r.kind == kind]

    def _delete_release(self, resource: ResourceRecord, job: StepContext) -> None:
        kubeconfig, ours = addon_kubeconfig(job)
        if kubeconfig.exists() or self._cluster_exists():
            if ours and not kubeconfig.exists():
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
                    if tags.get(tag) != self.cluster:
                        continue
                    job.note(f"deleting {kind} {description['ResourceArn']} made by the load balancer controller")
                    if kind == "load balancer":
                        self.elbv2.delete_load_balancer(LoadBalancerArn=description["ResourceArn"])
                    else:
                        self.elbv2.delete_target_group(TargetGroupArn=description["ResourceArn"])
        groups = self.ec2.describe_security_groups(Filters=[{"Name": f"tag:{tag}", "Values": [self.cluster]}])
        for group in groups["SecurityGroups"]:
            job.note(f"deleting security group {group['GroupId']} made by the load balancer controller")
            self._retry_dependency(functools.partial(self.ec2.delete_security_group, GroupId=group["GroupId"]))

    def _retry_dependency(
        self, call: Callable[[], object], attempts: int = 30, codes: Sequence[str] = ("DependencyViolation",)
    ) -> None:
        """A just-deleted load balancer keeps its network interfaces for a minute, a disk stays attached
        while its node goes: retry DependencyViolation (or ``codes``)."""
        for attempt in range(attempts):
            try:
                call()
                return
            except ClientError as exc:
                if error_code(exc) not in codes or attempt == attempts - 1:
                    raise
                time.sleep(self.poll_interval)

    def _cluster_exists(self) -> bool:
        try:
            self.eks.describe_cluster(name=self.cluster)
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return False
            raise
        return True

    def _delete_nodegroup(self, resource: ResourceRecord, job: StepContext) -> None:
        cluster = resource.attributes.get("cluster", self.cluster)
        self.eks.delete_nodegroup(clusterName=cluster, nodegroupName=resource.id)
        job.note(f"waiting for node group {resource.id} to be deleted")
        self._wait("eks", "nodegroup_deleted", f"node group {resource.id}", clusterName=cluster,
                   nodegroupName=resource.id)  # fmt: skip

    def _delete_cluster(self, resource: ResourceRecord, job: StepContext) -> None:
        self._delete_controller_leftovers(job)
        self.eks.delete_cluster(name=resource.id)
        job.note(f"waiting for EKS cluster {resource.id} to be deleted")
        self._wait("eks", "cluster_deleted", f"EKS cluster {resource.id}", name=resource.id)
        kubeconfig, ours = addon_kubeconfig(job)
        if ours:
            kubeconfig.unlink(missing_ok=True)

    def _delete_policy(self, arn: str) -> None:
        for version in self.iam.list_policy_versions(PolicyArn=arn).get("Versions", []):
            if not version.get("IsDefaultVersion"):
                self.iam.delete_policy_version(PolicyArn=arn, VersionId=version["VersionId"])
        self.iam.delete_policy(PolicyArn=arn)

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
                clusterName=r.attributes.get("cluster", self.cluster), nodegroupName=r.id),
            "eks/addon": lambda r: self.eks.describe_addon(
                clusterName=r.attributes.get("cluster", self.cluster), addonName=r.id),
            "ec2/launch-template": lambda r: self.ec2.describe_launch_templates(LaunchTemplateIds=[r.id])[
                "LaunchTemplates"],
            "iam/policy": lambda r: self.iam.get_policy(PolicyArn=r.id),
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

    def delete_dns(self, record: DnsRecord) -> bool:
        from cmbcluster_aws.dns import Route53Dns

        return Route53Dns(self.route53, hosted_zone_id=self.settings.route53_hosted_zone_id).delete(record)

    def close(self) -> None:
        close_clients(self._clients.values())


_GONE_CODES = frozenset(
    {
        "NoSuchEntity", "NoSuchBucket", "ResourceNotFoundException", "RepositoryNotFoundException",
        "InvalidVolume.NotFound", "InvalidLaunchTemplateId.NotFound", "InvalidLaunchTemplateId.NotFoundException",
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
