"""The kubeconfig of a new cluster, written beside the deployment's record for the helm steps."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cmbcluster.interfaces.provisioning import DeploymentRecord, StepContext

__all__ = ["addon_kubeconfig", "kubeconfig_document", "kubeconfig_path", "write_kubeconfig"]


def kubeconfig_path(record: DeploymentRecord) -> Path:
    """Where a deployment's kubeconfig lives: beside its record (written once the cluster exists)."""
    return record.path.with_suffix(".kubeconfig")


def addon_kubeconfig(job: StepContext) -> tuple[Path, bool]:
    """The kubeconfig the add-on steps use, and whether it is the one the provisioner writes (False:
    the operator's own, ``--kubeconfig`` / ``CMBCLUSTER_INFRA_KUBECONFIG``, used as it is)."""
    if job.options.kubeconfig is not None:
        return job.options.kubeconfig, False
    return kubeconfig_path(job.record), True


def kubeconfig_document(
    *, name: str, server: str, certificate_authority_data: str, command: str, args: Sequence[str]
) -> dict[str, Any]:
    """A kubeconfig whose credentials come from an exec plugin (``aws eks get-token``,
    ``gke-gcloud-auth-plugin``), so no long-lived secret is written to disk."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server, "certificate-authority-data": certificate_authority_data}}
        ],
        "users": [
            {
                "name": name,
                "user": {
                    "exec": {
                        "apiVersion": "client.authentication.k8s.io/v1beta1",
                        "command": command,
                        "args": list(args),
                        "interactiveMode": "Never",
                    }
                },
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }


def write_kubeconfig(path: Path, **document: Any) -> Path:
    """Write :func:`kubeconfig_document` (JSON, which is YAML) readable by the operator only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(kubeconfig_document(**document), handle, indent=2)
    return path
