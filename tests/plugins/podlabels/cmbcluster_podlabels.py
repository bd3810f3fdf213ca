"""A third party's plugin that labels the control-plane pod through the chart's extension points.

It imports only CMBCluster's documented public modules (a test checks this), as a cloud plugin
such as cmbcluster-azure would to set ``azure.workload.identity/use: "true"``.
"""

from __future__ import annotations

from typing import Any

from cmbcluster import hookimpl
from cmbcluster.interfaces import ActiveSettings

CMBCLUSTER_PLUGIN_API = ">=1.0,<2"


@hookimpl
def cmbcluster_deploy_values(config: ActiveSettings) -> dict[str, Any]:
    return {
        "controlPlane": {
            "podLabels": {"example.org/workload-identity": "true"},
            "podAnnotations": {"example.org/team": "cosmology"},
            "extraEnv": [{"name": "PODLABELS_MODE", "value": "strict"}],
        },
        "serviceAccount": {"annotations": {"example.org/client-id": "00000000-0000-0000-0000-000000000000"}},
    }
