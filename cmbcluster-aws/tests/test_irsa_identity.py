"""Per-user IRSA identity, ECR and readiness of the AWS infra provider, against moto over HTTP.

moto 5.2 does not implement the IAM policy simulator (``SimulatePrincipalPolicy`` answers 500),
so "user A's role cannot reach user B's bucket" is shown on the policy documents themselves.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient

from cmbcluster.app import create_app
from cmbcluster.db.models import Storage
from cmbcluster.errors import ConfigurationError, Conflict, InvalidRequest, NotFound, ProviderUnavailable
from cmbcluster.interfaces import CloudIdentity, InfraProvider, StorageBackend, UserRef
from cmbcluster.migration.engine import Events, Migration, Side
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in, make_bucket
from cmbcluster.testing.infra import InfraProviderContract
from cmbcluster.testing.lifecycle import LifecycleContract
from cmbcluster_aws.identity import BUCKET_POLICY_NAME, ROLE_ANNOTATION, AwsInfra
from cmbcluster_aws.provisioning import user_boundary_policy
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import S3Storage

REGION = "eu-west-1"  # as in conftest.make_settings
ACCOUNT_ID = "123456789012"
CLUSTER = "cmbtest-eks"
NAMESPACE = "cmbcluster-users"
USER_A = UserRef(id="0f3a9c1e7b2d4e6f8a0b1c2d3e4f5a6b", email="alice@example.org")
USER_B = UserRef(id="9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b", email="bob@example.org")
USER_PATH = f"/cmbcluster-users/{CLUSTER}/"  # the deployment's name is the cluster's by default
BOUNDARY = f"arn:aws:iam::{ACCOUNT_ID}:policy/cmbcluster-infra/{CLUSTER}/{CLUSTER}-user-boundary"
OBJECT_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]


def _document(value: Any) -> dict[str, Any]:
    """A policy document read back from IAM: botocore decodes it, or URL-encoded JSON."""
    if isinstance(value, dict):
        return value
    decoded = json.loads(urllib.parse.unquote(value))
    assert isinstance(decoded, dict)
    return decoded


def _resources(document: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for statement in document["Statement"]:
        resource = statement.get("Resource", [])
        found.extend([resource] if isinstance(resource, str) else resource)
    return found


@pytest.fixture
def iam(moto_reset: str) -> Iterator[Any]:
    client = boto3.client("iam", region_name=REGION, endpoint_url=moto_reset)
    yield client
    client.close()


@pytest.fixture
def issuer(moto_reset: str, iam: Any) -> str:
    """An EKS cluster in moto (it answers with an OIDC issuer) and the IAM OIDC provider for it."""
    return make_cluster(moto_reset, iam)


def make_cluster(moto_reset: str, iam: Any) -> str:
    eks = boto3.client("eks", region_name=REGION, endpoint_url=moto_reset)
    cluster = eks.create_cluster(
        name=CLUSTER,
        roleArn=f"arn:aws:iam::{ACCOUNT_ID}:role/eks-cluster",
        resourcesVpcConfig={"subnetIds": []},
    )["cluster"]
    eks.close()
    url = str(cluster["identity"]["oidc"]["issuer"])
    assert url.startswith("https://oidc.eks.")
    iam.create_open_id_connect_provider(Url=url, ClientIDList=["sts.amazonaws.com"], ThumbprintList=["9" * 40])
    return url


@pytest.fixture
def boundary(make_settings: Callable[..., AwsSettings], iam: Any) -> str:
    """The permissions boundary of per-user roles, as `cmbcluster infra up` makes it."""
    return make_boundary(make_settings, iam)


def make_boundary(make_settings: Callable[..., AwsSettings], iam: Any) -> str:
    arn = iam.create_policy(
        PolicyName=f"{CLUSTER}-user-boundary", Path=f"/cmbcluster-infra/{CLUSTER}/",
        PolicyDocument=json.dumps(user_boundary_policy(make_settings(eks_cluster_name=CLUSTER))),
    )["Policy"]["Arn"]  # fmt: skip
    assert arn == BOUNDARY
    return str(arn)


@pytest.fixture
def infra(make_settings: Callable[..., AwsSettings], issuer: str, boundary: str) -> Iterator[AwsInfra]:
    provider = AwsInfra(make_settings(eks_cluster_name=CLUSTER), domain="cmb.example.org")
    yield provider
    provider.close()


class TestAwsInfraContract(InfraProviderContract):
    """The infra contract on moto: what a user's role reaches, read back from its IAM policy."""

    @pytest.fixture
    def infra_provider(self, infra: AwsInfra, iam: Any) -> AwsInfra:
        self.iam, self.provider = iam, infra
        return infra

    @pytest.fixture
    def storage_backend(self, make_settings: Callable[..., AwsSettings]) -> Iterator[StorageBackend]:
        storage = S3Storage(make_settings(eks_cluster_name=CLUSTER))
        yield storage
        storage.close()

    def reachable_buckets(self, identity: CloudIdentity, candidates: Sequence[str]) -> set[str]:
        role = self.provider.role_name(identity.user)
        try:
            document = self.iam.get_role_policy(RoleName=role, PolicyName=BUCKET_POLICY_NAME)["PolicyDocument"]
        except self.iam.exceptions.NoSuchEntityException:
            return set()  # no policy (no buckets) or no role (deleted)
        arns = set(_resources(_document(document)))
        return {b for b in candidates if f"arn:aws:s3:::{b}" in arns and f"arn:aws:s3:::{b}/*" in arns}


