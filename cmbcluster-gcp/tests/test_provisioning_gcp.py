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
from cmbcluster.errors import CmbclusterError, Conflict, PermissionDenied
from cmbcluster.interfaces import ProgressEvent, ProvisioningOptions
from cmbcluster.provisioning import ProvisioningRecord
from cmbcluster.testing.process import clean_environ, run_cli
from cmbcluster_gcp.provisioning import GcpProvisioner
from cmbcluster_gcp.rest import GoogleApi
from cmbcluster_gcp.settings import GcpSettings

sys.path.insert(0, str(Path(__file__).parent))
from google_api_fake import TOKEN, FakeServer, GoogleApiFake

PROJECT, REGION, CLUSTER = "cmbcluster-test", "europe-west1", "cmbtest"
STEPS = ["network", "subnetwork", "cloud-nat", "artifact-registry", "database-bucket", "gke-cluster",
         "addon-cert-manager"]  # fmt: skip
P = f"/compute/v1/projects/{PROJECT}"


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


@pytest.fixture
def provisioner(settings: GcpSettings, server: FakeServer) -> Iterator[GcpProvisioner]:
    credentials: Any = google.oauth2.credentials.Credentials(TOKEN)  # type: ignore[no-untyped-call]
    api = GoogleApi(credentials, endpoint=server.url, backoff_seconds=0.01, poll_interval=0.01)
    p = GcpProvisioner(settings, api=api, poll_interval=0.01)
    yield p
    p.close()


@pytest.fixture
def record(tmp_path: Path) -> ProvisioningRecord:
    return ProvisioningRecord.for_deployment(tmp_path / "infra", provider="gcp", deployment=CLUSTER)


class Events(list[ProgressEvent]):
    def __call__(self, event: ProgressEvent) -> None:
        self.append(event)

    def actions(self, action: str) -> list[str]:
        return [e.message for e in self if e.action == action]


def body_of(fake: GoogleApiFake, method: str, pattern: str) -> Any:
    calls = fake.calls(method, pattern)
    assert len(calls) == 1, [c.path for c in calls]
    return calls[0].body


def test_plan_names_every_step_and_calls_no_api(provisioner: GcpProvisioner, fake: GoogleApiFake) -> None:
    steps = provisioner.plan()
    assert [s.name for s in steps] == STEPS
    creates = [item for s in steps for item in s.creates]
    assert f"container/cluster {CLUSTER}" in creates and "artifactregistry/repository cmbcluster" in creates
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
    assert repository.query == {"repositoryId": "cmbcluster"} and repository.body["format"] == "DOCKER"
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
    assert cluster["nodePools"][0]["config"]["workloadMetadataConfig"] == {"mode": "GKE_METADATA"}
    assert cluster["subnetwork"] == f"projects/{PROJECT}/regions/{REGION}/subnetworks/{CLUSTER}-subnet"

    # Every create is preceded by a GET (404) and followed by polling its operation until DONE.
    methods = [(r.method, r.path) for r in fake.requests]
    assert methods.index(("GET", f"{P}/global/networks/{CLUSTER}-net")) < methods.index(
        ("POST", f"{P}/global/networks")
    )
    assert len(fake.calls("GET", r"/operations/")) >= 2 * 5  # RUNNING then DONE for each operation
    assert len(fake.networks) == len(fake.subnetworks) == len(fake.routers) == len(fake.clusters) == 1
    assert len(fake.repositories) == len(fake.buckets) == 1

    [command] = events.actions("command")
    assert command.startswith("helm upgrade --install cert-manager cert-manager --repo https://charts.jetstack.io")
    kubeconfig = json.loads(record.path.with_suffix(".kubeconfig").read_text())
    assert kubeconfig["clusters"][0]["cluster"]["server"] == "https://203.0.113.10"
    assert kubeconfig["users"][0]["user"]["exec"]["command"] == "gke-gcloud-auth-plugin"
    states = {s.step: s.state for s in provisioning.status(provisioner, record)}
    assert [states[s] for s in STEPS] == ["done"] * 6 + ["pending"]

    provisioning.down(provisioner, record)
    assert fake.resource_count() == 0 and record.resources == []
    deletes = [r.path for r in fake.requests if r.method == "DELETE"]
    # The cluster before its subnetwork, the router and subnetwork before the network (the fake enforces it).
    assert deletes[0].endswith(f"/storage/v1/b/{CLUSTER}-database-{PROJECT}") or "clusters" in deletes[0]
    assert deletes[-1] == f"{P}/global/networks/{CLUSTER}-net"


