"""CMBCluster core: the plugin contract, the control plane and the embedded default.

Plugin authors need only what is exported here and in :mod:`cmbcluster.interfaces`,
:mod:`cmbcluster.errors`, :mod:`cmbcluster.oidc` (sign-in with OpenID Connect),
:mod:`cmbcluster.naming`, :mod:`cmbcluster.provisioning`, :mod:`cmbcluster.local` (the folder storage
and the machine's infra, to wrap or start from) and :mod:`cmbcluster.testing` (the contract suites).
"""

from importlib.metadata import PackageNotFoundError, version

from cmbcluster.hookspecs import hookimpl
from cmbcluster.registrations import (
    AuthProviderRegistration,
    ComputeBackendRegistration,
    InfraProviderRegistration,
    ProviderContext,
    ResolvedConfig,
    StorageBackendRegistration,
)

try:
    __version__ = version("cmbcluster-core")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

#: The version of the plugin contract. A plugin module may declare what it needs with
#: ``CMBCLUSTER_PLUGIN_API = ">=1.0,<2"``; a plugin whose requirement this core does not
#: meet is recorded as failed to load instead of being half-used.
PLUGIN_API_VERSION = "1.0"

__all__ = [
    "PLUGIN_API_VERSION",
    "AuthProviderRegistration",
    "ComputeBackendRegistration",
    "InfraProviderRegistration",
    "ProviderContext",
    "ResolvedConfig",
    "StorageBackendRegistration",
    "__version__",
    "hookimpl",
]