class TestAwsLifecycleContract(LifecycleContract):
    """Core's calls over a user's life, on the IRSA roles in moto."""

    @pytest.fixture
    def infra_provider(self, infra: AwsInfra) -> AwsInfra:
        return infra


def test_is_an_infra_provider(infra: AwsInfra) -> None:
    assert isinstance(infra, InfraProvider)


def test_role_trust_policy_admits_only_the_users_service_account(infra: AwsInfra, iam: Any, issuer: str) -> None:
    identity = infra.ensure_user_identity(USER_A, namespace=NAMESPACE)

    service_account = "cmbcluster-user-0f3a9c1e7b"
    name = f"{CLUSTER}-user-0f3a9c1e7b"  # the role carries the deployment's name, the ServiceAccount need not
    role_arn = f"arn:aws:iam::{ACCOUNT_ID}:role{USER_PATH}{name}"
    assert identity.user == USER_A
    assert identity.service_account == service_account
    assert identity.namespace == NAMESPACE
    assert identity.principal == role_arn
    assert identity.annotations == {ROLE_ANNOTATION: role_arn}
    assert "alice" not in name and "example" not in name

    role = iam.get_role(RoleName=name)["Role"]
    assert role["Arn"] == role_arn
    assert role["Path"] == USER_PATH  # a path holding this deployment's per-user roles only
    # the boundary the control plane cannot change: users' buckets at most, whatever it writes into the role
    assert role["PermissionsBoundary"] == {"PermissionsBoundaryType": "PermissionsBoundaryPolicy",
                                           "PermissionsBoundaryArn": BOUNDARY}  # fmt: skip
    assert {t["Key"]: t["Value"] for t in role["Tags"]} == {
        "owner": USER_A.id, "managed-by": "cmbcluster", "cmbcluster:deployment": CLUSTER,
    }  # fmt: skip
    issuer_id = issuer.removeprefix("https://")
    assert _document(role["AssumeRolePolicyDocument"]) == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Federated": f"arn:aws:iam::{ACCOUNT_ID}:oidc-provider/{issuer_id}"},
                "Action": "sts:AssumeRoleWithWebIdentity",
                "Condition": {
                    "StringEquals": {
                        f"{issuer_id}:sub": f"system:serviceaccount:{NAMESPACE}:{service_account}",
                        f"{issuer_id}:aud": "sts.amazonaws.com",
                    }
                },
            }
        ],
    }
    # Nothing is granted until the user has buckets.
    assert iam.list_role_policies(RoleName=name)["PolicyNames"] == []
    assert iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"] == []


