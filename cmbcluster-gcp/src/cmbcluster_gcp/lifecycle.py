"""The lifecycle of CMBCluster's Cloud Storage buckets, users' and the database bucket alike (a
module of its own: the provisioner uses it without loading google-cloud-storage)."""

from __future__ import annotations

from typing import Any

__all__ = ["lifecycle_rules"]


def lifecycle_rules(noncurrent_days: int, noncurrent_kept: int) -> list[dict[str, Any]]:
    """The lifecycle of a versioned bucket: a noncurrent version is deleted ``noncurrent_days``
    after it stopped being live, and sooner once ``noncurrent_kept`` newer noncurrent versions
    exist (``numNewerVersions`` counts the live version too, hence the + 1; 0: no count bound).
    The age rule is what bounds a deleted object's versions, which nothing newer ever displaces."""
    rules: list[dict[str, Any]] = [
        {"action": {"type": "Delete"}, "condition": {"isLive": False, "daysSinceNoncurrentTime": noncurrent_days}}
    ]
    if noncurrent_kept > 0:
        rules.append(
            {"action": {"type": "Delete"}, "condition": {"isLive": False, "numNewerVersions": noncurrent_kept + 1}}
        )
    return rules
