"""How errors become HTTP answers: one body shape for every 4xx and 5xx, typed errors keep their
status, nothing leaks a traceback; and the OpenAPI description of those answers."""

from __future__ import annotations

import inspect
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from cmbcluster.api.docs import customise_openapi
from cmbcluster.db.engine import CHANGED_MEANWHILE
from cmbcluster.errors import CmbclusterError, LimitExceeded, RequestTimeout

log = logging.getLogger(__name__)


class ErrorOut(BaseModel):
    """The body of every error answer."""

    error: str = Field(description="A stable machine-readable code: not_found, invalid_request, limit_exceeded...")
    message: str = Field(description="What went wrong and what to do, for people")
    detail: Any | None = Field(default=None, description="Per-field problems of a refused request body, when any")


#: What any route may answer besides its own statuses: documented on every operation.
COMMON_ERRORS = {
    401: "Not signed in, or the session or token expired",
    403: "Signed in, but not allowed (another user's object, an admin-only route, a cross-site request)",
    413: "The request body is larger than the route accepts",
    415: "The request body is not sent as application/json (its Content-Type), which this route takes",
    422: "The request's parameters or body do not match the schema",
    431: "The request's headers are too large",
    429: "Too many requests or a quota reached: retry after Retry-After seconds",
    503: "A cloud or cluster service, or the database, is busy or unavailable: nothing was changed; retry",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route's own error statuses, each with the common error body."""
    return {code: {"model": ErrorOut, "description": _describe(code)} for code in codes}


def document_errors(app: FastAPI) -> None:
    """Add the errors every API operation may answer to the OpenAPI document (a route's own
    description of a status wins), read from the operation itself: 431 and 503 everywhere; 400
    and 422 where it takes parameters or a body; 404 where its path names an object or it
    changes something; 409 where it changes something; 429 on POST; 401 and 403 where it needs a
    signed-in caller (it has ``security``); 413 where a body is sent; 415 where that body is JSON.
    Routes add their own statuses with :func:`error_responses`."""

    def add_errors(schema: dict[str, Any]) -> None:
        schema.setdefault("components", {}).setdefault("schemas", {})["ErrorOut"] = ErrorOut.model_json_schema()
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                for code in _common_codes(path, method, operation):
                    responses.setdefault(str(code), {"description": _describe(code), "content": error})

    customise_openapi(app, add_errors)


def _common_codes(path: str, method: str, operation: dict[str, Any]) -> list[int]:
    sends_body = "requestBody" in operation or method in ("post", "put", "patch")
    takes_input = sends_body or any(p.get("in") in ("path", "query") for p in operation.get("parameters", []))
    codes = [431, 503]
    if takes_input:
        codes += [400, 422]
    changes = method in ("post", "put", "patch", "delete")
    if "{" in path or changes:  # a changing request may name other objects (an application, a bucket)
        codes.append(404)
    if changes:  # a change may clash with the current state (a non-empty bucket, a limit reached)
        codes.append(409)
    if method == "post":  # creations and starts are limited (per user, concurrent starts, sign-ins)
        codes.append(429)
    if operation.get("security"):
        codes += [401, 403]
    if sends_body:
        codes.append(413)
    if "application/json" in operation.get("requestBody", {}).get("content", {}):
        codes.append(415)  # the request guard's answer to another media type
    return codes


def _describe(code: int) -> str:
    return COMMON_ERRORS.get(code) or HTTPStatus(code).phrase


#: Messages quote what was refused; a 5,000-character parameter is not worth sending back whole.
MAX_MESSAGE_CHARS = 500
#: Per-field problems a 422 lists at most: a body of 60,000 unknown fields (650 KB) got 5.4 MB back.
MAX_DETAIL_ERRORS = 20


def error_body(code: str, message: str, detail: object | None = None) -> dict[str, object]:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    body: dict[str, object] = {"error": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    return body


def error_response(exc: CmbclusterError) -> JSONResponse:
    """The answer for a typed error (also used by middleware, outside the exception handlers)."""
    headers = {}
    if isinstance(exc, LimitExceeded) and exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, RequestTimeout):  # the body stopped midway: what might follow on the connection is not a request
        headers["Connection"] = "close"
    return JSONResponse(error_body(exc.code, exc.message, exc.detail), status_code=exc.http_status, headers=headers)


#: Error codes of the HTTP errors the framework raises itself (unknown routes, wrong methods...).
_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _problem(err: dict[str, Any]) -> str:
    """One refused field, for people: where, and what is wrong."""
    loc = err.get("loc", ())
    if err.get("type") == "json_invalid":  # FastAPI's loc is (body, character offset)
        reason = (err.get("ctx") or {}).get("error") or "malformed"
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        return f"the request body is not valid JSON{at}: {reason}"
    return f"{'.'.join(str(p) for p in loc if p != 'body') or 'request'}: {err.get('msg', 'invalid')}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The same body shape as every other error, with FastAPI's per-field detail kept.
        errors = exc.errors()
        shown = errors[:MAX_DETAIL_ERRORS]
        problems = [_problem(err) for err in shown]
        if len(errors) > len(shown):  # first: the message is cut at MAX_MESSAGE_CHARS
            problems.insert(0, f"{len(errors)} problems, the first {len(shown)} listed")
        detail = jsonable_encoder(shown, exclude={"input", "ctx", "url"})
        return JSONResponse(error_body("invalid_request", "; ".join(problems), detail), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        typed = getattr(exc, "error", None)  # the request guard's refusals carry the error
        if isinstance(typed, CmbclusterError):
            return error_response(typed)
        if isinstance(typed, Exception):  # raised signing in before the body: its own handler's answer
            return await _untyped(request, typed)
        code = _HTTP_CODES.get(exc.status_code) or HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be read: send JSON matching the route's schema"
        return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(CmbclusterError)
    async def _typed(request: Request, exc: CmbclusterError) -> JSONResponse:
        if exc.server_fault:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return error_response(exc)

    @app.exception_handler(UnicodeEncodeError)
    async def _not_unicode(request: Request, exc: UnicodeEncodeError) -> JSONResponse:
        # JSON lets a request spell a lone surrogate ("\ud800"), which no text can hold: the
        # first attempt to encode it fails, before anything is written.
        return JSONResponse(
            error_body("invalid_request", "the request holds text that is not valid Unicode (a lone surrogate)"),
            status_code=400,
        )

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

    async def _changed_meanwhile(request: Request, exc: Exception) -> JSONResponse:
        # Two requests raced on one record (a stop and a delete of one environment at once) and
        # the database refused the second's write, or found the row gone: this request's change
        # was rolled back. A conflict the client can resolve by reloading, not a fault of the
        # server; logged with its cause, since a refused constraint may also be a bug.
        log.warning("conflicting change on %s %s: %s", request.method, request.url.path, exc, exc_info=exc)
        return JSONResponse(
            error_body("conflict", "another request changed or deleted the same record at the same moment; "
                       "reload it and try again"),
            status_code=409,
        )  # fmt: skip

    for changed_meanwhile in CHANGED_MEANWHILE:
        app.add_exception_handler(changed_meanwhile, _changed_meanwhile)

    async def _untyped(request: Request, exc: Exception) -> Response:
        """The answer of the handler installed for ``exc``'s type (the most specific; at least
        ``_unexpected``'s 500)."""
        for kind in type(exc).__mro__:
            handler = app.exception_handlers.get(kind)
            if handler is not None:
                answer = handler(request, exc)  # ours are all coroutines
                return await answer if inspect.isawaitable(answer) else answer
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal_error", "internal error; the server log has the details"), status_code=500
        )
