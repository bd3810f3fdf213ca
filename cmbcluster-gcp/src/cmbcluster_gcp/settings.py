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
    google_issuer: str = Field(
        default="https://accounts.google.com",
        validation_alias=AliasChoices("GOOGLE_ISSUER"),
        description="The ID-token issuer; only tests point it elsewhere (an OIDC mock)",
    )
    google_discovery_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("GOOGLE_DISCOVERY_URL"),
        description="Default: <GOOGLE_ISSUER>/.well-known/openid-configuration",
    )
    google_allowed_domains: str = Field(
        default="",
        validation_alias=AliasChoices("GOOGLE_ALLOWED_DOMAINS"),
        description="Comma-separated Google Workspace domains (the hd claim) allowed to sign in; empty: any",
    )
    storage_emulator_host: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STORAGE_EMULATOR_HOST"),
        description="Talk to a GCS emulator instead of Google (tests)",
    )

    @property
    def google_allowed_domain_list(self) -> tuple[str, ...]:
        """GOOGLE_ALLOWED_DOMAINS parsed: lower-case, blanks dropped."""
        return tuple(d.strip().lower() for d in self.google_allowed_domains.split(",") if d.strip())
