"""``cmbcluster infra`` on Google Cloud: the network, GKE, Artifact Registry and bucket of a deployment.

What ``up`` builds, in order (``cmbcluster infra plan`` lists it with names):

1. A VPC network (custom subnets) and a subnetwork with secondary ranges for pods and services.
2. A Cloud Router with Cloud NAT, so private nodes reach the internet.
3. The Artifact Registry Docker repository the images are pushed to.
4. The database bucket (uniform access, public access prevention, versioning, the lifecycle of user buckets).
5. The GKE cluster: private nodes, Workload Identity (``<project>.svc.id.goog``), the Cloud
   Storage FUSE CSI driver add-on (``GcsFuseCsiDriver``) that mounts users' buckets, one
   autoscaled node pool running the GKE metadata server.
6. cert-manager, installed with helm (``--addons print`` prints the command instead).

Everything goes through Google's REST APIs (compute v1, container v1, artifactregistry v1,
storage v1, dns v1) with google-auth's ``AuthorizedSession``. Every resource has a
deterministic name, so a rerun of ``up`` finds (GET) what an interrupted run made instead of
creating it twice; a create answered 409 is adopted the same way. Long-running operations are
polled until done. ``GOOGLE_API_ENDPOINT`` replaces ``https://<service>.googleapis.com`` (tests
point it at a local fake of these APIs).
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import google.auth
import google.auth.credentials
import google.auth.exceptions
import google.auth.transport.requests
import google.oauth2.credentials

from cmbcluster.errors import (
    ConfigurationError,
    Conflict,
    InvalidRequest,
    NotFound,
    ProviderUnavailable,
)
from cmbcluster.interfaces import (
    DeploymentRecord,
    DnsRecord,
    PlannedStep,
    Provisioner,
    ProvisioningOptions,
    ResourceRecord,
    StepContext,
)
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
from cmbcluster_gcp.identity import CLOUD_PLATFORM_SCOPE, GcpInfra
from cmbcluster_gcp.lifecycle import lifecycle_rules
from cmbcluster_gcp.rest import GoogleApi
from cmbcluster_gcp.settings import GcpSettings

__all__ = ["GcpProvisioner", "GoogleApi"]

log = logging.getLogger(__name__)

SUBNET_CIDR = "10.0.0.0/20"
PODS_RANGE, PODS_CIDR = "pods", "10.4.0.0/14"
SERVICES_RANGE, SERVICES_CIDR = "services", "10.8.0.0/20"
MASTER_CIDR = "172.16.0.0/28"
LABEL_DEPLOYMENT = "cmbcluster-deployment"
LABEL_MANAGED_BY = "managed-by"


def credentials_for(settings: GcpSettings) -> google.auth.credentials.Credentials:
    """GOOGLE_OAUTH_ACCESS_TOKEN when set (a token from `gcloud auth print-access-token`), else the
    application default credentials."""
    if settings.google_oauth_access_token is not None:
        token = settings.google_oauth_access_token.get_secret_value()
        return google.oauth2.credentials.Credentials(token)  # type: ignore[no-untyped-call]
    try:
        credentials, _project = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise ConfigurationError(
            [f"no Google Cloud credentials: run `gcloud auth application-default login` or set "
             f"GOOGLE_OAUTH_ACCESS_TOKEN ({exc})"]
        ) from None  # fmt: skip
    return credentials


class GcpProvisioner(Provisioner):
    """:class:`~cmbcluster.interfaces.Provisioner` for Google Cloud (REST APIs via :class:`GoogleApi`)."""

    provider = "gcp"

    def __init__(
        self,
        settings: GcpSettings,
        *,
        api: GoogleApi | None = None,
        poll_interval: float = 10.0,
        database_bucket: str | None = None,
    ) -> None:
        self.settings = settings
        self.configured_database_bucket = database_bucket
        self._api = api
        self.poll_interval = poll_interval
        self._infra = GcpInfra(settings)

    @property
    def api(self) -> GoogleApi:
        if self._api is None:  # made on first use: `plan` needs no credentials
            self._api = GoogleApi(
                credentials_for(self.settings), endpoint=self.settings.google_api_endpoint,
                poll_interval=self.poll_interval,
            )  # fmt: skip
        return self._api

    # -- names -------------------------------------------------------------------------------
    @property
    def deployment(self) -> str:
        return self.settings.cluster_name

    @property
    def project(self) -> str:
        return self.settings.project_id

    @property
    def region(self) -> str:
        return self.settings.region

    @property
    def location(self) -> str:
        """The cluster's location: ZONE (a zonal cluster) or REGION (regional, nodes in every zone)."""
        return self.settings.zone or self.settings.region

    def _name(self, suffix: str) -> str:
        return f"{self.deployment}-{suffix}"

    @property
    def network(self) -> str:
        return self._name("net")

    @property
    def subnetwork(self) -> str:
        return self._name("subnet")

    @property
    def router(self) -> str:
        return self._name("router")

    @property
    def repository(self) -> str:
        """The Artifact Registry repository id: the last part of the registry's repository prefix."""
        return self._infra.registry().repository_prefix.rstrip("/").rsplit("/", 1)[-1]

    @property
    def database_bucket(self) -> str:
        return (self.configured_database_bucket or f"{self.deployment}-database-{self.project}").lower()

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL_DEPLOYMENT: self.deployment, LABEL_MANAGED_BY: "cmbcluster"}

    # REST paths (relative to each service's base URL)
    def _network_path(self) -> str:
        return f"compute/v1/projects/{self.project}/global/networks/{self.network}"

    def _subnetwork_path(self) -> str:
        return f"compute/v1/projects/{self.project}/regions/{self.region}/subnetworks/{self.subnetwork}"

    def _router_path(self) -> str:
        return f"compute/v1/projects/{self.project}/regions/{self.region}/routers/{self.router}"

    def _repository_path(self) -> str:
        return f"v1/projects/{self.project}/locations/{self.region}/repositories/{self.repository}"

    def _bucket_path(self) -> str:
        return f"storage/v1/b/{urllib.parse.quote(self.database_bucket, safe='')}"

    def _cluster_path(self) -> str:
        return f"v1/projects/{self.project}/locations/{self.location}/clusters/{self.deployment}"

    # -- plan --------------------------------------------------------------------------------
    def plan(self) -> list[PlannedStep]:
        s = self.settings
        return [
            PlannedStep(name="network", description="VPC network with custom subnets",
                        creates=(f"compute/network {self.network}",)),
            PlannedStep(name="subnetwork",
                        description=f"Subnetwork {SUBNET_CIDR} in {self.region}, pods {PODS_CIDR}, "
                        f"services {SERVICES_CIDR}",
                        creates=(f"compute/subnetwork {self.subnetwork}",)),
            PlannedStep(name="cloud-nat", description="Cloud Router with Cloud NAT for the private nodes",
                        creates=(f"compute/router {self.router} (NAT {self._name('nat')})",)),
            PlannedStep(name="artifact-registry", description=f"Artifact Registry Docker repository in {self.region}",
                        creates=(f"artifactregistry/repository {self.repository}",)),
            PlannedStep(name="database-bucket", description="Cloud Storage bucket for database backups",
                        creates=(f"storage/bucket {self.database_bucket}",)),
            PlannedStep(name="gke-cluster",
                        description=f"GKE cluster in {self.location}: Workload Identity, GcsFuseCsiDriver add-on, "
                        f"{s.gke_nodes_per_zone}-{s.gke_max_nodes_per_zone} x {s.gke_machine_type} per zone",
                        creates=(f"container/cluster {self.deployment}",
                                 f"container/nodepool {self._name('nodes')}")),
            release_step("cert-manager", CERT_MANAGER),
        ]  # fmt: skip

    # -- up ----------------------------------------------------------------------------------
    def apply_step(self, step: PlannedStep, job: StepContext) -> None:
        handlers: dict[str, Callable[[StepContext], None]] = {
            "network": self._ensure_network,
            "subnetwork": self._ensure_subnetwork,
            "cloud-nat": self._ensure_router,
            "artifact-registry": self._ensure_repository,
            "database-bucket": self._ensure_bucket,
            "gke-cluster": self._ensure_cluster,
            "addon-cert-manager": self._addon,
        }
        handlers[step.name](job)

    def _ensure(
        self,
        job: StepContext,
        *,
        service: str,
        path: str,
        create_path: str,
        body: dict[str, Any],
        record: ResourceRecord,
        what: str,
        params: dict[str, str] | None = None,
        wait_for: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """GET the resource; create it if absent (a 409 means a racing or earlier create: adopt it)."""
        existing = self.api.get(service, path, what)
        if existing is None:
            try:
                operation = self.api.request("POST", service, create_path, what, body=body, params=params)
            except Conflict:
                job.adopted(record)
            else:
                job.created(record)
                if operation.get("kind") != "storage#bucket":
                    self.api.wait(service, operation, f"creating {what}")
            existing = self.api.get(service, path, what) or {}
        else:
            job.adopted(record)
        return existing

    def _ensure_network(self, job: StepContext) -> None:
        self._ensure(
            job, service="compute", path=self._network_path(),
            create_path=f"compute/v1/projects/{self.project}/global/networks",
            body={"name": self.network, "autoCreateSubnetworks": False, "routingConfig": {"routingMode": "REGIONAL"},
                  "description": f"CMBCluster deployment {self.deployment}"},
            record=ResourceRecord(step=job.step, kind="compute/network", id=self._network_path(), name=self.network),
            what=f"network {self.network}",
        )  # fmt: skip

    def _ensure_subnetwork(self, job: StepContext) -> None:
        self._ensure(
            job, service="compute", path=self._subnetwork_path(),
            create_path=f"compute/v1/projects/{self.project}/regions/{self.region}/subnetworks",
            body={"name": self.subnetwork, "network": self._network_path().removeprefix("compute/v1/"),
                  "ipCidrRange": SUBNET_CIDR, "region": self.region, "privateIpGoogleAccess": True,
                  "secondaryIpRanges": [{"rangeName": PODS_RANGE, "ipCidrRange": PODS_CIDR},
                                        {"rangeName": SERVICES_RANGE, "ipCidrRange": SERVICES_CIDR}]},
            record=ResourceRecord(step=job.step, kind="compute/subnetwork", id=self._subnetwork_path(),
                                  name=self.subnetwork),
            what=f"subnetwork {self.subnetwork}",
        )  # fmt: skip

    def _ensure_router(self, job: StepContext) -> None:
        nat = {"name": self._name("nat"), "natIpAllocateOption": "AUTO_ONLY",
               "sourceSubnetworkIpRangesToNat": "ALL_SUBNETWORKS_ALL_IP_RANGES",
               "logConfig": {"enable": True, "filter": "ERRORS_ONLY"}}  # fmt: skip
        router = self._ensure(
            job, service="compute", path=self._router_path(),
            create_path=f"compute/v1/projects/{self.project}/regions/{self.region}/routers",
            body={"name": self.router, "network": self._network_path().removeprefix("compute/v1/"),
                  "region": self.region, "nats": [nat]},
            record=ResourceRecord(step=job.step, kind="compute/router", id=self._router_path(), name=self.router),
            what=f"Cloud Router {self.router}",
        )  # fmt: skip
        if not any(n.get("name") == nat["name"] for n in router.get("nats", [])):
            # A router made by hand or by an older run without NAT: add it (PATCH merges the field).
            operation = self.api.request("PATCH", "compute", self._router_path(), f"Cloud NAT {nat['name']}",
                                         body={"nats": [*router.get("nats", []), nat]})  # fmt: skip
            self.api.wait("compute", operation, f"adding Cloud NAT {nat['name']}")
            job.note(f"Cloud NAT {nat['name']} added to {self.router}")

    def _ensure_repository(self, job: StepContext) -> None:
        self._ensure(
            job, service="artifactregistry", path=self._repository_path(),
            create_path=f"v1/projects/{self.project}/locations/{self.region}/repositories",
            params={"repositoryId": self.repository},
            body={"format": "DOCKER", "description": f"CMBCluster images ({self.deployment})", "labels": self.labels},
            record=ResourceRecord(step=job.step, kind="artifactregistry/repository", id=self._repository_path(),
                                  name=self.repository),
            what=f"Artifact Registry repository {self.repository}",
        )  # fmt: skip

    def _ensure_bucket(self, job: StepContext) -> None:
        self._ensure(
            job, service="storage", path=self._bucket_path(), create_path="storage/v1/b",
            params={"project": self.project},
            body={"name": self.database_bucket, "location": self.settings.storage_location or self.region,
                  "storageClass": "STANDARD", "labels": self.labels, "versioning": {"enabled": True},
                  # deleted old backups are noncurrent versions: kept as long as users' versions, then gone
                  "lifecycle": {"rule": lifecycle_rules(max(self.settings.noncurrent_version_days, 1),
                                                        self.settings.noncurrent_versions_kept)},
                  "iamConfiguration": {"uniformBucketLevelAccess": {"enabled": True},
                                       "publicAccessPrevention": "enforced"}},
            record=ResourceRecord(step=job.step, kind="storage/bucket", id=self.database_bucket,
                                  name=self.database_bucket),
            what=f"bucket {self.database_bucket}",
        )  # fmt: skip

    def cluster_body(self) -> dict[str, Any]:
        s = self.settings
        return {
            "cluster": {
                "name": self.deployment,
                "description": f"CMBCluster deployment {self.deployment}",
                "resourceLabels": self.labels,
                "network": self._network_path().removeprefix("compute/v1/"),
                "subnetwork": self._subnetwork_path().removeprefix("compute/v1/"),
                "ipAllocationPolicy": {"useIpAliases": True, "clusterSecondaryRangeName": PODS_RANGE,
                                       "servicesSecondaryRangeName": SERVICES_RANGE},
                "privateClusterConfig": {"enablePrivateNodes": True, "masterIpv4CidrBlock": MASTER_CIDR},
                "workloadIdentityConfig": {"workloadPool": s.effective_workload_identity_pool},
                "addonsConfig": {"gcsFuseCsiDriverConfig": {"enabled": True},
                                 "httpLoadBalancing": {"disabled": False}},
                "releaseChannel": {"channel": s.gke_release_channel},
                "nodePools": [{
                    "name": self._name("nodes"),
                    "initialNodeCount": s.gke_nodes_per_zone,
                    "autoscaling": {"enabled": True, "minNodeCount": 1,
                                    "maxNodeCount": max(s.gke_max_nodes_per_zone, s.gke_nodes_per_zone)},
                    "management": {"autoUpgrade": True, "autoRepair": True},
                    "config": {"machineType": s.gke_machine_type, "diskSizeGb": 100,
                               "oauthScopes": [CLOUD_PLATFORM_SCOPE],
                               "workloadMetadataConfig": {"mode": "GKE_METADATA"},
                               "shieldedInstanceConfig": {"enableSecureBoot": True}},
                }],
            }
        }  # fmt: skip

    def _ensure_cluster(self, job: StepContext) -> None:
        what = f"GKE cluster {self.deployment}"
        path = self._cluster_path()
        record = ResourceRecord(step=job.step, kind="container/cluster", id=path, name=self.deployment)
        cluster = self.api.get("container", path, what)
        if cluster is None:
            try:
                operation = self.api.request(
                    "POST", "container", path.rsplit("/", 1)[0], what, body=self.cluster_body()
                )
            except Conflict:
                job.adopted(record)
            else:
                job.created(record)
                job.note(f"waiting for {what} (about 6-10 minutes on Google Cloud)")
                self.api.wait("container", operation, f"creating {what}")
        else:
            if cluster.get("resourceLabels", {}).get(LABEL_DEPLOYMENT) != self.deployment:
                raise Conflict(f"{what} exists but was not made by `cmbcluster infra up`")
            job.adopted(record)
        cluster = self._wait_running(what)
        self._write_kubeconfig(job, cluster)

    def _wait_running(self, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + 2400
        delay = min(0.5, self.poll_interval)
        while True:
            cluster = self.api.request("GET", "container", self._cluster_path(), what)
            status = cluster.get("status")
            if status == "RUNNING":
                return cluster
            if status in ("ERROR", "DEGRADED", "STOPPING"):
                raise ProviderUnavailable(f"{what} is {status}: {cluster.get('statusMessage', '')}")
            if time.monotonic() > deadline:
                raise ProviderUnavailable(f"{what} is still {status}; rerun `up` to resume")
            time.sleep(delay)
            delay = min(delay * 2, self.poll_interval)

    def _write_kubeconfig(self, job: StepContext, cluster: dict[str, Any]) -> None:
        write_kubeconfig(
            kubeconfig_path(job.record),
            name=f"gke_{self.project}_{self.location}_{self.deployment}",
            server=f"https://{cluster.get('endpoint', '')}",
            certificate_authority_data=str(cluster.get("masterAuth", {}).get("clusterCaCertificate", "")),
            command="gke-gcloud-auth-plugin",  # what `gcloud container clusters get-credentials` configures
            args=[],
        )

    def _addon(self, job: StepContext) -> None:
        if not kubeconfig_path(job.record).exists():
            cluster = self.api.request("GET", "container", self._cluster_path(), f"GKE cluster {self.deployment}")
            self._write_kubeconfig(job, cluster)
        install_release(job, CERT_MANAGER, kubeconfig_path(job.record))

    # -- down --------------------------------------------------------------------------------
    def delete_resource(self, resource: ResourceRecord, job: StepContext) -> None:
        services = {
            "compute/network": "compute", "compute/subnetwork": "compute", "compute/router": "compute",
            "artifactregistry/repository": "artifactregistry", "container/cluster": "container",
        }  # fmt: skip
        what = resource.label
        try:
            if resource.kind == "helm/release":
                if kubeconfig_path(job.record).exists():
                    uninstall_release(job, resource, kubeconfig_path(job.record))
                return
            if resource.kind == "storage/bucket":
                self._delete_bucket(resource.id, job)
                return
            service = services.get(resource.kind)
            if service is None:
                raise InvalidRequest(f"the record lists {what}, a kind this version cannot delete")
            operation = self.api.request("DELETE", service, resource.id, what)
            if resource.kind == "container/cluster":
                job.note(f"waiting for {what} to be deleted (about 5 minutes on Google Cloud)")
            self.api.wait(service, operation, f"deleting {what}")
            if resource.kind == "container/cluster":
                kubeconfig_path(job.record).unlink(missing_ok=True)
        except NotFound:
            job.emit("gone", f"{what} was already gone")

    def check_down(self, record: DeploymentRecord, options: ProvisioningOptions) -> None:
        refuse_to_delete_data(record, options, kind="storage/bucket", holds_objects=self._holds_objects)

    def _holds_objects(self, bucket: ResourceRecord) -> bool:
        """Whether the bucket holds any object or object version (False when it is gone)."""
        try:
            return bool(self._objects(bucket.id))
        except NotFound:
            return False

    def _objects(self, bucket: str) -> list[dict[str, Any]]:
        path = f"storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o"
        listing = self.api.request("GET", "storage", path, f"objects of bucket {bucket}",
                                   params={"versions": "true", "maxResults": "1000"})  # fmt: skip
        items: list[dict[str, Any]] = listing.get("items", [])
        return items

    def _delete_bucket(self, bucket: str, job: StepContext) -> None:
        path = f"storage/v1/b/{urllib.parse.quote(bucket, safe='')}"
        objects = self._objects(bucket)
        if objects and not job.options.delete_data:  # check_down refused already; objects written since then
            raise data_written_during_down(f"bucket {bucket}")
        while objects:
            for item in objects:
                name = urllib.parse.quote(str(item["name"]), safe="")
                self.api.request("DELETE", "storage", f"{path}/o/{name}", f"object {item['name']}",
                                 params={"generation": str(item.get("generation", ""))})  # fmt: skip
            objects = self._objects(bucket)
        self.api.request("DELETE", "storage", path, f"bucket {bucket}")

    # -- status ------------------------------------------------------------------------------
    def resource_exists(self, resource: ResourceRecord) -> bool:
        paths = {
            "compute/network": ("compute", resource.id), "compute/subnetwork": ("compute", resource.id),
            "compute/router": ("compute", resource.id),
            "artifactregistry/repository": ("artifactregistry", resource.id),
            "container/cluster": ("container", resource.id),
            "storage/bucket": ("storage", f"storage/v1/b/{urllib.parse.quote(resource.id, safe='')}"),
            "helm/release": ("container", self._cluster_path()),
        }  # fmt: skip
        if resource.kind not in paths:
            return False
        service, path = paths[resource.kind]
        return self.api.get(service, path, resource.label) is not None

    # -- DNS ---------------------------------------------------------------------------------
    def upsert_dns(self, records: Sequence[DnsRecord], *, dry_run: bool = False) -> list[str]:
        from cmbcluster_gcp.dns import CloudDns

        return CloudDns(self.api, project=self.project, zone=self.settings.dns_zone).upsert(records, dry_run=dry_run)

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
        self._infra.close()
