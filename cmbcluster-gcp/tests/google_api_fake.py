"""A local HTTP fake of the Google Cloud REST APIs `cmbcluster infra` calls (no emulator exists for them).

A real HTTP server on 127.0.0.1 that serves, under one base URL, the paths of:

- compute v1: networks, subnetworks, routers (global and regional operations)
- container v1: clusters (and their operations)
- artifactregistry v1: repositories (long-running operations)
- storage v1: buckets (and their listing) and object listing/deletion
- dns v1: managed zones, resource record sets, changes (a CNAME refused beside other records), zone IAM
- iam v1: service accounts and their IAM policies
- cloudresourcemanager v1 (project IAM policy, testIamPermissions) and v3 (the project's number)
- compute v1: persistent disks (aggregated list by label, delete)
- storagetransfer v1: transfer jobs (create, run, patch) and transfer operations; running a job
  with an ``awsS3DataSource`` really copies the objects from S3 (``s3_endpoint``, a moto server,
  with the job's access key or the role it names) into the GCS sink (``gcs_endpoint``, the GCS
  emulator), skipping objects already there with the same size and MD5 (``overwriteWhen: DIFFERENT``)

It checks what the documented APIs check and what our code relies on: the bearer token, JSON
bodies with the documented field names and types, names that match the path, references to
resources that exist, 409 on creating what exists, 404 on what does not, 400 when deleting
what something else still uses (a network with subnetworks, a subnetwork under a cluster).
Operations are RUNNING on their first read and DONE on the next, so callers must poll. Every
request is recorded for assertions; ``fail_next`` injects an HTTP error. IAM policies check their
members as IAM does: a service account that does not exist, or a Workload Identity pool before a
cluster with Workload Identity exists, is a 400; ``propagation_refusals`` makes a new service
account be refused that many times first (IAM's propagation delay); ``denied_permissions`` are
left out of testIamPermissions' answers.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "fake-access-token"
NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 409: "ALREADY_EXISTS"}.get(status, "")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class GoogleApiFake:
    project: str
    requests: list[Request] = field(default_factory=list)
    networks: dict[str, dict[str, Any]] = field(default_factory=dict)
    subnetworks: dict[str, dict[str, Any]] = field(default_factory=dict)
    routers: dict[str, dict[str, Any]] = field(default_factory=dict)
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)
    repositories: dict[str, dict[str, Any]] = field(default_factory=dict)
    buckets: dict[str, dict[str, Any]] = field(default_factory=dict)
    objects: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    zones: dict[str, dict[str, Any]] = field(default_factory=dict)
    rrsets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    service_accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)  # "project", "sa:<email>", "zone:<name>"
    disks: dict[str, dict[str, Any]] = field(default_factory=dict)  # "<zone>/<name>"
    denied_permissions: set[str] = field(default_factory=set)
    #: (zone, machine type) pairs Compute Engine does not offer; every other type is offered in every
    #: zone of a region, and a region has the zones <region>-b, -c and -d
    machine_types_missing: set[tuple[str, str]] = field(default_factory=set)
    propagation_refusals: int = 0
    unpropagated: dict[str, int] = field(default_factory=dict)
    project_number: str = "271828182845"
    transfer_jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # by name, "transferJobs/<id>"
    transfer_operations: dict[str, dict[str, Any]] = field(default_factory=dict)  # by name
    s3_endpoint: str | None = None  # where a transfer job reads S3 (a moto server)
    gcs_endpoint: str | None = None  # where a transfer job writes Cloud Storage (the GCS emulator)
    #: a key here (an object's S3 key) is written to the sink with its bytes reversed: a service gone wrong
    transfer_damages: set[str] = field(default_factory=set)
    failures: list[tuple[str, re.Pattern[str], int]] = field(default_factory=list)
    url: str = ""
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- helpers for tests ---------------------------------------------------------------------
    def fail_next(self, method: str, path_pattern: str, status: int) -> None:
        self.failures.append((method, re.compile(path_pattern), status))

    def calls(self, method: str, pattern: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def add_zone(self, name: str, dns_name: str) -> None:
        self.zones[name] = {"kind": "dns#managedZone", "name": name, "dnsName": dns_name, "visibility": "public"}
        self.rrsets[name] = [{"kind": "dns#resourceRecordSet", "name": dns_name, "type": "SOA", "ttl": 21600,
                              "rrdatas": ["ns1. admin. 1 21600 3600 259200 300"]}]  # fmt: skip

    def resource_count(self) -> int:
        return sum(len(c) for c in (self.networks, self.subnetworks, self.routers, self.clusters, self.repositories,
                                    self.buckets, self.service_accounts))  # fmt: skip

    def members(self, resource: str, role: str) -> list[str]:
        """The members of ``role`` in the IAM policy of ``resource`` ("project", "sa:<email>", "zone:<name>")."""
        bindings = self.policies.get(resource, {}).get("bindings", [])
        return sorted(m for b in bindings if b["role"] == role for m in b["members"])

    def add_disk(self, zone: str, name: str, labels: dict[str, str], size_gb: int = 10) -> None:
        self.disks[f"{zone}/{name}"] = {
            "kind": "compute#disk", "name": name, "sizeGb": str(size_gb), "labels": labels,
            "zone": f"https://www.googleapis.com/compute/v1/projects/{self.project}/zones/{zone}",
        }  # fmt: skip

    # -- operations ----------------------------------------------------------------------------
    def _compute_operation(self, scope: str, target: str, kind: str) -> dict[str, Any]:
        name = f"operation-{next(self._ids)}"
        self_link = f"https://www.googleapis.com/compute/v1/projects/{self.project}/{scope}/operations/{name}"
        op = {"kind": "compute#operation", "name": name, "operationType": kind, "status": "RUNNING",
              "targetLink": target, "selfLink": self_link}  # fmt: skip
        self.operations[urllib.parse.urlsplit(self_link).path] = op
        return dict(op)

    def _container_operation(self, location: str, kind: str) -> dict[str, Any]:
        name = f"operation-{next(self._ids)}"
        path = f"/v1/projects/{self.project}/locations/{location}/operations/{name}"
        op = {"name": name, "operationType": kind, "status": "RUNNING",
              "selfLink": f"https://container.googleapis.com{path}"}  # fmt: skip
        self.operations[path] = op
        return dict(op)

    def _lro(self, location: str) -> dict[str, Any]:
        name = f"projects/{self.project}/locations/{location}/operations/{next(self._ids)}"
        op = {"name": name, "done": False}
        self.operations[f"/v1/{name}"] = op
        return dict(op)

    def _poll(self, path: str) -> dict[str, Any]:
        op = self.operations.get(path)
        if op is None:
            raise ApiError(404, f"operation {path} not found")
        if op.get("status") == "RUNNING":
            op["status"] = "DONE"
            return {**op, "status": "RUNNING"}
        if op.get("done") is False:
            op["done"] = True
            return {**op, "done": False}
        return dict(op)

    # -- request handling ----------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, str], body: Any, auth: str) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(Request(method, path, query, body))
            for index, (m, pattern, status) in enumerate(self.failures):
                if m == method and pattern.search(path):
                    del self.failures[index]
                    return status, {"error": {"code": status, "message": "injected failure"}}
            if auth != f"Bearer {TOKEN}":
                return 401, {"error": {"code": 401, "message": "Request had invalid authentication credentials.",
                                       "status": "UNAUTHENTICATED"}}  # fmt: skip
            try:
                return 200, self._route(method, path, query, body)
            except ApiError as exc:
                return exc.status, {"error": {"code": exc.status, "message": exc.message, "status": exc.reason}}

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> Any:
        p = re.escape(self.project)
        routes: list[tuple[str, str, Callable[..., Any]]] = [
            ("GET", r"/compute/v1/projects/[^/]+/(?:global|regions/[^/]+|zones/[^/]+)/operations/[^/]+",
             lambda: self._poll(path)),
            ("GET", r"/v1/projects/[^/]+/locations/[^/]+/operations/[^/]+", lambda: self._poll(path)),
            ("POST", rf"/compute/v1/projects/{p}/global/networks", lambda: self._create_network(body)),
            ("GET", rf"/compute/v1/projects/{p}/global/networks/([^/]+)", lambda n: self._get(self.networks, n)),
            ("DELETE", rf"/compute/v1/projects/{p}/global/networks/([^/]+)", self._delete_network),
            ("POST", rf"/compute/v1/projects/{p}/regions/([^/]+)/subnetworks", lambda r: self._create_subnet(r, body)),
            ("GET", rf"/compute/v1/projects/{p}/regions/[^/]+/subnetworks/([^/]+)",
             lambda n: self._get(self.subnetworks, n)),
            ("DELETE", rf"/compute/v1/projects/{p}/regions/([^/]+)/subnetworks/([^/]+)", self._delete_subnet),
            ("POST", rf"/compute/v1/projects/{p}/regions/([^/]+)/routers", lambda r: self._create_router(r, body)),
            ("GET", rf"/compute/v1/projects/{p}/regions/[^/]+/routers/([^/]+)", lambda n: self._get(self.routers, n)),
            ("PATCH", rf"/compute/v1/projects/{p}/regions/([^/]+)/routers/([^/]+)",
             lambda r, n: self._patch_router(r, n, body)),
            ("DELETE", rf"/compute/v1/projects/{p}/regions/([^/]+)/routers/([^/]+)", self._delete_router),
            ("POST", rf"/v1/projects/{p}/locations/([^/]+)/repositories",
             lambda loc: self._create_repository(loc, query, body)),
            ("GET", rf"/v1/projects/{p}/locations/[^/]+/repositories/([^/]+)",
             lambda n: self._get(self.repositories, n)),
            ("DELETE", rf"/v1/projects/{p}/locations/([^/]+)/repositories/([^/]+)", self._delete_repository),
            ("POST", rf"/v1/projects/{p}/locations/([^/]+)/clusters", lambda loc: self._create_cluster(loc, body)),
            ("GET", rf"/v1/projects/{p}/locations/[^/]+/clusters/([^/]+)", lambda n: self._get(self.clusters, n)),
            ("DELETE", rf"/v1/projects/{p}/locations/([^/]+)/clusters/([^/]+)", self._delete_cluster),
            ("POST", r"/storage/v1/b", lambda: self._create_bucket(query, body)),
            ("GET", r"/storage/v1/b", lambda: self._list_buckets(query)),
            ("GET", r"/storage/v1/b/([^/]+)", lambda n: self._get(self.buckets, n)),
            ("GET", r"/storage/v1/b/([^/]+)/o", self._list_objects),
            ("DELETE", r"/storage/v1/b/([^/]+)/o/([^/]+)", lambda b, o: self._delete_object(b, o, query)),
            ("DELETE", r"/storage/v1/b/([^/]+)", self._delete_bucket),
            ("GET", rf"/dns/v1/projects/{p}/managedZones", lambda: {"managedZones": list(self.zones.values())}),
            ("GET", rf"/dns/v1/projects/{p}/managedZones/([^/]+)", lambda n: self._get(self.zones, n)),
            ("GET", rf"/dns/v1/projects/{p}/managedZones/([^/]+)/rrsets", lambda z: self._rrsets(z, query)),
            ("POST", rf"/dns/v1/projects/{p}/managedZones/([^/]+)/changes", lambda z: self._change(z, body)),
            ("POST", rf"/dns/v1/projects/{p}/managedZones/([^/:]+):getIamPolicy",
             lambda z: self._get_policy(f"zone:{self._get(self.zones, z)['name']}")),
            ("POST", rf"/dns/v1/projects/{p}/managedZones/([^/:]+):setIamPolicy",
             lambda z: self._set_policy(f"zone:{self._get(self.zones, z)['name']}", body)),
            ("POST", rf"/v1/projects/{p}/serviceAccounts", lambda: self._create_account(body)),
            ("GET", rf"/v1/projects/{p}/serviceAccounts", lambda: {"accounts": list(self.service_accounts.values())}),
            ("GET", rf"/v1/projects/(?:{p}|-)/serviceAccounts/([^/:]+)", lambda e: self._get(self.service_accounts, e)),
            ("DELETE", rf"/v1/projects/(?:{p}|-)/serviceAccounts/([^/:]+)", self._delete_account),
            ("POST", rf"/v1/projects/(?:{p}|-)/serviceAccounts/([^/:]+):getIamPolicy",
             lambda e: self._get_policy(f"sa:{self._get(self.service_accounts, e)['email']}")),
            ("POST", rf"/v1/projects/(?:{p}|-)/serviceAccounts/([^/:]+):setIamPolicy",
             lambda e: self._set_policy(f"sa:{self._get(self.service_accounts, e)['email']}", body)),
            ("POST", rf"/v1/projects/{p}:getIamPolicy", lambda: self._get_policy("project")),
            ("POST", rf"/v1/projects/{p}:setIamPolicy", lambda: self._set_policy("project", body)),
            ("POST", rf"/v1/projects/{p}:testIamPermissions", lambda: self._test_permissions(body)),
            ("GET", rf"/v3/projects/{p}",
             lambda: {"name": f"projects/{self.project_number}", "projectId": self.project}),
            ("GET", rf"/compute/v1/projects/{p}/aggregated/disks", lambda: self._list_disks(query)),
            ("GET", rf"/compute/v1/projects/{p}/regions/([^/]+)", self._region),
            ("GET", rf"/compute/v1/projects/{p}/zones/([^/]+)/machineTypes/([^/]+)", self._machine_type),
            ("DELETE", rf"/compute/v1/projects/{p}/zones/([^/]+)/disks/([^/]+)", self._delete_disk),
            ("POST", r"/v1/transferJobs", lambda: self._create_transfer_job(body)),
            ("POST", r"/v1/(transferJobs/[^/:]+):run", lambda j: self._run_transfer_job(j, body)),
            ("PATCH", r"/v1/(transferJobs/[^/:]+)", lambda j: self._patch_transfer_job(j, body)),
            ("GET", r"/v1/(transferOperations/[^/]+)", self._poll_transfer),
        ]  # fmt: skip
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and route_method == method:
                return handler(*(urllib.parse.unquote(g) for g in match.groups()))
        raise ApiError(404, f"no such API: {method} {path}")

    # -- validation helpers --------------------------------------------------------------------
    @staticmethod
    def _require(body: Any, fields: dict[str, type | tuple[type, ...]], allowed: set[str]) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        for name, kind in fields.items():
            if name not in body:
                raise ApiError(400, f"Invalid value for field '{name}': required")
            if not isinstance(body[name], kind):
                raise ApiError(400, f"Invalid value for field '{name}': {body[name]!r}")
        unknown = set(body) - set(fields) - allowed
        if unknown:
            raise ApiError(400, f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r}")
        return body

    @staticmethod
    def _name(name: Any) -> str:
        if not isinstance(name, str) or not NAME.match(name):
            raise ApiError(400, f"Invalid value for field 'resource.name': {name!r}. Must be a match of regex "
                                "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'")  # fmt: skip
        return name

    def _region(self, region: str) -> dict[str, Any]:
        base = f"https://www.googleapis.com/compute/v1/projects/{self.project}/zones"
        return {"kind": "compute#region", "name": region, "zones": [f"{base}/{region}-{z}" for z in "bcd"]}

    def _machine_type(self, zone: str, machine_type: str) -> dict[str, Any]:
        if (zone, machine_type) in self.machine_types_missing:
            raise ApiError(404, f"The resource 'projects/{self.project}/zones/{zone}/machineTypes/{machine_type}' "
                           "was not found")  # fmt: skip
        return {"kind": "compute#machineType", "name": machine_type, "zone": zone}

    @staticmethod
    def _get(store: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
        if name not in store:
            raise ApiError(404, f"The resource '{name}' was not found")
        return store[name]

    def _ref(self, store: dict[str, dict[str, Any]], reference: Any, collection: str) -> str:
        """A reference such as projects/<p>/global/networks/<n> (partial or full URL) to something that exists."""
        match = re.search(rf"projects/{re.escape(self.project)}/(?:global|regions/[^/]+)/{collection}/([^/]+)$",
                          str(reference))  # fmt: skip
        if not match or match.group(1) not in store:
            raise ApiError(400, f"Invalid value for field: {reference!r}: the {collection} resource was not found")
        return match.group(1)

    # -- compute -------------------------------------------------------------------------------
    def _create_network(self, body: Any) -> dict[str, Any]:
        body = self._require(body, {"name": str, "autoCreateSubnetworks": bool},
                             {"description", "routingConfig", "mtu"})  # fmt: skip
        name = self._name(body["name"])
        if body["autoCreateSubnetworks"]:
            raise ApiError(400, "this fake expects custom-mode networks")
        if name in self.networks:
            raise ApiError(409, f"The resource 'projects/{self.project}/global/networks/{name}' already exists")
        link = f"https://www.googleapis.com/compute/v1/projects/{self.project}/global/networks/{name}"
        self.networks[name] = {"kind": "compute#network", **body, "selfLink": link}
        return self._compute_operation("global", link, "insert")

    def _delete_network(self, name: str) -> dict[str, Any]:
        self._get(self.networks, name)
        users = [s for s, sub in self.subnetworks.items() if sub["network"].endswith(f"/networks/{name}")]
        users += [r for r, router in self.routers.items() if router["network"].endswith(f"/networks/{name}")]
        if users:
            raise ApiError(400, f"The network resource '{name}' is already being used by '{users[0]}'",
                           "resourceInUseByAnotherResource")  # fmt: skip
        link = self.networks.pop(name)["selfLink"]
        return self._compute_operation("global", link, "delete")

    def _create_subnet(self, region: str, body: Any) -> dict[str, Any]:
        body = self._require(body, {"name": str, "network": str, "ipCidrRange": str},
                             {"region", "privateIpGoogleAccess", "secondaryIpRanges", "description"})  # fmt: skip
        name = self._name(body["name"])
        self._ref(self.networks, body["network"], "networks")
        for extra in body.get("secondaryIpRanges", []):
            self._require(extra, {"rangeName": str, "ipCidrRange": str}, set())
        if name in self.subnetworks:
            raise ApiError(409, f"The resource 'projects/{self.project}/regions/{region}/subnetworks/{name}' "
                                "already exists")  # fmt: skip
        link = f"https://www.googleapis.com/compute/v1/projects/{self.project}/regions/{region}/subnetworks/{name}"
        self.subnetworks[name] = {"kind": "compute#subnetwork", **body, "region": region, "selfLink": link}
        return self._compute_operation(f"regions/{region}", link, "insert")

    def _delete_subnet(self, region: str, name: str) -> dict[str, Any]:
        self._get(self.subnetworks, name)
        users = [c for c, cluster in self.clusters.items() if cluster["subnetwork"].endswith(f"/subnetworks/{name}")]
        if users:
            raise ApiError(400, f"The subnetwork resource '{name}' is already being used by cluster '{users[0]}'",
                           "resourceInUseByAnotherResource")  # fmt: skip
        link = self.subnetworks.pop(name)["selfLink"]
        return self._compute_operation(f"regions/{region}", link, "delete")

    def _check_nats(self, nats: Any) -> None:
        if not isinstance(nats, list):
            raise ApiError(400, "Invalid value for field 'nats'")
        for nat in nats:
            self._require(nat, {"name": str, "natIpAllocateOption": str, "sourceSubnetworkIpRangesToNat": str},
                          {"logConfig", "natIps", "subnetworks"})  # fmt: skip
            if nat["natIpAllocateOption"] not in ("AUTO_ONLY", "MANUAL_ONLY"):
                raise ApiError(400, f"Invalid value for field 'natIpAllocateOption': {nat['natIpAllocateOption']!r}")

    def _create_router(self, region: str, body: Any) -> dict[str, Any]:
        body = self._require(body, {"name": str, "network": str}, {"region", "nats", "bgp", "description"})
        name = self._name(body["name"])
        self._ref(self.networks, body["network"], "networks")
        self._check_nats(body.get("nats", []))
        if name in self.routers:
            raise ApiError(
                409, f"The resource 'projects/{self.project}/regions/{region}/routers/{name}' already exists"
            )
        link = f"https://www.googleapis.com/compute/v1/projects/{self.project}/regions/{region}/routers/{name}"
        self.routers[name] = {"kind": "compute#router", **body, "region": region, "selfLink": link}
        return self._compute_operation(f"regions/{region}", link, "insert")

    def _patch_router(self, region: str, name: str, body: Any) -> dict[str, Any]:
        router = self._get(self.routers, name)
        self._check_nats(body.get("nats", []))
        router.update(body)
        return self._compute_operation(f"regions/{region}", router["selfLink"], "patch")

    def _delete_router(self, region: str, name: str) -> dict[str, Any]:
        link = self._get(self.routers, name)["selfLink"]
        del self.routers[name]
        return self._compute_operation(f"regions/{region}", link, "delete")

    # -- artifact registry ---------------------------------------------------------------------
    def _create_repository(self, location: str, query: dict[str, str], body: Any) -> dict[str, Any]:
        repository_id = query.get("repositoryId", "")
        if not NAME.match(repository_id):
            raise ApiError(400, "repositoryId is required and must be a valid repository id")
        body = self._require(body, {"format": str}, {"description", "labels", "mode", "kmsKeyName"})
        if body["format"] not in ("DOCKER", "MAVEN", "NPM", "PYTHON", "APT", "YUM", "GO"):
            raise ApiError(400, f"invalid format {body['format']!r}")
        if repository_id in self.repositories:
            raise ApiError(409, "the repository already exists")
        name = f"projects/{self.project}/locations/{location}/repositories/{repository_id}"
        self.repositories[repository_id] = {**body, "name": name}
        return self._lro(location)

    def _delete_repository(self, location: str, name: str) -> dict[str, Any]:
        self._get(self.repositories, name)
        del self.repositories[name]
        return self._lro(location)

    # -- container -----------------------------------------------------------------------------
    def _create_cluster(self, location: str, body: Any) -> dict[str, Any]:
        body = self._require(body, {"cluster": dict}, {"parent"})
        cluster = self._require(
            body["cluster"], {"name": str, "network": str, "subnetwork": str, "nodePools": list},
            {"description", "resourceLabels", "ipAllocationPolicy", "privateClusterConfig", "workloadIdentityConfig",
             "addonsConfig", "releaseChannel", "initialClusterVersion", "networkConfig"},
        )  # fmt: skip
        datapath = cluster.get("networkConfig", {}).get("datapathProvider", "DATAPATH_PROVIDER_UNSPECIFIED")
        if datapath not in ("DATAPATH_PROVIDER_UNSPECIFIED", "LEGACY_DATAPATH", "ADVANCED_DATAPATH"):
            raise ApiError(400, f"Invalid value for field 'cluster.networkConfig.datapathProvider': {datapath!r}")
        name = self._name(cluster["name"])
        self._ref(self.networks, cluster["network"], "networks")
        subnet = self.subnetworks[self._ref(self.subnetworks, cluster["subnetwork"], "subnetworks")]
        ranges = {r["rangeName"] for r in subnet.get("secondaryIpRanges", [])}
        policy = cluster.get("ipAllocationPolicy", {})
        for key in ("clusterSecondaryRangeName", "servicesSecondaryRangeName"):
            if policy.get(key) and policy[key] not in ranges:
                raise ApiError(400, f"secondary range {policy[key]!r} not found in subnetwork {subnet['name']}")
        pool = cluster.get("workloadIdentityConfig", {}).get("workloadPool")
        if pool is not None and pool != f"{self.project}.svc.id.goog":
            raise ApiError(400, f"workload pool must be {self.project}.svc.id.goog")
        for node_pool in cluster["nodePools"]:
            self._require(node_pool, {"name": str, "initialNodeCount": int, "config": dict},
                          {"autoscaling", "management", "locations"})  # fmt: skip
        if name in self.clusters:
            raise ApiError(409, f"Already exists: projects/{self.project}/locations/{location}/clusters/{name}")
        self.clusters[name] = {
            **cluster, "location": location, "status": "RUNNING", "endpoint": "203.0.113.10",
            "masterAuth": {"clusterCaCertificate": "LS0tLS1CRUdJTi1GQUtF"},
        }  # fmt: skip
        return self._container_operation(location, "CREATE_CLUSTER")

    def _delete_cluster(self, location: str, name: str) -> dict[str, Any]:
        self._get(self.clusters, name)
        del self.clusters[name]
        return self._container_operation(location, "DELETE_CLUSTER")

    # -- storage -------------------------------------------------------------------------------
    def _create_bucket(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        if query.get("project") != self.project:
            raise ApiError(400, "Required parameter: project")
        body = self._require(body, {"name": str}, {"location", "storageClass", "labels", "versioning", "lifecycle",
                                                   "iamConfiguration"})  # fmt: skip
        if body["name"] in self.buckets:
            raise ApiError(409, "Your previous request to create the named bucket succeeded and you already own it.")
        self.buckets[body["name"]] = {"kind": "storage#bucket", "id": body["name"], **body}
        self.objects[body["name"]] = []
        return self.buckets[body["name"]]

    def _list_buckets(self, query: dict[str, str]) -> dict[str, Any]:
        if query.get("project") != self.project:
            raise ApiError(400, "Required parameter: project")
        prefix = query.get("prefix", "")
        return {"kind": "storage#buckets", "items": [b for n, b in self.buckets.items() if n.startswith(prefix)]}

    def _list_objects(self, bucket: str) -> dict[str, Any]:
        self._get(self.buckets, bucket)
        return {"kind": "storage#objects", "items": list(self.objects[bucket])}

    def _delete_object(self, bucket: str, name: str, query: dict[str, str]) -> dict[str, Any]:
        before = len(self.objects.get(bucket, []))
        generation = query.get("generation")
        kept = [o for o in self.objects.get(bucket, []) if (o["name"], str(o["generation"])) != (name, generation)]
        self.objects[bucket] = kept
        if len(self.objects[bucket]) == before:
            raise ApiError(404, "No such object")
        return {}

    def _delete_bucket(self, bucket: str) -> dict[str, Any]:
        self._get(self.buckets, bucket)
        if self.objects[bucket]:
            raise ApiError(409, "The bucket you tried to delete is not empty.", "conflict")
        del self.buckets[bucket], self.objects[bucket]
        return {}

    # -- dns -----------------------------------------------------------------------------------
    def _rrsets(self, zone: str, query: dict[str, str]) -> dict[str, Any]:
        self._get(self.zones, zone)
        found = [r for r in self.rrsets[zone] if r["name"] == query.get("name", r["name"])
                 and r["type"] == query.get("type", r["type"])]  # fmt: skip
        return {"rrsets": found}

    def _change(self, zone: str, body: Any) -> dict[str, Any]:
        self._get(self.zones, zone)
        body = self._require(body, {}, {"kind", "additions", "deletions"})
        current = self.rrsets[zone]
        for deletion in body.get("deletions", []):
            if deletion not in current:
                raise ApiError(412, "deletion does not match the current record set", "conditionNotMet")
        remaining = [r for r in current if r not in body.get("deletions", [])]
        for addition in body.get("additions", []):
            self._require(addition, {"name": str, "type": str, "ttl": int, "rrdatas": list}, {"kind"})
            if not addition["name"].endswith(self.zones[zone]["dnsName"]):
                raise ApiError(400, f"{addition['name']} is not in the zone")
            if addition["type"] == "CNAME" and not all(v.endswith(".") for v in addition["rrdatas"]):
                raise ApiError(400, "CNAME data must be a fully qualified name")
            if any(r["name"] == addition["name"] and r["type"] == addition["type"] for r in remaining):
                raise ApiError(409, f"The resource record set '{addition['name']}' already exists")
            remaining.append(addition)
        for record in remaining:  # RFC 1034: a CNAME is alone at its name, which Cloud DNS enforces
            others = [r for r in remaining if r["name"] == record["name"] and r["type"] != record["type"]]
            if record["type"] == "CNAME" and others:
                raise ApiError(400, f"The resource '{record['name']}' (CNAME) is not compatible because other records "
                                    f"with that name exist ({others[0]['type']})")  # fmt: skip
        self.rrsets[zone] = remaining
        return {"kind": "dns#change", "status": "done", **body}

    # -- iam -------------------------------------------------------------------------------------
    def _create_account(self, body: Any) -> dict[str, Any]:
        body = self._require(body, {"accountId": str}, {"serviceAccount"})
        account_id = body["accountId"]
        if not re.fullmatch(r"[a-z]([-a-z0-9]{4,28}[a-z0-9])", account_id):
            raise ApiError(400, f"accountId {account_id!r} must be 6-30 characters: [a-z]([-a-z0-9]*[a-z0-9])")
        details = self._require(body.get("serviceAccount", {}), {}, {"displayName", "description"})
        email = f"{account_id}@{self.project}.iam.gserviceaccount.com"
        if email in self.service_accounts:
            raise ApiError(409, f"Service account {account_id} already exists within project projects/{self.project}.")
        self.service_accounts[email] = {
            "name": f"projects/{self.project}/serviceAccounts/{email}", "projectId": self.project, "email": email,
            "uniqueId": str(10**20 + next(self._ids)), **details,
        }  # fmt: skip
        self.policies[f"sa:{email}"] = {"version": 1, "etag": "BwE", "bindings": []}
        if self.propagation_refusals:
            self.unpropagated[email] = self.propagation_refusals
        return self.service_accounts[email]

    def _delete_account(self, email: str) -> dict[str, Any]:
        self._get(self.service_accounts, email)
        del self.service_accounts[email]
        self.policies.pop(f"sa:{email}", None)
        return {}

    def _get_policy(self, resource: str) -> dict[str, Any]:
        policy: dict[str, Any] = copy.deepcopy(
            self.policies.setdefault(resource, {"version": 1, "etag": "BwE", "bindings": []})
        )
        return policy

    def _check_member(self, member: str) -> None:
        kind, _, name = member.partition(":")
        if kind == "serviceAccount" and "[" in name:  # a Kubernetes ServiceAccount of a Workload Identity pool
            pool = name.split("[", 1)[0]
            pools = {c.get("workloadIdentityConfig", {}).get("workloadPool") for c in self.clusters.values()}
            if pool != f"{self.project}.svc.id.goog" or pool not in pools:
                raise ApiError(
                    400,
                    f"Identity Pool does not exist ({pool}). Please check that you specified a "
                    "valid resource name as returned in the `name` attribute in the configuration API.",
                )
        elif kind == "serviceAccount":
            if name not in self.service_accounts and name.endswith(f"@{self.project}.iam.gserviceaccount.com"):
                raise ApiError(400, f"Service account {name} does not exist.")
            if self.unpropagated.get(name):
                self.unpropagated[name] -= 1
                raise ApiError(400, f"Service account {name} does not exist.")
        elif kind not in ("user", "group", "domain", "principal", "principalSet"):
            raise ApiError(400, f"Invalid member: {member!r}")

    def _set_policy(self, resource: str, body: Any) -> dict[str, Any]:
        body = self._require(body, {"policy": dict}, {"updateMask"})
        policy = self._require(body["policy"], {"bindings": list}, {"etag", "version", "auditConfigs"})
        current = self._get_policy(resource)
        if policy.get("etag") != current["etag"]:
            raise ApiError(409, "There were concurrent policy changes. Please retry the whole read-modify-write.",
                           "ABORTED")  # fmt: skip
        for binding in policy["bindings"]:
            self._require(binding, {"role": str, "members": list}, {"condition"})
            for member in binding["members"]:
                self._check_member(member)
        stored = {"version": policy.get("version", 1), "etag": f"BwE{next(self._ids)}", "bindings": policy["bindings"]}
        self.policies[resource] = stored
        return copy.deepcopy(stored)

    def _test_permissions(self, body: Any) -> dict[str, Any]:
        body = self._require(body, {"permissions": list}, set())
        return {"permissions": [p for p in body["permissions"] if p not in self.denied_permissions]}

    # -- compute disks ---------------------------------------------------------------------------
    def _list_disks(self, query: dict[str, str]) -> dict[str, Any]:
        match = re.fullmatch(r'labels\.([a-z0-9_-]+)\s*=\s*"?([^"]*)"?', query.get("filter", ""))
        items: dict[str, Any] = {}
        for key, disk in self.disks.items():
            if match and disk["labels"].get(match.group(1)) != match.group(2):
                continue
            items.setdefault(f"zones/{key.split('/')[0]}", {"disks": []})["disks"].append(disk)
        return {"kind": "compute#diskAggregatedList", "items": items}

    def _delete_disk(self, zone: str, name: str) -> dict[str, Any]:
        disk = self._get(self.disks, f"{zone}/{name}")
        del self.disks[f"{zone}/{name}"]
        return self._compute_operation(f"zones/{zone}", disk["zone"] + f"/disks/{name}", "delete")

    # -- storagetransfer v1 ----------------------------------------------------------------------
    def _create_transfer_job(self, body: Any) -> dict[str, Any]:
        optional = {"name", "description", "status", "schedule", "notificationConfig", "loggingConfig"}
        job = self._require(body, {"projectId": str, "transferSpec": dict}, optional)
        if job["projectId"] != self.project:
            raise ApiError(403, f"The caller has no permission on project {job['projectId']!r}", "PERMISSION_DENIED")
        name = job.get("name") or f"transferJobs/{next(self._ids)}"
        if not re.fullmatch(r"transferJobs/[A-Za-z0-9_-]+", name) or name.startswith("transferJobs/OPI"):
            raise ApiError(400, f"Invalid value for field 'name': {name!r}")
        if name in self.transfer_jobs:
            raise ApiError(409, f"Transfer job {name} already exists")
        spec = self._require(job["transferSpec"], {"awsS3DataSource": dict, "gcsDataSink": dict},
                             {"transferOptions", "objectConditions"})  # fmt: skip
        source = self._require(spec["awsS3DataSource"], {"bucketName": str},
                               {"awsAccessKey", "roleArn", "path"})  # fmt: skip
        if ("awsAccessKey" in source) == ("roleArn" in source):
            raise ApiError(400, "Exactly one of awsAccessKey or roleArn must be set in awsS3DataSource")
        if "awsAccessKey" in source:
            self._require(source["awsAccessKey"], {"accessKeyId": str, "secretAccessKey": str}, set())
        elif not re.fullmatch(r"arn:aws[a-z-]*:iam::[0-9]{12}:role/.+", source["roleArn"]):
            raise ApiError(400, f"Invalid value for field 'roleArn': {source['roleArn']!r}")
        self._require(spec["gcsDataSink"], {"bucketName": str}, {"path"})
        stored = {**copy.deepcopy(job), "name": name, "status": job.get("status", "ENABLED")}
        self.transfer_jobs[name] = stored
        return {k: v for k, v in stored.items() if k != "transferSpec"} | {"transferSpec": _redacted(stored)}

    def _run_transfer_job(self, name: str, body: Any) -> dict[str, Any]:
        self._require(body, {"projectId": str}, set())
        job = self._get(self.transfer_jobs, name)
        if job["status"] != "ENABLED":
            raise ApiError(400, f"Transfer job {name} is {job['status']}", "FAILED_PRECONDITION")
        operation_name = f"transferOperations/{name.replace('/', '-')}-{next(self._ids)}"
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.storagetransfer.v1.TransferOperation", "name": operation_name,
            "projectId": self.project, "transferJobName": name, "status": "IN_PROGRESS", "counters": {},
        }  # fmt: skip
        try:
            metadata["counters"] = self._copy_s3_to_gcs(job["transferSpec"])
            final = "SUCCESS"
        except Exception as exc:  # what the service reports: the failure, in errorBreakdowns
            final = "FAILED"
            code = "PERMISSION_DENIED" if "Denied" in str(exc) else "UNKNOWN"
            entries = [{"url": "s3://", "errorDetails": [str(exc)]}]
            metadata["errorBreakdowns"] = [{"errorCode": code, "errorCount": "1", "errorLogEntries": entries}]
        self.transfer_operations[operation_name] = {"name": operation_name, "metadata": metadata, "done": False,
                                                    "final": final}  # fmt: skip
        return {"name": operation_name, "metadata": {**metadata, "counters": {}}, "done": False}

    def _poll_transfer(self, name: str) -> dict[str, Any]:
        """IN_PROGRESS on the first read after the run, then the final state: callers must poll."""
        operation = self._get(self.transfer_operations, name)
        if not operation["done"]:
            operation["done"] = True
            return {"name": name, "metadata": operation["metadata"], "done": False}
        return {"name": name, "metadata": {**operation["metadata"], "status": operation["final"]}, "done": True}

    def _patch_transfer_job(self, name: str, body: Any) -> dict[str, Any]:
        patch = self._require(body, {"projectId": str, "transferJob": dict}, {"updateTransferJobFieldMask"})
        job = self._get(self.transfer_jobs, name)
        if "status" in patch["transferJob"]:
            job["status"] = patch["transferJob"]["status"]
        return {k: v for k, v in job.items() if k != "transferSpec"}

    def _copy_s3_to_gcs(self, spec: dict[str, Any]) -> dict[str, str]:
        """What the service does: read every object of the S3 bucket and write it to the GCS bucket."""
        import boto3
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        assert self.s3_endpoint and self.gcs_endpoint, "set the fake's s3_endpoint and gcs_endpoint"
        source = spec["awsS3DataSource"]
        if "roleArn" in source:  # the service assumes the role through web identity federation
            sts = boto3.client("sts", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                               aws_access_key_id="google", aws_secret_access_key="google")  # fmt: skip
            assumed = sts.assume_role_with_web_identity(
                RoleArn=source["roleArn"], RoleSessionName="storage-transfer", WebIdentityToken="google-id-token"
            )["Credentials"]
            keys = {"aws_access_key_id": assumed["AccessKeyId"],
                    "aws_secret_access_key": assumed["SecretAccessKey"],
                    "aws_session_token": assumed["SessionToken"]}  # fmt: skip
        else:
            keys = {"aws_access_key_id": source["awsAccessKey"]["accessKeyId"],
                    "aws_secret_access_key": source["awsAccessKey"]["secretAccessKey"]}  # fmt: skip
        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1", **keys)
        anonymous: Any = AnonymousCredentials()  # type: ignore[no-untyped-call]
        client = storage.Client(project=self.project, credentials=anonymous,
                                client_options={"api_endpoint": self.gcs_endpoint})  # fmt: skip
        sink = client.bucket(spec["gcsDataSink"]["bucketName"])
        objects = skipped = copied_bytes = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=source["bucketName"]):
            for item in page.get("Contents", []):
                key, size, etag = item["Key"], item["Size"], item["ETag"].strip('"')
                existing = sink.get_blob(key)
                if (
                    existing is not None
                    and existing.size == size
                    and key not in self.transfer_damages
                    and (existing.md5_hash and base64.b64decode(existing.md5_hash).hex() == etag)
                ):
                    skipped += 1
                    continue
                body = s3.get_object(Bucket=source["bucketName"], Key=key)["Body"]
                data = body.read()
                if key in self.transfer_damages:
                    data = data[::-1]
                sink.blob(key).upload_from_string(data)
                objects += 1
                copied_bytes += size
        return {"objectsCopiedToSink": str(objects), "bytesCopiedToSink": str(copied_bytes),
                "objectsFromSourceSkippedBySync": str(skipped)}  # fmt: skip


def _redacted(job: dict[str, Any]) -> dict[str, Any]:
    """The job's transferSpec as the API answers it: the access key's secret is never returned."""
    spec = copy.deepcopy(job["transferSpec"])
    key = spec["awsS3DataSource"].get("awsAccessKey")
    if key is not None:
        key.pop("secretAccessKey", None)
    return dict(spec)


def _handler(fake: GoogleApiFake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parts.query))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if parts.path == "/token":  # OAuth 2.0 token endpoint for application default credentials
                form = dict(urllib.parse.parse_qsl(raw.decode()))
                fake.requests.append(Request(self.command, parts.path, {}, {"grant_type": form.get("grant_type")}))
                self._reply(200, {"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"})
                return
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                status, payload = 400, {"error": {"code": 400, "message": "Invalid JSON payload received."}}
            else:
                if raw and self.headers.get("Content-Type", "").split(";")[0] != "application/json":
                    status, payload = 400, {"error": {"code": 400, "message": "Content-Type must be JSON"}}
                else:
                    status, payload = fake.handle(self.command, parts.path, query, body,
                                                  self.headers.get("Authorization", ""))  # fmt: skip
            self._reply(status, payload)

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


class FakeServer:
    """Serves a :class:`GoogleApiFake` on 127.0.0.1 (a free port) until ``stop()``."""

    def __init__(self, fake: GoogleApiFake) -> None:
        self.fake = fake
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
        host, port = self.httpd.server_address[:2]
        self.url = fake.url = f"http://{host!s}:{port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> FakeServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
