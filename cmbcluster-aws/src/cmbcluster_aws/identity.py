"""AWS infra: per-user IAM roles for service accounts (IRSA), the ECR registry and DNS names.

Every user gets a Kubernetes ServiceAccount, ``cmbcluster-user-<short id>``, and an IAM role,
``<deployment>-user-<short id>`` under ``/cmbcluster-users/<deployment>/`` (:mod:`cmbcluster_aws.names`),
both built from CMBCluster's opaque user id (never an e-mail address). The role carries the
deployment's permissions boundary (users' buckets at most), which the control plane cannot change.
Its trust policy admits only ``sts:AssumeRoleWithWebIdentity`` through the EKS cluster's IAM OIDC
provider, and only for ``system:serviceaccount:<namespace>:<that service account>``. Its one inline
policy, ``cmbcluster-buckets``, grants that user's buckets and nothing else; it is rewritten by
:meth:`AwsInfra.update_user_buckets` whenever the user's buckets change.

boto3 comes in through this module's imports only (the plugin imports it lazily). botocore
failures go through :func:`cmbcluster_aws.errors.map_aws_error`, the plugin's one error mapping.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from cmbcluster.errors import (
    ConfigurationError,
    Conflict,
    InvalidRequest,
    LimitExceeded,
    ProviderUnavailable,
)
from cmbcluster.interfaces import CloudIdentity, DnsInfo, InfraProvider, RegistryInfo, RegistryLogin, UserRef
from cmbcluster.naming import dns_label, short_id
from cmbcluster_aws.clients import close_clients, make_clients
from cmbcluster_aws.errors import aws_errors, error_code, map_aws_error
from cmbcluster_aws.names import S3_BUCKET_NAMES, boundary_arn, partition_of, user_path, user_role_name
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.tags import MANAGED_BY, TAG_DEPLOYMENT, TAG_MANAGED_BY, TAG_OWNER

__all__ = [
    "BUCKET_POLICY_NAME",
    "ROLE_ANNOTATION",
    "AwsInfra",
    "bucket_access_policy",
    "partition_of",
    "trust_policy",
]

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_PREFIX = "cmbcluster-user"
BUCKET_POLICY_NAME = "cmbcluster-buckets"
ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"
STS_AUDIENCE = "sts.amazonaws.com"
OBJECT_ACTIONS = ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")
MAX_INLINE_POLICY_CHARS = 10_240  # IAM's limit for all inline policies of a role (whitespace excluded)

_NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _document(value: Any) -> dict[str, Any]:
    """A policy document as IAM returns it: already parsed by botocore, or URL-encoded JSON."""
    if isinstance(value, dict):
        return value
    parsed = json.loads(urllib.parse.unquote(str(value)))
    if not isinstance(parsed, dict):
        raise ValueError("policy document is not a JSON object")
    return parsed


def _dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"))


def trust_policy(provider_arn: str, issuer_id: str, namespace: str, service_account: str) -> dict[str, Any]:
    """Only ``system:serviceaccount:<namespace>:<service_account>``, through the cluster's OIDC provider.

    ``issuer_id`` is the issuer without its scheme (``oidc.eks.<region>.amazonaws.com/id/<id>``),
    the prefix IAM uses for the provider's condition keys.
    """
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Federated": provider_arn},
                "Action": "sts:AssumeRoleWithWebIdentity",
                "Condition": {
                    "StringEquals": {
                        f"{issuer_id}:sub": f"system:serviceaccount:{namespace}:{service_account}",
                        f"{issuer_id}:aud": STS_AUDIENCE,
                    }
                },
            }
        ],
    }


def bucket_access_policy(buckets: Sequence[str], *, partition: str = "aws") -> dict[str, Any]:
    """Listing of each bucket and read/write/delete of its objects; no other resource, no ``*`` resource."""
    arns = [f"arn:{partition}:s3:::{bucket}" for bucket in buckets]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "CmbclusterUserList", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": arns},
            {
                "Sid": "CmbclusterUserObjects",
                "Effect": "Allow",
                "Action": list(OBJECT_ACTIONS),
                "Resource": [f"{arn}/*" for arn in arns],
            },
        ],
    }


class AwsInfra(InfraProvider):
    """:class:`~cmbcluster.interfaces.InfraProvider` on EKS (IRSA), ECR and the deployment's domain.

    ``clients`` replaces the boto3 clients by service name (``iam``, ``eks``, ``ecr``, ``sts``;
    tests); ``domain`` is the deployment's host name (AwsSettings has no DNS setting, so the
    plugin passes core's public host).
    """

    def __init__(
        self,
        settings: AwsSettings,
        *,
        domain: str = "localhost",
        clients: dict[str, Any] | None = None,
        max_attempts: int = 3,
        connect_timeout: float = 3.0,
        read_timeout: float = 20.0,
    ) -> None:
        self.settings = settings
        self.domain = domain
        self.partition = partition_of(settings.aws_region)
        self._issuer: str | None = None
        made = make_clients(
            settings, ("iam", "eks", "ecr", "sts"), given=clients, max_attempts=max_attempts,
            connect_timeout=connect_timeout, read_timeout=read_timeout,
        )  # fmt: skip
        self._iam: Any = made["iam"]
        self._eks: Any = made["eks"]
        self._ecr: Any = made["ecr"]
        self._sts: Any = made["sts"]

    # -- names -------------------------------------------------------------------------------
    @staticmethod
    def service_account_name(user: UserRef) -> str:
        """The user's Kubernetes ServiceAccount: ``cmbcluster-user-<short id>``."""
        return dns_label(SERVICE_ACCOUNT_PREFIX, short_id(user.id))

    def role_name(self, user: UserRef) -> str:
        """The user's IAM role: ``<deployment>-user-<short id>``, under the deployment's per-user path."""
        return user_role_name(self.settings, user.id)

    @property
    def role_path(self) -> str:
        return user_path(self.settings)

    @property
    def permissions_boundary(self) -> str:
        return boundary_arn(self.settings)

    # -- OIDC --------------------------------------------------------------------------------
    def oidc_issuer(self) -> str:
        """The EKS cluster's OIDC issuer URL (cached: it never changes for a cluster)."""
        if self._issuer is None:
            name = self.settings.eks_cluster_name
            with aws_errors(f"EKS cluster {name}"):
                cluster = self._eks.describe_cluster(name=name)["cluster"]
            issuer = str(cluster.get("identity", {}).get("oidc", {}).get("issuer") or "")
            if not issuer.startswith("https://"):
                raise ConfigurationError([f"EKS cluster {name} has no OIDC issuer; enable IRSA on the cluster"])
            self._issuer = issuer.rstrip("/")
        return self._issuer

    def oidc_provider_arn(self) -> str:
        issuer_id = self.oidc_issuer().removeprefix("https://")
        return f"arn:{self.partition}:iam::{self.settings.aws_account_id}:oidc-provider/{issuer_id}"

    def _check_oidc_provider(self, arn: str) -> None:
        try:
            self._iam.get_open_id_connect_provider(OpenIDConnectProviderArn=arn)
        except ClientError as exc:
            if error_code(exc) == "NoSuchEntity":
                raise ConfigurationError(
                    [f"the IAM OIDC provider {arn} of EKS cluster {self.settings.eks_cluster_name} does not exist"]
                ) from exc
            raise map_aws_error(exc, f"IAM OIDC provider {arn}") from exc
        except BotoCoreError as exc:
            raise map_aws_error(exc, f"IAM OIDC provider {arn}") from exc

    # -- identity ----------------------------------------------------------------------------
    def ensure_user_identity(self, user: UserRef, *, namespace: str) -> CloudIdentity:
        if not _NAMESPACE.match(namespace):
            raise InvalidRequest(f"namespace {namespace!r} is not a valid Kubernetes namespace name")
        service_account = self.service_account_name(user)
        name = self.role_name(user)
        provider_arn = self.oidc_provider_arn()
        self._check_oidc_provider(provider_arn)
        document = _dumps(
            trust_policy(provider_arn, self.oidc_issuer().removeprefix("https://"), namespace, service_account)
        )
        tags = [
            {"Key": TAG_OWNER, "Value": user.id},
            {"Key": TAG_MANAGED_BY, "Value": MANAGED_BY},
            {"Key": TAG_DEPLOYMENT, "Value": self.settings.deployment},
        ]
        what = f"IAM role {name}"
        try:
            role = self._iam.create_role(
                RoleName=name,
                Path=self.role_path,
                AssumeRolePolicyDocument=document,
                Description=f"CMBCluster deployment {self.settings.deployment}: a user's pods (IRSA)",
                PermissionsBoundary=self.permissions_boundary,
                Tags=tags,
            )["Role"]
        except ClientError as exc:
            if error_code(exc) != "EntityAlreadyExists":
                raise map_aws_error(exc, what) from exc
            role = self._own_role(user, name)
            if role is None:  # deleted between the two calls
                raise Conflict(f"{what} changed while it was being created; try again") from exc
            with aws_errors(what):
                self._iam.update_assume_role_policy(RoleName=name, PolicyDocument=document)
                self._iam.tag_role(RoleName=name, Tags=tags)
        except BotoCoreError as exc:
            raise map_aws_error(exc, what) from exc
        arn = str(role["Arn"])
        return CloudIdentity(
            user=user,
            principal=arn,
            service_account=service_account,
            namespace=namespace,
            annotations={ROLE_ANNOTATION: arn},
        )

    def _own_role(self, user: UserRef, name: str) -> dict[str, Any] | None:
        """The role ``name`` if it exists (``None`` if not); Conflict if it is not this user's."""
        try:
            role: dict[str, Any] = self._iam.get_role(RoleName=name)["Role"]
        except ClientError as exc:
            if error_code(exc) == "NoSuchEntity":
                return None
            raise map_aws_error(exc, f"IAM role {name}") from exc
        except BotoCoreError as exc:
            raise map_aws_error(exc, f"IAM role {name}") from exc
        tags = {str(t["Key"]): str(t["Value"]) for t in role.get("Tags", [])}
        if (
            role.get("Path") != self.role_path
            or tags.get(TAG_MANAGED_BY) != MANAGED_BY
            or tags.get(TAG_OWNER) != user.id
            or role.get("PermissionsBoundary", {}).get("PermissionsBoundaryArn") != self.permissions_boundary
        ):
            raise Conflict(f"IAM role {name} exists but does not belong to this user; not touching it")
        return role

    def update_user_buckets(self, user: UserRef, buckets: Sequence[str]) -> None:
        """Grant the user's role exactly ``buckets`` (the inline policy is removed when empty).

        Core calls it whenever the user's buckets change and before every start, right after
        :meth:`ensure_user_identity`; a user without a role yet (no environment started) has
        nothing to grant, and gets the grant with the role."""
        if isinstance(buckets, str):
            raise InvalidRequest("buckets must be a list of bucket names")
        unique = sorted(dict.fromkeys(buckets))
        for bucket in unique:
            S3_BUCKET_NAMES.check(bucket)
        name = self.role_name(user)
        what = f"IAM role {name}"
        if self._own_role(user, name) is None:
            return
        if not unique:
            self._delete_inline_policy(name)
            return
        document = _dumps(bucket_access_policy(unique, partition=self.partition))
        if len(document) > MAX_INLINE_POLICY_CHARS:
            raise LimitExceeded(f"a policy for {len(unique)} buckets exceeds IAM's inline policy size")
        with aws_errors(what):
            self._iam.put_role_policy(RoleName=name, PolicyName=BUCKET_POLICY_NAME, PolicyDocument=document)

    def _delete_inline_policy(self, name: str) -> None:
        try:
            self._iam.delete_role_policy(RoleName=name, PolicyName=BUCKET_POLICY_NAME)
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise map_aws_error(exc, f"policy {BUCKET_POLICY_NAME} of IAM role {name}") from exc
        except BotoCoreError as exc:
            raise map_aws_error(exc, f"policy {BUCKET_POLICY_NAME} of IAM role {name}") from exc

    def delete_user_identity(self, user: UserRef, *, namespace: str) -> None:
        name = self.role_name(user)
        if self._own_role(user, name) is None:
            return
        self._delete_inline_policy(name)
        try:
            self._iam.delete_role(RoleName=name)
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise map_aws_error(exc, f"IAM role {name}") from exc
        except BotoCoreError as exc:
            raise map_aws_error(exc, f"IAM role {name}") from exc

    # -- registry and DNS --------------------------------------------------------------------
    def registry(self) -> RegistryInfo:
        """ECR_REGISTRY_URL, else the account's registry; repositories under ``<deployment>/`` by default, so
        two deployments of one account never push to (or delete) each other's images."""
        url = self.settings.ecr_registry_url
        default_prefix = self.settings.deployment
        if not url:
            host = f"{self.settings.aws_account_id}.dkr.ecr.{self.settings.aws_region}.amazonaws.com"
            if self.partition == "aws-cn":
                host += ".cn"
            return RegistryInfo(host=host, repository_prefix=default_prefix)
        parsed = urllib.parse.urlsplit(url if "://" in url else f"https://{url}")
        host = parsed.netloc
        if not host:
            raise ConfigurationError([f"ECR_REGISTRY_URL {url!r} names no registry host"])
        prefix = parsed.path.strip("/") or default_prefix
        return RegistryInfo(host=host, repository_prefix=prefix)

    def registry_login(self) -> RegistryLogin:
        with aws_errors("ECR authorization token"):
            data = self._ecr.get_authorization_token()["authorizationData"]
        if not data:
            raise ProviderUnavailable("ECR returned no authorization token")
        try:
            decoded = base64.b64decode(str(data[0]["authorizationToken"]), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, KeyError) as exc:
            raise ProviderUnavailable("ECR returned an unreadable authorization token") from exc
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise ProviderUnavailable("ECR returned an authorization token without user:password")
        return RegistryLogin(username=username, password=password)

    def dns(self) -> DnsInfo:
        return DnsInfo(domain=self.domain, environments_domain=self.domain)

    # -- operations --------------------------------------------------------------------------
    def check_ready(self) -> None:
        try:
            account = str(self._sts.get_caller_identity().get("Account", ""))
        except (ClientError, BotoCoreError) as exc:
            error = map_aws_error(exc, "STS")
            raise ProviderUnavailable(f"AWS is not reachable: {error.message}", detail=error.detail) from exc
        if account != self.settings.aws_account_id:
            raise ProviderUnavailable(
                f"the AWS credentials belong to account {account}, not AWS_ACCOUNT_ID {self.settings.aws_account_id}"
            )

    def close(self) -> None:
        close_clients((self._iam, self._eks, self._ecr, self._sts))
