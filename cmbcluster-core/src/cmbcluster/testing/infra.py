"""The infra contract: what every :class:`~cmbcluster.interfaces.InfraProvider` must do.

An infra provider gives each user a cloud identity of their own (or none, like ``local``), and
keeps that identity's reach to exactly the user's buckets. Core grants in two places, in this
order, and the suite does the same through :func:`grant_as_core_does`: after every bucket change
and before every start ``update_user_buckets(user, buckets)`` (every active bucket of the user),
then at a start ``StorageBackend.ensure_bucket_access(bucket, identity)`` for each bucket mounted.

Subclass, provide ``infra_provider`` and ``storage_backend`` (the backend your provider is deployed
with; buckets are made there), and implement :meth:`InfraProviderContract.reachable_buckets` by
reading the cloud's own policies back::

    from cmbcluster.testing.infra import InfraProviderContract

    class TestAzureInfra(InfraProviderContract):
        @pytest.fixture
        def infra_provider(self, azure):
            return AzureInfra(...)

        @pytest.fixture
        def storage_backend(self, azurite):
            return BlobStorage(...)

        def reachable_buckets(self, identity, candidates):
            return {b for b in candidates if identity.principal in role_assignments(b)}

A provider that gives users no identity of their own sets ``gives_identities = False``; the suite
then checks that it says so (``None``) and that core's calls around it succeed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence

import pytest

from cmbcluster.errors import NotFound
from cmbcluster.interfaces import (
    BucketOptions,
    CloudIdentity,
    DnsInfo,
    InfraProvider,
    RegistryInfo,
    StorageBackend,
    UserRef,
)

NAMESPACE = "cmbcluster-users"


def grant_as_core_does(
    infra: InfraProvider, storage: StorageBackend, user: UserRef, identity: CloudIdentity | None, buckets: Sequence[str]
) -> None:
    """What core calls when ``user``'s buckets are now exactly ``buckets`` and an environment mounting
    them starts: the provider's grant of the whole list, then the backend's grant of each bucket."""
    infra.update_user_buckets(user, list(buckets))
    if identity is not None:
        for bucket in buckets:
            storage.ensure_bucket_access(bucket, identity)


class InfraProviderContract:
    """Subclass it; provide ``infra_provider`` and ``storage_backend``; implement ``reachable_buckets``."""

    #: Whether ``ensure_user_identity`` gives each user a cloud identity (AWS, GCP) or None (local).
    gives_identities: bool = True

    @pytest.fixture
    def infra_provider(self) -> InfraProvider:
        raise NotImplementedError("provide an infra_provider fixture in your subclass")

    @pytest.fixture
    def storage_backend(self) -> StorageBackend:
        raise NotImplementedError("provide a storage_backend fixture: the backend your provider is deployed with")

    @pytest.fixture
    def namespace(self) -> str:
        """The Kubernetes namespace of users' pods."""
        return NAMESPACE

    def reachable_buckets(self, identity: CloudIdentity, candidates: Sequence[str]) -> set[str]:
        """Which of ``candidates`` (bucket names, some maybe deleted) ``identity`` may read and write,
        as the cloud's own policies say (read them back; never from the provider's memory)."""
        raise NotImplementedError("implement reachable_buckets: read the cloud's policies for the identity")

    @pytest.fixture
    def users(self) -> tuple[UserRef, UserRef]:
        return (
            UserRef(id=uuid.uuid4().hex, email="ada.lovelace@example.org"),
            UserRef(id=uuid.uuid4().hex, email="grace.hopper@example.org"),
        )

    @pytest.fixture
    def buckets(self, storage_backend: StorageBackend) -> Iterator[list[str]]:
        """Names of the buckets a test made (deleted at the end, as far as they still exist)."""
        made: list[str] = []
        yield made
        for name in made:
            try:
                storage_backend.delete_bucket(name, force=True)
            except NotFound:
                pass

    @staticmethod
    def _bucket(storage: StorageBackend, owner: UserRef, made: list[str]) -> str:
        name = storage.create_bucket(owner, BucketOptions(display_name="contract")).name
        made.append(name)
        return name

    # -- identities --------------------------------------------------------------------------------
    def test_ensure_user_identity_is_idempotent_and_per_user(
        self, infra_provider: InfraProvider, users: tuple[UserRef, UserRef], namespace: str
    ) -> None:
        ada, grace = users
        first = infra_provider.ensure_user_identity(ada, namespace=namespace)
        again = infra_provider.ensure_user_identity(ada, namespace=namespace)
        other = infra_provider.ensure_user_identity(grace, namespace=namespace)
        if not self.gives_identities:
            assert (first, again, other) == (None, None, None)
            return
        assert first is not None and again is not None and other is not None
        assert first.user == ada and other.user == grace
        assert (again.principal, again.service_account) == (first.principal, first.service_account)
        assert other.principal != first.principal
        if first.service_account is not None:
            assert other.service_account != first.service_account
        # names come from the opaque id, never the person's address
        for identity in (first, other):
            assert "lovelace" not in identity.principal and "hopper" not in identity.principal
            assert "lovelace" not in (identity.service_account or "")

    def test_the_identity_reaches_exactly_the_users_buckets_after_every_change(
        self,
        infra_provider: InfraProvider,
        storage_backend: StorageBackend,
        users: tuple[UserRef, UserRef],
        buckets: list[str],
        namespace: str,
    ) -> None:
        ada, grace = users
        identity = infra_provider.ensure_user_identity(ada, namespace=namespace)
        first, second = self._bucket(storage_backend, ada, buckets), self._bucket(storage_backend, ada, buckets)
        others = self._bucket(storage_backend, grace, buckets)
        other_identity = infra_provider.ensure_user_identity(grace, namespace=namespace)
        grant_as_core_does(infra_provider, storage_backend, grace, other_identity, [others])
        grant_as_core_does(infra_provider, storage_backend, ada, identity, [first, second])
        grant_as_core_does(infra_provider, storage_backend, ada, identity, [first, second])  # idempotent
        if not self.gives_identities:
            assert identity is None
            return
        assert identity is not None
        assert self.reachable_buckets(identity, buckets) == {first, second}

        storage_backend.delete_bucket(second, force=True)  # the user deletes a bucket: core grants the rest
        grant_as_core_does(infra_provider, storage_backend, ada, identity, [first])
        assert self.reachable_buckets(identity, buckets) == {first}
        storage_backend.delete_bucket(first, force=True)
        grant_as_core_does(infra_provider, storage_backend, ada, identity, [])
        assert self.reachable_buckets(identity, buckets) == set()
        assert other_identity is not None
        assert self.reachable_buckets(other_identity, buckets) == {others}  # the other user kept theirs

    def test_delete_user_identity_is_idempotent_and_a_later_start_works(
        self,
        infra_provider: InfraProvider,
        storage_backend: StorageBackend,
        users: tuple[UserRef, UserRef],
        buckets: list[str],
        namespace: str,
    ) -> None:
        ada, grace = users
        infra_provider.delete_user_identity(grace, namespace=namespace)  # never had one: nothing to do
        infra_provider.ensure_user_identity(ada, namespace=namespace)
        infra_provider.delete_user_identity(ada, namespace=namespace)
        infra_provider.delete_user_identity(ada, namespace=namespace)
        # the user comes back (an administrator restored them): a start makes it all again
        identity = infra_provider.ensure_user_identity(ada, namespace=namespace)
        bucket = self._bucket(storage_backend, ada, buckets)
        grant_as_core_does(infra_provider, storage_backend, ada, identity, [bucket])
        if self.gives_identities:
            assert identity is not None
            assert self.reachable_buckets(identity, buckets) == {bucket}
        else:
            assert identity is None
        infra_provider.delete_user_identity(ada, namespace=namespace)

    # -- the deployment ----------------------------------------------------------------------------
    def test_registry_and_dns_name_the_deployment(self, infra_provider: InfraProvider) -> None:
        registry = infra_provider.registry()
        assert isinstance(registry, RegistryInfo) and registry.host and "://" not in registry.host
        dns = infra_provider.dns()
        assert isinstance(dns, DnsInfo) and dns.domain and dns.environments_domain

    def test_check_ready_on_a_working_cloud_and_close(self, infra_provider: InfraProvider) -> None:
        infra_provider.check_ready()
        infra_provider.close()
