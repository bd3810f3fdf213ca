"""Settings of the GCP plugin; the variable names are those of the original GKE deployment."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class GcpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True)

    project_id: str = Field(validation_alias=AliasChoices("PROJECT_ID", "GOOGLE_CLOUD_PROJECT"))
    project_number: str | None = Field(
        default=None,
        validation_alias=AliasChoices("PROJECT_NUMBER"),
        pattern=r"^\d+$",
        description="Needed for Workload Identity principals",
    )
    region: str = Field(default="us-central1", validation_alias=AliasChoices("REGION"))
    zone: str | None = Field(default=None, validation_alias=AliasChoices("ZONE"))
    cluster_name: str = Field(default="cmbcluster", validation_alias=AliasChoices("CLUSTER_NAME"))
    artifact_registry: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ARTIFACT_REGISTRY", "REGISTRY_URL"),
        description="For example us-central1-docker.pkg.dev/<project>/cmbcluster",
    )
    storage_location: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STORAGE_LOCATION"),
        description="Bucket location; REGION when unset",
    )
    database_bucket: str | None = Field(
        default=None, validation_alias=AliasChoices("GCS_DATABASE_BUCKET", "DATABASE_BUCKET")
    )
    user_bucket_prefix: str = Field(
        default="cmbcluster-user",
        validation_alias=AliasChoices("GCS_USER_BUCKET_PREFIX", "USER_BUCKET_PREFIX"),
        pattern=r"^[a-z0-9][a-z0-9-]{0,29}$",
    )
    noncurrent_versions_kept: int = Field(default=3, ge=0, validation_alias=AliasChoices("GCS_NONCURRENT_VERSIONS"))
    google_client_id: str | None = Field(default=None, validation_alias=AliasChoices("GOOGLE_CLIENT_ID"))
    google_client_secret: SecretStr | None = Field(default=None, validation_alias=AliasChoices("GOOGLE_CLIENT_SECRET"))
    storage_emulator_host: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STORAGE_EMULATOR_HOST"),
        description="Talk to a GCS emulator instead of Google (tests)",
    )