def test_bucket_policy_grants_exactly_the_users_buckets(infra: AwsInfra, iam: Any) -> None:
    infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    infra.update_user_buckets(USER_A, ["cmbtest-0f3a9c1e7b-bbbb0002", "cmbtest-0f3a9c1e7b-aaaa0001"])

    name = infra.role_name(USER_A)
    assert iam.list_role_policies(RoleName=name)["PolicyNames"] == [BUCKET_POLICY_NAME]
    document = _document(iam.get_role_policy(RoleName=name, PolicyName=BUCKET_POLICY_NAME)["PolicyDocument"])
    assert document == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "CmbclusterUserList",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": ["arn:aws:s3:::cmbtest-0f3a9c1e7b-aaaa0001", "arn:aws:s3:::cmbtest-0f3a9c1e7b-bbbb0002"],
            },
            {
                "Sid": "CmbclusterUserObjects",
                "Effect": "Allow",
                "Action": OBJECT_ACTIONS,
                "Resource": [
                    "arn:aws:s3:::cmbtest-0f3a9c1e7b-aaaa0001/*",
                    "arn:aws:s3:::cmbtest-0f3a9c1e7b-bbbb0002/*",
                ],
            },
        ],
    }
    assert "*" not in _resources(document)
    assert all(r.startswith("arn:aws:s3:::cmbtest-0f3a9c1e7b-") for r in _resources(document))
    assert all(s["Action"] != "*" and "s3:*" not in s["Action"] for s in document["Statement"])

    # The buckets change: the policy follows; no buckets left: the policy goes.
    infra.update_user_buckets(USER_A, ["cmbtest-0f3a9c1e7b-aaaa0001"])
    document = _document(iam.get_role_policy(RoleName=name, PolicyName=BUCKET_POLICY_NAME)["PolicyDocument"])
    assert _resources(document) == [
        "arn:aws:s3:::cmbtest-0f3a9c1e7b-aaaa0001",
        "arn:aws:s3:::cmbtest-0f3a9c1e7b-aaaa0001/*",
    ]
    infra.update_user_buckets(USER_A, [])
    assert iam.list_role_policies(RoleName=name)["PolicyNames"] == []
    infra.update_user_buckets(USER_A, [])  # idempotent


def test_user_a_role_does_not_reach_user_b_bucket(infra: AwsInfra, iam: Any) -> None:
    a = infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    b = infra.ensure_user_identity(USER_B, namespace=NAMESPACE)
    assert a.principal != b.principal and a.service_account != b.service_account
    bucket_a, bucket_b = "cmbtest-0f3a9c1e7b-aaaa0001", "cmbtest-9e8d7c6b5a-bbbb0001"
    infra.update_user_buckets(USER_A, [bucket_a])
    infra.update_user_buckets(USER_B, [bucket_b])

    role_a, role_b = infra.role_name(USER_A), infra.role_name(USER_B)
    policy_a = iam.get_role_policy(RoleName=role_a, PolicyName=BUCKET_POLICY_NAME)["PolicyDocument"]
    policy_b = iam.get_role_policy(RoleName=role_b, PolicyName=BUCKET_POLICY_NAME)["PolicyDocument"]
    text_a, text_b = json.dumps(_document(policy_a)), json.dumps(_document(policy_b))
    assert bucket_b not in text_a and bucket_a in text_a
    assert bucket_a not in text_b and bucket_b in text_b

    # Each role trusts only its own ServiceAccount.
    trust_a = json.dumps(_document(iam.get_role(RoleName=role_a)["Role"]["AssumeRolePolicyDocument"]))
    assert f"system:serviceaccount:{NAMESPACE}:{a.service_account}" in trust_a
    assert str(b.service_account) not in trust_a


