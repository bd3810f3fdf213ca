"""Fixed-window rate limits kept in the database, so they hold across replicas."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cmbcluster.db.engine import begin_locked
from cmbcluster.db.models import RateLimit, utcnow
from cmbcluster.errors import LimitExceeded


def hit(db: Session, key: str, *, limit: int, window_seconds: int = 60, what: str = "requests") -> None:
    """Count one attempt for ``key``; LimitExceeded (429, Retry-After) past ``limit`` per window.

    Attempts sent at once (a brute force sends its guesses in parallel) are counted one after the
    other: the count is read and written under the database's lock (BEGIN IMMEDIATE on SQLite, the
    row FOR UPDATE elsewhere), so none is lost and none ends in a database error."""
    while True:
        begin_locked(db)
        now = utcnow()
        row = db.execute(select(RateLimit).where(RateLimit.key == key).with_for_update()).scalar_one_or_none()
        if row is None:
            db.add(RateLimit(key=key, window_start=now, count=1))
            try:
                db.commit()
            except IntegrityError:  # another replica counted the key's first attempt meanwhile: count again
                db.rollback()
                continue
            return
        window_end = row.window_start + dt.timedelta(seconds=window_seconds)
        if now >= window_end:
            row.window_start, row.count = now, 1
        elif row.count >= limit:
            db.rollback()
            retry_after = max(1, int((window_end - now).total_seconds()) + 1)
            raise LimitExceeded(f"too many {what}; try again in {retry_after} s", retry_after=retry_after)
        else:
            row.count += 1
        db.commit()
        return
