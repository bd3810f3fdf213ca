"""Per-user Workload Identity, the registry and DNS of the GCP infra provider.

Bucket IAM policies are written by GcsStorage and read back from the GCS emulator. GCP IAM has
no emulator: :class:`InMemoryIamClient` (our IamClient interface) stands in for it, and the
HTTP requests :class:`HttpIamClient` sends are checked against a recording server on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import google.oauth2.credentials
import pytest

from cmbcluster.errors import (
    Conflict,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    ProviderUnavailable,
)
from cmbcluster.interfaces import BucketOptions, CloudIdentity, InfraProvider, StorageBackend, UserRef
from cmbcluster.plugins import PluginManager
from cmbcluster.registrations import ProviderContext
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.infra import InfraProviderContract
from cmbcluster.testing.lifecycle import LifecycleContract
from cmbcluster.testing.process import clean_environ, run_cli
from cmbcluster_gcp.identity import (
    GSA_ANNOTATION,
    WORKLOAD_IDENTITY_USER_ROLE,
    GcpInfra,
    HttpIamClient,
    InMemoryIamClient,
    ServiceAccountInfo,
)
from cmbcluster_gcp.settings import GcpSettings
from cmbcluster_gcp.storage import GcsStorage

PROJECT = "cmbcluster-test"  # as in conftest.py
NUMBER = "424242424242"
NAMESPACE = "cmbcluster-users"
POOL = f"{PROJECT}.svc.id.goog"
USER_A = UserRef(id="0f3a9c1e7b2d4e6f8a0b1c2d3e4f5a6b", email="alice.smith@example.org")
USER_B = UserRef(id="9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b", email="bob@example.org")
OBJECT_USER = "roles/storage.objectUser"
EmulatorApi = Callable[..., Any]


def principal_of(service_account: str, namespace: str = NAMESPACE) -> str:
    return (
        f"principal://iam.googleapis.com/projects/{NUMBER}/locations/global/workloadIdentityPools/"
        f"{POOL}/subject/ns/{namespace}/sa/{service_account}"
    )


def settings(**overrides: Any) -> GcpSettings:
    values: dict[str, Any] = {"project_id": PROJECT, "project_number": NUMBER, "region": "europe-west1"}
    values.update(overrides)
    return GcpSettings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def iam() -> InMemoryIamClient:
    return InMemoryIamClient(project_numbers={PROJECT: NUMBER})


def bucket_bindings(emulator_api: EmulatorApi, bucket: str) -> dict[str, list[str]]:
    policy = emulator_api(f"/storage/v1/b/{bucket}/iam")
    return {b["role"]: sorted(b["members"]) for b in policy.get("bindings", [])}


class TestGcpInfraContract(InfraProviderContract):
    """The infra contract in Workload Identity mode: what a principal reaches, read back from each
    bucket's IAM policy in the GCS emulator."""

    settings: dict[str, Any] = {}

    @pytest.fixture
    def infra_provider(self, iam: InMemoryIamClient, emulator_api: EmulatorApi) -> GcpInfra:
        self.emulator_api = emulator_api
        return GcpInfra(settings(**self.settings), iam=iam)

    @pytest.fixture
    def storage_backend(self, gcs: GcsStorage) -> StorageBackend:
        return gcs

    def reachable_buckets(self, identity: CloudIdentity, candidates: Sequence[str]) -> set[str]:
        reached = set()
        for bucket in candidates:
            try:
                bindings = bucket_bindings(self.emulator_api, bucket)
            except urllib.error.HTTPError as exc:
                assert exc.code == 404, exc
                continue  # deleted
            if identity.principal in bindings.get(OBJECT_USER, []):
                reached.add(bucket)
        return reached


class TestGcpLifecycleContract(LifecycleContract):
    """Core's calls over a user's life, with one Google service account per user."""

    @pytest.fixture
    def infra_provider(self, iam: InMemoryIamClient) -> GcpInfra:
        return GcpInfra(settings(identity_mode="service-account"), iam=iam)


class TestGcpServiceAccountInfraContract(TestGcpInfraContract):
    """The same contract with one Google service account per user."""

    settings = {"identity_mode": "service-account"}