def test_ensure_is_idempotent_and_updates_the_trust_policy(infra: AwsInfra, iam: Any) -> None:
    first = infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    infra.update_user_buckets(USER_A, ["cmbtest-0f3a9c1e7b-aaaa0001"])
    again = infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    assert again == first
    moved = infra.ensure_user_identity(USER_A, namespace="other-ns")
    assert moved.principal == first.principal

    role = infra.role_name(USER_A)
    roles = [r["RoleName"] for r in iam.list_roles(PathPrefix=USER_PATH)["Roles"]]
    assert roles == [role]
    trust = _document(iam.get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"])
    subjects = [v for k, v in trust["Statement"][0]["Condition"]["StringEquals"].items() if k.endswith(":sub")]
    assert subjects == [f"system:serviceaccount:other-ns:{first.service_account}"]
    # Re-ensuring leaves the user's bucket grant alone.
    assert iam.list_role_policies(RoleName=role)["PolicyNames"] == [BUCKET_POLICY_NAME]


def test_delete_removes_policy_and_role_idempotently(infra: AwsInfra, iam: Any) -> None:
    infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    role = infra.role_name(USER_A)
    infra.update_user_buckets(USER_A, ["cmbtest-0f3a9c1e7b-aaaa0001"])
    infra.delete_user_identity(USER_A, namespace=NAMESPACE)

    with pytest.raises(iam.exceptions.NoSuchEntityException):
        iam.get_role(RoleName=role)
    with pytest.raises(iam.exceptions.NoSuchEntityException):
        iam.get_role_policy(RoleName=role, PolicyName=BUCKET_POLICY_NAME)
    infra.delete_user_identity(USER_A, namespace=NAMESPACE)  # idempotent
    # without a role there is nothing to grant: no role is created behind ensure_user_identity's back
    infra.update_user_buckets(USER_A, ["cmbtest-0f3a9c1e7b-aaaa0001"])
    with pytest.raises(iam.exceptions.NoSuchEntityException):
        iam.get_role(RoleName=role)


def test_a_role_of_another_owner_is_not_taken_over(infra: AwsInfra, iam: Any) -> None:
    infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    twin = UserRef(id=USER_A.id[:10] + "ffffffffffffffffffffff")  # same short id, another user
    with pytest.raises(Conflict):
        infra.ensure_user_identity(twin, namespace=NAMESPACE)
    with pytest.raises(Conflict):
        infra.delete_user_identity(twin, namespace=NAMESPACE)
    assert iam.get_role(RoleName=f"{CLUSTER}-user-0f3a9c1e7b")["Role"]


def test_a_role_without_the_boundary_is_not_taken_over(infra: AwsInfra, iam: Any) -> None:
    """A role of the right name, path and tags but no boundary (made by hand) would let the control
    plane grant more than users' buckets: it is refused, never adopted."""
    iam.create_role(
        RoleName=infra.role_name(USER_A), Path=USER_PATH, AssumeRolePolicyDocument="{}",
        Tags=[{"Key": "owner", "Value": USER_A.id}, {"Key": "managed-by", "Value": "cmbcluster"}],
    )  # fmt: skip
    with pytest.raises(Conflict, match="does not belong to this user"):
        infra.ensure_user_identity(USER_A, namespace=NAMESPACE)


def test_two_deployments_of_one_account_keep_their_users_apart(
    make_settings: Callable[..., AwsSettings], issuer: str, iam: Any, boundary: str
) -> None:
    """Every name carries the deployment's: roles, their path, bucket prefixes and repositories."""
    lab = make_settings(eks_cluster_name=CLUSTER, deployment_name="lab", s3_user_bucket_prefix="")
    other = make_settings(eks_cluster_name=CLUSTER, deployment_name="other", s3_user_bucket_prefix="")
    assert (lab.s3_user_bucket_prefix, other.s3_user_bucket_prefix) == ("lab-user", "other-user")
    iam.create_policy(PolicyName="lab-user-boundary", Path="/cmbcluster-infra/lab/", PolicyDocument=json.dumps(
        user_boundary_policy(lab)))  # fmt: skip
    first, second = AwsInfra(lab), AwsInfra(other)
    try:
        identity = first.ensure_user_identity(USER_A, namespace=NAMESPACE)
        assert identity.principal == f"arn:aws:iam::{ACCOUNT_ID}:role/cmbcluster-users/lab/lab-user-0f3a9c1e7b"
        assert first.registry().repository_prefix == "lab"
        # the other deployment neither sees nor may touch it: another name, under another path
        assert second.role_name(USER_A) == "other-user-0f3a9c1e7b" and second.role_path == "/cmbcluster-users/other/"
        assert [r["RoleName"] for r in iam.list_roles(PathPrefix=second.role_path)["Roles"]] == []
        assert second.permissions_boundary != first.permissions_boundary
    finally:
        first.close()
        second.close()


def test_bad_input_is_refused(infra: AwsInfra) -> None:
    with pytest.raises(InvalidRequest):
        infra.ensure_user_identity(USER_A, namespace="Bad_Namespace")
    infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    with pytest.raises(InvalidRequest):
        infra.update_user_buckets(USER_A, ["*"])
    with pytest.raises(InvalidRequest):
        infra.update_user_buckets(USER_A, ["Not_A_Bucket"])


def test_missing_oidc_provider_is_a_configuration_error(
    make_settings: Callable[..., AwsSettings], issuer: str, iam: Any
) -> None:
    iam.delete_open_id_connect_provider(
        OpenIDConnectProviderArn=f"arn:aws:iam::{ACCOUNT_ID}:oidc-provider/{issuer.removeprefix('https://')}"
    )
    infra = AwsInfra(make_settings(eks_cluster_name=CLUSTER))
    with pytest.raises(ConfigurationError):
        infra.ensure_user_identity(USER_A, namespace=NAMESPACE)


def test_missing_cluster_is_not_found(make_settings: Callable[..., AwsSettings]) -> None:
    infra = AwsInfra(make_settings(eks_cluster_name="no-such-cluster"))
    with pytest.raises(NotFound):
        infra.ensure_user_identity(USER_A, namespace=NAMESPACE)


def test_registry_and_login(infra: AwsInfra, make_settings: Callable[..., AwsSettings]) -> None:
    registry = infra.registry()
    assert registry.host == f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com"
    assert registry.repository_prefix == CLUSTER  # the deployment's own repositories
    login = infra.registry_login()
    assert login.username == "AWS"
    assert login.password == f"{ACCOUNT_ID}-auth-token"  # moto's token: base64("AWS:<account>-auth-token")

    configured = AwsInfra(make_settings(ecr_registry_url=f"https://{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com/cmb/"))
    assert configured.registry().host == f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com"
    assert configured.registry().repository_prefix == "cmb"


def test_dns_uses_the_deployment_domain(infra: AwsInfra) -> None:
    dns = infra.dns()
    assert dns.domain == "cmb.example.org"
    assert dns.environments_domain == "cmb.example.org"


def test_check_ready(infra: AwsInfra, make_settings: Callable[..., AwsSettings]) -> None:
    infra.check_ready()
    wrong = AwsInfra(make_settings(aws_account_id="210987654321"))
    with pytest.raises(ProviderUnavailable):
        wrong.check_ready()


def test_unreachable_endpoint_is_provider_unavailable_quickly(make_settings: Callable[..., AwsSettings]) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    infra = AwsInfra(make_settings(endpoint_url=f"http://127.0.0.1:{port}"))
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable):
        infra.check_ready()
    with pytest.raises(ProviderUnavailable):
        infra.ensure_user_identity(USER_A, namespace=NAMESPACE)
    assert time.monotonic() - started < 5


