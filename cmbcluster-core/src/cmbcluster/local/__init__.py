"""The built-in ``local`` provider: the embedded default, everything on one machine.

Public, and stable like the rest of the plugin contract: :class:`LocalStorage` (buckets as folders,
objects as files; it passes :class:`cmbcluster.testing.storage.StorageContract`) and
:class:`LocalInfra` (no cloud identities, no registry or DNS of its own) and
:class:`FolderProvisioner` (a deployment made of files; it passes the provisioner contract). A plugin may wrap them in
its tests, or start from them (``cmbcluster plugin new`` does) and replace them part by part.
"""

from cmbcluster.local.infra import LocalInfra
from cmbcluster.local.provisioning import FolderProvisioner
from cmbcluster.local.storage import LocalStorage

__all__ = ["FolderProvisioner", "LocalInfra", "LocalStorage"]
