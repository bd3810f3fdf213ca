"""Liveness, readiness and Prometheus metrics (outside /api/v1: probes and scrapers use them)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from cmbcluster import __version__
from cmbcluster.api.deps import (
    ApiRouter,
    BearerToken,
    Context,
    DbSession,
    SessionCookie,
    authenticate_request,
)
from cmbcluster.api.errors import error_responses
from cmbcluster.errors import PermissionDenied

log = logging.getLogger(__name__)

router = ApiRouter(tags=["operations"])

READY_TIMEOUT_SECONDS = 5.0


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get("/readyz", summary="Readiness: the database and every active provider answer")
async def readyz(context: Context) -> JSONResponse:
    def database() -> None:
        with context.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    checks: dict[str, Any] = {"database": database}
    checks.update({f"{kind}:{name}": provider.check_ready for kind, name, provider in context.providers()})

    async def run(name: str, check: Any) -> str:
        try:
            await asyncio.wait_for(run_in_threadpool(check), READY_TIMEOUT_SECONDS)
        except TimeoutError:
            return f"timed out after {READY_TIMEOUT_SECONDS:g}s"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; report it
            # The reason (addresses, errors of the network) goes to the operator's log; anyone
            # may read this endpoint, so it says only which check failed and how.
            log.warning("readiness check %s failed: %s: %s", name, type(exc).__name__, exc)
            return f"{type(exc).__name__} (the server log has the details)"
        return "ok"

    results = dict(zip(checks, await asyncio.gather(*(run(n, c) for n, c in checks.items())), strict=True))
    ready = all(result == "ok" for result in results.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": results}, status_code=200 if ready else 503
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (the scrape token of CMBCLUSTER_METRICS_TOKEN, or an administrator)",
    response_class=Response,
    responses=error_responses(401, 403),
)
def metrics(request: Request, context: Context, db: DbSession, bearer: BearerToken, cookie: SessionCookie) -> Response:
    # It names every user and group with their usage: never public, whatever the ingress routes.
    token = context.config.core.metrics_token
    sent = bearer.credentials if bearer is not None else None
    if sent is None or token is None or not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
        principal = authenticate_request(request, db, sent, cookie)
        db.commit()
        if principal.user.role != "admin":
            raise PermissionDenied("administrators and the metrics scrape token (CMBCLUSTER_METRICS_TOKEN) only")
    return Response(generate_latest(context.metrics.registry), media_type=CONTENT_TYPE_LATEST)