def test_plugin_registers_aws_infra() -> None:
    from cmbcluster_aws import plugin

    (registration,) = list(plugin.cmbcluster_infra_providers())
    assert registration.name == "aws"
    assert registration.settings_model is AwsSettings


# -- `cmbcluster migrate run --to aws`: the users' identities ------------------------------------------
def test_identities_a_migration_could_not_make_are_made_by_its_next_run(
    make_settings: Callable[..., AwsSettings], moto_reset: str, iam: Any, tmp_path: Path
) -> None:
    """A first run before the EKS cluster exists switches the buckets but cannot make the users' roles;
    the next run (nothing left to copy) makes them and grants each role its buckets, as it says it will."""
    app = create_app(CoreSettings(data_dir=tmp_path / "data"))
    with TestClient(app, base_url=LOCAL) as client:
        alice = dev_sign_in(client, "alice@example.org", "Alice")
        storage_id = make_bucket(client, alice, {"notes.txt": b"hello"})
    settings = make_settings(eks_cluster_name=CLUSTER)
    s3, infra = S3Storage(settings), AwsInfra(settings, domain="cmb.example.org")
    notes: list[str] = []

    class Notes(Events):
        def note(self, text: str) -> None:
            notes.append(text)

    def run() -> list[str]:
        source = Side(name="local", storage=app.state.context.storage)
        result = Migration(app.state.context.sessions, source, Side(name="aws", storage=s3, infra=infra),
                           namespace=NAMESPACE, events=Notes()).run()  # fmt: skip
        return [b.state for b in result.buckets]

    try:
        assert run() == ["switched"]
        assert any("alice@example.org on aws could not be created" in note for note in notes), notes
        make_cluster(moto_reset, iam)
        make_boundary(make_settings, iam)
        notes.clear()

        assert run() == []  # nothing left to copy
        assert notes == []
        role = iam.get_role(RoleName=f"{CLUSTER}-user-{storage_owner(app, storage_id)[:10]}")["Role"]
        with app.state.context.sessions() as db:
            bucket = db.get(Storage, storage_id).bucket_name
        granted = iam.get_role_policy(RoleName=role["RoleName"], PolicyName=BUCKET_POLICY_NAME)
        policy = _document(granted["PolicyDocument"])
        assert f"arn:aws:s3:::{bucket}" in _resources(policy)
    finally:
        s3.close()
        infra.close()
        app.state.context.close()


def storage_owner(app: Any, storage_id: str) -> str:
    with app.state.context.sessions() as db:
        return str(db.get(Storage, storage_id).user_id)
