"""``/environments/<id>/``: each environment's own traffic, through the control plane's port.

Only the environment's owner gets through, with exactly the check the ingress makes on
Kubernetes (:func:`cmbcluster.services.environments.open_for_traffic`): anyone else, and anyone
while it is not running, gets 404 (a WebSocket too, before its handshake completes). A browser
that is not signed in is sent to the sign-in page, and comes back here afterwards.

Not part of the API (no OpenAPI entry): what answers is the environment's application.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from fastapi import Request, Response, WebSocket
from fastapi.responses import RedirectResponse
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import HTTPConnection

from cmbcluster import webui
from cmbcluster.api.deps import (
    CONTROL_PLANE_COOKIES,
    ApiRouter,
    authenticate_request,
    own_credentials,
    own_origins,
)
from cmbcluster.api.errors import error_response
from cmbcluster.api.guard import streams_body
from cmbcluster.compute.command import ENVIRONMENTS_PATH, environment_path
from cmbcluster.context import AppContext
from cmbcluster.errors import AuthenticationFailed, CmbclusterError, NotFound, PermissionDenied
from cmbcluster.interfaces import Upstream
from cmbcluster.services import environments as envs
from cmbcluster.services import sessions
from cmbcluster.services.environment_proxy import EnvironmentProxy
from cmbcluster.services.sessions import Credential, SignedInUser

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
#: How often a long WebSocket session counts as activity (idle culling spares it).
ACTIVITY_SECONDS = 30.0


class _EnvironmentId(Convertor[str]):
    """Environment ids only (32 hexadecimal characters): ``/environments/`` itself and the web UI's
    own files below it stay the UI's."""

    regex = "[0-9a-f]{32}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("environment_id", _EnvironmentId())
router = ApiRouter(prefix=ENVIRONMENTS_PATH, include_in_schema=False)


def _proxy(conn: HTTPConnection) -> EnvironmentProxy:
    proxy: EnvironmentProxy | None = getattr(conn.app.state, "environment_proxy", None)
    if proxy is None:
        proxy = conn.app.state.environment_proxy = EnvironmentProxy(own_cookies=CONTROL_PLANE_COOKIES)
    return proxy


def _caller(conn: HTTPConnection, db: Session) -> tuple[SignedInUser, Credential]:
    """The signed-in caller, by bearer token or session cookie, as every API route authenticates."""
    bearer, cookie = own_credentials(conn)
    scheme, credentials = get_authorization_scheme_param(conn.headers.get("authorization"))
    if bearer is None and not cookie and scheme.lower() == "bearer" and credentials:
        # Another bearer token is the application's own, passed on once the caller signed in by cookie.
        raise AuthenticationFailed("sign in first: the bearer token is not a CMBCluster session or API token, "
                                   "and there is no session cookie")  # fmt: skip
    if isinstance(conn, Request):
        principal = authenticate_request(conn, db, bearer, cookie)
        return principal.user, principal.credential
    if bearer is None and cookie:
        # Browsers send cookies with WebSocket handshakes from any page, and no CORS applies: only
        # our own pages may open one with the session cookie. Every browser sends Origin with a
        # handshake; one without it comes from no page (scripts send a bearer token).
        origin = conn.headers.get("origin")
        if not origin:
            raise PermissionDenied(
                "a WebSocket opened with the session cookie must come from this site's pages: the handshake "
                "carries no Origin (from a script, send a bearer token instead)"
            )
        sent = urlsplit(origin)
        if (sent.scheme.lower(), sent.netloc.lower()) not in _websocket_origins(conn):
            raise PermissionDenied("cross-site WebSocket refused")
    token = bearer or cookie
    if not token:
        raise AuthenticationFailed("sign in first: no session cookie or bearer token")
    return sessions.authenticate(db, token)


