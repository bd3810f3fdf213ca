"""Core keeps each user's cloud identity in step with their buckets (``InfraProvider.update_user_buckets``).

A recording infra provider (through the real plugin machinery) gives users an identity of their
own, as the AWS and GCP plugins do, and remembers every grant core asks for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import SimpleNamespace

from fastapi.testclient import TestClient

from cmbcluster import hookimpl
from cmbcluster.app import create_app
from cmbcluster.errors import ProviderUnavailable
from cmbcluster.interfaces import CloudIdentity, UserRef
from cmbcluster.local.infra import LocalInfra
from cmbcluster.plugins import PluginManager
from cmbcluster.registrations import InfraProviderRegistration
from cmbcluster.settings import CoreSettings
from cmbcluster.testing.api import LOCAL, dev_sign_in


class RecordingInfra(LocalInfra):
    def __init__(self) -> None:
        super().__init__("localhost")
        self.grants: list[tuple[str, list[str]]] = []
        self.deleted: list[str] = []
        self.fail = False

    def ensure_user_identity(self, user: UserRef, *, namespace: str) -> CloudIdentity | None:
        return CloudIdentity(user=user, principal=f"role/{user.id}")

    def delete_user_identity(self, user: UserRef, *, namespace: str) -> None:
        if self.fail:
            raise ProviderUnavailable("IAM is down")
        self.deleted.append(user.id)

    def update_user_buckets(self, user: UserRef, buckets: Sequence[str]) -> None:
        if self.fail:
            raise ProviderUnavailable("IAM is down")
        self.grants.append((user.id, sorted(buckets)))


def make_client(settings: CoreSettings, infra: RecordingInfra) -> TestClient:
    @hookimpl
    def cmbcluster_infra_providers() -> Iterator[InfraProviderRegistration]:
        yield InfraProviderRegistration(name="recording", factory=lambda ctx: infra)

    manager = PluginManager(entry_points_enabled=False)
    manager.register(SimpleNamespace(cmbcluster_infra_providers=cmbcluster_infra_providers), name="recording")
    return TestClient(create_app(settings.model_copy(update={"infra_provider": "recording"}), manager), base_url=LOCAL)


def test_bucket_changes_and_starts_grant_exactly_the_users_buckets(settings: CoreSettings) -> None:
    infra = RecordingInfra()
    with make_client(settings, infra) as client:
        ada = dev_sign_in(client, "ada@example.org")
        bob = dev_sign_in(client, "bob@example.org")
        me = client.get("/api/v1/auth/me", headers=ada).json()["id"]
        first = client.post("/api/v1/storages", json={"display_name": "one"}, headers=ada).json()
        second = client.post("/api/v1/storages", json={"display_name": "two"}, headers=ada).json()
        client.post("/api/v1/storages", json={"display_name": "bob's"}, headers=bob)
        both = sorted([first["bucket_name"], second["bucket_name"]])
        assert infra.grants[:2] == [(me, [first["bucket_name"]]), (me, both)]
        assert all(buckets != both for user, buckets in infra.grants if user != me)  # never another's buckets

        env = client.post("/api/v1/environments", json={"application": "files", "start": True}, headers=ada)
        assert env.status_code == 201, env.text
        assert infra.grants[-1] == (me, both)  # re-applied before the start
        client.delete(f"/api/v1/environments/{env.json()['id']}", headers=ada)

        assert client.delete(f"/api/v1/storages/{first['id']}", headers=ada).status_code == 204
        assert infra.grants[-1] == (me, [second["bucket_name"]])


def test_a_failed_grant_keeps_the_bucket_and_fails_the_start_with_the_reason(settings: CoreSettings) -> None:
    infra = RecordingInfra()
    with make_client(settings, infra) as client:
        ada = dev_sign_in(client, "ada@example.org")
        infra.fail = True
        created = client.post("/api/v1/storages", json={"display_name": "kept"}, headers=ada)
        assert created.status_code == 201  # the bucket exists and is kept; the grant is retried at the next start
        assert [s["id"] for s in client.get("/api/v1/storages", headers=ada).json()["storages"]] == [
            created.json()["id"]
        ]
        env = client.post("/api/v1/environments", json={"application": "files"}, headers=ada).json()
        assert env["status"] == "failed" and "IAM is down" in env["status_message"]
        infra.fail = False
        started = client.post(f"/api/v1/environments/{env['id']}/start", headers=ada)
        assert started.status_code == 200 and started.json()["status"] in ("starting", "running")
        client.delete(f"/api/v1/environments/{env['id']}", headers=ada)


def test_deleting_a_user_removes_their_environments_and_cloud_identity_never_their_data(
    settings: CoreSettings,
) -> None:
    infra = RecordingInfra()
    with make_client(settings, infra) as client:
        admin = dev_sign_in(client, "pi@example.org")
        ada = dev_sign_in(client, "ada@example.org")
        ada_id = client.get("/api/v1/auth/me", headers=ada).json()["id"]
        bucket = client.post("/api/v1/storages", json={"display_name": "maps"}, headers=ada).json()
        env = client.post("/api/v1/environments", json={"application": "files"}, headers=ada).json()

        refused = client.delete(f"/api/v1/admin/users/{ada_id}", headers=admin)
        assert refused.status_code == 409 and "1 bucket" in refused.json()["message"]  # her data stays
        assert client.get("/api/v1/auth/me", headers=ada).status_code == 200
        assert client.delete(f"/api/v1/storages/{bucket['id']}", headers=ada).status_code == 204

        infra.fail = True  # the cloud fails: nothing is deleted, the admin may try again
        assert client.delete(f"/api/v1/admin/users/{ada_id}", headers=admin).status_code == 503
        assert client.get("/api/v1/auth/me", headers=ada).status_code == 200
        infra.fail = False
        assert client.delete(f"/api/v1/admin/users/{ada_id}", headers=admin).status_code == 204
        assert infra.deleted[-1] == ada_id
        assert client.get("/api/v1/auth/me", headers=ada).status_code == 401  # signed out for good
        compute = client.app.state.context.compute  # type: ignore[attr-defined]
        assert env["id"] not in {s.environment_id for s in compute.list_managed()}
        assert client.get(f"/api/v1/admin/users/{ada_id}", headers=admin).status_code == 404
        audit = client.get("/api/v1/admin/audit", params={"action": "user.deleted"}, headers=admin).json()
        assert [e["target_id"] for e in audit["items"]] == [ada_id]

        me = client.get("/api/v1/auth/me", headers=admin).json()["id"]
        itself = client.delete(f"/api/v1/admin/users/{me}", headers=admin)
        assert itself.status_code == 400 and "your own account" in itself.json()["message"]
