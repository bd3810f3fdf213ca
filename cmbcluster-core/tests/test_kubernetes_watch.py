"""The watch cache's order of objects of one name (the live watch itself: tests/k8s)."""

from __future__ import annotations

from typing import Any

from cmbcluster.kubernetes.watch import WatchCache


def _pod(uid: str, version: int, phase: str) -> dict[str, Any]:
    return {"metadata": {"name": "env-x", "uid": uid, "resourceVersion": str(version)}, "status": {"phase": phase}}


def test_a_late_event_of_a_restarts_previous_pod_never_replaces_the_new_one() -> None:
    """A restart makes a pod of the same name once the previous one is gone; the previous pod's
    last events may arrive after the start put the new pod in the cache (found by an outsider's
    trial: a starting environment showed "stopping", and the reconcile loop took its new pod for a
    stop's leftover). The new pod stays; its own later events replace it as usual."""
    cache = WatchCache(lambda **_: None, namespace="ns", what="pods")
    new = _pod("new", 200, "Pending")
    cache.put(new)
    cache._apply({"type": "MODIFIED", "object": _pod("old", 190, "Running")})
    assert cache.get("env-x") == new
    cache._apply({"type": "DELETED", "object": _pod("old", 195, "Running")})
    assert cache.get("env-x") == new
    running = _pod("new", 210, "Running")
    cache._apply({"type": "MODIFIED", "object": running})
    assert cache.get("env-x") == running
    cache.put(new)  # a read answered before that event: never goes back
    assert cache.get("env-x") == running