# -- workload identity (the default mode) -----------------------------------------------------------
def test_is_an_infra_provider(iam: InMemoryIamClient) -> None:
    assert isinstance(GcpInfra(settings(), iam=iam), InfraProvider)


def test_service_account_names_come_from_the_opaque_id_never_the_email() -> None:
    name = GcpInfra.service_account_name(USER_A)
    assert name == "cmbcluster-user-0f3a9c1e7b"
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name)
    assert "alice" not in name and "example" not in name
    assert name != GcpInfra.service_account_name(USER_B)


def test_the_principal_is_exactly_the_users_service_account(iam: InMemoryIamClient) -> None:
    infra = GcpInfra(settings(), iam=iam)
    identity = infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    assert identity.service_account == "cmbcluster-user-0f3a9c1e7b"
    assert identity.namespace == NAMESPACE
    assert identity.principal == principal_of("cmbcluster-user-0f3a9c1e7b")
    assert identity.annotations == {}  # a plain ServiceAccount: no Google service account to impersonate
    assert iam.calls == []  # PROJECT_NUMBER is set: nothing to ask IAM
    assert infra.ensure_user_identity(USER_A, namespace=NAMESPACE) == identity  # idempotent


def test_the_project_number_is_looked_up_once_when_not_configured(iam: InMemoryIamClient) -> None:
    infra = GcpInfra(settings(project_number=None), iam=iam)
    first = infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    infra.ensure_user_identity(USER_B, namespace=NAMESPACE)
    assert first.principal == principal_of("cmbcluster-user-0f3a9c1e7b")
    assert iam.calls == [("project_number", PROJECT)]


def test_an_unknown_project_makes_the_provider_not_ready() -> None:
    infra = GcpInfra(settings(project_number=None), iam=InMemoryIamClient())
    with pytest.raises(ProviderUnavailable, match="not ready"):
        infra.check_ready()
    GcpInfra(settings(), iam=InMemoryIamClient()).check_ready()  # PROJECT_NUMBER set: nothing to check


@pytest.mark.parametrize("namespace", ["", "Users", "a/b", "-x", "x" * 64, "ns_1"])
def test_a_bad_namespace_is_refused(iam: InMemoryIamClient, namespace: str) -> None:
    with pytest.raises(InvalidRequest, match="namespace"):
        GcpInfra(settings(), iam=iam).ensure_user_identity(USER_A, namespace=namespace)


def test_a_custom_pool_is_used(iam: InMemoryIamClient) -> None:
    infra = GcpInfra(settings(workload_identity_pool="fleet-host.svc.id.goog"), iam=iam)
    principal = infra.ensure_user_identity(USER_A, namespace=NAMESPACE).principal
    assert "/workloadIdentityPools/fleet-host.svc.id.goog/subject/ns/" in principal


def test_each_bucket_binds_only_its_users_principal(
    gcs: GcsStorage, iam: InMemoryIamClient, emulator_api: EmulatorApi
) -> None:
    infra = GcpInfra(settings(), iam=iam)
    alice = infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    bob = infra.ensure_user_identity(USER_B, namespace=NAMESPACE)
    bucket_a = gcs.create_bucket(USER_A, BucketOptions(display_name="maps")).name
    bucket_b = gcs.create_bucket(USER_B, BucketOptions(display_name="chains")).name
    gcs.ensure_bucket_access(bucket_a, alice)
    gcs.ensure_bucket_access(bucket_b, bob)
    gcs.ensure_bucket_access(bucket_a, alice)  # idempotent

    on_a, on_b = bucket_bindings(emulator_api, bucket_a), bucket_bindings(emulator_api, bucket_b)
    assert on_a[OBJECT_USER] == [principal_of("cmbcluster-user-0f3a9c1e7b")]
    assert on_b[OBJECT_USER] == [principal_of("cmbcluster-user-9e8d7c6b5a")]
    every_member = {m for members in [*on_a.values(), *on_b.values()] for m in members}
    assert not every_member & {"allUsers", "allAuthenticatedUsers"}
    assert not any(m.startswith("principalSet://") for m in every_member)  # nothing broader than one principal
    assert alice.principal not in on_b[OBJECT_USER] and bob.principal not in on_a[OBJECT_USER]


