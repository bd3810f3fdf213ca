"""How a start mounts a user's bucket: the one ``MountRequest`` every storage backend's
``volume_spec`` receives, from the control plane and from the pod-decoration contract alike."""

from __future__ import annotations

from cmbcluster.interfaces import CloudIdentity, MountedVolume, MountRequest, StorageBackend, UserRef


def mount_bucket(
    storage: StorageBackend,
    *,
    bucket: str,
    mount_path: str,
    user: UserRef,
    environment_id: str,
    identity: CloudIdentity | None,
    namespace: str,
    read_only: bool = False,
) -> MountedVolume:
    """``bucket`` mounted at ``mount_path`` in ``user``'s environment, as ``identity`` (the user's
    cloud identity, already granted the bucket; None when the infra provider gives users none)."""
    request = MountRequest(
        bucket=bucket, mount_path=mount_path, user=user, environment_id=environment_id, read_only=read_only,
        namespace=namespace, identity=identity,
    )  # fmt: skip
    return MountedVolume(mount_path=mount_path, bucket=bucket, spec=storage.volume_spec(request))