def test_rerunning_up_only_reads(provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    fake.requests.clear()
    events = Events()
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"), progress=events)
    assert {r.method for r in fake.requests} == {"GET"}
    assert events.actions("created") == [] and len(events.actions("adopted")) == 6


def test_up_interrupted_midway_resumes_without_duplicates(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    fake.fail_next("POST", r"/clusters$", 403)  # e.g. a quota or a missing permission, fixed by the operator
    with pytest.raises(PermissionDenied, match="GKE cluster"):
        provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert record.completed_steps == STEPS[:5] and not fake.clusters

    events = Events()
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"), progress=events)
    assert events.actions("created") == [f"container/cluster {CLUSTER} (v1/projects/{PROJECT}/locations/{REGION}"
                                         f"/clusters/{CLUSTER})"]  # fmt: skip
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
    assert fake.resource_count() == 6


def test_server_errors_are_retried(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    fake.fail_next("GET", r"/subnetworks/", 503)
    fake.fail_next("POST", r"/repositories$", 429)
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert fake.resource_count() == 6
    assert len(fake.calls("POST", r"/repositories$")) == 2


def test_down_after_a_partial_up_removes_what_exists(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    fake.fail_next("POST", r"/storage/v1/b$", 400)
    with pytest.raises(CmbclusterError):
        provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    assert fake.resource_count() == 4
    del fake.repositories["cmbcluster"]  # deleted by hand meanwhile
    events = Events()
    provisioning.down(provisioner, record, progress=events)
    assert fake.resource_count() == 0 and record.resources == []
    assert any("cmbcluster" in message for message in events.actions("gone"))


def test_a_database_bucket_holding_backups_is_kept_unless_delete_data(
    provisioner: GcpProvisioner, record: ProvisioningRecord, fake: GoogleApiFake
) -> None:
    provisioning.up(provisioner, record, ProvisioningOptions(addons="skip"))
    bucket = f"{CLUSTER}-database-{PROJECT}"
    fake.objects[bucket] = [{"name": "backups/a.sqlite", "generation": "1"}, {"name": "backups/a.sqlite",
                                                                              "generation": "2"}]  # fmt: skip
    with pytest.raises(Conflict, match=r"nothing was deleted.*--delete-data"):
        provisioning.down(provisioner, record)
    assert fake.resource_count() == 6 and not fake.calls("DELETE", ".")
    provisioning.down(provisioner, record, ProvisioningOptions(delete_data=True))
    assert fake.resource_count() == 0


def test_cloud_dns_upsert_replaces_records_atomically(provisioner: GcpProvisioner, fake: GoogleApiFake) -> None:
    fake.add_zone("cmb-zone", "example.org.")
    done = provisioner.upsert_dns(dns_records("cmb.example.org", "203.0.113.7"))
    assert done[0] == "UPSERT A cmb.example.org. -> 203.0.113.7 (zone cmb-zone)"
    provisioner.upsert_dns(dns_records("cmb.example.org", "203.0.113.8"))
    records = {(r["name"], r["type"]): r["rrdatas"] for r in fake.rrsets["cmb-zone"]}
    assert records[("cmb.example.org.", "A")] == ["203.0.113.8"]
    assert records[("*.cmb.example.org.", "A")] == ["203.0.113.8"]
    [change] = fake.calls("POST", r"/managedZones/cmb-zone/changes$")[1:]
    assert [d["rrdatas"] for d in change.body["deletions"]] == [["203.0.113.7"], ["203.0.113.7"]]

    assert provisioner.upsert_dns(dns_records("cmb.example.org", "203.0.113.8"))[0].startswith("unchanged")
    lb = provisioner.upsert_dns(dns_records("apps.example.org", "lb.example.net"), dry_run=True)
    assert lb[0] == "UPSERT CNAME apps.example.org. -> lb.example.net. (zone cmb-zone)"
    with pytest.raises(CmbclusterError, match="zone apex"):
        provisioner.upsert_dns(dns_records("example.org", "lb.example.net", wildcard=False))
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
    assert "7 steps" in plan.stdout and "GcsFuseCsiDriver" in plan.stdout and fake.requests == []

    up = run_cli("infra", "up", "--addons", "print", env=cli_env, cwd=tmp_path, timeout=120)
    assert up.returncode == 0, up.stderr
    assert "[6/7] gke-cluster" in up.stdout and fake.resource_count() == 6
    again = run_cli("infra", "up", "--addons", "skip", env=cli_env, cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and "created" not in again.stdout and fake.resource_count() == 6

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
        f"would run: docker build --file helm/images/controlplane/Dockerfile --tag {host}/{PROJECT}/cmbcluster/"
        "controlplane:v2 --platform linux/amd64 ."
    ]
    push = run_cli("images", "push", "--dry-run", "--tag", "v2", env=cli_env, cwd=tmp_path)
    assert push.returncode == 0, push.stderr
    assert push.stdout.splitlines() == [
        f"would run: <gcp registry token> | docker login --username oauth2accesstoken --password-stdin {host}",
        f"would run: docker push {host}/{PROJECT}/cmbcluster/controlplane:v2",
        f"would run: docker push {host}/{PROJECT}/cmbcluster/environment:v2",
    ]
    assert fake.calls("POST", r"^/token$")  # the token came from the credentials' own token endpoint


def test_cli_errors_are_one_clear_line(cli_env: dict[str, str], tmp_path: Path, server: FakeServer) -> None:
    bad_token = {**cli_env, "GOOGLE_OAUTH_ACCESS_TOKEN": "wrong"}
    cases = [
        (bad_token, ["infra", "up"], "could not authenticate to Google Cloud"),
        ({**cli_env, "GOOGLE_API_ENDPOINT": "http://127.0.0.1:9"}, ["infra", "status"], "cannot reach Google Cloud"),
        ({**cli_env, "GKE_RELEASE_CHANNEL": "NIGHTLY"}, ["infra", "plan"], "GKE_RELEASE_CHANNEL"),
        ({**cli_env, "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing.json")}, ["infra", "up"],
         "no Google Cloud credentials"),
    ]  # fmt: skip
    run_cli("infra", "up", "--addons", "skip", env=cli_env, cwd=tmp_path, timeout=120)  # so that status has work
    for env, args, message in cases:
        result = run_cli(*args, env=env, cwd=tmp_path, timeout=120)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
