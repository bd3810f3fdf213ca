"""`cmbcluster infra` on Google Cloud against a local HTTP fake of the documented REST APIs."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google.oauth2.credentials
import pytest

from cmbcluster import provisioning
from cmbcluster.commands.infra import dns_records
from cmbcluster.errors import CmbclusterError, ConfigurationError, Conflict, PermissionDenied, ProviderUnavailable
from cmbcluster.interfaces import ProvisioningOptions
from cmbcluster.provisioning import ProvisioningRecord
from cmbcluster.testing.process import clean_environ, run_cli
from cmbcluster.testing.provisioning import Events, Inventory, ProvisionerContract
from cmbcluster_gcp.provisioning import GcpProvisioner
from cmbcluster_gcp.rest import GoogleApi
from cmbcluster_gcp.settings import GcpSettings

sys.path.insert(0, str(Path(__file__).parent))
from google_api_fake import TOKEN, FakeServer, GoogleApiFake

PROJECT, REGION, CLUSTER = "cmbcluster-test", "europe-west1", "cmbtest"
API_STEPS = ["network", "subnetwork", "cloud-nat", "artifact-registry", "database-bucket", "gke-cluster",
             "service-accounts"]  # fmt: skip
ADDON_STEPS = ["addon-cert-manager", "addon-ingress-nginx", "addon-cluster-config"]
STEPS = API_STEPS + ADDON_STEPS
RESOURCES = 7  # network, subnetwork, router, repository, bucket, cluster, the control plane's service account
CONTROL_PLANE = f"{CLUSTER}-controlplane@{PROJECT}.iam.gserviceaccount.com"
P = f"/compute/v1/projects/{PROJECT}"
#: the fake's collections of the deployment's resources (one of each after `up`)
FAKE_KINDS = ("networks", "subnetworks", "routers", "repositories", "buckets", "clusters", "service_accounts")


@pytest.fixture
def server() -> Iterator[FakeServer]:
    running = FakeServer(GoogleApiFake(project=PROJECT)).start()
    yield running
    running.stop()


@pytest.fixture
def fake(server: FakeServer) -> GoogleApiFake:
    return server.fake


@pytest.fixture
def settings(server: FakeServer) -> GcpSettings:
    return GcpSettings(project_id=PROJECT, region=REGION, cluster_name=CLUSTER, google_api_endpoint=server.url)


def make_provisioner(settings: GcpSettings, server: FakeServer) -> GcpProvisioner:
    credentials: Any = google.oauth2.credentials.Credentials(TOKEN)  # type: ignore[no-untyped-call]
    api = GoogleApi(credentials, endpoint=server.url, backoff_seconds=0.01, poll_interval=0.01)
    return GcpProvisioner(settings, api=api, poll_interval=0.01)


@pytest.fixture
def provisioner(settings: GcpSettings, server: FakeServer) -> Iterator[GcpProvisioner]:
    p = make_provisioner(settings, server)
    yield p
    p.close()


@pytest.fixture
def record(tmp_path: Path) -> ProvisioningRecord:
    return ProvisioningRecord.for_deployment(tmp_path / "infra", provider="gcp", deployment=CLUSTER)


def body_of(fake: GoogleApiFake, method: str, pattern: str) -> Any:
    calls = fake.calls(method, pattern)
    assert len(calls) == 1, [c.path for c in calls]
    return calls[0].body


class TestGcpProvisionerContract(ProvisionerContract):
    """The provisioner contract against the Google API fake: what the deployment holds, as the fake keeps it."""

    @pytest.fixture
    def provisioner(self, settings: GcpSettings, server: FakeServer) -> Iterator[GcpProvisioner]:
        p = make_provisioner(settings, server)
        yield p
        p.close()

    @pytest.fixture
    def inventory(self, fake: GoogleApiFake) -> Inventory:
        def counts() -> dict[str, int]:
            return {kind: len(getattr(fake, kind)) for kind in FAKE_KINDS}

        return counts

    @pytest.fixture
    def full_inventory(self) -> dict[str, int]:
        return dict.fromkeys(FAKE_KINDS, 1)


def test_plan_names_every_step_and_calls_no_api(provisioner: GcpProvisioner, fake: GoogleApiFake) -> None:
    steps = provisioner.plan()
    assert [s.name for s in steps] == STEPS
    creates = [item for s in steps for item in s.creates]
    assert f"container/cluster {CLUSTER}" in creates and f"artifactregistry/repository {CLUSTER}" in creates
    assert f"iam/service-account {CONTROL_PLANE}" in creates
    assert f"storage/bucket {CLUSTER}-database-{PROJECT}" in creates
    assert fake.requests == []


def test_up_sends_the_documented_requests_then_down_removes_everything(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    events = Events()
    provisioning.up(provisioner, record, ProvisioningOptions(addons="print"), progress=events)

    network = body_of(fake, "POST", rf"^{P}/global/networks$")
    assert network["name"] == f"{CLUSTER}-net" and network["autoCreateSubnetworks"] is False
    assert network["routingConfig"] == {"routingMode": "REGIONAL"}
    subnet = body_of(fake, "POST", rf"^{P}/regions/{REGION}/subnetworks$")
    assert subnet["network"] == f"projects/{PROJECT}/global/networks/{CLUSTER}-net" and subnet["privateIpGoogleAccess"]
    assert {r["rangeName"] for r in subnet["secondaryIpRanges"]} == {"pods", "services"}
    router = body_of(fake, "POST", rf"^{P}/regions/{REGION}/routers$")
    assert router["nats"][0]["natIpAllocateOption"] == "AUTO_ONLY"
    assert router["nats"][0]["sourceSubnetworkIpRangesToNat"] == "ALL_SUBNETWORKS_ALL_IP_RANGES"
    [repository] = fake.calls("POST", rf"^/v1/projects/{PROJECT}/locations/{REGION}/repositories$")
    assert repository.query == {"repositoryId": CLUSTER} and repository.body["format"] == "DOCKER"
    [bucket] = fake.calls("POST", r"^/storage/v1/b$")
    assert bucket.query == {"project": PROJECT}
    assert bucket.body["iamConfiguration"] == {"uniformBucketLevelAccess": {"enabled": True},
                                               "publicAccessPrevention": "enforced"}  # fmt: skip
    assert bucket.body["versioning"] == {"enabled": True} and bucket.body["location"] == REGION
    assert bucket.body["lifecycle"] == {
        "rule": [
            {"action": {"type": "Delete"}, "condition": {"isLive": False, "daysSinceNoncurrentTime": 30}},
            {"action": {"type": "Delete"}, "condition": {"isLive": False, "numNewerVersions": 4}},
        ]
    }
    cluster = body_of(fake, "POST", rf"^/v1/projects/{PROJECT}/locations/{REGION}/clusters$")["cluster"]
    assert cluster["addonsConfig"]["gcsFuseCsiDriverConfig"] == {"enabled": True}
    assert cluster["workloadIdentityConfig"] == {"workloadPool": f"{PROJECT}.svc.id.goog"}
    assert cluster["privateClusterConfig"]["enablePrivateNodes"] is True
    # the GKE metadata server: pods get their own Workload Identity, never the node's credentials
    assert cluster["nodePools"][0]["config"]["workloadMetadataConfig"] == {"mode": "GKE_METADATA"}
    assert cluster["nodePools"][0]["config"]["metadata"] == {"disable-legacy-endpoints": "true"}
    # Dataplane V2: NetworkPolicies enforced (on GKE without it they are accepted and ignored)
    assert cluster["networkConfig"] == {"datapathProvider": "ADVANCED_DATAPATH"}
    # the persistent disk CSI driver: GKE's default StorageClass standard-rwo binds the control plane's claim
    assert cluster["addonsConfig"]["gcePersistentDiskCsiDriverConfig"] == {"enabled": True}
    assert cluster["subnetwork"] == f"projects/{PROJECT}/regions/{REGION}/subnetworks/{CLUSTER}-subnet"

    # Every create is preceded by a GET (404) and followed by polling its operation until DONE.
    methods = [(r.method, r.path) for r in fake.requests]
    assert methods.index(("GET", f"{P}/global/networks/{CLUSTER}-net")) < methods.index(
        ("POST", f"{P}/global/networks")
    )
    assert len(fake.calls("GET", r"/operations/")) >= 2 * 5  # RUNNING then DONE for each operation
    assert len(fake.networks) == len(fake.subnetworks) == len(fake.routers) == len(fake.clusters) == 1
    assert len(fake.repositories) == len(fake.buckets) == len(fake.service_accounts) == 1

    # the control plane's Google service account: Cloud Storage; only its own Kubernetes ServiceAccount acts as it
    assert fake.members("project", "roles/storage.admin") == [f"serviceAccount:{CONTROL_PLANE}"]
    assert fake.members("project", "roles/iam.serviceAccountAdmin") == []  # only in service-account mode
    assert fake.members(f"sa:{CONTROL_PLANE}", "roles/iam.workloadIdentityUser") == [
        f"serviceAccount:{PROJECT}.svc.id.goog[cmbcluster/cmbcluster-controlplane]"
    ]
    commands = events.actions("command")
    assert [c.split()[3] for c in commands] == ["cert-manager", "ingress-nginx", "cmbcluster-cluster-config"]
    assert commands[0].startswith("helm upgrade --install cert-manager cert-manager --repo https://charts.jetstack.io")
    assert "issuer.dns01" not in commands[2] and "storageClass" not in commands[2]  # no domain; GKE's own class
    kubeconfig = json.loads(record.path.with_suffix(".kubeconfig").read_text())
    assert kubeconfig["clusters"][0]["cluster"]["server"] == "https://203.0.113.10"
    assert kubeconfig["users"][0]["user"]["exec"]["command"] == "gke-gcloud-auth-plugin"
    states = {s.step: s.state for s in provisioning.status(provisioner, record)}
    assert [states[s] for s in STEPS] == ["done"] * len(API_STEPS) + ["pending"] * len(ADDON_STEPS)

    provisioning.down(provisioner, record)
    assert fake.resource_count() == 0 and record.resources == []
    assert fake.members("project", "roles/storage.admin") == []  # the binding went with it
    deletes = [r.path for r in fake.requests if r.method == "DELETE"]
    # The cluster before its subnetwork, the router and subnetwork before the network (the fake enforces it).
    assert deletes[0].endswith(f"/serviceAccounts/{CONTROL_PLANE}")
    assert deletes[-1] == f"{P}/global/networks/{CLUSTER}-net"


def test_rerunning_up_only_reads(provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    fake.requests.clear()
    events = Events()
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"), progress=events)
    writes = [r.path for r in fake.requests if r.method != "GET" and not r.path.endswith(
        (":getIamPolicy", ":testIamPermissions"))]  # fmt: skip
    assert writes == []  # reads only (IAM policies are read with POST)
    assert events.actions("created") == [] and len(events.actions("adopted")) == RESOURCES + 2  # and 2 bindings


def test_a_refused_create_names_what_was_refused_and_a_rerun_resumes(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    fake.fail_next("POST", r"/clusters$", 403)  # e.g. a quota or a missing permission, fixed by the operator
    with pytest.raises(PermissionDenied, match="GKE cluster"):
        provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert record.completed_steps == API_STEPS[:5] and not fake.clusters
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert len(fake.calls("POST", rf"^{P}/global/networks$")) == 1
    assert len(fake.calls("POST", r"/clusters$")) == 2  # the refused one, then the one that worked


def test_a_create_answered_409_is_adopted(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    # The network exists although our GET said otherwise (a racing run): the 409 is not a failure.
    fake.fail_next("GET", rf"^{P}/global/networks/{CLUSTER}-net$", 404)
    fake.networks[f"{CLUSTER}-net"] = {"name": f"{CLUSTER}-net", "autoCreateSubnetworks": False,
                                       "selfLink": f"https://x{P}/global/networks/{CLUSTER}-net"}  # fmt: skip
    events = Events()
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"), progress=events)
    assert events.actions("adopted")[0].startswith(f"compute/network {CLUSTER}-net")
    assert fake.resource_count() == RESOURCES


def test_server_errors_are_retried(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    fake.fail_next("GET", r"/subnetworks/", 503)
    fake.fail_next("POST", r"/repositories$", 429)
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert fake.resource_count() == RESOURCES
    assert len(fake.calls("POST", r"/repositories$")) == 2


def test_down_after_a_partial_up_removes_what_exists(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    fake.fail_next("POST", r"/storage/v1/b$", 400)
    with pytest.raises(CmbclusterError):
        provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert fake.resource_count() == 4
    del fake.repositories[CLUSTER]  # deleted by hand meanwhile
    events = Events()
    provisioning.down(provisioner, record, progress=events)
    assert fake.resource_count() == 0 and record.resources == []
    assert any(f"repository {CLUSTER}" in message for message in events.actions("gone"))


def test_a_database_bucket_holding_backups_is_kept_unless_delete_data(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    bucket = f"{CLUSTER}-database-{PROJECT}"
    fake.objects[bucket] = [{"name": "backups/a.sqlite", "generation": "1"}, {"name": "backups/a.sqlite",
                                                                              "generation": "2"}]  # fmt: skip
    with pytest.raises(Conflict, match=r"nothing was deleted.*--delete-data"):
        provisioning.down(provisioner, record)
    assert fake.resource_count() == RESOURCES and not fake.calls("DELETE", ".")
    provisioning.down(provisioner, record, ProvisioningOptions(delete_data=True))
    assert fake.resource_count() == 0


def test_cloud_dns_upsert_replaces_records_atomically(provisioner: GcpProvisioner, fake: GoogleApiFake) -> None:
    fake.add_zone("cmb-zone", "example.org.")
    done = provisioner.upsert_dns(dns_records("cmb.example.org", "203.0.113.7", environments_domain="envs.example.org"))
    assert done[0] == "UPSERT A cmb.example.org. -> 203.0.113.7 (zone cmb-zone)"
    provisioner.upsert_dns(dns_records("cmb.example.org", "203.0.113.8", environments_domain="envs.example.org"))
    records = {(r["name"], r["type"]): r["rrdatas"] for r in fake.rrsets["cmb-zone"]}
    assert records[("cmb.example.org.", "A")] == ["203.0.113.8"]
    assert records[("*.envs.example.org.", "A")] == ["203.0.113.8"]  # the environments' domain, not *.<UI host>
    [change] = fake.calls("POST", r"/managedZones/cmb-zone/changes$")[1:]
    assert [d["rrdatas"] for d in change.body["deletions"]] == [["203.0.113.7"], ["203.0.113.7"]]

    assert provisioner.upsert_dns(dns_records("cmb.example.org", "203.0.113.8"))[0].startswith("unchanged")
    lb = provisioner.upsert_dns(dns_records("apps.example.org", "lb.example.net"), dry_run=True)
    assert lb[0] == "UPSERT CNAME apps.example.org. -> lb.example.net. (zone cmb-zone)"
    # a load balancer's name where an address was: the A record goes in the same change (Cloud DNS refuses
    # a CNAME beside it), and back
    replaced = provisioner.upsert_dns(dns_records("cmb.example.org", "lb.example.net"))
    assert replaced[0] == "DELETE A cmb.example.org. -> 203.0.113.8 (replaced by a CNAME)"
    records = {(r["name"], r["type"]): r["rrdatas"] for r in fake.rrsets["cmb-zone"]}
    assert records[("cmb.example.org.", "CNAME")] == ["lb.example.net."] and ("cmb.example.org.", "A") not in records
    provisioner.upsert_dns(dns_records("cmb.example.org", "203.0.113.9"))
    records = {(r["name"], r["type"]): r["rrdatas"] for r in fake.rrsets["cmb-zone"]}
    assert records[("cmb.example.org.", "A")] == ["203.0.113.9"] and ("cmb.example.org.", "CNAME") not in records
    with pytest.raises(CmbclusterError, match="zone apex"):
        provisioner.upsert_dns(dns_records("example.org", "lb.example.net"))
    with pytest.raises(CmbclusterError, match="no public Cloud DNS managed zone"):
        provisioner.upsert_dns(dns_records("cmb.example.com", "203.0.113.8"))


# -- the command line, as an operator runs it -----------------------------------------------


@pytest.fixture
def cli_env(server: FakeServer, tmp_path: Path) -> dict[str, str]:
    """Application default credentials: a service account key whose token endpoint is the fake's
    (google-auth signs a JWT with the key and trades it for an access token there)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps({
        "type": "service_account", "project_id": PROJECT, "private_key_id": "k1", "private_key": pem.decode(),
        "client_email": f"deployer@{PROJECT}.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": f"{server.url}/token",
    }))  # fmt: skip
    return {
        **clean_environ(),
        "CLOUD_PROVIDER": "gcp",
        "CMBCLUSTER_AUTH_PROVIDERS": "local",
        "CMBCLUSTER_DATA_DIR": str(tmp_path / "data"),
        "PROJECT_ID": PROJECT,
        "PROJECT_NUMBER": "123456789",
        "REGION": REGION,
        "CLUSTER_NAME": CLUSTER,
        "GOOGLE_API_ENDPOINT": server.url,
        "GOOGLE_APPLICATION_CREDENTIALS": str(adc),
    }


