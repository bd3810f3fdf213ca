"""The whole control plane with CLOUD_PROVIDER=aws and CLOUD_PROVIDER=gcp on the real Kubernetes API server.

A user signs in, creates a bucket and an environment that mounts it; what the cloud plugins
made of it is then read back from the API server, from moto (AWS) and from the GCS emulator:

- **aws** (`cmbcluster serve` in a subprocess, moto over HTTP): the pod mounts a PersistentVolumeClaim
  bound to a Mountpoint PersistentVolume for the user's bucket, mounted with the user's own role;
  it runs as the user's ServiceAccount, annotated with the IRSA role that moto holds, whose trust
  admits only that ServiceAccount and which the bucket policy names.
- **gcp** (the app from ``create_app``, so that the IAM fake can stand in for Google IAM): the pod
  carries the inline gcsfuse CSI volume and the sidecar annotations; it runs as the user's
  ServiceAccount, which is exactly the principal bound on the bucket (read back from the
  emulator), or, in the ``service-account`` mode, the only one allowed to act as the user's
  Google service account. The configuration is the original GKE deployment's ``.env``.

The control plane runs with the control-plane user's token bound to exactly the Role of
:mod:`cmbcluster.kubernetes.rbac`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("kubernetes")
pytest.importorskip("cmbcluster_aws")
pytest.importorskip("cmbcluster_gcp")

import boto3
from fastapi.testclient import TestClient
from kubernetes import client as k8s
from moto.server import ThreadedMotoServer

from cmbcluster.app import create_app
from cmbcluster.config import load_core_settings, resolve
from cmbcluster.testing.api import dev_sign_in
from cmbcluster.testing.oidc import OidcMockServer
from cmbcluster.testing.process import ServeProcess, clean_environ, run_cli
from cmbcluster_aws.provisioning import user_boundary_policy
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_gcp import plugin as gcp_plugin
from cmbcluster_gcp.identity import InMemoryIamClient
from tests.k8s.harness import GcsEmulator, K8sCluster, wait_for

REGION = "eu-west-1"
ACCOUNT_ID = "123456789012"  # moto's account
EKS_CLUSTER = "cmbflow-eks"
AWS_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
GCP_PROJECT = "cmbcluster-flow"
GCP_PROJECT_NUMBER = "271828182845"
METADATA_SERVER_LABEL = "iam.gke.io/gke-metadata-server-enabled"
TERMINAL = ("running", "failed", "stopped")

#: The GCP part of the original deployment's .env (.env.example of the GKE deployment), as an
#: operator has it: variables CMBCluster reads and variables it no longer needs, side by side.
ORIGINAL_GCP_ENV = """\
# === CLOUD PROVIDER SELECTION ===
CLOUD_PROVIDER=gcp
# === GCP INFRASTRUCTURE ===
PROJECT_ID={project}
CLUSTER_NAME=cmbcluster
REGION=us-central1
ZONE=us-central1-a
# === NETWORKING & DNS ===
DOMAIN=cmbcluster.example.com
API_URL=https://api.cmbcluster.example.com
FRONTEND_URL=https://cmbcluster.example.com
LETSENCRYPT_EMAIL=ops@example.com
# === AUTHENTICATION ===
AUTH_PROVIDER=auto
GOOGLE_CLIENT_ID=1234567890-abcdef.apps.googleusercontent.com
GOOGLE_CLIENT_SECRET=GOCSPX-not-a-real-secret
COGNITO_USER_POOL_ID=
COGNITO_CLIENT_ID=
COGNITO_CLIENT_SECRET=
COGNITO_ISSUER=
# === BACKEND SECURITY ===
SECRET_KEY={secret_key}
NEXTAUTH_SECRET=bmV4dGF1dGgtc2VjcmV0LWZvci10ZXN0cw==
FILE_ENCRYPTION_KEY=ZmlsZS1lbmNyeXB0aW9uLWtleS1mb3ItdGVzdHM=
JWT_ALGORITHM=HS256
TOKEN_EXPIRE_HOURS=8
DEV_MODE=false
DEBUG=false
TLS_ENABLED=true
RATE_LIMIT_ENABLED=true
# === APPLICATION BEHAVIOR ===
NAMESPACE=cmbcluster
MAX_INACTIVE_HOURS=4
MAX_USER_PODS=1
FREE_TIER_MAX_UPTIME_MINUTES=60
DEFAULT_IMAGE=borisbolliet/cmbagent-ui
SUBNET_RANGE=10.1.0.0/16
PODS_CIDR=10.4.0.0/16
SERVICES_CIDR=10.5.0.0/20
"""


# -- shared helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin(k8s_cluster: K8sCluster) -> Iterator[k8s.CoreV1Api]:
    api = k8s_cluster.api_client()
    yield k8s.CoreV1Api(api)
    api.close()


def create_bucket_and_environment(client: Any, headers: dict[str, str], mount_path: str) -> tuple[dict[str, Any], str]:
    """Through the API as a user does: a bucket, then an environment mounting it; (bucket, environment id)."""
    bucket = client.post("/api/v1/storages", headers=headers, json={"display_name": "Planck maps"})
    assert bucket.status_code == 201, bucket.text
    created = client.post(
        "/api/v1/environments",
        headers=headers,
        json={"application": "jupyterlab", "mounts": [{"storage_id": bucket.json()["id"], "mount_path": mount_path}]},
    )
    assert created.status_code == 201, created.text
    return bucket.json(), str(created.json()["id"])


def settled(client: Any, headers: dict[str, str], environment_id: str) -> dict[str, Any]:
    def status() -> dict[str, Any] | None:
        env: dict[str, Any] = client.get(f"/api/v1/environments/{environment_id}", headers=headers).json()
        return env if env["status"] in TERMINAL else None

    result: dict[str, Any] = wait_for(status, 60, f"environment {environment_id} to settle")
    return result


def assert_secure_pod(pod: k8s.V1Pod) -> None:
    """What the decorations must leave alone: a non-root pod without privilege escalation."""
    assert pod.spec.security_context.run_as_non_root is True
    container = pod.spec.containers[0]
    assert container.security_context.allow_privilege_escalation is False
    assert container.security_context.capabilities.drop == ["ALL"]
    assert container.security_context.privileged is False


# -- AWS: `cmbcluster serve` with moto and the cluster --------------------------------------------------
@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def aws_client(service: str, endpoint: str) -> Any:
    return boto3.client(service, region_name=REGION, endpoint_url=endpoint, **AWS_CREDENTIALS)


@pytest.fixture
def eks(moto: str) -> str:
    """An empty moto with an EKS cluster and the IAM OIDC provider of its issuer."""
    with urllib.request.urlopen(urllib.request.Request(f"{moto}/moto-api/reset", method="POST"), timeout=10):
        pass
    eks_api, iam = aws_client("eks", moto), aws_client("iam", moto)
    cluster = eks_api.create_cluster(
        name=EKS_CLUSTER,
        roleArn=f"arn:aws:iam::{ACCOUNT_ID}:role/eks-cluster",
        resourcesVpcConfig={"subnetIds": []},
    )["cluster"]
    issuer = str(cluster["identity"]["oidc"]["issuer"])
    iam.create_open_id_connect_provider(Url=issuer, ClientIDList=["sts.amazonaws.com"], ThumbprintList=["9" * 40])
    # the permissions boundary of per-user roles, as `cmbcluster infra up` makes it
    settings = AwsSettings(_env_file=None, aws_region=REGION, aws_account_id=ACCOUNT_ID,  # type: ignore[call-arg]
                           eks_cluster_name=EKS_CLUSTER, s3_user_bucket_prefix="cmbflow")  # fmt: skip
    iam.create_policy(PolicyName=f"{EKS_CLUSTER}-user-boundary", Path=f"/cmbcluster-infra/{EKS_CLUSTER}/",
                      PolicyDocument=json.dumps(user_boundary_policy(settings)))  # fmt: skip
    eks_api.close()
    iam.close()
    return issuer.removeprefix("https://")


def test_aws_flow_pod_mounts_the_bucket_through_mountpoint_as_the_users_irsa_role(
    k8s_cluster: K8sCluster, admin: k8s.CoreV1Api, moto: str, eks: str, tmp_path: Path
) -> None:
    namespace = k8s_cluster.control_plane_namespace("cmbflow-aws")
    env = clean_environ(
        {
            "CLOUD_PROVIDER": "aws",
            "CMBCLUSTER_AUTH_PROVIDERS": "local",  # the development sign-in: moto has no Cognito hosted UI
            "AWS_REGION": REGION,
            "AWS_ACCOUNT_ID": ACCOUNT_ID,
            "EKS_CLUSTER_NAME": EKS_CLUSTER,
            "S3_USER_BUCKET_PREFIX": "cmbflow",
            "AWS_ENDPOINT_URL": moto,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "CMBCLUSTER_DATA_DIR": str(tmp_path / "data"),
            "CMBCLUSTER_KUBECONFIG": str(k8s_cluster.cp_kubeconfig),  # the control-plane user: the Role only
            "CMBCLUSTER_NAMESPACE": namespace,
            "CMBCLUSTER_LOG_FORMAT": "text",
        }
    )
    with ServeProcess(env, tmp_path) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert server.wait_ready("/readyz").status_code == 200, server.output()
        headers = dev_sign_in(client, "vera@example.org", "Vera Rubin")
        user_id = client.get("/api/v1/auth/me", headers=headers).json()["id"]
        bucket, environment_id = create_bucket_and_environment(client, headers, "/home/jovyan/maps")
        env_status = settled(client, headers, environment_id)
        assert env_status["status"] == "running", (env_status, server.output()[-3000:])

        pod = admin.read_namespaced_pod(f"env-{environment_id}", namespace)
        service_account = f"cmbcluster-user-{user_id[:10]}"
        assert "vera" not in service_account

        # the volume: a claim bound to a Mountpoint PersistentVolume for exactly this bucket
        claims = [v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim]
        assert len(claims) == 1
        mount = next(m for m in pod.spec.containers[0].volume_mounts if m.mount_path == "/home/jovyan/maps")
        assert next(v for v in pod.spec.volumes if v.name == mount.name).persistent_volume_claim.claim_name == claims[0]
        claim = wait_for(
            lambda: (
                (c := admin.read_namespaced_persistent_volume_claim(claims[0], namespace)).status.phase == "Bound" and c
            ),
            30,
            "the claim to be bound",
        )
        volume = admin.read_persistent_volume(claim.spec.volume_name)
        assert volume.spec.claim_ref.namespace == namespace and volume.spec.claim_ref.name == claims[0]
        assert volume.spec.csi.driver == "s3.csi.aws.com"
        assert volume.spec.csi.volume_attributes == {
            "bucketName": bucket["bucket_name"],
            "authenticationSource": "pod",  # mounted with the user's role, not the driver's
            "stsRegion": REGION,
        }
        assert {"allow-delete", f"region {REGION}", "uid=1000", "gid=100", "allow-other"} <= set(
            volume.spec.mount_options
        )

        # the identity: the user's ServiceAccount, annotated with the IRSA role moto holds (the role carries the
        # deployment's name, under its per-user path, with its permissions boundary)
        iam = aws_client("iam", moto)
        role = iam.get_role(RoleName=f"{EKS_CLUSTER}-user-{user_id[:10]}")["Role"]
        assert role["Path"] == f"/cmbcluster-users/{EKS_CLUSTER}/"
        assert role["PermissionsBoundary"]["PermissionsBoundaryArn"].endswith(f"/{EKS_CLUSTER}-user-boundary")
        assert pod.spec.service_account_name == service_account
        account = admin.read_namespaced_service_account(service_account, namespace)
        assert account.metadata.annotations["eks.amazonaws.com/role-arn"] == role["Arn"]
        trust = role["AssumeRolePolicyDocument"]
        trust = trust if isinstance(trust, dict) else json.loads(urllib.parse.unquote(trust))
        assert trust["Statement"][0]["Condition"]["StringEquals"][f"{eks}:sub"] == (
            f"system:serviceaccount:{namespace}:{service_account}"
        )
        s3 = aws_client("s3", moto)
        bucket_policy = json.loads(s3.get_bucket_policy(Bucket=bucket["bucket_name"])["Policy"])
        principals = {json.dumps(s.get("Principal"), sort_keys=True) for s in bucket_policy["Statement"]}
        assert role["Arn"] in " ".join(principals)
        iam.close()
        s3.close()

        # the decorations, and the security context they leave alone
        assert pod.spec.node_selector == {"kubernetes.io/os": "linux"}
        assert pod.spec.termination_grace_period_seconds == 60
        assert pod.spec.automount_service_account_token is True  # the IRSA webhook needs it
        assert_secure_pod(pod)

        # deleting the environment removes its cluster-scoped volume too
        assert client.delete(f"/api/v1/environments/{environment_id}", headers=headers).status_code == 204
        wait_for(
            lambda: (
                not admin.list_persistent_volume(label_selector=f"cmbcluster.io/environment-id={environment_id}").items
            ),
            60,
            "the PersistentVolume to be removed",
        )


# -- GCP: the original .env, the GCS emulator, the IAM fake and the cluster --------------------------------
@pytest.fixture(scope="module")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    with GcsEmulator(tmp_path_factory.mktemp("gcs") / "emulator.log") as emulator:
        assert emulator.process.poll() is None, "gcp-storage-emulator exited"
        yield emulator


@pytest.fixture(scope="module")
def oidc() -> Iterator[OidcMockServer]:
    with OidcMockServer() as server:
        yield server


@pytest.fixture
def metadata_server_node(admin: k8s.CoreV1Api) -> Iterator[None]:
    """Label the test node as a GKE node running the metadata server (a Workload Identity node pool)."""
    node = admin.list_node().items[0].metadata.name
    admin.patch_node(node, {"metadata": {"labels": {METADATA_SERVER_LABEL: "true"}}})
    yield
    admin.patch_node(node, {"metadata": {"labels": {METADATA_SERVER_LABEL: None}}})


def original_env_file(directory: Path) -> Path:
    path = directory / ".env"
    path.write_text(ORIGINAL_GCP_ENV.format(project=GCP_PROJECT, secret_key=secrets.token_hex(32)))
    return path


def test_the_original_gcp_deployment_variables_validate(tmp_path: Path) -> None:
    original_env_file(tmp_path)
    result = run_cli("config", "check", env=clean_environ(), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "storage=gcp, compute=kubernetes, infra=gcp, auth=gcp" in result.stdout


def google_sign_in(client: TestClient, oidc: OidcMockServer, sub: str) -> None:
    start = client.get("/api/v1/auth/gcp/login", follow_redirects=False)
    assert start.status_code == 303, start.text
    callback = urllib.parse.urlsplit(oidc.authorize(start.headers["location"], sub))
    done = client.get(f"{callback.path}?{callback.query}", follow_redirects=False)
    assert done.status_code == 303, done.text


@pytest.mark.parametrize("identity_mode", ["workload-identity", "service-account"])
def test_gcp_flow_pod_mounts_the_bucket_with_gcsfuse_as_the_users_own_principal(
    k8s_cluster: K8sCluster,
    admin: k8s.CoreV1Api,
    gcs_emulator: GcsEmulator,
    oidc: OidcMockServer,
    metadata_server_node: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    identity_mode: str,
) -> None:
    namespace = k8s_cluster.control_plane_namespace("cmbflow-gcp")
    original_env_file(tmp_path)  # the working directory (tests/conftest.py): read as the deployment's .env
    # What only a test needs: local stand-ins for Google and a cluster; nothing else is configured.
    for name, value in {
        "STORAGE_EMULATOR_HOST": gcs_emulator.url,
        "GOOGLE_ISSUER": oidc.issuer,
        "CMBCLUSTER_DATA_DIR": str(tmp_path / "data"),
        "CMBCLUSTER_KUBECONFIG": str(k8s_cluster.cp_kubeconfig),
        "CMBCLUSTER_NAMESPACE": namespace,
        "GCP_IDENTITY_MODE": identity_mode,
    }.items():
        monkeypatch.setenv(name, value)
    # No PROJECT_NUMBER in the original .env: the fake answers the lookup, as Resource Manager would.
    iam = InMemoryIamClient(project_numbers={GCP_PROJECT: GCP_PROJECT_NUMBER})
    config = resolve(load_core_settings())
    config.infra = dataclasses.replace(config.infra, factory=functools.partial(gcp_plugin._gcp_infra, iam=iam))

    oidc.put_user("g-vera", {"email": "vera@example.org", "email_verified": True, "name": "Vera Rubin"})
    # signed in with the session cookie, as a browser, which sends its Origin with every change
    origin = {"Origin": "https://api.cmbcluster.example.com"}
    with TestClient(create_app(config=config), base_url=origin["Origin"], headers=origin) as client:
        google_sign_in(client, oidc, "g-vera")
        user_id = client.get("/api/v1/auth/me").json()["id"]
        bucket, environment_id = create_bucket_and_environment(client, {}, "/home/jovyan/maps")
        env_status = settled(client, {}, environment_id)
        assert env_status["status"] == "running", env_status

        pod = admin.read_namespaced_pod(f"env-{environment_id}", namespace)
        service_account = f"cmbcluster-user-{user_id[:10]}"

        # the volume: the inline gcsfuse CSI volume of the user's bucket, and its sidecar's annotations
        mount = next(m for m in pod.spec.containers[0].volume_mounts if m.mount_path == "/home/jovyan/maps")
        volume = next(v for v in pod.spec.volumes if v.name == mount.name)
        assert volume.csi.driver == "gcsfuse.csi.storage.gke.io"
        assert volume.csi.volume_attributes["bucketName"] == bucket["bucket_name"]
        assert {"implicit-dirs", "uid=1000", "gid=100"} <= set(volume.csi.volume_attributes["mountOptions"].split(","))
        annotations = pod.metadata.annotations
        assert annotations["gke-gcsfuse/volumes"] == "true"
        assert annotations["gke-gcsfuse/memory-request"] == "256Mi"
        assert annotations["gke-gcsfuse/ephemeral-storage-request"] == "5Gi"
        assert pod.spec.termination_grace_period_seconds == 60
        assert pod.spec.node_selector == {METADATA_SERVER_LABEL: "true"}
        assert_secure_pod(pod)

        # the identity: the user's own ServiceAccount, exactly what the bucket grants
        assert pod.spec.service_account_name == service_account
        account = admin.read_namespaced_service_account(service_account, namespace)
        policy = gcs_emulator.json(f"/storage/v1/b/{bucket['bucket_name']}/iam")
        granted = {b["role"]: sorted(b["members"]) for b in policy["bindings"]}
        if identity_mode == "workload-identity":
            assert granted == {
                "roles/storage.objectUser": [
                    f"principal://iam.googleapis.com/projects/{GCP_PROJECT_NUMBER}/locations/global/"
                    f"workloadIdentityPools/{GCP_PROJECT}.svc.id.goog/subject/ns/{namespace}/sa/{service_account}"
                ]
            }
            assert "iam.gke.io/gcp-service-account" not in (account.metadata.annotations or {})
        else:
            email = account.metadata.annotations["iam.gke.io/gcp-service-account"]
            assert email == f"cmbcluster-{user_id[:19]}@{GCP_PROJECT}.iam.gserviceaccount.com"
            assert granted == {"roles/storage.objectUser": [f"serviceAccount:{email}"]}
            assert iam.policies[email]["bindings"] == [
                {
                    "role": "roles/iam.workloadIdentityUser",
                    "members": [f"serviceAccount:{GCP_PROJECT}.svc.id.goog[{namespace}/{service_account}]"],
                }
            ]
        assert client.delete(f"/api/v1/environments/{environment_id}").status_code == 204
