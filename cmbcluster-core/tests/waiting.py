"""Waiting for an environment of the local backend, as the reconcile loop would see it."""

from __future__ import annotations

import time

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
