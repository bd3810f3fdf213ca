"""Settings of the AWS plugin; the variable names are those of the original AWS deployment."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class AwsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True)

    aws_region: str = Field(validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"))
    aws_account_id: str = Field(validation_alias=AliasChoices("AWS_ACCOUNT_ID"), pattern=r"^\d{12}$")
    eks_cluster_name: str = Field(default="cmbcluster-eks", validation_alias=AliasChoices("EKS_CLUSTER_NAME"))
    ecr_registry_url: str | None = Field(default=None, validation_alias=AliasChoices("ECR_REGISTRY_URL"))
    s3_database_bucket: str | None = Field(default=None, validation_alias=AliasChoices("S3_DATABASE_BUCKET"))
    s3_user_bucket_prefix: str = Field(
        default="cmbcluster-user",
        validation_alias=AliasChoices("S3_USER_BUCKET_PREFIX"),
        pattern=r"^[a-z0-9][a-z0-9-]{0,29}$",
    )
    s3_versioning: bool = Field(default=True, validation_alias=AliasChoices("S3_VERSIONING"))
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
    endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AWS_ENDPOINT_URL"),
        description="Talk to an S3/IAM-compatible endpoint instead of AWS (moto in tests)",
    )
