"""Settings of the GCP plugin; the variable names are those of the original GKE deployment.

Identifiers are checked for their Google Cloud form here, so ``cmbcluster config check`` names a
mistyped project or region before anything reaches Google. The deployment's name
(``CMBCLUSTER_DEPLOYMENT_NAME``, default the cluster's name) is in every cloud name the plugin makes.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, StringConstraints, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cmbcluster.naming import check_deployment_name
from cmbcluster.settings import LOCAL_ONLY, check_node_range

#: A Kubernetes resource quantity ("250m", "1", "256Mi", "5Gi"); "0" means no limit for gcsfuse.
Quantity = Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")]
#: A project id: 6-30 lower-case letters, digits and '-', starting with a letter (older domain-scoped
#: projects carry their domain before a colon).
_PROJECT_ID = re.compile(r"^(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]+-[a-z]+[0-9]{1,2}$")
_ZONE = re.compile(r"^([a-z]+-[a-z]+[0-9]{1,2})-[a-z]$")


def _invalid(kind: str, message: str, value: str) -> PydanticCustomError:
    return PydanticCustomError(kind, "{value} " + message, {"value": repr(value)})


class GcpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True)

    project_id: str = Field(
        validation_alias=AliasChoices("PROJECT_ID", "GOOGLE_CLOUD_PROJECT"),
        description="The id of the deployment's project (not its display name: `gcloud projects list` shows both)",
    )
    deployment_name: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CMBCLUSTER_DEPLOYMENT_NAME"),
        description="The deployment's name, in every cloud name; default: CLUSTER_NAME",
    )
    project_number: str | None = Field(
        default=None,
        validation_alias=AliasChoices("PROJECT_NUMBER"),
        pattern=r"^\d+$",
        description="Needed for Workload Identity principals",
    )
    region: str = Field(
        default="us-central1",
        validation_alias=AliasChoices("REGION"),
        description="The deployment's region (e.g. europe-west1): its network, registry, buckets (unless "
        "STORAGE_LOCATION) and cluster (unless ZONE)",
    )
    zone: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ZONE"),
        description="A zone of REGION (e.g. europe-west1-b) for a zonal cluster; unset: `infra up` creates a "
        "regional one, with nodes in each zone",
    )
    cluster_name: str = Field(
        default="cmbcluster",
        validation_alias=AliasChoices("CLUSTER_NAME"),
        description="The GKE cluster (`infra up` creates it); also the deployment's name unless "
        "CMBCLUSTER_DEPLOYMENT_NAME is set",
    )
    artifact_registry: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ARTIFACT_REGISTRY", "REGISTRY_URL"),
        description="Registry host and repository prefix that `cmbcluster images` pushes to and environments pull "
        "from, e.g. us-central1-docker.pkg.dev/<project>/cmbcluster; default: "
        "<REGION>-docker.pkg.dev/<PROJECT_ID>/<deployment>",
    )
    storage_location: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STORAGE_LOCATION"),
        description="Bucket location; REGION when unset",
    )
    user_bucket_prefix: str = Field(
        default="",
        validation_alias=AliasChoices("GCS_USER_BUCKET_PREFIX", "USER_BUCKET_PREFIX"),
        pattern=r"^([a-z0-9][a-z0-9-]{0,29})?$",
        description="Prefix of users' bucket names; default: <deployment>-user",
    )
    noncurrent_versions_kept: int = Field(
        default=3,
        ge=0,
        validation_alias=AliasChoices("GCS_NONCURRENT_VERSIONS"),
        description="At most this many earlier versions of an object are kept, however recent, in the versioned "
        "buckets CMBCluster creates; 0: no count bound, only GCS_NONCURRENT_VERSION_DAYS",
    )
    noncurrent_version_days: int = Field(
        default=30,
        ge=0,
        le=3650,
        validation_alias=AliasChoices("GCS_NONCURRENT_VERSION_DAYS", "NONCURRENT_VERSION_DAYS"),
        description="days an overwritten or deleted object's earlier version is kept; 0: none (no versioning)",
    )
    google_client_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("GOOGLE_CLIENT_ID"),
        description="OAuth client id of a Google Cloud web application (Sign in with Google); GOOGLE_CLIENT_SECRET "
        "is its secret.",
    )
    google_client_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("GOOGLE_CLIENT_SECRET"),
        description="The secret of the OAuth client GOOGLE_CLIENT_ID",
    )
    google_issuer: str = Field(
        default="https://accounts.google.com",
        validation_alias=AliasChoices("GOOGLE_ISSUER"),
        description="The ID-token issuer; only tests point it elsewhere (an OIDC mock)",
    )
    google_discovery_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("GOOGLE_DISCOVERY_URL"),
        description="Google's discovery document; default: <GOOGLE_ISSUER>/.well-known/openid-configuration",
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
        json_schema_extra=LOCAL_ONLY,
    )

    # -- per-user identity (cmbcluster_gcp.identity) and pod decoration (cmbcluster_gcp.pods) ------
    identity_mode: Literal["workload-identity", "service-account"] = Field(
        default="workload-identity",
        validation_alias=AliasChoices("GCP_IDENTITY_MODE"),
        description="workload-identity: buckets are granted to the user's Kubernetes ServiceAccount itself; "
        "service-account: one Google service account per user, impersonated by that ServiceAccount",
    )
    workload_identity_pool: str | None = Field(
        default=None,
        validation_alias=AliasChoices("WORKLOAD_IDENTITY_POOL"),
        pattern=r"^[a-z0-9.-]+$",
        description="The cluster's Workload Identity pool (a fleet host project's, say); default: "
        "<PROJECT_ID>.svc.id.goog, the pool of the project's GKE clusters",
    )
    iam_endpoint: str = Field(
        default="https://iam.googleapis.com",
        validation_alias=AliasChoices("GCP_IAM_ENDPOINT"),
        description="The IAM API (service accounts); only tests point it elsewhere",
        json_schema_extra=LOCAL_ONLY,
    )
    resource_manager_endpoint: str = Field(
        default="https://cloudresourcemanager.googleapis.com",
        validation_alias=AliasChoices("GCP_RESOURCE_MANAGER_ENDPOINT"),
        description="Looks up PROJECT_NUMBER when it is not set; only tests point it elsewhere",
        json_schema_extra=LOCAL_ONLY,
    )
    domain: str | None = Field(
        default=None, validation_alias=AliasChoices("DOMAIN"), description="The deployment's domain (Cloud DNS)"
    )
    dns_zone: str | None = Field(
        default=None, validation_alias=AliasChoices("CLOUD_DNS_ZONE"), description="The Cloud DNS managed zone"
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

    # -- `cmbcluster infra` (cmbcluster_gcp.provisioning) --------------------------------------------
    gke_machine_type: str = Field(
        default="e2-standard-4",
        validation_alias=AliasChoices("GKE_MACHINE_TYPE"),
        description="Machine type of the node pool `infra up` creates (the cluster's nodes)",
    )
    gke_nodes_per_zone: int = Field(
        default=1,
        ge=1,
        le=100,
        validation_alias=AliasChoices("GKE_NODES_PER_ZONE"),
        description="Nodes per zone the node pool `infra up` creates starts with (it autoscales, down to 1)",
    )
    gke_max_nodes_per_zone: int = Field(
        default=3,
        ge=1,
        le=1000,
        validation_alias=AliasChoices("GKE_MAX_NODES_PER_ZONE"),
        description="The most nodes per zone the node pool `infra up` creates autoscales to (never fewer than "
        "GKE_NODES_PER_ZONE)",
    )
    gke_release_channel: Literal["RAPID", "REGULAR", "STABLE", "EXTENDED"] = Field(
        default="REGULAR",
        validation_alias=AliasChoices("GKE_RELEASE_CHANNEL"),
        description="Release channel of the GKE cluster `infra up` creates: how soon GKE upgrades it",
    )
    google_api_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices("GOOGLE_API_ENDPOINT"),
        description="Replaces https://<service>.googleapis.com for the infra APIs; only tests point it elsewhere",
        json_schema_extra=LOCAL_ONLY,
    )
    storage_transfer_aws_role_arn: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STORAGE_TRANSFER_AWS_ROLE_ARN"),
        pattern=r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$",
        description="`migrate run --managed-transfer` from S3: the AWS role Storage Transfer Service assumes "
        "to read the source buckets (trusting Google's transfer service account); preferred to an access key",
        json_schema_extra=LOCAL_ONLY,
    )
    storage_transfer_aws_access_key_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STORAGE_TRANSFER_AWS_ACCESS_KEY_ID"),
        description="`migrate run --managed-transfer` from S3 without a role: a long-lived AWS access key "
        "Storage Transfer Service reads the source buckets with",
        json_schema_extra=LOCAL_ONLY,
    )
    storage_transfer_aws_secret_access_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("STORAGE_TRANSFER_AWS_SECRET_ACCESS_KEY"),
        description="The secret of STORAGE_TRANSFER_AWS_ACCESS_KEY_ID",
        json_schema_extra=LOCAL_ONLY,
    )
    google_oauth_access_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("GOOGLE_OAUTH_ACCESS_TOKEN"),
        description="An access token for `cmbcluster infra` (gcloud auth print-access-token); default: ADC",
        json_schema_extra=LOCAL_ONLY,
    )
    workload_identity_node_selector: bool = Field(
        default=True,
        validation_alias=AliasChoices("GKE_WORKLOAD_IDENTITY_NODE_SELECTOR"),
        description="Schedule user pods on nodes running the GKE metadata server (Standard clusters)",
    )
    gcsfuse_termination_grace_seconds: int = Field(
        default=60,
        ge=0,
        le=3600,
        validation_alias=AliasChoices("GCSFUSE_TERMINATION_GRACE_SECONDS"),
        description="Time a stopping pod gets to flush files written to gcsfuse-mounted buckets",
    )
    gcsfuse_cpu_request: Quantity | None = Field(
        default="250m",
        validation_alias=AliasChoices("GCSFUSE_CPU_REQUEST"),
        description="CPU request of the gcsfuse sidecar GKE adds to a pod mounting a bucket (gke-gcsfuse/cpu-request)",
    )
    gcsfuse_memory_request: Quantity | None = Field(
        default="256Mi",
        validation_alias=AliasChoices("GCSFUSE_MEMORY_REQUEST"),
        description="Memory request of the gcsfuse sidecar (gke-gcsfuse/memory-request)",
    )
    gcsfuse_ephemeral_storage_request: Quantity | None = Field(
        default="5Gi",
        validation_alias=AliasChoices("GCSFUSE_EPHEMERAL_STORAGE_REQUEST"),
        description="Ephemeral storage request of the gcsfuse sidecar (gke-gcsfuse/ephemeral-storage-request)",
    )
    gcsfuse_cpu_limit: Quantity | None = Field(
        default=None,
        validation_alias=AliasChoices("GCSFUSE_CPU_LIMIT"),
        description="CPU limit of the gcsfuse sidecar (gke-gcsfuse/cpu-limit); unset: GKE's; 0: none",
    )
    gcsfuse_memory_limit: Quantity | None = Field(
        default=None,
        validation_alias=AliasChoices("GCSFUSE_MEMORY_LIMIT"),
        description="Memory limit of the gcsfuse sidecar (gke-gcsfuse/memory-limit); unset: GKE's; 0: none",
    )
    gcsfuse_ephemeral_storage_limit: Quantity | None = Field(
        default=None,
        validation_alias=AliasChoices("GCSFUSE_EPHEMERAL_STORAGE_LIMIT"),
        description="Ephemeral storage limit of the gcsfuse sidecar (gke-gcsfuse/ephemeral-storage-limit); "
        "unset: GKE's; 0: none",
    )

    @field_validator("project_id")
    @classmethod
    def _project(cls, value: str) -> str:
        if not _PROJECT_ID.match(value):
            raise _invalid(
                "project_id",
                "is not a Google Cloud project id: 6-30 lower-case letters, digits or '-', starting with a letter "
                "(the id, not the project's display name: `gcloud projects list` shows both)",
                value,
            )
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION.match(value):
            raise _invalid("region", "is not a Google Cloud region (for example europe-west1, us-central1)", value)
        return value

    @field_validator("zone")
    @classmethod
    def _zone(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        match = _ZONE.match(value)
        if not match:
            raise _invalid("zone", "is not a Google Cloud zone (for example europe-west1-b)", value)
        region = info.data.get("region")
        if region and match.group(1) != region:
            raise _invalid("zone", f"is not in REGION {region}", value)
        return value

    @field_validator("deployment_name")
    @classmethod
    def _deployment_name(cls, value: str | None) -> str | None:
        return None if value is None else check_deployment_name(value, "CMBCLUSTER_DEPLOYMENT_NAME")

    @field_validator("cluster_name")
    @classmethod
    def _cluster_names_the_deployment(cls, value: str, info: ValidationInfo) -> str:
        if "deployment_name" in info.data and info.data["deployment_name"] is None:  # it names the deployment
            check_deployment_name(value, "CLUSTER_NAME")
        return value

    @model_validator(mode="after")
    def _node_range(self) -> GcpSettings:
        check_node_range(self, "gke_nodes_per_zone", "gke_max_nodes_per_zone", "node pool")
        return self

    @model_validator(mode="after")
    def _transfer_key_pair(self) -> GcpSettings:
        if (self.storage_transfer_aws_access_key_id is None) != (self.storage_transfer_aws_secret_access_key is None):
            raise ValueError(
                "STORAGE_TRANSFER_AWS_ACCESS_KEY_ID and STORAGE_TRANSFER_AWS_SECRET_ACCESS_KEY are set together"
            )
        return self

    @model_validator(mode="after")
    def _default_prefix(self) -> GcpSettings:
        if not self.user_bucket_prefix:
            self.user_bucket_prefix = f"{self.deployment}-user"
        return self

    @property
    def deployment(self) -> str:
        """The deployment's name: CMBCLUSTER_DEPLOYMENT_NAME, else the GKE cluster's."""
        return self.deployment_name or self.cluster_name

    @property
    def effective_workload_identity_pool(self) -> str:
        """The Workload Identity pool of the project's GKE clusters."""
        return self.workload_identity_pool or f"{self.project_id}.svc.id.goog"

    @property
    def google_allowed_domain_list(self) -> tuple[str, ...]:
        """GOOGLE_ALLOWED_DOMAINS parsed: lower-case, blanks dropped."""
        return tuple(d.strip().lower() for d in self.google_allowed_domains.split(",") if d.strip())
