"""Ownership, checked in one place for every service: a user's own row, or NotFound."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.base import ExecutableOption

from cmbcluster.db.models import Environment, Storage, User
from cmbcluster.errors import NotFound
from cmbcluster.services.sessions import SignedInUser

__all__ = ["Owner", "owned", "owned_id"]

Owned = TypeVar("Owned", Environment, Storage)
#: the user, loaded or as signed in (only the id is read)
Owner = User | SignedInUser


def owned(
    db: Session, model: type[Owned], user: Owner, object_id: str, *, what: str, options: Sequence[ExecutableOption] = ()
) -> Owned:
    """``user``'s ``model`` row ``object_id``, or NotFound: another user's id is answered exactly like
    an unknown one, so nobody learns that someone else's object exists."""
    row = db.execute(
        select(model).where(model.id == object_id, model.user_id == user.id).options(*options)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"{what} {object_id} not found")
    return row


def owned_id(db: Session | Connection, model: type[Owned], user: Owner, object_id: str, *, what: str) -> str:
    """:func:`owned` for a check alone: one indexed lookup of the id, no row loaded."""
    found = db.execute(_OWNED_ID[model], {"object_id": object_id, "user_id": user.id}).scalar_one_or_none()
    if found is None:
        raise NotFound(f"{what} {object_id} not found")
    return found


# Built once: every progress stream opens with this check (building it costs more than running it).
_OWNED_ID = {
    model: select(model.id).where(model.id == bindparam("object_id"), model.user_id == bindparam("user_id"))
    for model in (Environment, Storage)
}
