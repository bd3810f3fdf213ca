"""What an EKS pod needs for Mountpoint for S3 volumes (``cmbcluster_decorate_pod``).

- **Node selection**: Linux nodes (Mountpoint and the IRSA webhook support nothing else), plus
  ``EKS_NODE_SELECTOR`` (a user node group, say).
- **Termination grace**: Mountpoint uploads a file when it is closed; a stopping pod gets
  ``EKS_TERMINATION_GRACE_SECONDS`` to close its files.

Mountpoint mounting with the user's own role (``authenticationSource: pod``) is the volume's own
business: ``S3Storage.volume_spec`` sets it from the request's identity. Nothing here touches the
pod's security context (non-root, no privilege escalation): the volume's mount options (``uid``,
``gid``, ``allow-other``) already give the non-root user its files, and FUSE mounts ignore
``fsGroup``. The ServiceAccount with its ``eks.amazonaws.com/role-arn`` annotation is created by
the compute backend from the CloudIdentity; nothing here creates Kubernetes objects.
"""

from __future__ import annotations

from typing import Any

from cmbcluster.interfaces import PodContext, PodDraft
from cmbcluster_aws.settings import AwsSettings
from cmbcluster_aws.storage import CSI_DRIVER

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
    if context.storage_backend == PROVIDER and mountpoint_volumes(draft):
        draft.termination_grace_period_seconds = max(
            draft.termination_grace_period_seconds, settings.eks_termination_grace_seconds
        )
    draft.node_selector.setdefault(OS_NODE_LABEL, "linux")
    draft.node_selector.update(settings.node_selector)
