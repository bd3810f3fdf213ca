"""The request guard: what every HTTP request passes before the application reads it.

- Headers over :data:`MAX_HEADER_BYTES` in total are answered 431.
- A request body is limited before anything parses it: routes accept
  ``CMBCLUSTER_MAX_REQUEST_BODY_BYTES`` (1 MiB by default), except those marked with
  :func:`streams_body`, which read their body as a stream and enforce their own limit (uploads).
  A declared ``Content-Length`` over the limit is answered 413 at once; a body without one is
  counted while the route reads it.
- A body (other than a streaming route's) that sends no byte for
  ``CMBCLUSTER_REQUEST_TIMEOUT_SECONDS`` is answered 408: a client that stalls mid-body would
  otherwise hold its connection as long as it liked. (Uploads have their own idle timeout.)
- A route that needs a signed-in caller and is sent a body authenticates first: without valid
  credentials the answer is 401 (or 403) before a byte of the body is read. (FastAPI parses a
  JSON body before it resolves dependencies, so the route's own check would come too late.)
- A route whose body is a JSON model answers a body of another media type 415, naming
  ``application/json``: at once for a declared ``Content-Type`` (``application/json`` or
  ``application/*+json``, parameters allowed), at the first byte of a body sent without one.
  (FastAPI would read the body as bytes and answer 422 "Input should be a valid dictionary",
  which does not say that only the type was wrong.) Forms, uploads and the environments' own
  traffic take what they take; a route sent no body is not asked for a type.

The body checks run at the route's first read of the body: by then routing has chosen the
route, and nothing of the body has been read.

Why not FastAPI's own ``max_body_size``: it answers in another error shape than every other
error here, its limits are fixed when routes are declared (ours come from settings), and it
cannot authenticate first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import params
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cmbcluster.api.errors import error_response
from cmbcluster.errors import CmbclusterError, HeadersTooLarge, PayloadTooLarge, RequestTimeout, UnsupportedMediaType

#: Total size of a request's header names and values. Browsers and scripts send a few KiB
#: (cookies included); nginx's default allows 32 KiB across its large header buffers.
MAX_HEADER_BYTES = 32 * 1024

F = TypeVar("F", bound=Callable[..., Any])
_STREAMS_ATTRIBUTE = "__cmbcluster_streams_body__"


def streams_body(endpoint: F) -> F:
    """Mark a route that reads its body as a stream and enforces its own size limit (object
    uploads: CMBCLUSTER_MAX_UPLOAD_BYTES). Put it below the route decorator::

        @router.put("/{storage_id}/objects/{key:path}")
        @streams_body
        async def upload_object(...): ...
    """
    setattr(endpoint, _STREAMS_ATTRIBUTE, True)
    return endpoint


def _too_large(limit: int) -> str:
    return f"the request body is larger than this route accepts ({limit} bytes)"


def _not_json(media_type: str | None) -> UnsupportedMediaType:
    if media_type is None:
        sent = "it had none"
    else:  # quoted only when short and plain: a header value is the sender's to choose
        sent = f"it was {media_type}" if len(media_type) <= 100 and media_type.isprintable() else "it was another"
    return UnsupportedMediaType(f"this route takes a JSON body: send it with Content-Type: application/json ({sent})")


@dataclass(frozen=True)
class _RouteRules:
    body_limit: int | None  #: None: the route limits its own body
    needs_caller: bool
    takes_json: bool  #: the body is a JSON model (not a form, not read by the route itself)


class Refused(HTTPException):
    """A request the guard refuses while the app reads its body. An HTTPException because
    FastAPI passes those on from body parsing (any other exception there becomes its 400 "error
    parsing the body"); the app's handler answers ``error`` as it answers that error anywhere else."""

    def __init__(self, error: Exception) -> None:
        if isinstance(error, CmbclusterError):
            super().__init__(error.http_status, error.message)
        else:
            super().__init__(500, type(error).__name__)
        self.error = error


class RequestGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._rules: dict[int, _RouteRules] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
        if header_bytes > MAX_HEADER_BYTES:
            refusal = HeadersTooLarge(f"the request's headers are larger than {MAX_HEADER_BYTES} bytes")
            await error_response(refusal)(scope, receive, send)
            return
        if scope["type"] == "http" and _has_body(scope):
            receive = self._guarded(scope, receive)
        await self.app(scope, receive, send)

    def _guarded(self, scope: Scope, receive: Receive) -> Receive:
        """``receive`` checked at its first call, when routing has chosen the route (its
        ``scope["route"]``) and before a byte of the body is read; then counted."""
        limit: int | None = None
        received = 0
        checked = False
        body_done = False  # then receive() waits for the client to go away: no timeout
        untyped_json = False  # a JSON route sent no Content-Type: refused at the body's first byte

        async def guarded() -> Message:
            nonlocal limit, received, checked, untyped_json, body_done
            if not checked:
                checked = True
                rules = self._rules_for(scope)
                if rules.needs_caller:  # first: a stranger learns nothing, not even the limit
                    try:
                        _authenticate(scope)
                    except CmbclusterError as exc:
                        raise Refused(exc) from None
                    except Exception as exc:  # the database busy, a bug: answered as on any route
                        raise Refused(exc) from exc
                if rules.takes_json:
                    media_type = _media_type(scope)
                    if media_type is not None and not _is_json(media_type):
                        raise Refused(_not_json(media_type))
                    untyped_json = media_type is None
                limit = rules.body_limit
                declared = _content_length(scope)
                if limit is not None and declared is not None and declared > limit:
                    raise Refused(PayloadTooLarge(_too_large(limit)))
            if limit is None or body_done:
                message = await receive()
            else:
                timeout = scope["app"].state.context.config.core.request_timeout_seconds
                with anyio.move_on_after(timeout) as waiting:
                    message = await receive()
                if waiting.cancelled_caught:
                    raise Refused(RequestTimeout(f"no byte of the request's body arrived for {timeout:g} seconds"))
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                body = message.get("body", b"")
                if untyped_json and body:
                    raise Refused(_not_json(None))
                if limit is not None:
                    received += len(body)
                    if received > limit:
                        raise Refused(PayloadTooLarge(_too_large(limit)))
            return message

        return guarded

    def _rules_for(self, scope: Scope) -> _RouteRules:
        route = scope.get("route")
        core = scope["app"].state.context.config.core
        if not isinstance(route, APIRoute):
            return _RouteRules(body_limit=core.max_request_body_bytes, needs_caller=False, takes_json=False)
        rules = self._rules.get(id(route))
        if rules is None:
            from cmbcluster.api.deps import depends_on, get_principal

            # A streaming route reads its body in the endpoint, after its dependencies signed the
            # caller in, and limits it itself.
            streams = getattr(route.endpoint, _STREAMS_ATTRIBUTE, False)
            body = route.body_field
            rules = self._rules[id(route)] = _RouteRules(
                body_limit=None if streams else core.max_request_body_bytes,
                needs_caller=not streams and depends_on(route.dependant, get_principal),
                takes_json=body is not None and not isinstance(body.field_info, params.Form),  # File is a Form
            )
        return rules


def _authenticate(scope: Scope) -> None:
    """Sign the caller in (or raise), and leave the caller for the route's get_principal."""
    from cmbcluster.api.deps import SIGNED_IN_SCOPE_KEY, sign_in

    scope[SIGNED_IN_SCOPE_KEY] = sign_in(Request(scope))


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


def _media_type(scope: Scope) -> str | None:
    """The request's ``Content-Type`` without its parameters, lower-cased; None when it has none."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.decode("latin-1").partition(";")[0].strip().lower() or None
    return None


def _is_json(media_type: str) -> bool:
    """JSON as FastAPI reads it: ``application/json`` or a ``+json`` type (``application/merge-patch+json``)."""
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))
