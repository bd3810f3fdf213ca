"""Settings of the AWS plugin; the variable names are those of the original AWS deployment."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cmbcluster.settings import LOCAL_ONLY


class AwsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True)

    aws_region: str = Field(validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"))
    aws_account_id: str = Field(validation_alias=AliasChoices("AWS_ACCOUNT_ID"), pattern=r"^\d{12}$")
    eks_cluster_name: str = Field(default="cmbcluster-eks", validation_alias=AliasChoices("EKS_CLUSTER_NAME"))
    ecr_registry_url: str | None = Field(default=None, validation_alias=AliasChoices("ECR_REGISTRY_URL"))
    s3_user_bucket_prefix: str = Field(
        default="cmbcluster-user",
        validation_alias=AliasChoices("S3_USER_BUCKET_PREFIX"),
        pattern=r"^[a-z0-9][a-z0-9-]{0,29}$",
    )
    s3_versioning: bool = Field(default=True, validation_alias=AliasChoices("S3_VERSIONING"))
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
    cognito_user_pool_id: str | None = Field(default=None, validation_alias=AliasChoices("COGNITO_USER_POOL_ID"))
    cognito_client_id: str | None = Field(default=None, validation_alias=AliasChoices("COGNITO_CLIENT_ID"))
    cognito_client_secret: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("COGNITO_CLIENT_SECRET")
    )
    cognito_domain: str | None = Field(default=None, validation_alias=AliasChoices("COGNITO_DOMAIN"))
    cognito_issuer: str | None = Field(default=None, validation_alias=AliasChoices("COGNITO_ISSUER"))
    cognito_jwks_url: str | None = Field(default=None, validation_alias=AliasChoices("COGNITO_JWKS_URL"))
    # -- `cmbcluster infra` (provisioning) ---------------------------------------------------------
    eks_kubernetes_version: str = Field(
        default="1.33", validation_alias=AliasChoices("EKS_KUBERNETES_VERSION"), pattern=r"^\d+\.\d+$"
    )
    eks_node_instance_type: str = Field(default="m5.large", validation_alias=AliasChoices("EKS_NODE_INSTANCE_TYPE"))
    eks_node_count: int = Field(default=2, ge=1, le=100, validation_alias=AliasChoices("EKS_NODE_COUNT"))
    eks_node_max: int = Field(default=5, ge=1, le=450, validation_alias=AliasChoices("EKS_NODE_MAX"))
    vpc_cidr: str = Field(default="10.0.0.0/16", validation_alias=AliasChoices("VPC_CIDR"))
    route53_hosted_zone_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ROUTE53_HOSTED_ZONE_ID", "HOSTED_ZONE_ID"),
        description="Route53 zone for `cmbcluster infra dns`; found from the domain when unset",
    )
    endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AWS_ENDPOINT_URL"),
        description="Talk to an S3/IAM-compatible endpoint instead of AWS (moto in tests)",
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
