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
(``ProvisionerContract``), :mod:`~cmbcluster.testing.deploy` (``DeployValuesContract``),
:mod:`~cmbcluster.testing.lifecycle` (``LifecycleContract``), :mod:`~cmbcluster.testing.prices`
(``PriceTableContract``) and :mod:`~cmbcluster.testing.compute` (``ComputeBackendContract``);
``docs/plugins/testing.md`` covers
each, and the helpers beside them.
"""

# The suites' own assertions are what fails in a plugin's test run: have pytest rewrite them (as it
# rewrites test modules), so that a failure shows the values compared, not a bare AssertionError.
# This package is imported before any of its modules, whose import the rewrite hook then sees; its
# modules are named one by one, as the package itself is being imported (no assertion in it).
try:
    import pytest as _pytest
except ImportError:  # the suites need pytest; the other helpers do not
    pass
else:
    import pkgutil as _pkgutil

    _pytest.register_assert_rewrite(*(f"{__name__}.{m.name}" for m in _pkgutil.iter_modules(__path__)))
