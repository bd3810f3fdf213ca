"""What a GKE pod needs for gcsfuse-mounted buckets and Workload Identity (``cmbcluster_decorate_pod``).

- Pods with a ``gcsfuse.csi.storage.gke.io`` volume get ``gke-gcsfuse/volumes: "true"`` (the
  driver's webhook then injects its sidecar), the sidecar's resource annotations from the
  settings, and a termination grace period long enough for the sidecar to flush written files.
- Pods that run as a user's own ServiceAccount under the ``gcp`` infra provider are scheduled on
  nodes that run the GKE metadata server (``iam.gke.io/gke-metadata-server-enabled``), without
  which Workload Identity gives them no credentials.

The ServiceAccount itself (and its ``iam.gke.io/gcp-service-account`` annotation in the
``service-account`` identity mode) is created by the compute backend from the CloudIdentity;
nothing here creates Kubernetes objects.
"""

from __future__ import annotations

from typing import Any

from cmbcluster.interfaces import PodContext, PodDraft
from cmbcluster_gcp.settings import GcpSettings
from cmbcluster_gcp.storage import CSI_DRIVER, GCSFUSE_ANNOTATION

PROVIDER = "gcp"
METADATA_SERVER_NODE_LABEL = "iam.gke.io/gke-metadata-server-enabled"
#: gcsfuse sidecar annotation -> the GcpSettings field that sets it
SIDECAR_RESOURCE_ANNOTATIONS = {
    "gke-gcsfuse/cpu-request": "gcsfuse_cpu_request",
    "gke-gcsfuse/memory-request": "gcsfuse_memory_request",
    "gke-gcsfuse/ephemeral-storage-request": "gcsfuse_ephemeral_storage_request",
    "gke-gcsfuse/cpu-limit": "gcsfuse_cpu_limit",
    "gke-gcsfuse/memory-limit": "gcsfuse_memory_limit",
    "gke-gcsfuse/ephemeral-storage-limit": "gcsfuse_ephemeral_storage_limit",
}


def applies(context: PodContext) -> bool:
    """Whether the pod is this plugin's business: GCS storage or the gcp infra provider is active."""
    return context.storage_backend == PROVIDER or context.infra_provider == PROVIDER


def has_gcsfuse_volume(draft: PodDraft) -> bool:
    return any(_csi_driver(volume) == CSI_DRIVER for volume in draft.volumes)


def decorate_gke_pod(draft: PodDraft, context: PodContext, settings: GcpSettings) -> None:
    """Change ``draft`` in place for GKE; no change when neither GCS nor GKE identity is in use."""
    if not applies(context):
        return
    if context.storage_backend == PROVIDER and has_gcsfuse_volume(draft):
        draft.annotations[GCSFUSE_ANNOTATION] = "true"
        for annotation, field_name in SIDECAR_RESOURCE_ANNOTATIONS.items():
            value = getattr(settings, field_name)
            if value is not None:
                draft.annotations[annotation] = str(value)
        draft.termination_grace_period_seconds = max(
            draft.termination_grace_period_seconds, settings.gcsfuse_termination_grace_seconds
        )
    identity = context.identity
    if (
        context.infra_provider == PROVIDER
        and identity is not None
        and identity.service_account
        and settings.workload_identity_node_selector
    ):
        draft.node_selector[METADATA_SERVER_NODE_LABEL] = "true"


def _csi_driver(volume: dict[str, Any]) -> str | None:
    csi = volume.get("csi")
    return str(csi.get("driver")) if isinstance(csi, dict) else None
