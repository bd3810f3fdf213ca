"""What the GCP plugin adds to the Helm values of ``cmbcluster deploy`` (the chart's ``global.gcp.*``).

The control plane's ServiceAccount is annotated for Workload Identity with the Google service
account it acts as, ``<deployment>-controlplane@<PROJECT_ID>.iam.gserviceaccount.com``
(``cmbcluster-controlplane@...`` with the default deployment name), the one ``cmbcluster infra up``
makes (:func:`control_plane_service_account`; docs/DEPLOYMENT_GCP.md lists its roles); buckets are
mounted with the GKE Cloud Storage FUSE CSI driver (inline volumes: no ClusterRole needed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cmbcluster import hookimpl
from cmbcluster_gcp.settings import GcpSettings

if TYPE_CHECKING:
    from cmbcluster.config import ResolvedConfig

STORAGE_DRIVER = "gcsfuse"


def control_plane_service_account(settings: GcpSettings) -> str:
    """The Google service account of the control plane (``infra up`` makes it; one name, here)."""
    return f"{settings.deployment}-controlplane@{settings.project_id}.iam.gserviceaccount.com"


@hookimpl
def cmbcluster_deploy_values(config: ResolvedConfig) -> dict[str, Any] | None:
    # the chart's cloud identity and storage driver are the storage's and the infra's: gcp sign-in
    # alone (its settings are active then too) adds nothing; core renders the settings themselves
    settings = config.settings(GcpSettings)
    if settings is None or not config.serves("gcp", "storage", "infra"):
        return None
    gcp: dict[str, Any] = {
        "projectId": settings.project_id,
        "region": settings.region,
        "clusterName": settings.cluster_name,
        "serviceAccountEmail": control_plane_service_account(settings),
    }
    if settings.project_number:
        gcp["projectNumber"] = settings.project_number
    values: dict[str, Any] = {"global": {"gcp": gcp}}
    if settings.artifact_registry:
        gcp["artifactRegistry"] = settings.artifact_registry
    if config.serves("gcp", "storage"):
        values["storage"] = {"driver": STORAGE_DRIVER}
    return values
