"""Contract test suites and pytest fixtures for CMBCluster implementations, ours and third parties'.

Subclass a suite in your plugin's tests and provide its fixture (as s3fs and gcsfs subclass
fsspec's abstract tests)::

    from cmbcluster.testing.storage import StorageContract

    class TestAzureStorage(StorageContract):
        @pytest.fixture
        def storage_backend(self, azurite):
            return AzureStorage(...)

The suites: :mod:`~cmbcluster.testing.storage` (``StorageContract``), :mod:`~cmbcluster.testing.auth`
(``AuthProviderContract``), :mod:`~cmbcluster.testing.infra` (``InfraProviderContract``),
:mod:`~cmbcluster.testing.pods` (``PodDecorationContract``), :mod:`~cmbcluster.testing.provisioning`
(``ProvisionerContract``), :mod:`~cmbcluster.testing.deploy` (``DeployValuesContract``) and
:mod:`~cmbcluster.testing.lifecycle` (``LifecycleContract``), :mod:`~cmbcluster.testing.prices`
(``PriceTableContract``); ``docs/plugins/testing.md`` covers
each, and the helpers beside them.
"""
