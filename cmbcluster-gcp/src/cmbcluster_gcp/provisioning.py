"""``cmbcluster infra`` on Google Cloud: the network, GKE, Artifact Registry and bucket of a deployment.

What ``up`` builds, in order (``cmbcluster infra plan`` lists it with names):

1. A VPC network (custom subnets) and a subnetwork with secondary ranges for pods and services.
2. A Cloud Router with Cloud NAT, so private nodes reach the internet.
3. The Artifact Registry Docker repository the images are pushed to.
4. The database bucket (uniform access, public access prevention, versioning, the lifecycle of user buckets).
5. The GKE cluster: private nodes, Workload Identity (``<project>.svc.id.goog``), Dataplane V2
   (NetworkPolicies enforced), the Cloud Storage FUSE CSI driver add-on (``GcsFuseCsiDriver``) that
   mounts users' buckets, the Compute Engine persistent disk CSI driver (the default StorageClass
   ``standard-rwo`` the control plane's claim binds to), one autoscaled node pool running the GKE
   metadata server (pods never see the node's credentials).
6. The Google service accounts the cluster's workloads act as through Workload Identity: the
   control plane's (Cloud Storage, and IAM for per-user service accounts in ``service-account``
   mode), bound to its Kubernetes ServiceAccount; cert-manager's, ``roles/dns.admin`` on the
   deployment's Cloud DNS zones only.
7. With helm (``--addons print`` prints the commands instead): cert-manager, ingress-nginx, and
   CMBCluster's own cluster-config chart: the Let's Encrypt ClusterIssuer (DNS-01 through Cloud DNS).

Everything goes through Google's REST APIs (compute v1, container v1, artifactregistry v1,
storage v1, dns v1) with google-auth's ``AuthorizedSession``. Every resource has a
deterministic name, so a rerun of ``up`` finds (GET) what an interrupted run made instead of
creating it twice; a create answered 409 is adopted the same way. Long-running operations are
polled until done. ``GOOGLE_API_ENDPOINT`` replaces ``https://<service>.googleapis.com`` (tests
point it at a local fake of these APIs).
"""

from __future__ import annotations

import dataclasses
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
from cmbcluster_gcp.deploy import control_plane_service_account
from cmbcluster_gcp.identity import CLOUD_PLATFORM_SCOPE, GSA_DESCRIPTION, WORKLOAD_IDENTITY_USER_ROLE, GcpInfra
from cmbcluster_gcp.labels import LABEL_MANAGED_BY as _BUCKET_MANAGED_BY
from cmbcluster_gcp.labels import LABEL_OWNER, MANAGED_BY
from cmbcluster_gcp.lifecycle import lifecycle_rules
from cmbcluster_gcp.rest import GoogleApi, until_propagated
from cmbcluster_gcp.settings import GcpSettings

__all__ = ["ADDONS", "GcpProvisioner", "GoogleApi", "control_plane_service_account"]

log = logging.getLogger(__name__)

SUBNET_CIDR = "10.0.0.0/20"
PODS_RANGE, PODS_CIDR = "pods", "10.4.0.0/14"
SERVICES_RANGE, SERVICES_CIDR = "services", "10.8.0.0/20"
MASTER_CIDR = "172.16.0.0/28"
LABEL_DEPLOYMENT = "cmbcluster-deployment"
LABEL_MANAGED_BY = "managed-by"
GSA_ANNOTATION_KEY = r"iam\.gke\.io/gcp-service-account"  # helm --set needs the dots escaped
#: The control plane's project roles: users' buckets (and, in service-account mode, users' service accounts).
CONTROL_PLANE_ROLES = ("roles/storage.admin",)
SERVICE_ACCOUNT_MODE_ROLES = ("roles/iam.serviceAccountAdmin",)
DNS_ROLE = "roles/dns.admin"
#: A sample of what `up` needs, checked with testIamPermissions before anything is made.
UP_PERMISSIONS = (
    "compute.networks.create", "compute.subnetworks.create", "compute.routers.create",
    "artifactregistry.repositories.create", "storage.buckets.create", "container.clusters.create",
    "iam.serviceAccounts.create", "iam.serviceAccounts.setIamPolicy", "resourcemanager.projects.setIamPolicy",
    "dns.managedZones.get",
)  # fmt: skip
# Chart versions pinned (cmbcluster.provisioning); the install order: cert-manager before the ClusterIssuer.
ADDONS: dict[str, HelmRelease] = {
    "cert-manager": CERT_MANAGER,
    "ingress-nginx": INGRESS_NGINX,  # a regional L4 load balancer (the Service's default on GKE)
    "cluster-config": cluster_config_release(deployment=""),  # filled per deployment in _addon
}


