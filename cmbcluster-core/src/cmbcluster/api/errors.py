"""How errors become HTTP answers: typed errors keep their status; nothing leaks a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from cmbcluster.errors import CmbclusterError, LimitExceeded

log = logging.getLogger(__name__)


def error_body(code: str, message: str, detail: object | None = None) -> dict[str, object]:
    body: dict[str, object] = {"error": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    return body


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The same body shape as every other error, with FastAPI's per-field detail kept.
        problems = [
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'request'}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        ]
        detail = jsonable_encoder(exc.errors(), exclude={"input", "ctx", "url"})
        return JSONResponse(error_body("invalid_request", "; ".join(problems), detail), status_code=422)

    @app.exception_handler(CmbclusterError)
    async def _typed(request: Request, exc: CmbclusterError) -> JSONResponse:
        headers = {}
        if isinstance(exc, LimitExceeded) and exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        if exc.http_status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return JSONResponse(error_body(exc.code, exc.message, exc.detail), status_code=exc.http_status, headers=headers)

    @app.exception_handler(PoolTimeout)
    @app.exception_handler(OperationalError)
    async def _database_busy(request: Request, exc: Exception) -> JSONResponse:
        # Every connection busy, or SQLite's lock wait used up: overload, not a bug. Nothing
        # was written (the transaction rolled back), so the client may simply retry.
        if isinstance(exc, OperationalError) and "locked" not in str(exc.orig):
            return await _unexpected(request, exc)
        log.warning("database busy on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            error_body("busy", "the server is busy; nothing was changed, try again shortly"),
            status_code=503, headers={"Retry-After": "2"},
        )  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal_error", "internal error; the server log has the details"), status_code=500
        )
