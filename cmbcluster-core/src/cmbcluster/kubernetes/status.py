"""An environment's status from its Pod and the newest Kubernetes event about it: pure rules.

- A pod being deleted is ``stopping``.
- ``Pending`` and not scheduled is ``pending``, with the scheduler's event (``FailedScheduling:
  0/3 nodes ...``) or the condition's message; scheduled, it is ``starting``, with what the
  kubelet says (pulling the image, a container waiting, and why).
- ``Running`` and Ready is ``running``, with the environment's URL; not Ready yet, ``starting``.
- ``Succeeded`` is ``stopped`` (the application exited); ``Failed`` is ``failed`` with the reason;
  so is an application the kubelet keeps restarting (``CrashLoopBackOff``), with its exit code.
- A container waiting for a reason it cannot get past alone (a wrong image name, an image that
  cannot be pulled, a missing Secret) says so in the message.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cmbcluster.interfaces import EnvironmentPhase, EnvironmentStatus
from cmbcluster.kubernetes.labels import USER_ANNOTATION, USER_LABEL, metadata
from cmbcluster.kubernetes.manifests import CONTAINER_NAME

__all__ = ["crash_loop", "event_message", "event_pod", "event_time", "status_from_pod"]

#: Waiting reasons an environment does not recover from without a change (its image, its Secret).
FAILED_WAITING = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"})


def status_from_pod(
    environment_id: str, pod: dict[str, Any], *, url: str, event: dict[str, Any] | None = None
) -> EnvironmentStatus:
    """The status of ``environment_id`` from its ``pod``; ``event`` is the newest Kubernetes event
    about a pod of that name (ignored when it is about another pod of the same name), ``url`` is
    where the environment is reached once running."""
    meta = metadata(pod)
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    user_id = (meta.get("annotations") or {}).get(USER_ANNOTATION) or (meta.get("labels") or {}).get(USER_LABEL)
    started_at = parse_time(status.get("startTime")) or parse_time(meta.get("creationTimestamp"))
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, dict)}
    latest = event_message(event, meta)

    def result(p: EnvironmentPhase, message: str = "", url: str | None = None) -> EnvironmentStatus:
        return EnvironmentStatus(
            environment_id=environment_id, phase=p, url=url, message=message,
            started_at=started_at, user_id=str(user_id) if user_id else None,
        )  # fmt: skip

    if meta.get("deletionTimestamp"):
        return result(EnvironmentPhase.STOPPING, "stopping")
    waiting, terminated = container_states(status)
    if phase == "Pending":
        scheduled = conditions.get("PodScheduled")
        if scheduled is None or scheduled.get("status") != "True":
            message = latest or (scheduled or {}).get("message") or "waiting for a node"
            return result(EnvironmentPhase.PENDING, str(message))
        return result(EnvironmentPhase.STARTING, waiting or latest or "starting the container")
    if phase == "Running":
        ready = conditions.get("Ready")
        if ready is not None and ready.get("status") == "True":
            return result(EnvironmentPhase.RUNNING, "", url)
        crashed = crash_loop(status)
        if crashed:  # the kubelet restarts it, after a back-off that grows to 5 minutes: a failure now
            return result(EnvironmentPhase.FAILED, crashed)
        return result(EnvironmentPhase.STARTING, waiting or latest or "waiting for the application to be ready")
    if phase == "Succeeded":
        return result(EnvironmentPhase.STOPPED, terminated or "the application exited")
    if phase == "Failed":
        message = status.get("message") or status.get("reason") or terminated or "the pod failed"
        return result(EnvironmentPhase.FAILED, str(message))
    return result(EnvironmentPhase.STARTING, f"pod phase {phase}")


def container_states(status: dict[str, Any]) -> tuple[str, str]:
    """(waiting reason: message, terminated reason) of the environment's container."""
    waiting = terminated = ""
    for container in status.get("containerStatuses") or []:
        if not isinstance(container, dict) or container.get("name") != CONTAINER_NAME:
            continue
        state = container.get("state") or {}
        if state.get("waiting"):
            reason = state["waiting"].get("reason") or "waiting"
            message = state["waiting"].get("message")
            waiting = f"{reason}: {message}" if message else str(reason)
            if reason in FAILED_WAITING:
                waiting = f"{waiting} (the environment cannot start until this is fixed)"
        if state.get("terminated"):
            term = state["terminated"]
            terminated = str(term.get("message") or term.get("reason") or f"exit code {term.get('exitCode')}")
    return waiting, terminated


def crash_loop(status: dict[str, Any]) -> str:
    """Why the environment's application keeps ending (its exit code and reason), when the kubelet
    is backing off before restarting it (CrashLoopBackOff); else empty. Its pod stays Running, and
    was reported starting until core's start timeout (10 minutes), while the user waited for an
    application that had failed at once."""
    for container in status.get("containerStatuses") or []:
        if not isinstance(container, dict) or container.get("name") != CONTAINER_NAME:
            continue
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") != "CrashLoopBackOff":
            return ""
        last = (container.get("lastState") or {}).get("terminated") or {}
        code, why = last.get("exitCode"), last.get("reason") or ""
        ended = f"the application exited with code {code}" if code is not None else "the application exited"
        times = container.get("restartCount") or 0
        again = f", {times + 1} times" if times >= 1 else ""
        return f"{ended}{f' ({why})' if why else ''}{again} (CrashLoopBackOff: restarted after a back-off)"
    return ""


def event_message(event: dict[str, Any] | None, pod_meta: dict[str, Any]) -> str:
    """The event as ``Reason: message`` when it is about this very pod (same uid), else empty."""
    if event is None or (event.get("involvedObject") or {}).get("uid") != pod_meta.get("uid"):
        return ""
    reason, message = event.get("reason") or "", event.get("message") or ""
    return f"{reason}: {message}" if reason and message else str(reason or message)


def event_pod(event: dict[str, Any]) -> str | None:
    """The name of the pod an event is about: the key of the events' watch cache."""
    name = (event.get("involvedObject") or {}).get("name")
    return str(name) if name else None


def event_time(event: dict[str, Any]) -> str:
    """When an event last happened, for ordering (ISO 8601 strings sort in time order)."""
    return str(event.get("lastTimestamp") or event.get("eventTime") or metadata(event).get("creationTimestamp") or "")


def parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