def cert_manager_service_account(settings: GcpSettings) -> str:
    return f"{settings.deployment}-cert-manager@{settings.project_id}.iam.gserviceaccount.com"


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
        namespace: str = "cmbcluster",
        domains: Sequence[str] = (),
        ingress_namespace: str = "ingress-nginx",
        propagation_seconds: float = 120.0,
    ) -> None:
        from cmbcluster_gcp.storage import GCS_BUCKET_NAMES  # google-cloud-storage, only when provisioning

        problems = GCS_BUCKET_NAMES.database_bucket_problems(
            database_bucket, "CMBCLUSTER_DATABASE_BUCKET (GCS_DATABASE_BUCKET)"
        )
        if problems:  # before anything is made: Cloud Storage would refuse it at the database-bucket step
            raise ConfigurationError(problems)
        self.settings = settings
        self.configured_database_bucket = database_bucket
        self.namespace = namespace
        self.domains = tuple(dict.fromkeys(d.strip(".").lower() for d in domains if d))
        self.ingress_namespace = ingress_namespace
        self.propagation_seconds = propagation_seconds
        self._api = api
        self.poll_interval = poll_interval
        self._infra = GcpInfra(settings)
        self._zones: list[tuple[str, str]] | None = None

    @property
    def api(self) -> GoogleApi:
        if self._api is None:  # made on first use: `plan` needs no credentials
            self._api = GoogleApi(
                credentials_for(self.settings), endpoint=self.settings.google_api_endpoint,
                poll_interval=self.poll_interval, storage_endpoint=self.settings.storage_emulator_host,
            )  # fmt: skip
        return self._api

    # -- names -------------------------------------------------------------------------------
    @property
    def deployment(self) -> str:
        """The deployment's name (CMBCLUSTER_DEPLOYMENT_NAME, else the cluster's): in every name."""
        return self.settings.deployment

    @property
    def cluster(self) -> str:
        """The GKE cluster's name (CLUSTER_NAME)."""
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
        return self.configured_database_bucket or f"{self.deployment}-database-{self.project}"

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
        return f"v1/projects/{self.project}/locations/{self.location}/clusters/{self.cluster}"

    @property
    def service_accounts(self) -> dict[str, str]:
        """The Google service accounts ``up`` makes, by what they are for: cert-manager's only with a domain."""
        accounts = {"controlplane": control_plane_service_account(self.settings)}
        if self.domains:
            accounts["cert-manager"] = cert_manager_service_account(self.settings)
        return accounts

    def _release(self, key: str) -> HelmRelease:
        release = ADDONS[key]
        return dataclasses.replace(release, namespace=self.ingress_namespace) if key == "ingress-nginx" else release

    # -- plan --------------------------------------------------------------------------------
    def plan(self) -> list[PlannedStep]:
        s = self.settings
        steps = [
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
                        description=f"GKE cluster in {self.location}: Workload Identity, Dataplane V2 (NetworkPolicies "
                        "enforced), GKE metadata server, GcsFuseCsiDriver and persistent disk CSI add-ons, "
                        f"{s.gke_nodes_per_zone} to {s.gke_max_nodes_per_zone} x "
                        f"{s.gke_machine_type} per zone",
                        creates=(f"container/cluster {self.cluster}",
                                 f"container/nodepool {self._name('nodes')}")),
            PlannedStep(name="service-accounts",
                        description="Google service accounts of the control plane and cert-manager, bound to their "
                        "Kubernetes ServiceAccounts (Workload Identity)",
                        creates=tuple(f"iam/service-account {email}" for email in self.service_accounts.values())),
        ]  # fmt: skip
        issuer = "the ClusterIssuer letsencrypt (DNS-01, Cloud DNS)" if self.domains else "no ClusterIssuer (no domain)"
        whats = {
            "ingress-nginx": f"the ingress controller (class nginx) in {self.ingress_namespace}",
            "cluster-config": f"{issuer}; the control plane's disk uses GKE's default StorageClass standard-rwo",
        }
        return steps + [release_step(key, self._release(key), whats.get(key, "")) for key in ADDONS]

    # -- up ----------------------------------------------------------------------------------
    def apply_step(self, step: PlannedStep, job: StepContext) -> None:
        handlers: dict[str, Callable[[StepContext], None]] = {
            "network": self._ensure_network,
            "subnetwork": self._ensure_subnetwork,
            "cloud-nat": self._ensure_router,
            "artifact-registry": self._ensure_repository,
            "database-bucket": self._ensure_bucket,
            "gke-cluster": self._ensure_cluster,
            "service-accounts": self._service_accounts,
        }
        if step.name.startswith("addon-"):
            self._addon(step.name.removeprefix("addon-"), job)
            return
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
                "name": self.cluster,
                "description": f"CMBCluster deployment {self.deployment}",
                "resourceLabels": self.labels,
                "network": self._network_path().removeprefix("compute/v1/"),
                "subnetwork": self._subnetwork_path().removeprefix("compute/v1/"),
                "ipAllocationPolicy": {"useIpAliases": True, "clusterSecondaryRangeName": PODS_RANGE,
                                       "servicesSecondaryRangeName": SERVICES_RANGE},
                "privateClusterConfig": {"enablePrivateNodes": True, "masterIpv4CidrBlock": MASTER_CIDR},
                "workloadIdentityConfig": {"workloadPool": s.effective_workload_identity_pool},
                "addonsConfig": {"gcsFuseCsiDriverConfig": {"enabled": True},
                                 "gcePersistentDiskCsiDriverConfig": {"enabled": True},
                                 "httpLoadBalancing": {"disabled": False}},
                # Dataplane V2 (Cilium): NetworkPolicies enforced from the first pod; its metadata server
                # answers at 169.254.169.252:988, which the chart's policy blocks for user pods.
                "networkConfig": {"datapathProvider": "ADVANCED_DATAPATH"},
                "releaseChannel": {"channel": s.gke_release_channel},
                "nodePools": [{
                    "name": self._name("nodes"),
                    "initialNodeCount": s.gke_nodes_per_zone,
                    "autoscaling": {"enabled": True, "minNodeCount": 1,
                                    "maxNodeCount": s.gke_max_nodes_per_zone},
                    "management": {"autoUpgrade": True, "autoRepair": True},
                    "config": {"machineType": s.gke_machine_type, "diskSizeGb": 100,
                               "oauthScopes": [CLOUD_PLATFORM_SCOPE],
                               # the GKE metadata server: pods get their own Workload Identity, never the node's
                               "workloadMetadataConfig": {"mode": "GKE_METADATA"},
                               "metadata": {"disable-legacy-endpoints": "true"},
                               "shieldedInstanceConfig": {"enableSecureBoot": True}},
                }],
            }
        }  # fmt: skip

    def _ensure_cluster(self, job: StepContext) -> None:
        what = f"GKE cluster {self.cluster}"
        path = self._cluster_path()
        record = ResourceRecord(step=job.step, kind="container/cluster", id=path, name=self.cluster)
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
                raise Conflict(f"{what} exists but was not made by `cmbcluster infra up` for {self.deployment}")
            job.adopted(record)
            if cluster.get("networkConfig", {}).get("datapathProvider") != "ADVANCED_DATAPATH":
                job.note(f"{what} runs without Dataplane V2: NetworkPolicies are not enforced (it cannot be turned on "
                         "in place; see docs/operators/security.md)")  # fmt: skip
        cluster = self._wait_running(what)
        if addon_kubeconfig(job)[1]:
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
            addon_kubeconfig(job)[0],
            name=f"gke_{self.project}_{self.location}_{self.cluster}",
            server=f"https://{cluster.get('endpoint', '')}",
            certificate_authority_data=str(cluster.get("masterAuth", {}).get("clusterCaCertificate", "")),
            command="gke-gcloud-auth-plugin",  # what `gcloud container clusters get-credentials` configures
            args=[],
        )

    # -- Google service accounts and their bindings -------------------------------------------
    def _service_accounts(self, job: StepContext) -> None:
        """The control plane's and cert-manager's Google service accounts, what each may do, and which
        Kubernetes ServiceAccount may act as it (Workload Identity; the pool exists once the cluster does)."""
        pool = self.settings.effective_workload_identity_pool
        control_plane = self._ensure_service_account(job, self.service_accounts["controlplane"], "the control plane")
        roles = CONTROL_PLANE_ROLES + (
            SERVICE_ACCOUNT_MODE_ROLES if self.settings.identity_mode == "service-account" else ()
        )
        for role in roles:
            self._bind(job, "project", role, f"serviceAccount:{control_plane}")
        self._bind(job, f"serviceaccount:{control_plane}", WORKLOAD_IDENTITY_USER_ROLE,
                   f"serviceAccount:{pool}[{self.namespace}/{CONTROL_PLANE_SERVICE_ACCOUNT}]")  # fmt: skip
        if "cert-manager" in self.service_accounts:
            cert_manager = self._ensure_service_account(job, self.service_accounts["cert-manager"], "cert-manager")
            for zone, _dns_name in self.managed_zones():
                self._bind(job, f"zone:{zone}", DNS_ROLE, f"serviceAccount:{cert_manager}")
            self._bind(job, f"serviceaccount:{cert_manager}", WORKLOAD_IDENTITY_USER_ROLE,
                       f"serviceAccount:{pool}[cert-manager/cert-manager]")  # fmt: skip

    def _description(self, what: str) -> str:
        return f"CMBCluster deployment {self.deployment}: {what}"

    def _ensure_service_account(self, job: StepContext, email: str, what: str) -> str:
        account_id = email.split("@", 1)[0]
        record = ResourceRecord(step=job.step, kind="iam/service-account", id=email, name=account_id)
        existing = self.api.get(
            "iam", f"v1/projects/{self.project}/serviceAccounts/{email}", f"service account {email}"
        )
        if existing is not None:
            if existing.get("description") != self._description(what):
                raise Conflict(f"service account {email} exists but does not belong to deployment {self.deployment}")
            job.adopted(record)
            return email
        try:
            self.api.request(
                "POST", "iam", f"v1/projects/{self.project}/serviceAccounts", f"service account {email}",
                body={"accountId": account_id, "serviceAccount": {
                    "displayName": f"CMBCluster {self.deployment}: {what}", "description": self._description(what)}},
            )  # fmt: skip
        except Conflict:
            job.adopted(record)
        else:
            job.created(record)
        return email

    def _policy_paths(self, resource: str) -> tuple[str, str, str]:
        """(service, path of :getIamPolicy / :setIamPolicy without the verb, what) of a binding's resource."""
        kind, _, name = resource.partition(":")
        if kind == "project":
            return "cloudresourcemanager", f"v1/projects/{self.project}", f"the IAM policy of project {self.project}"
        if kind == "serviceaccount":
            return "iam", f"v1/projects/{self.project}/serviceAccounts/{name}", f"the IAM policy of {name}"
        if kind == "zone":
            return "dns", f"dns/v1/projects/{self.project}/managedZones/{name}", f"the IAM policy of zone {name}"
        raise InvalidRequest(f"no IAM policy for {resource}")

    def _change_binding(self, resource: str, role: str, member: str, *, add: bool) -> bool:
        """Add (or remove) ``member`` in ``role`` of ``resource``'s IAM policy, read-modify-write on its etag;
        whether anything changed."""
        service, path, what = self._policy_paths(resource)
        for _attempt in range(5):
            policy = self.api.request("POST", service, f"{path}:getIamPolicy", what,
                                      body={"options": {"requestedPolicyVersion": 3}})  # fmt: skip
            bindings = [dict(b) for b in policy.get("bindings", [])]
            binding = next((b for b in bindings if b.get("role") == role and "condition" not in b), None)
            members = list(binding.get("members", [])) if binding else []
            if (member in members) == add:
                return False
            if add:
                if binding is None:
                    bindings.append({"role": role, "members": [member]})
                else:
                    binding["members"] = [*members, member]
            elif binding is not None:
                binding["members"] = [m for m in members if m != member]
                if not binding["members"]:
                    bindings.remove(binding)
            try:
                self.api.request("POST", service, f"{path}:setIamPolicy", what,
                                 body={"policy": {**policy, "bindings": bindings}})  # fmt: skip
                return True
            except Conflict:  # the etag moved: read again
                continue
        raise Conflict(f"{what} keeps changing; rerun `up`")

    def _bind(self, job: StepContext, resource: str, role: str, member: str) -> None:
        """One binding, recorded; a service account made moments ago is waited for (IAM propagation)."""
        changed = until_propagated(lambda: self._change_binding(resource, role, member, add=True),
                                   what=f"{role} for {member}", window=self.propagation_seconds)  # fmt: skip
        record = ResourceRecord(step=job.step, kind="iam/binding", id=f"{resource}|{role}|{member}",
                                name=f"{role} {member} on {resource}",
                                attributes={"resource": resource, "role": role, "member": member})  # fmt: skip
        (job.created if changed else job.adopted)(record)

    def managed_zones(self) -> list[tuple[str, str]]:
        """(managed zone, its DNS name) of each Cloud DNS zone holding one of the deployment's names."""
        if self._zones is None:
            from cmbcluster_gcp.dns import CloudDns

            dns = CloudDns(self.api, project=self.project, zone=self.settings.dns_zone)
            self._zones = list(dict.fromkeys(dns.zone_for(domain) for domain in self.domains))
        return self._zones

    # -- add-ons -------------------------------------------------------------------------------
    def _addon(self, key: str, job: StepContext) -> None:
        release = self._release(key)
        values = dict(release.values)
        if key == "cert-manager" and "cert-manager" in self.service_accounts:
            values[f"serviceAccount.annotations.{GSA_ANNOTATION_KEY}"] = self.service_accounts["cert-manager"]
        if key == "cluster-config":
            dns01: dict[str, Any] | None = None
            if self.domains:
                cloud_dns: dict[str, Any] = {"project": self.project}
                zones = self.managed_zones()
                if len(zones) == 1:
                    cloud_dns["hostedZoneName"] = zones[0][0]
                dns01 = {"cloudDNS": cloud_dns}
            # GKE's default StorageClass (standard-rwo, the persistent disk CSI driver) suits the
            # control plane's claim: no StorageClass of ours.
            release = cluster_config_release(deployment=self.deployment, storage_class=None, dns01=dns01,
                                             email=self.settings.letsencrypt_email,
                                             acme_server=self.settings.acme_server)  # fmt: skip
            values = dict(release.values)
        kubeconfig, ours = addon_kubeconfig(job)
        if ours and not kubeconfig.exists():
            cluster = self.api.request("GET", "container", self._cluster_path(), f"GKE cluster {self.cluster}")
            self._write_kubeconfig(job, cluster)
        install_release(job, dataclasses.replace(release, values=values), kubeconfig)

    # -- checks before anything is made ------------------------------------------------------
    def required_tools(self, options: ProvisioningOptions) -> list[Tool]:
        if options.addons != "install":
            return []
        tools = [Tool(name="helm", why="it installs the cluster's add-ons (Helm 3.10 or newer)")]
        if options.kubeconfig is None:
            tools.append(Tool(name="gke-gcloud-auth-plugin",
                              why="the kubeconfig `up` writes gets GKE credentials from it "
                              "(`gcloud components install gke-gcloud-auth-plugin`)"))  # fmt: skip
        return tools

    def check_up(self, note: Callable[[str], None]) -> list[str]:
        """The permissions ``up`` needs (testIamPermissions on the project) and the deployment's DNS zones."""
        problems: list[str] = []
        try:
            answer = self.api.request(
                "POST", "cloudresourcemanager", f"v1/projects/{self.project}:testIamPermissions",
                f"project {self.project}", body={"permissions": list(UP_PERMISSIONS)},
            )  # fmt: skip
            granted = set(answer.get("permissions", []))
            problems += [f"the credentials may not {p} in project {self.project}" for p in UP_PERMISSIONS
                         if p not in granted]  # fmt: skip
        except (PermissionDenied, ProviderUnavailable) as exc:
            note(f"cannot check the permissions in advance ({exc.message}); `up` stops at the first refusal")
        problems += self._machine_type_problems(note)
        try:
            self.managed_zones()
        except NotFound as exc:
            problems.append(exc.message)
        return problems

    def _machine_type_problems(self, note: Callable[[str], None]) -> list[str]:
        """Why the cluster's location cannot hold GKE_MACHINE_TYPE (its zone, or fewer than three
        zones of its region offer it): else its node pool is refused after the network, the NAT and
        the cluster are made."""
        machine_type, location = self.settings.gke_machine_type, self.location
        compute = f"compute/v1/projects/{self.project}"
        try:
            if self.settings.zone:
                zones = [self.settings.zone]
            else:
                region = self.api.get("compute", f"{compute}/regions/{location}", f"region {location}")
                if region is None:
                    return [f"REGION {location} is not a Compute Engine region of project {self.project}"]
                zones = [str(url).rsplit("/", 1)[-1] for url in region.get("zones", [])]
            missing = [zone for zone in zones if self.api.get(
                "compute", f"{compute}/zones/{zone}/machineTypes/{machine_type}", f"machine type {machine_type}"
            ) is None]  # fmt: skip
        except (PermissionDenied, ProviderUnavailable) as exc:
            note(f"cannot check GKE_MACHINE_TYPE in advance ({exc.message}); `up` stops at the node pool")
            return []
        # A regional cluster's nodes go to three of its region's zones (GKE's choice where it has four)
        if not missing or (not self.settings.zone and len(zones) - len(missing) >= 3):
            if missing:
                note(f"GKE_MACHINE_TYPE {machine_type} is not offered in {', '.join(missing)}: nodes go elsewhere")
            return []
        where = ", ".join(zones)
        return [f"GKE_MACHINE_TYPE {machine_type} is not offered in {', '.join(missing)} (the cluster's nodes go to "
                f"{where}); choose another type, or a ZONE that has it"]  # fmt: skip

    # -- down --------------------------------------------------------------------------------
    def delete_resource(self, resource: ResourceRecord, job: StepContext) -> None:
        services = {
            "compute/network": "compute", "compute/subnetwork": "compute", "compute/router": "compute",
            "artifactregistry/repository": "artifactregistry", "container/cluster": "container",
        }  # fmt: skip
        what = resource.label
        try:
            if resource.kind == "helm/release":
                kubeconfig, _ours = addon_kubeconfig(job)
                if kubeconfig.exists():
                    uninstall_release(job, resource, kubeconfig)
                return
            if resource.kind == "iam/binding":
                attributes = resource.attributes
                self._change_binding(attributes["resource"], attributes["role"], attributes["member"], add=False)
                return
            if resource.kind == "iam/service-account":
                self.api.request("DELETE", "iam", f"v1/projects/{self.project}/serviceAccounts/{resource.id}", what)
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
                kubeconfig, ours = addon_kubeconfig(job)
                if ours:
                    kubeconfig.unlink(missing_ok=True)
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
        if self._objects(bucket) and not job.options.delete_data:  # check_down refused; objects written since then
            raise data_written_during_down(f"bucket {bucket}")
        self._empty_bucket(bucket)
        self.api.request("DELETE", "storage", path, f"bucket {bucket}")

    def _empty_bucket(self, bucket: str) -> None:
        """Delete every object and every object version of ``bucket``."""
        path = f"storage/v1/b/{urllib.parse.quote(bucket, safe='')}"
        objects = self._objects(bucket)
        while objects:
            for item in objects:
                name = urllib.parse.quote(str(item["name"]), safe="")
                self.api.request("DELETE", "storage", f"{path}/o/{name}", f"object {item['name']}",
                                 params={"generation": str(item.get("generation", ""))})  # fmt: skip
            objects = self._objects(bucket)

    # -- what `down` keeps unless told -------------------------------------------------------
    def retained(self, record: DeploymentRecord) -> list[ResourceRecord]:
        """Per-user Google service accounts (``service-account`` mode), users' buckets (the deployment's
        prefix, made by CMBCluster) and the persistent disks of the cluster's claims (the cluster's labels)."""
        found: list[ResourceRecord] = []
        users = GSA_DESCRIPTION.format(deployment=self.deployment, user_id="")
        for account in self._pages(
            "iam", f"v1/projects/{self.project}/serviceAccounts", "accounts", "service accounts"
        ):
            if str(account.get("description", "")).startswith(users):
                email = str(account["email"])
                found.append(
                    ResourceRecord(
                        step="retained",
                        kind="iam/user-service-account",
                        id=email,
                        name=email,
                        attributes={"why": "a user's Google service account (no data)"},
                    )
                )
        prefix = f"{self.settings.user_bucket_prefix}-"
        ours = {self.database_bucket, *(r.id for r in record.find("storage/bucket"))}
        for bucket in self._pages("storage", "storage/v1/b", "items", "buckets",
                                  params={"project": self.project, "prefix": prefix}):  # fmt: skip
            labels = bucket.get("labels") or {}
            name = str(bucket.get("name", ""))
            if name.startswith(prefix) and name not in ours and labels.get(_BUCKET_MANAGED_BY) == MANAGED_BY \
                    and labels.get(LABEL_OWNER):  # fmt: skip
                found.append(
                    ResourceRecord(
                        step="retained",
                        kind="storage/user-bucket",
                        id=name,
                        name=name,
                        attributes={"why": "a user's bucket, with all its data"},
                    )
                )
        disks = self.api.request(
            "GET", "compute", f"compute/v1/projects/{self.project}/aggregated/disks", "persistent disks",
            params={"filter": f'labels.{LABEL_DEPLOYMENT}="{self.deployment}"'},
        ).get("items", {})  # fmt: skip
        for scope in disks.values():
            for disk in scope.get("disks", []):
                zone = str(disk.get("zone", "")).rsplit("/", 1)[-1]
                path = f"compute/v1/projects/{self.project}/zones/{zone}/disks/{disk['name']}"
                found.append(ResourceRecord(
                    step="retained", kind="compute/disk", id=path, name=str(disk["name"]),
                    attributes={"why": f"a disk of the cluster ({disk.get('sizeGb', '?')} GB), outliving it"},
                ))  # fmt: skip
        return found

    def _pages(
        self, service: str, path: str, key: str, what: str, params: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            page = self.api.request(
                "GET", service, path, what, params={**(params or {}), **({"pageToken": token} if token else {})}
            )
            items += page.get(key, [])
            token = str(page.get("nextPageToken") or "")
            if not token:
                return items

    def delete_retained(self, resource: ResourceRecord, job: StepContext) -> None:
        try:
            if resource.kind == "iam/user-service-account":
                self.api.request("DELETE", "iam", f"v1/projects/{self.project}/serviceAccounts/{resource.id}",
                                 resource.label)  # fmt: skip
            elif resource.kind == "storage/user-bucket":
                self._empty_bucket(resource.id)
                self.api.request("DELETE", "storage", f"storage/v1/b/{urllib.parse.quote(resource.id, safe='')}",
                                 resource.label)  # fmt: skip
            elif resource.kind == "compute/disk":
                operation = self.api.request("DELETE", "compute", resource.id, resource.label)
                self.api.wait("compute", operation, f"deleting {resource.label}")
            else:
                raise InvalidRequest(f"{resource.label} is not something `down` can delete")
        except NotFound:
            job.emit("gone", f"{resource.label} was already gone")

    def deletion_order(self, resources: Sequence[ResourceRecord]) -> list[ResourceRecord]:
        """Reverse creation; what the deployment made besides (users' buckets and accounts, disks) last,
        once the cluster that used it is gone."""
        retained = ("storage/user-bucket", "compute/disk", "iam/user-service-account")
        ordered = list(reversed(resources))
        return [r for r in ordered if r.kind not in retained] + [r for r in ordered if r.kind in retained]

    # -- status ------------------------------------------------------------------------------
    def resource_exists(self, resource: ResourceRecord) -> bool:
        paths = {
            "compute/network": ("compute", resource.id), "compute/subnetwork": ("compute", resource.id),
            "compute/router": ("compute", resource.id),
            "artifactregistry/repository": ("artifactregistry", resource.id),
            "container/cluster": ("container", resource.id),
            "storage/bucket": ("storage", f"storage/v1/b/{urllib.parse.quote(resource.id, safe='')}"),
            "iam/service-account": ("iam", f"v1/projects/{self.project}/serviceAccounts/{resource.id}"),
            "helm/release": ("container", self._cluster_path()),
        }  # fmt: skip
        if resource.kind == "iam/binding":
            return True  # bindings are read with their resource's whole policy; `up` repairs them
        if resource.kind not in paths:
            return False
        service, path = paths[resource.kind]
        return self.api.get(service, path, resource.label) is not None

    # -- DNS ---------------------------------------------------------------------------------
    def upsert_dns(self, records: Sequence[DnsRecord], *, dry_run: bool = False) -> list[str]:
        from cmbcluster_gcp.dns import CloudDns

        return CloudDns(self.api, project=self.project, zone=self.settings.dns_zone).upsert(records, dry_run=dry_run)

    def delete_dns(self, record: DnsRecord) -> bool:
        from cmbcluster_gcp.dns import CloudDns

        return CloudDns(self.api, project=self.project, zone=self.settings.dns_zone).delete(record)

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
        self._infra.close()
