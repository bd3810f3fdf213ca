"""A controllable clock for tests: every ``utcnow()`` of the control plane reads it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager

from cmbcluster.db import models


class ManualClock:
    """Stands still until advanced."""

    def __init__(self, start: dt.datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("a clock needs a timezone-aware start")
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> dt.datetime:
        self.now += dt.timedelta(**delta)
        return self.now

    def set(self, moment: dt.datetime) -> None:
        self.now = moment


@contextmanager
def manual_clock(start: dt.datetime) -> Iterator[ManualClock]:
    clock = ManualClock(start)
    previous, models.clock = models.clock, clock
    try:
        yield clock
    finally:
        models.clock = previous
