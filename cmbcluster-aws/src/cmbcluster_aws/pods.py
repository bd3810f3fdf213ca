"""What an EKS pod needs for IRSA and Mountpoint for S3 volumes (``cmbcluster_decorate_pod``).

- **Mountpoint with the user's own role**: with ``S3_MOUNT_CREDENTIALS=pod`` (the default) and
  a per-user IRSA identity, every ``s3.csi.aws.com`` PersistentVolume of the pod gets
  ``authenticationSource: pod`` and ``stsRegion``: the CSI driver then mounts the bucket with
  the credentials of the pod's ServiceAccount (the user's role, which grants only their
  buckets) instead of its own, so the driver's role needs no access to users' buckets.
- **Node selection**: Linux nodes (Mountpoint and the IRSA webhook support nothing else), plus
  ``EKS_NODE_SELECTOR`` (a user node group, say).
- **Termination grace**: Mountpoint uploads a file when it is closed; a stopping pod gets
  ``EKS_TERMINATION_GRACE_SECONDS`` to close its files.

Nothing here touches the pod's security context (non-root, no privilege escalation): the
volume's mount options (``uid``, ``gid``, ``allow-other``) already give the non-root user its
files, and FUSE mounts ignore ``fsGroup``. The ServiceAccount with its
``eks.amazonaws.com/role-arn`` annotation is created by the compute backend from the
CloudIdentity; nothing here creates Kubernetes objects.
"""

from __future__ import annotations

import logging
from typing import Any

from cmbcluster.interfaces import PodContext, PodDraft
from cmbcluster_aws.identity import ROLE_ANNOTATION
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import CSI_DRIVER

log = logging.getLogger(__name__)

PROVIDER = "aws"
OS_NODE_LABEL = "kubernetes.io/os"


def applies(context: PodContext) -> bool:
    """Whether the pod is this plugin's business: S3 storage or the aws infra provider is active."""
    return context.storage_backend == PROVIDER or context.infra_provider == PROVIDER


def mountpoint_volumes(draft: PodDraft) -> list[dict[str, Any]]:
    """The draft's PersistentVolumes of the Mountpoint for S3 CSI driver."""
    return [
        obj
        for obj in draft.extra_objects
        if obj.get("kind") == "PersistentVolume" and (obj.get("spec") or {}).get("csi", {}).get("driver") == CSI_DRIVER
    ]


def decorate_eks_pod(draft: PodDraft, context: PodContext, settings: AwsSettings) -> None:
    """Change ``draft`` in place for EKS; no change when neither S3 nor the aws infra is in use."""
    if not applies(context):
        return
    volumes = mountpoint_volumes(draft) if context.storage_backend == PROVIDER else []
    if volumes:
        identity = context.identity
        irsa = (
            context.infra_provider == PROVIDER
            and identity is not None
            and bool(identity.service_account)
            and ROLE_ANNOTATION in identity.annotations
        )
        if settings.s3_mount_credentials == "pod" and irsa:
            for volume in volumes:
                attributes = volume["spec"]["csi"].setdefault("volumeAttributes", {})
                attributes["authenticationSource"] = "pod"
                attributes["stsRegion"] = settings.aws_region
        elif settings.s3_mount_credentials == "pod":
            log.warning(
                "environment %s mounts S3 buckets with the CSI driver's credentials: the user has no IRSA role "
                "(infra provider %s)",
                context.environment_id,
                context.infra_provider,
            )
        draft.termination_grace_period_seconds = max(
            draft.termination_grace_period_seconds, settings.eks_termination_grace_seconds
        )
    draft.node_selector.setdefault(OS_NODE_LABEL, "linux")
    draft.node_selector.update(settings.node_selector)
