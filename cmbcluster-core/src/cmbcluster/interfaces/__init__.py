"""The interfaces each concern's implementations provide: storage, auth, infra, compute, pods."""

from cmbcluster.interfaces.auth import AuthorizationRequest, AuthProvider, TokenSet, UserInfo
from cmbcluster.interfaces.common import CloudIdentity, UserRef
from cmbcluster.interfaces.compute import (
    ComputeBackend,
    EnvironmentPhase,
    EnvironmentSpec,
    EnvironmentStatus,
    MountedVolume,
    Resources,
)
from cmbcluster.interfaces.infra import DnsInfo, InfraProvider, RegistryInfo, RegistryLogin
from cmbcluster.interfaces.pods import PodContext, PodDraft
from cmbcluster.interfaces.provisioning import (
    DnsRecord,
    HelmRelease,
    PlannedStep,
    ProgressEvent,
    Provisioner,
    ProvisioningOptions,
    ProvisioningRecord,
    ResourceRecord,
    StepContext,
)
from cmbcluster.interfaces.storage import (
    BucketInfo,
    BucketOptions,
    BucketUsage,
    MountRequest,
    ObjectInfo,
    ObjectPage,
    StorageBackend,
    StorageClass,
    VolumeSpec,
    check_listing,
    resolve_byte_range,
)

__all__ = [
    "AuthProvider",
    "AuthorizationRequest",
    "BucketInfo",
    "BucketOptions",
    "BucketUsage",
    "CloudIdentity",
    "ComputeBackend",
    "DnsInfo",
    "DnsRecord",
    "EnvironmentPhase",
    "EnvironmentSpec",
    "EnvironmentStatus",
    "HelmRelease",
    "InfraProvider",
    "MountRequest",
    "MountedVolume",
    "ObjectInfo",
    "ObjectPage",
    "PlannedStep",
    "PodContext",
    "PodDraft",
    "ProgressEvent",
    "Provisioner",
    "ProvisioningOptions",
    "ProvisioningRecord",
    "RegistryInfo",
    "RegistryLogin",
    "ResourceRecord",
    "Resources",
    "StepContext",
    "StorageBackend",
    "StorageClass",
    "TokenSet",
    "UserInfo",
    "UserRef",
    "VolumeSpec",
    "check_listing",
    "resolve_byte_range",
]
