"""The labels and annotations CMBCluster puts on every Kubernetes object it manages.

Labels hold DNS-safe forms of the ids (label values are limited to 63 characters of
``[-._a-zA-Z0-9]``); the annotations hold the raw ids. Stop, delete and the reconcile loop
find objects by these labels, never by name patterns.
"""

from __future__ import annotations

from typing import Any

from cmbcluster.naming import dns_label

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "cmbcluster"
MANAGED_SELECTOR = f"{MANAGED_BY}={MANAGED_BY_VALUE}"
USER_LABEL = "cmbcluster.io/user-id"
ENVIRONMENT_LABEL = "cmbcluster.io/environment-id"
#: on user pods only, so that the namespace's NetworkPolicy selects them and nothing else
COMPONENT_LABEL = "app.kubernetes.io/component"
USER_ENVIRONMENT = "user-environment"
USER_ANNOTATION = "cmbcluster.io/user-id"
ENVIRONMENT_ANNOTATION = "cmbcluster.io/environment-id"
#: the start's application token, which the control plane's proxy (or the ingress) sends: read
#: from the pod, so that every replica knows it
TOKEN_ANNOTATION = "cmbcluster.io/application-token"  # noqa: S105 - an annotation's name


def identity_labels(user_id: str, environment_id: str) -> dict[str, str]:
    """The labels of every object of one environment."""
    return {MANAGED_BY: MANAGED_BY_VALUE, USER_LABEL: dns_label(user_id), ENVIRONMENT_LABEL: dns_label(environment_id)}


def user_labels(user_id: str) -> dict[str, str]:
    """The labels of a user's objects that outlive environments (their ServiceAccount)."""
    return {MANAGED_BY: MANAGED_BY_VALUE, USER_LABEL: dns_label(user_id)}


def environment_selector(environment_id: str) -> str:
    return f"{MANAGED_SELECTOR},{ENVIRONMENT_LABEL}={dns_label(environment_id)}"


def metadata(obj: dict[str, Any]) -> dict[str, Any]:
    """An object's ``metadata`` as the API's JSON has it (empty when missing or malformed)."""
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}