# -- one Google service account per user ------------------------------------------------------------
def test_service_account_mode_creates_a_google_account_only_the_users_pods_may_use(
    gcs: GcsStorage, iam: InMemoryIamClient, emulator_api: EmulatorApi
) -> None:
    infra = GcpInfra(settings(identity_mode="service-account"), iam=iam)
    identity = infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    email = f"cmbcluster-0f3a9c1e7b2d4e6f8a0@{PROJECT}.iam.gserviceaccount.com"
    assert identity.service_account == "cmbcluster-user-0f3a9c1e7b"
    assert identity.principal == f"serviceAccount:{email}"
    assert identity.annotations == {GSA_ANNOTATION: email}
    account = iam.accounts[email]
    # one user's, of one deployment (the default deployment's name is the cluster's, cmbcluster)
    assert account.description == f"CMBCluster deployment cmbcluster: user {USER_A.id}"
    assert "alice" not in account.display_name
    assert len(email.split("@")[0]) <= 30
    assert iam.policies[email]["bindings"] == [
        {
            "role": WORKLOAD_IDENTITY_USER_ROLE,
            "members": [f"serviceAccount:{POOL}[{NAMESPACE}/cmbcluster-user-0f3a9c1e7b]"],
        }
    ]

    writes = sum(1 for call, _ in iam.calls if call in ("create_service_account", "set_service_account_policy"))
    assert infra.ensure_user_identity(USER_A, namespace=NAMESPACE) == identity
    assert sum(1 for call, _ in iam.calls if call in ("create_service_account", "set_service_account_policy")) == writes

    bucket = gcs.create_bucket(USER_A, BucketOptions(display_name="maps")).name
    gcs.ensure_bucket_access(bucket, identity)
    assert bucket_bindings(emulator_api, bucket)[OBJECT_USER] == [f"serviceAccount:{email}"]

    infra.delete_user_identity(USER_A, namespace=NAMESPACE)
    assert email not in iam.accounts
    infra.delete_user_identity(USER_A, namespace=NAMESPACE)  # idempotent


def test_service_account_mode_narrows_a_widened_impersonation_policy(iam: InMemoryIamClient) -> None:
    infra = GcpInfra(settings(identity_mode="service-account"), iam=iam)
    email = str(infra.ensure_user_identity(USER_A, namespace=NAMESPACE).annotations[GSA_ANNOTATION])
    policy = iam.get_service_account_policy(email)
    policy["bindings"] = [
        {"role": WORKLOAD_IDENTITY_USER_ROLE, "members": [f"serviceAccount:{POOL}[{NAMESPACE}/other]", "user:x@y.z"]},
        {"role": "roles/iam.serviceAccountTokenCreator", "members": ["group:ops@example.org"]},
    ]
    iam.set_service_account_policy(email, policy)
    infra.ensure_user_identity(USER_A, namespace="research")
    assert iam.policies[email]["bindings"] == [
        {"role": "roles/iam.serviceAccountTokenCreator", "members": ["group:ops@example.org"]},
        {
            "role": WORKLOAD_IDENTITY_USER_ROLE,
            "members": [f"serviceAccount:{POOL}[research/cmbcluster-user-0f3a9c1e7b]"],
        },
    ]


def test_service_account_mode_keeps_the_accounts_made_before_deployments_had_names(iam: InMemoryIamClient) -> None:
    infra = GcpInfra(settings(identity_mode="service-account"), iam=iam)
    email = infra.google_service_account_email(USER_A)
    iam.create_service_account(
        PROJECT, email.split("@")[0], display_name="old", description=f"CMBCluster user {USER_A.id}"
    )
    assert infra.ensure_user_identity(USER_A, namespace=NAMESPACE).annotations[GSA_ANNOTATION] == email


