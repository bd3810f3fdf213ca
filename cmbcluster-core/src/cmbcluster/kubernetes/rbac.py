"""The exact Kubernetes permissions the ``kubernetes`` compute backend needs.

One definition shared by the Helm chart (rendered into a Role and a ClusterRole) and by the
tests, which run the backend with a token bound to exactly these rules and nothing more.

- :data:`NAMESPACED_RULES` go into a ``Role`` in the environments' namespace.
- :data:`CLUSTER_RULES` go into a ``ClusterRole``: PersistentVolumes are cluster-scoped (the
  ``s3.csi.aws.com`` storage backend mounts buckets through a static PV + PVC), so a namespaced
  Role cannot grant them. Every deployment needs it: stop and delete look for an environment's
  volumes by label whenever its pod is already gone, whatever the storage backend.

Verbs, and why: ``create`` (start), ``get`` (status, and adopting an object that already
exists on a 409), ``list`` and ``watch`` (the pod and event caches that keep status current,
``list_managed``, and finding every object of an environment by label on stop/delete),
``delete`` (stop/delete, replacing a foreign object of our name), ``patch`` on service
accounts only (a user's identity annotations change when their cloud role does; everything of
an environment is created owned by its root, the Secret or else the Pod, so nothing else is
patched). Service accounts are per user and
outlive environments: ``list`` and ``delete`` only when the user is deleted; the namespace's one NetworkPolicy is
only ever created (an existing one, e.g. the Helm chart's, is kept). Leases: ``get``, ``create`` and
``update`` of the one leader-election Lease (``update`` because taking over an expired lease
must be a compare-and-swap on its resourceVersion). ``list`` of ``pods.metrics.k8s.io``: the CPU and
memory the web UI shows for running environments (read only; a cluster without metrics-server
simply hides them). Nothing else is changed in place.
"""

from __future__ import annotations

from typing import Any

ROLE_NAME = "cmbcluster-compute"
#: the control plane's own ServiceAccount (bound to the Role), as the Helm chart names it on every
#: cloud: the control plane's cloud identity (an IRSA role, a Workload Identity binding) trusts it
CONTROL_PLANE_SERVICE_ACCOUNT = "cmbcluster-controlplane"
CLUSTER_ROLE_NAME = "cmbcluster-compute-volumes"

NAMESPACED_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "create", "delete"]},
    {
        "apiGroups": [""],
        "resources": ["secrets", "persistentvolumeclaims"],
        "verbs": ["get", "list", "create", "delete"],
    },
    {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", "list", "create", "delete", "patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "watch"]},
    # patch: an upgrade brings running environments' Ingresses to its annotations (backend._update_annotations)
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["ingresses"],
        "verbs": ["get", "list", "create", "delete", "patch"],
    },
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
    {"apiGroups": ["metrics.k8s.io"], "resources": ["pods"], "verbs": ["list"]},
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
