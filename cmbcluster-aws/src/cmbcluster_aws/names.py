"""Every AWS name of a deployment, in one place: its IAM paths, roles, the per-user permissions
boundary, bucket prefixes. No boto3 here: ``cmbcluster deploy`` and the docs' tests use it too.

Each name carries the deployment's name (``CMBCLUSTER_DEPLOYMENT_NAME``, default the EKS cluster's),
so two deployments in one account never share a role, a path, a bucket prefix or a repository:

- ``/cmbcluster-infra/<deployment>/``: the roles ``infra up`` makes (the cluster's, the nodes', the
  IRSA roles of the control plane and of the add-ons) and the permissions boundary of per-user roles;
- ``/cmbcluster-users/<deployment>/``: the per-user roles the control plane makes, and nothing else.
  The control plane may create and change roles under this path only, and only with the boundary
  attached (``iam:PermissionsBoundary``), which it cannot change: whatever it writes into a per-user
  role, that role can reach users' buckets and nothing more.
"""

from __future__ import annotations

from cmbcluster.naming import BucketNameRules, dns_label, short_id
from cmbcluster_aws.settings import AwsSettings

__all__ = [
    "INFRA_PATH_ROOT",
    "S3_BUCKET_NAMES",
    "USER_PATH_ROOT",
    "boundary_arn",
    "boundary_name",
    "control_plane_role_arn",
    "infra_path",
    "infra_role_name",
    "partition_of",
    "user_path",
    "user_role_name",
]

INFRA_PATH_ROOT = "/cmbcluster-infra/"
USER_PATH_ROOT = "/cmbcluster-users/"

#: S3's rules for general purpose bucket names (``S3Storage.bucket_names``): a database bucket
#: with dots is valid; a name S3 reserves (``xn--``..., ...``-s3alias``) is not.
S3_BUCKET_NAMES = BucketNameRules(
    pattern=(
        r"(?!xn--|sthree-|amzn-s3-demo-)(?!.*\.\.)(?!\d+\.\d+\.\d+\.\d+$)"
        r"(?!.*(?:-s3alias|--ol-s3|\.mrap|--x-s3|--table-s3)$)[a-z0-9][a-z0-9.-]*[a-z0-9]"
    ),
    description=(
        "3-63 lower-case letters, digits, '.' and '-', starting and ending with a letter or digit, without '..', "
        "not an IP address, not starting with 'xn--', 'sthree-' or 'amzn-s3-demo-' nor ending with '-s3alias', "
        "'--ol-s3', '.mrap', '--x-s3' or '--table-s3' (S3's rules)"
    ),
)


def partition_of(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def infra_path(settings: AwsSettings) -> str:
    """The IAM path of what ``infra up`` makes in IAM for this deployment."""
    return f"{INFRA_PATH_ROOT}{settings.deployment}/"


def user_path(settings: AwsSettings) -> str:
    """The IAM path of this deployment's per-user roles: nothing else lives under it."""
    return f"{USER_PATH_ROOT}{settings.deployment}/"


def infra_role_name(settings: AwsSettings, suffix: str) -> str:
    """``<deployment>-<suffix>``: ``cluster-role``, ``node-role``, ``controlplane``, an add-on's."""
    return f"{settings.deployment}-{suffix}"


def user_role_name(settings: AwsSettings, user_id: str) -> str:
    """``<deployment>-user-<first 10 characters of the user id>`` (never an e-mail address)."""
    return dns_label(settings.deployment, "user", short_id(user_id))


def boundary_name(settings: AwsSettings) -> str:
    return f"{settings.deployment}-user-boundary"


def boundary_arn(settings: AwsSettings) -> str:
    """The managed policy every per-user role carries as its permissions boundary."""
    return (
        f"arn:{partition_of(settings.aws_region)}:iam::{settings.aws_account_id}:policy"
        f"{infra_path(settings)}{boundary_name(settings)}"
    )


def control_plane_role_arn(settings: AwsSettings) -> str:
    """The IRSA role ``infra up`` makes for the control plane's ServiceAccount; ``cmbcluster deploy``
    annotates the chart's ServiceAccount with it."""
    return (
        f"arn:{partition_of(settings.aws_region)}:iam::{settings.aws_account_id}:role"
        f"{infra_path(settings)}{infra_role_name(settings, 'controlplane')}"
    )
