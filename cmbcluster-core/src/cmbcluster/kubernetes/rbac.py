"""The exact Kubernetes permissions the ``kubernetes`` compute backend needs.

One definition shared by the Helm chart (rendered into a Role and a ClusterRole) and by the
tests, which run the backend with a token bound to exactly these rules and nothing more.

- :data:`NAMESPACED_RULES` go into a ``Role`` in the environments' namespace.
- :data:`CLUSTER_RULES` go into a ``ClusterRole``: PersistentVolumes are cluster-scoped (the
  ``s3.csi.aws.com`` storage backend mounts buckets through a static PV + PVC), so a namespaced
  Role cannot grant them. Deployments whose storage backend uses inline CSI volumes (GCS) may
  leave the ClusterRole out.

Verbs, and why: ``create`` (start), ``get`` (status, and adopting an object that already
exists on a 409), ``list`` (``list_managed``, and finding every object of an environment by
label on stop/delete), ``delete`` (stop/delete, replacing a foreign object of our name),
``watch`` on pods and events (status kept current by a watch), ``patch`` on secrets and
claims only (they are created before the pod, so the pod cannot start without them, then the
pod is added as their owner). Nothing else is changed in place: no ``update`` anywhere.
"""

from __future__ import annotations

from typing import Any

ROLE_NAME = "cmbcluster-compute"
CLUSTER_ROLE_NAME = "cmbcluster-compute-volumes"

NAMESPACED_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {
        "apiGroups": [""],
        "resources": ["services"],
        "verbs": ["get", "list", "create", "delete"],
    },
    {
        "apiGroups": [""],
        "resources": ["secrets", "persistentvolumeclaims"],
        "verbs": ["get", "list", "create", "delete", "patch"],
    },
    {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list", "watch"]},
]

CLUSTER_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["get", "list", "create", "delete"]},
]


def role_manifest(namespace: str, name: str = ROLE_NAME) -> dict[str, Any]:
    """The namespaced Role, as the API's JSON."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/managed-by": "cmbcluster"}},
        "rules": [dict(rule) for rule in NAMESPACED_RULES],
    }


def cluster_role_manifest(name: str = CLUSTER_ROLE_NAME) -> dict[str, Any]:
    """The ClusterRole for PersistentVolumes, as the API's JSON."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "cmbcluster"}},
        "rules": [dict(rule) for rule in CLUSTER_RULES],
    }
