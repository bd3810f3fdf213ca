"""Settings of the AWS plugin; the variable names are those of the original AWS deployment.

Identifiers are checked for their AWS form here, so ``cmbcluster config check`` names a mistyped
region or account before anything reaches AWS. The deployment's name (``CMBCLUSTER_DEPLOYMENT_NAME``,
default the EKS cluster's name) is in every cloud name the plugin makes (:mod:`cmbcluster_aws.names`).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cmbcluster.naming import check_deployment_name
from cmbcluster.settings import LOCAL_ONLY, check_node_range

_REGION = re.compile(r"^[a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-\d{1,2}$")
_ACCOUNT = re.compile(r"^\d{12}$")
_AGENT = re.compile(r"^arn:aws[a-z-]*:datasync:[a-z0-9-]+:\d{12}:agent/agent-[0-9a-z]{17}$")


class AwsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True)

    aws_region: str = Field(
        validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"),
        description="The region code of the deployment (e.g. eu-west-1): its cluster, buckets, registry and "
        "IAM partition",
    )
    aws_account_id: str = Field(
        validation_alias=AliasChoices("AWS_ACCOUNT_ID"),
        description="The deployment's 12-digit account (`aws sts get-caller-identity`), in every IAM ARN; "
        "credentials of another account are refused",
    )
    deployment_name: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CMBCLUSTER_DEPLOYMENT_NAME"),
        description="The deployment's name, in every cloud name and IAM path; default: EKS_CLUSTER_NAME",
    )
    eks_cluster_name: str = Field(
        default="cmbcluster-eks",
        validation_alias=AliasChoices("EKS_CLUSTER_NAME"),
        description="The EKS cluster (`infra up` creates it), whose OIDC issuer users' IAM roles trust; also "
        "the deployment's name unless CMBCLUSTER_DEPLOYMENT_NAME is set",
    )
    ecr_registry_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ECR_REGISTRY_URL"),
        description="Registry host and repository prefix (<host>/<prefix>) that `cmbcluster images` pushes to "
        "and environments pull from; default: <account>.dkr.ecr.<region>.amazonaws.com/<deployment>",
    )
    s3_user_bucket_prefix: str = Field(
        default="",
        validation_alias=AliasChoices("S3_USER_BUCKET_PREFIX"),
        pattern=r"^([a-z0-9][a-z0-9-]{0,29})?$",
        description="Prefix of users' bucket names; default: <deployment>-user",
    )
    s3_versioning: bool = Field(
        default=True,
        validation_alias=AliasChoices("S3_VERSIONING"),
        description="Versioning of users' new buckets, so that an overwritten or deleted object can be "
        "recovered; off too when S3_NONCURRENT_VERSION_DAYS is 0",
    )
    s3_noncurrent_version_days: int = Field(
        default=30,
        ge=0,
        le=3650,
        validation_alias=AliasChoices("S3_NONCURRENT_VERSION_DAYS", "NONCURRENT_VERSION_DAYS"),
        description="days an overwritten or deleted object's earlier version is kept; 0: none (no versioning)",
    )
    s3_kms_key_id: str | None = Field(
        default=None, validation_alias=AliasChoices("S3_KMS_KEY_ID"), description="SSE-KMS key; SSE-S3 when unset"
    )
    cognito_user_pool_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("COGNITO_USER_POOL_ID"),
        description="The Cognito user pool users sign in with (e.g. eu-west-1_AbCdEf: its region comes first); "
        "needed for Cognito sign-in",
    )
    cognito_client_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("COGNITO_CLIENT_ID"),
        description="The pool's app client, with <public URL>/api/v1/auth/aws/callback as callback URL and "
        "read access to email and email_verified; needed for Cognito sign-in",
    )
    cognito_client_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("COGNITO_CLIENT_SECRET"),
        description="The app client's secret; unset for an app client without one",
    )
    cognito_domain: str | None = Field(
        default=None,
        validation_alias=AliasChoices("COGNITO_DOMAIN"),
        description="The pool's hosted UI domain (a Cognito prefix domain or your own), where users sign in; "
        "unset: the endpoints come from the pool's discovery document",
    )
    cognito_issuer: str | None = Field(
        default=None,
        validation_alias=AliasChoices("COGNITO_ISSUER"),
        description="The pool's issuer; default: https://cognito-idp.<region>.amazonaws.com/<pool id>; only "
        "tests point it elsewhere",
    )
    cognito_jwks_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("COGNITO_JWKS_URL"),
        description="The keys the pool signs with; default: <issuer>/.well-known/jwks.json; only tests point "
        "it elsewhere",
    )
    # -- `cmbcluster infra` (provisioning) ---------------------------------------------------------
    eks_kubernetes_version: str = Field(
        default="1.33",
        validation_alias=AliasChoices("EKS_KUBERNETES_VERSION"),
        pattern=r"^\d+\.\d+$",
        description="Kubernetes version (major.minor) of the EKS cluster `infra up` creates",
    )
    eks_node_instance_type: str = Field(
        default="m5.large",
        validation_alias=AliasChoices("EKS_NODE_INSTANCE_TYPE"),
        description="EC2 instance type of the managed node group `infra up` creates (the cluster's nodes)",
    )
    eks_node_count: int = Field(
        default=2,
        ge=1,
        le=100,
        validation_alias=AliasChoices("EKS_NODE_COUNT"),
        description="Nodes the node group `infra up` creates starts with (its desired size)",
    )
    eks_node_max: int = Field(
        default=5,
        ge=1,
        le=450,
        validation_alias=AliasChoices("EKS_NODE_MAX"),
        description="The most nodes the node group `infra up` creates may grow to (never fewer than EKS_NODE_COUNT)",
    )
    vpc_cidr: str = Field(
        default="10.0.0.0/16",
        validation_alias=AliasChoices("VPC_CIDR"),
        description="Address block of the VPC `infra up` creates, a /16 to a /24, split into 3 public and 3 "
        "private subnets",
    )
    route53_hosted_zone_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ROUTE53_HOSTED_ZONE_ID", "HOSTED_ZONE_ID"),
        description="Route53 zone of the deployment's names (`infra dns`, cert-manager's DNS-01); found from "
        "the domain when unset",
    )
    letsencrypt_email: str | None = Field(
        default=None,
        validation_alias=AliasChoices("LETSENCRYPT_EMAIL"),
        description="The ACME account's address of the ClusterIssuer `infra up` makes (expiry notices)",
    )
    acme_server: str = Field(
        default="https://acme-v02.api.letsencrypt.org/directory",
        validation_alias=AliasChoices("ACME_SERVER"),
        description="The ClusterIssuer's ACME directory (Let's Encrypt; its staging directory for trials)",
    )
    endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AWS_ENDPOINT_URL"),
        description="Talk to an S3/IAM-compatible endpoint instead of AWS (moto in tests)",
        json_schema_extra=LOCAL_ONLY,
    )
    # The operator's own credentials, for `cmbcluster infra`, `images` and `db` on their machine. boto3
    # reads only the process environment and ~/.aws, not `.env`: these are read from both and handed to
    # the one boto3 session (cmbcluster_aws.clients). Never deployed: the control plane uses its role.
    aws_access_key_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AWS_ACCESS_KEY_ID"),
        description="An access key of the operator's (with AWS_SECRET_ACCESS_KEY); default: boto3's chain "
        "(AWS_PROFILE, ~/.aws, the pod's or instance's role)",
        json_schema_extra=LOCAL_ONLY,
    )
    aws_secret_access_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY"),
        description="The secret of AWS_ACCESS_KEY_ID",
        json_schema_extra=LOCAL_ONLY,
    )
    aws_session_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("AWS_SESSION_TOKEN"),
        description="With temporary keys (SSO, assumed roles)",
        json_schema_extra=LOCAL_ONLY,
    )
    aws_profile: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AWS_PROFILE"),
        description="A profile of ~/.aws/config (used when no access key is set)",
        json_schema_extra=LOCAL_ONLY,
    )

    # -- `migrate run --managed-transfer` from Cloud Storage (cmbcluster_aws.transfer) ------------------
    datasync_gcs_hmac_access_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATASYNC_GCS_HMAC_ACCESS_ID"),
        description="`migrate run --managed-transfer` from GCS: the access ID of a Cloud Storage HMAC key "
        "AWS DataSync reads the source buckets with",
        json_schema_extra=LOCAL_ONLY,
    )
    datasync_gcs_hmac_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("DATASYNC_GCS_HMAC_SECRET"),
        description="The secret of DATASYNC_GCS_HMAC_ACCESS_ID",
        json_schema_extra=LOCAL_ONLY,
    )
    datasync_s3_role_arn: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATASYNC_S3_ROLE_ARN"),
        pattern=r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$",
        description="`migrate run --managed-transfer` from GCS: the IAM role DataSync assumes to write the "
        "new S3 buckets (trusting datasync.amazonaws.com)",
        json_schema_extra=LOCAL_ONLY,
    )
    datasync_agent_arns: str = Field(
        default="",
        validation_alias=AliasChoices("DATASYNC_AGENT_ARNS"),
        description="Comma-separated DataSync agents that read Cloud Storage (Basic mode tasks); empty: "
        "agentless, Enhanced mode",
        json_schema_extra=LOCAL_ONLY,
    )

    # -- pod decoration (cmbcluster_aws.pods) ------------------------------------------------------
    s3_mount_credentials: Literal["pod", "driver"] = Field(
        default="pod",
        validation_alias=AliasChoices("S3_MOUNT_CREDENTIALS"),
        description="pod: Mountpoint mounts a bucket with the user's own IRSA role; driver: with the CSI driver's",
    )
    eks_node_selector: str = Field(
        default="",
        validation_alias=AliasChoices("EKS_NODE_SELECTOR"),
        description="Comma-separated key=value node labels user pods must run on (e.g. a user node group)",
    )
    eks_termination_grace_seconds: int = Field(
        default=60,
        ge=0,
        le=3600,
        validation_alias=AliasChoices("EKS_TERMINATION_GRACE_SECONDS"),
        description="Time a stopping pod gets to close files, which Mountpoint uploads on close",
    )

    @field_validator("eks_node_selector")
    @classmethod
    def _node_selector(cls, value: str) -> str:
        parse_node_selector(value)
        return value

    @field_validator("aws_region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION.match(value):
            raise PydanticCustomError(
                "aws_region",
                "{value} is not an AWS region code (for example eu-west-1, us-east-2)",
                {"value": repr(value)},
            )
        return value

    @field_validator("aws_account_id")
    @classmethod
    def _account(cls, value: str) -> str:
        if not _ACCOUNT.match(value):
            raise PydanticCustomError(
                "aws_account_id",
                "{value} is not an AWS account id: 12 digits (`aws sts get-caller-identity` shows it)",
                {"value": repr(value)},
            )
        return value

    @field_validator("deployment_name")
    @classmethod
    def _deployment_name(cls, value: str | None) -> str | None:
        return None if value is None else check_deployment_name(value, "CMBCLUSTER_DEPLOYMENT_NAME")

    @field_validator("eks_cluster_name")
    @classmethod
    def _cluster_names_the_deployment(cls, value: str, info: ValidationInfo) -> str:
        if "deployment_name" in info.data and info.data["deployment_name"] is None:  # it names the deployment
            check_deployment_name(value, "EKS_CLUSTER_NAME")
        return value

    @model_validator(mode="after")
    def _keys_in_pairs(self) -> AwsSettings:
        if (self.aws_access_key_id is None) != (self.aws_secret_access_key is None):
            pair = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
            given, missing = pair if self.aws_access_key_id is not None else pair[::-1]
            raise PydanticCustomError(
                "aws_keys", "{given} is set without {missing}", {"given": given, "missing": missing}
            )
        if self.aws_session_token is not None and self.aws_access_key_id is None:
            raise PydanticCustomError("aws_keys", "AWS_SESSION_TOKEN is set without AWS_ACCESS_KEY_ID", {})
        return self

    @field_validator("vpc_cidr")
    @classmethod
    def _vpc_cidr(cls, value: str) -> str:
        """Checked with the settings, so that `config check` refuses what `infra up` would."""
        try:
            network = ipaddress.ip_network(value)
        except ValueError as exc:
            raise PydanticCustomError("vpc_cidr", "{value} is not a network: {reason}",
                                      {"value": repr(value), "reason": str(exc)}) from None  # fmt: skip
        if not 16 <= network.prefixlen <= 24:
            raise PydanticCustomError(
                "vpc_cidr", "{value} must be between a /16 and a /24 (AWS's VPC limits)", {"value": str(network)}
            )
        return str(network)

    @model_validator(mode="after")
    def _node_range(self) -> AwsSettings:
        check_node_range(self, "eks_node_count", "eks_node_max", "node group")
        return self

    @field_validator("datasync_agent_arns")
    @classmethod
    def _agent_arns(cls, value: str) -> str:
        agents = [a.strip() for a in value.split(",") if a.strip()]
        wrong = [a for a in agents if not _AGENT.match(a)]
        if wrong:
            raise PydanticCustomError(
                "datasync_agent_arns",
                "{wrong} is not a DataSync agent ARN (arn:aws:datasync:REGION:ACCOUNT:agent/agent-...)",
                {"wrong": ", ".join(repr(a) for a in wrong)},
            )
        if len(agents) > 8:
            raise PydanticCustomError("datasync_agent_arns", "DataSync takes at most 8 agents per location", {})
        return value

    @model_validator(mode="after")
    def _hmac_key_in_pairs(self) -> AwsSettings:
        if (self.datasync_gcs_hmac_access_id is None) != (self.datasync_gcs_hmac_secret is None):
            raise PydanticCustomError(
                "datasync_hmac", "DATASYNC_GCS_HMAC_ACCESS_ID and DATASYNC_GCS_HMAC_SECRET are set together", {}
            )
        return self

    @model_validator(mode="after")
    def _default_prefix(self) -> AwsSettings:
        if not self.s3_user_bucket_prefix:
            self.s3_user_bucket_prefix = f"{self.deployment}-user"
        return self

    @property
    def deployment(self) -> str:
        """The deployment's name: CMBCLUSTER_DEPLOYMENT_NAME, else the EKS cluster's."""
        return self.deployment_name or self.eks_cluster_name

    def session_credentials(self) -> dict[str, str]:
        """What the boto3 session is built with: the access key, or the profile; nothing (boto3's own
        chain) when neither is set."""
        if self.aws_access_key_id is not None and self.aws_secret_access_key is not None:
            keys = {"aws_access_key_id": self.aws_access_key_id,
                    "aws_secret_access_key": self.aws_secret_access_key.get_secret_value()}  # fmt: skip
            if self.aws_session_token is not None:
                keys["aws_session_token"] = self.aws_session_token.get_secret_value()
            return keys
        return {"profile_name": self.aws_profile} if self.aws_profile else {}

    def config_notes(self) -> list[str]:
        """What `cmbcluster config check` tells about these settings: which AWS credentials are used."""
        from cmbcluster_aws.clients import credentials_source  # boto3 is imported only when asked

        return [f"AWS credentials: {credentials_source(self)}"]

    @property
    def datasync_agents(self) -> list[str]:
        """DATASYNC_AGENT_ARNS parsed."""
        return [a.strip() for a in self.datasync_agent_arns.split(",") if a.strip()]

    @property
    def cognito_region(self) -> str:
        """The user pool's own region, which its id starts with (``eu-west-1_AbC``): the issuer's, even
        when the pool is not in AWS_REGION."""
        region, sep, _rest = (self.cognito_user_pool_id or "").partition("_")
        return region if sep and _REGION.match(region) else self.aws_region

    @property
    def node_selector(self) -> dict[str, str]:
        """EKS_NODE_SELECTOR parsed."""
        return parse_node_selector(self.eks_node_selector)


_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def parse_node_selector(text: str) -> dict[str, str]:
    """``"a=b, c/d=e"`` -> ``{"a": "b", "c/d": "e"}``; ValueError naming a malformed pair."""
    selector: dict[str, str] = {}
    for pair in (p.strip() for p in text.split(",")):
        if not pair:
            continue
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise ValueError(f"{pair!r} is not a Kubernetes node label key=value")
        selector[key] = value
    return selector