def test_cli_plan_up_status_down(cli_env: dict[str, str], tmp_path: Path, fake: GoogleApiFake) -> None:
    plan = run_cli("infra", "plan", env=cli_env, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert f"{len(STEPS)} steps" in plan.stdout and "GcsFuseCsiDriver" in plan.stdout and fake.requests == []

    up = run_cli("infra", "up", "--addons", "print", env=cli_env, cwd=tmp_path, timeout=120)
    assert up.returncode == 0, up.stderr
    assert f"[6/{len(STEPS)}] gke-cluster" in up.stdout and fake.resource_count() == RESOURCES
    again = run_cli("infra", "up", "--addons", "skip", env=cli_env, cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and "created" not in again.stdout and fake.resource_count() == RESOURCES

    status = run_cli("infra", "status", "--json", env=cli_env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert {s["step"]: s["state"] for s in json.loads(status.stdout)}["gke-cluster"] == "done"

    down = run_cli("infra", "down", "--yes", env=cli_env, cwd=tmp_path, timeout=120)
    assert down.returncode == 0, down.stderr
    assert fake.resource_count() == 0


def test_cli_images_use_artifact_registry(cli_env: dict[str, str], tmp_path: Path, fake: GoogleApiFake) -> None:
    host = f"{REGION}-docker.pkg.dev"
    build = run_cli("images", "build", "--dry-run", "--tag", "v2", "--image", "controlplane", env=cli_env, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    assert build.stdout.splitlines() == [
        f"would run: docker build --file helm/images/controlplane/Dockerfile --tag {host}/{PROJECT}/{CLUSTER}/"
        "controlplane:v2 --platform linux/amd64 ."
    ]
    push = run_cli("images", "push", "--dry-run", "--tag", "v2", env=cli_env, cwd=tmp_path)
    assert push.returncode == 0, push.stderr
    assert push.stdout.splitlines() == [
        f"would run: <gcp registry token> | docker login --username oauth2accesstoken --password-stdin {host}",
        f"would run: docker push {host}/{PROJECT}/{CLUSTER}/controlplane:v2",
        f"would run: docker push {host}/{PROJECT}/{CLUSTER}/environment:v2",
    ]
    assert fake.calls("POST", r"^/token$")  # the token came from the credentials' own token endpoint


def test_cli_errors_are_one_clear_line(cli_env: dict[str, str], tmp_path: Path, server: FakeServer) -> None:
    bad_token = {**cli_env, "GOOGLE_OAUTH_ACCESS_TOKEN": "wrong"}
    cases = [
        (bad_token, ["infra", "up", "--addons", "print"], "could not authenticate to Google Cloud"),
        ({**cli_env, "PATH": str(tmp_path)}, ["infra", "up"], "`gke-gcloud-auth-plugin` is not installed"),
        ({**cli_env, "PROJECT_ID": "My_Project"}, ["infra", "plan"], "PROJECT_ID 'My_Project' is not a Google Cloud "
         "project id"),
        ({**cli_env, "REGION": "mars"}, ["infra", "plan"], "REGION 'mars' is not a Google Cloud region"),
        ({**cli_env, "ZONE": "us-east1-b"}, ["infra", "plan"], "ZONE 'us-east1-b' is not in REGION europe-west1"),
        ({**cli_env, "GOOGLE_API_ENDPOINT": "http://127.0.0.1:9"}, ["infra", "status"], "cannot reach Google Cloud"),
        ({**cli_env, "GKE_RELEASE_CHANNEL": "NIGHTLY"}, ["infra", "plan"], "GKE_RELEASE_CHANNEL"),
        ({**cli_env, "GKE_NODES_PER_ZONE": "3", "GKE_MAX_NODES_PER_ZONE": "2"}, ["config", "check"],
         "GKE_MAX_NODES_PER_ZONE (2) is below GKE_NODES_PER_ZONE (3)"),
        ({**cli_env, "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing.json")},
         ["infra", "up", "--addons", "print"], "no Google Cloud credentials"),
        # a database bucket Cloud Storage would refuse: said by `config check` without a cluster, and by `plan`
        ({**cli_env, "GCS_DATABASE_BUCKET": "Lab_Backups"}, ["config", "check"],
         "CMBCLUSTER_DATABASE_BUCKET: 'Lab_Backups' is not"),
        ({**cli_env, "GCS_DATABASE_BUCKET": "Lab-Backups"}, ["infra", "plan"], "'Lab-Backups' is not a valid bucket"),
    ]  # fmt: skip
    run_cli("infra", "up", "--addons", "skip", env=cli_env, cwd=tmp_path, timeout=120)  # so that status has work
    for env, args, message in cases:
        result = run_cli(*args, env=env, cwd=tmp_path, timeout=120)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


# -- what the chart needs, who may do what, what `down` keeps ------------------------------------


@pytest.fixture
def with_domain(settings: GcpSettings, server: FakeServer) -> Iterator[GcpProvisioner]:
    """A deployment with its names in a Cloud DNS zone: cert-manager gets an account for it, and a ClusterIssuer."""
    server.fake.add_zone("cmb-zone", "example.org.")
    credentials: Any = google.oauth2.credentials.Credentials(TOKEN)  # type: ignore[no-untyped-call]
    api = GoogleApi(credentials, endpoint=server.url, backoff_seconds=0.01, poll_interval=0.01)
    p = GcpProvisioner(settings, api=api, poll_interval=0.01, domains=["cmb.example.org", "envs.example.org"],
                       ingress_namespace="edge", namespace="research")  # fmt: skip
    yield p
    p.close()


def test_up_installs_what_the_chart_needs_with_a_dns01_identity(
    with_domain: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    events = Events()
    provisioning.up(with_domain, record, ProvisioningOptions(addons="print"), progress=events)
    cert_manager = f"{CLUSTER}-cert-manager@{PROJECT}.iam.gserviceaccount.com"
    assert set(fake.service_accounts) == {CONTROL_PLANE, cert_manager}
    # DNS changes in the deployment's zone only, by cert-manager's own ServiceAccount only
    assert fake.members("zone:cmb-zone", "roles/dns.admin") == [f"serviceAccount:{cert_manager}"]
    assert fake.members("project", "roles/dns.admin") == []
    assert fake.members(f"sa:{cert_manager}", "roles/iam.workloadIdentityUser") == [
        f"serviceAccount:{PROJECT}.svc.id.goog[cert-manager/cert-manager]"
    ]
    assert fake.members(f"sa:{CONTROL_PLANE}", "roles/iam.workloadIdentityUser") == [
        f"serviceAccount:{PROJECT}.svc.id.goog[research/cmbcluster-controlplane]"  # the control plane's namespace
    ]
    commands = {c.split()[3]: c for c in events.actions("command")}
    assert rf"serviceAccount.annotations.iam\.gke\.io/gcp-service-account={cert_manager}" in commands["cert-manager"]
    assert (
        "--namespace edge" in commands["ingress-nginx"]
        and "ingressClassResource.name=nginx" in commands["ingress-nginx"]
    )
    # environments on the control plane's host cannot send headers that reach the whole site
    assert (
        "controller.config.hide-headers=" in commands["ingress-nginx"]
        and "service-worker-allowed" in (commands["ingress-nginx"])
    )
    dns01 = json.loads(commands["cmbcluster-cluster-config"].split("issuer.dns01=", 1)[1].strip("'"))
    assert dns01 == {"cloudDNS": {"project": PROJECT, "hostedZoneName": "cmb-zone"}}

    provisioning.down(with_domain, record)
    assert fake.service_accounts == {} and fake.members("zone:cmb-zone", "roles/dns.admin") == []


def test_the_service_account_mode_gives_the_control_plane_iam_too(
    settings: GcpSettings, server: FakeServer, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    credentials: Any = google.oauth2.credentials.Credentials(TOKEN)  # type: ignore[no-untyped-call]
    api = GoogleApi(credentials, endpoint=server.url, backoff_seconds=0.01, poll_interval=0.01)
    mode = GcpProvisioner(settings.model_copy(update={"identity_mode": "service-account"}), api=api,
                          poll_interval=0.01)  # fmt: skip
    provisioning.up(mode, record, ProvisioningOptions(addons="skip"))
    assert fake.members("project", "roles/iam.serviceAccountAdmin") == [f"serviceAccount:{CONTROL_PLANE}"]
    mode.close()


def test_bindings_of_a_new_service_account_wait_for_iam_propagation(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    pauses: list[float] = []
    monkeypatch.setattr(time, "sleep", pauses.append)
    fake.propagation_refusals = 2  # IAM answers "does not exist" twice for a service account just made
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert fake.members("project", "roles/storage.admin") == [f"serviceAccount:{CONTROL_PLANE}"]
    assert [p for p in pauses if p >= 1.0][:2] == [1.0, 2.0]
    provisioning.down(provisioner, record)

    fake.propagation_refusals = 10**6  # never: reported once the window is over, with the record intact for a rerun
    provisioner.propagation_seconds = 5
    pauses.clear()
    with pytest.raises(ProviderUnavailable, match=r"still does not know a principal .* does not exist"):
        provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert sum(p for p in pauses if p >= 1.0) == pytest.approx(5) and record.find("iam/service-account")


def test_missing_permissions_and_zones_are_named_before_anything_is_created(
    with_domain: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    fake.denied_permissions = {"container.clusters.create", "iam.serviceAccounts.create"}
    del fake.zones["cmb-zone"]
    with pytest.raises(ConfigurationError) as refused:
        provisioning.up(with_domain, record, ProvisioningOptions(addons="print"))
    message = str(refused.value)
    assert "may not container.clusters.create" in message and "may not iam.serviceAccounts.create" in message
    assert "no public Cloud DNS managed zone holds cmb.example.org" in message and "nothing was created" in message
    assert fake.resource_count() == 0 and record.resources == []


def test_a_machine_type_a_zone_of_the_cluster_lacks_is_named_before_anything_is_created(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    """A GKE_MACHINE_TYPE one zone of the region does not offer (or a typo, offered nowhere) was
    refused only at the node pool, after the network, the NAT and the cluster were made."""
    machine_type, region = provisioner.settings.gke_machine_type, provisioner.settings.region
    fake.machine_types_missing = {(f"{region}-c", machine_type)}
    with pytest.raises(ConfigurationError) as refused:
        provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    message = str(refused.value)
    assert f"GKE_MACHINE_TYPE {machine_type} is not offered in {region}-c (the cluster's nodes go to " in message
    assert "nothing was created" in message and fake.resource_count() == 0 and record.resources == []
    fake.machine_types_missing = set()
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))  # offered everywhere: it goes on
    assert record.find("container/cluster")


def test_missing_tools_are_named_before_anything_is_created(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:  # fmt: skip
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigurationError) as refused:
        provisioning.up(provisioner, record)
    assert "`helm` is not installed" in str(refused.value) and "`gke-gcloud-auth-plugin`" in str(refused.value)
    assert fake.resource_count() == 0


def test_down_lists_what_it_keeps_and_deletes_it_only_when_told(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    # what the running deployment made: a user's Google service account and bucket, the control plane's disk
    description = f"CMBCluster deployment {CLUSTER}: user 0f3a9c1e7b2d4e6f8a0b1c2d3e4f5a6b"
    user_account = fake._create_account({"accountId": f"{CLUSTER}-0f3a9c1e7b2d4e6f8a0b",
                                         "serviceAccount": {"description": description}})["email"]  # fmt: skip
    fake._create_account({"accountId": "someone-else", "serviceAccount": {"description": "not ours"}})
    fake._create_bucket({"project": PROJECT}, {"name": f"{CLUSTER}-user-0f3a9c1e7b-aa11", "labels": {
        "owner": "0f3a9c1e7b", "managed-by": "cmbcluster"}})  # fmt: skip
    fake.objects[f"{CLUSTER}-user-0f3a9c1e7b-aa11"] = [{"name": "maps/a.fits", "generation": "1"}]
    fake._create_bucket({"project": PROJECT}, {"name": f"{CLUSTER}-user-by-hand", "labels": {}})
    fake.add_disk(f"{REGION}-b", "pvc-1234", {"cmbcluster-deployment": CLUSTER, "goog-k8s-cluster-name": CLUSTER})
    fake.add_disk(f"{REGION}-b", "another-disk", {})

    kept = {(r.kind, r.name) for r in provisioning.retained(provisioner, record)}
    assert kept == {("iam/user-service-account", user_account), ("compute/disk", "pvc-1234"),
                    ("storage/user-bucket", f"{CLUSTER}-user-0f3a9c1e7b-aa11")}  # fmt: skip
    events = Events()
    provisioning.down(provisioner, record, progress=events)
    notes = [n for n in events.actions("note") if n.startswith("kept on purpose")]
    assert len(notes) == 3 and any("with all its data" in n for n in notes)
    assert user_account in fake.service_accounts and f"{REGION}-b/pvc-1234" in fake.disks

    provisioning.down(provisioner, record, ProvisioningOptions(delete_retained=True))
    assert provisioning.retained(provisioner, record) == []
    assert set(fake.service_accounts) == {f"someone-else@{PROJECT}.iam.gserviceaccount.com"}
    assert set(fake.buckets) == {f"{CLUSTER}-user-by-hand"} and set(fake.disks) == {f"{REGION}-b/another-disk"}


def test_dns_records_are_recorded_and_down_removes_them(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    fake.add_zone("cmb-zone", "example.org.")
    provisioning.dns(provisioner, record, dns_records("cmb.example.org", "lb.example.net",
                                                      environments_domain="envs.example.org"))  # fmt: skip
    assert {(r["name"], r["type"]) for r in fake.rrsets["cmb-zone"]} == {
        ("example.org.", "SOA"), ("cmb.example.org.", "CNAME"), ("*.envs.example.org.", "CNAME")}  # fmt: skip
    provisioning.down(provisioner, record)
    assert [(r["name"], r["type"]) for r in fake.rrsets["cmb-zone"]] == [("example.org.", "SOA")]