def test_two_deployments_of_one_project_name_their_users_apart(iam: InMemoryIamClient) -> None:
    lab = GcpInfra(settings(identity_mode="service-account", deployment_name="lab"), iam=iam)
    other = GcpInfra(settings(identity_mode="service-account", deployment_name="other-deployment"), iam=iam)
    emails = {lab.google_service_account_email(USER_A), other.google_service_account_email(USER_A)}
    assert {e.split("@")[0] for e in emails} == {"lab-0f3a9c1e7b2d4e6f8a0b1c2d3e", "other-deployment-0f3a9c1e7b2d4"}
    assert all(len(e.split("@")[0]) <= 30 for e in emails)
    assert lab.registry().repository_prefix == f"{PROJECT}/lab"
    lab.ensure_user_identity(USER_A, namespace=NAMESPACE)
    other.delete_user_identity(USER_A, namespace=NAMESPACE)  # another deployment: the lab's account is not its
    assert lab.google_service_account_email(USER_A) in iam.accounts


def test_a_new_service_account_not_yet_known_to_iam_is_waited_for(
    iam: InMemoryIamClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IAM answers 'does not exist' for an account made moments ago: retried for the propagation window."""
    pauses: list[float] = []
    monkeypatch.setattr(time, "sleep", pauses.append)
    real, refusals = iam.set_service_account_policy, {"left": 2}

    def set_policy(email: str, policy: dict[str, Any]) -> dict[str, Any]:
        if refusals["left"]:
            refusals["left"] -= 1
            raise NotFound(f"service account {email} does not exist")
        return real(email, policy)

    monkeypatch.setattr(iam, "set_service_account_policy", set_policy)
    infra = GcpInfra(settings(identity_mode="service-account"), iam=iam)
    identity = infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    assert pauses[-2:] == [1.0, 2.0] and iam.policies[identity.annotations[GSA_ANNOTATION]]["bindings"]
    refusals["left"] = 10**6  # never propagates: reported after the window, not retried forever
    pauses.clear()
    with pytest.raises(ProviderUnavailable, match="still does not know a principal made moments ago after 5 s"):
        GcpInfra(settings(identity_mode="service-account"), iam=iam, propagation_seconds=5).ensure_user_identity(
            USER_A, namespace="elsewhere"
        )
    assert sum(pauses) == pytest.approx(5)


def test_service_account_mode_never_takes_over_someone_elses_account(iam: InMemoryIamClient) -> None:
    infra = GcpInfra(settings(identity_mode="service-account"), iam=iam)
    email = infra.google_service_account_email(USER_A)
    iam.accounts[email] = ServiceAccountInfo(email=email, description="made by hand")
    with pytest.raises(Conflict, match="does not belong"):
        infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    with pytest.raises(Conflict, match="does not belong"):
        infra.delete_user_identity(USER_A, namespace=NAMESPACE)
    assert email in iam.accounts


@dataclass
class RacingIam(InMemoryIamClient):
    """Someone else writes the policy between our read and our write, ``races`` times."""

    races: int = 1
    _raced: int = field(default=0)

    def get_service_account_policy(self, email: str) -> dict[str, Any]:
        policy = super().get_service_account_policy(email)
        if self._raced < self.races:
            self._raced += 1
            super().set_service_account_policy(email, {**policy, "bindings": []})
        return policy


def test_a_concurrent_policy_change_is_retried_then_reported() -> None:
    infra = GcpInfra(settings(identity_mode="service-account"), iam=RacingIam(races=1))
    assert infra.ensure_user_identity(USER_A, namespace=NAMESPACE).annotations
    with pytest.raises(Conflict, match="keeps changing"):
        GcpInfra(settings(identity_mode="service-account"), iam=RacingIam(races=5)).ensure_user_identity(
            USER_B, namespace=NAMESPACE
        )


def test_workload_identity_mode_deletes_nothing(iam: InMemoryIamClient) -> None:
    GcpInfra(settings(), iam=iam).delete_user_identity(USER_A, namespace=NAMESPACE)
    assert iam.calls == []


# -- registry and DNS -------------------------------------------------------------------------------
def test_registry_defaults_to_the_regions_artifact_registry(iam: InMemoryIamClient) -> None:
    info = GcpInfra(settings(), iam=iam).registry()
    assert (info.host, info.repository_prefix) == ("europe-west1-docker.pkg.dev", f"{PROJECT}/cmbcluster")
    configured = GcpInfra(settings(artifact_registry="us-docker.pkg.dev/proj/images"), iam=iam).registry()
    assert (configured.host, configured.repository_prefix) == ("us-docker.pkg.dev", "proj/images")


def test_dns_comes_from_domain_or_the_public_host(iam: InMemoryIamClient) -> None:
    dns = GcpInfra(settings(domain="cmb.example.org", dns_zone="cmb-zone"), iam=iam, domain="ignored").dns()
    assert (dns.domain, dns.environments_domain, dns.zone) == ("cmb.example.org", "cmb.example.org", "cmb-zone")
    assert GcpInfra(settings(), iam=iam, domain="api.example.org").dns().domain == "api.example.org"


# -- a recording HTTP server standing in for Google's APIs ------------------------------------------
@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class RecordingServer:
    """Records every request; answers each with the next queued (status, JSON body), else 200 {}."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.answers: list[tuple[int, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append(Recorded(self.command, self.path, dict(self.headers), body))
                status, answer = recorder.answers.pop(0) if recorder.answers else (200, {})
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def google_api() -> Iterator[RecordingServer]:
    server = RecordingServer()
    yield server
    server.stop()


def http_client(url: str, **kwargs: Any) -> HttpIamClient:
    credentials = google.oauth2.credentials.Credentials(token="test-access-token")  # type: ignore[no-untyped-call]
    return HttpIamClient(
        credentials=credentials, iam_endpoint=url, resource_manager_endpoint=url, backoff_seconds=0.01, **kwargs
    )


def test_the_http_client_sends_exactly_these_requests(google_api: RecordingServer) -> None:
    email = f"cmbcluster-0f3a9c1e7b2d4e6f8a0@{PROJECT}.iam.gserviceaccount.com"
    account = {"email": email, "uniqueId": "1", "description": f"CMBCluster deployment cmbcluster: user {USER_A.id}"}
    google_api.answers = [
        (404, {"error": {"code": 404, "message": "Unknown service account"}}),  # not there yet
        (200, account),  # created
        (200, account),  # readable
        (200, {"etag": "BwYx", "version": 1}),  # its (empty) policy
        (200, {"etag": "BwYy"}),  # written
    ]
    client = http_client(google_api.url)
    # no PROJECT_NUMBER: this mode names the Google service account, not the project's pool by number
    infra = GcpInfra(settings(project_number=None, identity_mode="service-account"), iam=client)
    identity = infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    client.close()

    assert identity.annotations == {GSA_ANNOTATION: email}
    sent = [(r.method, r.path, r.json()) for r in google_api.requests]
    account_path = f"/v1/projects/-/serviceAccounts/{email}"
    assert sent == [
        ("GET", account_path, None),
        (
            "POST",
            f"/v1/projects/{PROJECT}/serviceAccounts",
            {
                "accountId": "cmbcluster-0f3a9c1e7b2d4e6f8a0",
                "serviceAccount": {
                    "displayName": "CMBCluster cmbcluster user 0f3a9c1e7b",
                    "description": f"CMBCluster deployment cmbcluster: user {USER_A.id}",
                },
            },
        ),
        ("GET", account_path, None),
        ("POST", f"{account_path}:getIamPolicy", {}),
        (
            "POST",
            f"{account_path}:setIamPolicy",
            {
                "policy": {
                    "etag": "BwYx",
                    "version": 1,
                    "bindings": [
                        {
                            "role": WORKLOAD_IDENTITY_USER_ROLE,
                            "members": [f"serviceAccount:{POOL}[{NAMESPACE}/cmbcluster-user-0f3a9c1e7b]"],
                        }
                    ],
                }
            },
        ),
    ]
    assert all(r.headers.get("authorization") == "Bearer test-access-token" for r in google_api.requests)


def test_the_http_client_deletes_and_ignores_what_is_gone(google_api: RecordingServer) -> None:
    google_api.answers = [(200, {}), (404, {"error": {"message": "gone"}})]
    client = http_client(google_api.url)
    client.delete_service_account("a@p.iam.gserviceaccount.com")
    client.delete_service_account("a@p.iam.gserviceaccount.com")
    assert [(r.method, r.path) for r in google_api.requests] == [
        ("DELETE", "/v1/projects/-/serviceAccounts/a@p.iam.gserviceaccount.com")
    ] * 2


@pytest.mark.parametrize(
    ("status", "error", "attempts"),
    [
        (403, PermissionDenied, 1),
        (400, InvalidRequest, 1),
        (409, Conflict, 1),
        (404, NotFound, 1),
        (401, ProviderUnavailable, 1),
        (429, LimitExceeded, 3),
        (503, ProviderUnavailable, 3),
    ],
)
def test_http_errors_become_typed_errors_and_only_transient_ones_are_retried(
    google_api: RecordingServer, status: int, error: type[Exception], attempts: int
) -> None:
    google_api.answers = [(status, {"error": {"message": "no"}})] * 3
    with pytest.raises(error):
        http_client(google_api.url).get_service_account_policy("a@p.iam.gserviceaccount.com")
    assert len(google_api.requests) == attempts


def test_a_transient_failure_then_success_is_invisible(google_api: RecordingServer) -> None:
    google_api.answers = [(503, {}), (200, {"name": f"projects/{NUMBER}"})]
    assert http_client(google_api.url).project_number(PROJECT) == NUMBER
    assert [(r.method, r.path) for r in google_api.requests] == [("GET", f"/v3/projects/{PROJECT}")] * 2


def test_an_unreachable_iam_is_provider_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(ProviderUnavailable, match="cannot reach"):
        http_client(f"http://127.0.0.1:{port}", attempts=2).project_number(PROJECT)


def test_registry_login_is_an_oauth_access_token(google_api: RecordingServer) -> None:
    google_api.answers = [(200, {"access_token": "ya29.fresh", "expires_in": 3600, "token_type": "Bearer"})]

    def credentials() -> google.oauth2.credentials.Credentials:
        return google.oauth2.credentials.Credentials(  # type: ignore[no-untyped-call]
            token=None,
            refresh_token="a-refresh-token",
            token_uri=f"{google_api.url}/token",
            client_id="client",
            client_secret="secret",
        )

    login = GcpInfra(settings(), iam=InMemoryIamClient(), credentials=credentials).registry_login()
    assert (login.username, login.password) == ("oauth2accesstoken", "ya29.fresh")
    assert google_api.requests[0].path == "/token" and b"grant_type=refresh_token" in google_api.requests[0].body

    google_api.answers = [(400, {"error": "invalid_grant"})]
    with pytest.raises(ProviderUnavailable, match="access token"):
        GcpInfra(settings(), iam=InMemoryIamClient(), credentials=credentials).registry_login()


def test_registry_login_takes_the_operators_access_token_as_infra_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # no application default credentials here: only the token given can log in
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/adc.json")
    login = GcpInfra(settings(GOOGLE_OAUTH_ACCESS_TOKEN="ya29.operator"), iam=InMemoryIamClient()).registry_login()
    assert (login.username, login.password) == ("oauth2accesstoken", "ya29.operator")


# -- the plugin's registration ------------------------------------------------------------------------
def test_the_gcp_plugin_registers_the_infra_provider(iam: InMemoryIamClient) -> None:
    registration = PluginManager().load().infra_provider("gcp")
    assert registration.settings_model is GcpSettings
    core = CoreSettings(_env_file=None, cloud_provider="gcp", public_url="https://cmb.example.org")  # type: ignore[call-arg]
    ctx = ProviderContext(core=core, provider_settings=settings())
    infra = registration.factory(ctx)
    assert isinstance(infra, GcpInfra)
    assert infra.dns().domain == "cmb.example.org"
    assert infra.ensure_user_identity(USER_A, namespace=NAMESPACE).principal == principal_of(
        "cmbcluster-user-0f3a9c1e7b"
    )


def test_config_check_names_a_bad_identity_setting(tmp_path: Path) -> None:
    env = clean_environ(
        {"CLOUD_PROVIDER": "gcp", "PROJECT_ID": PROJECT, "GCP_IDENTITY_MODE": "shared", "PROJECT_NUMBER": "12ab"}
    )
    result = run_cli("config", "check", env=env, cwd=tmp_path)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "GCP_IDENTITY_MODE" in output and "PROJECT_NUMBER" in output
    assert "Traceback" not in output