def _websocket_origins(conn: HTTPConnection) -> set[tuple[str, str]]:
    """Our origins as a page's scheme names them (a ws:// request comes from an http:// page)."""
    return {({"ws": "http", "wss": "https"}.get(scheme, scheme), host) for scheme, host in own_origins(conn)}


def _open(context: AppContext, conn: HTTPConnection, environment_id: str) -> tuple[Upstream, Credential]:
    """The caller's check, then where the environment listens (blocking: database and backend); and
    what the caller signed in with."""
    with context.sessions() as db:
        user, credential = _caller(conn, db)
        envs.open_for_traffic(db, user, environment_id)
    upstream = context.compute.upstream(environment_id)
    if upstream is None:
        raise NotFound(f"environment {environment_id} is not served by this control plane")
    return upstream, credential


def _prefix(environment_id: str) -> str:
    return environment_path(environment_id).removesuffix("/")


@router.api_route("/{environment_id:environment_id}", methods=METHODS)
async def environment_root(request: Request) -> Response:
    """The environment's address without its final slash: relative links need it."""
    query = request.url.query
    return RedirectResponse(f"{request.url.path}/{'?' + query if query else ''}", status_code=307)


@router.api_route("/{environment_id:environment_id}/{path:path}", methods=METHODS)
@streams_body  # the application limits its own bodies (uploads into a notebook), as the ingress lets it
async def environment_traffic(request: Request) -> Response:
    context: AppContext = request.app.state.context
    environment_id = request.path_params["environment_id"]
    navigation = request.method == "GET" and webui.shows_ui(request)
    try:
        upstream, _ = await run_in_threadpool(_open, context, request, environment_id)
    except AuthenticationFailed:
        if navigation:
            return webui.sign_in_first(request)
        raise
    except NotFound:
        if navigation:  # a bookmark of a stopped environment: the web UI starts it, then opens the page
            return webui.start_first(environment_id, webui.page_of(request))  # (as for another's or an unknown id)
        raise
    return await _proxy(request).forward(request, upstream, _prefix(environment_id))


@router.websocket("/{environment_id:environment_id}/{path:path}")
async def environment_websocket(websocket: WebSocket) -> None:
    context: AppContext = websocket.app.state.context
    environment_id = websocket.path_params["environment_id"]
    try:
        upstream, credential = await run_in_threadpool(_open, context, websocket, environment_id)
    except CmbclusterError as exc:
        await _refuse(websocket, exc)
        return
    loop = asyncio.get_running_loop()
    # Signing out (or a revoked token, a deactivated account) closes the WebSocket, as it refuses requests.
    revoked: asyncio.Future[str] = loop.create_future()

    def on_revoked(why: str) -> None:
        if not revoked.done():  # done: the WebSocket already ended
            revoked.set_result(why)

    hold = context.revocations.hold(credential, on_revoked)
    last_activity = loop.time()
    recording: set[asyncio.Task[None]] = set()

    async def on_traffic() -> None:
        nonlocal last_activity
        if loop.time() - last_activity >= ACTIVITY_SECONDS:
            last_activity = loop.time()
            task = loop.create_task(run_in_threadpool(_record_activity, context, websocket, environment_id))
            recording.add(task)
            task.add_done_callback(recording.discard)

    try:
        await _proxy(websocket).forward_websocket(
            websocket, upstream, _prefix(environment_id), on_traffic=on_traffic, revoked=revoked
        )
    except CmbclusterError as exc:
        await _refuse(websocket, exc)
    finally:
        context.revocations.release(hold)


def _record_activity(context: AppContext, conn: HTTPConnection, environment_id: str) -> None:
    try:
        _open(context, conn, environment_id)
    except CmbclusterError:
        pass  # stopped or signed out meanwhile: the next message fails anyway


async def _refuse(websocket: WebSocket, error: CmbclusterError) -> None:
    """Refuse the handshake with the error's HTTP status (404, 401...) where the server can, else close."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(error))
    else:
        await websocket.close(code=1008, reason=error.message[:120])
