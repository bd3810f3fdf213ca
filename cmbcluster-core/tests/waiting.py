"""Waiting in tests: for an environment of the local backend, as the reconcile loop would see it,
and for the database pool to have every connection back."""

from __future__ import annotations

import time
from typing import Any

from cmbcluster.context import AppContext
from cmbcluster.db.models import Environment
from cmbcluster.services.reconcile import Reconciler


def wait_until_running(context: AppContext, env_id: str, timeout: float = 20) -> None:
    """Refresh starting environments until ``env_id`` is running; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        Reconciler(context).refresh_transitional()
        with context.sessions() as db:
            env = db.get(Environment, env_id)
            if env is not None and env.status == "running":
                return
        time.sleep(0.05)
    raise AssertionError(f"environment {env_id} did not reach running")


def wait_until_no_connection_is_out(pool: Any, timeout: float = 5) -> int:
    """How many connections are still checked out of ``pool`` once it settles (at most ``timeout``
    seconds). The app's background loops (heartbeat, revocation watch, reconcile) borrow one for a
    moment now and then (CI caught one mid-query); a leaked connection never comes back."""
    deadline = time.monotonic() + timeout
    while pool.checkedout() and time.monotonic() < deadline:
        time.sleep(0.02)
    return int(pool.checkedout())
