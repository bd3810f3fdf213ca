"""The audit trail (who changed what) and the activity log (what happened to a user's things)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from cmbcluster.db.models import Activity, AuditEvent


def audit(db: Session, *, actor_id: str | None, action: str, target_type: str, target_id: str, **detail: Any) -> None:
    """Record an admin-visible event; committed with the caller's transaction."""
    db.add(AuditEvent(actor_id=actor_id, action=action, target_type=target_type, target_id=target_id, detail=detail))


def activity(db: Session, *, user_id: str, kind: str, environment_id: str | None = None, **detail: Any) -> None:
    db.add(Activity(user_id=user_id, kind=kind, environment_id=environment_id, detail=detail))
