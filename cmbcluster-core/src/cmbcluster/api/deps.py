"""FastAPI dependencies, as ``Annotated`` aliases used by every router."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.encoders import jsonable_encoder
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy import Connection
from sqlalchemy.orm import Session
from starlette.requests import HTTPConnection
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from cmbcluster.api.docs import customise_openapi
from cmbcluster.context import AppContext
from cmbcluster.db.models import User
from cmbcluster.errors import AuthenticationFailed, PermissionDenied
from cmbcluster.services import environments as envs
from cmbcluster.services import sessions
from cmbcluster.services.environment_entry import origin
from cmbcluster.services.environment_proxy import is_control_plane_credential

T = TypeVar("T")

SESSION_COOKIE = "cmbcluster_session"
#: The session cookie where cookies are Secure (an https public URL). A ``__Host-`` cookie has no
#: Domain and only its own host can set it: a page on another host of the same domain (an
#: environment served on its own host, any other site of the organisation) cannot plant one that
#: would sign its owner's browser in as someone else.
SECURE_SESSION_COOKIE = f"__Host-{SESSION_COOKIE}"
LOGIN_COOKIE = "cmbcluster_login"
#: Where an environment served on a host of its own (host routing) keeps its owner signed in: set
#: by that host's access check, host-only, never the control plane's session cookie itself.
ENVIRONMENT_COOKIE = "cmbcluster_environment"
SECURE_ENVIRONMENT_COOKIE = f"__Host-{ENVIRONMENT_COOKIE}"
#: The control plane's own cookies: never passed on to an environment, nor set by one.
CONTROL_PLANE_COOKIES = frozenset(
    {SESSION_COOKIE, SECURE_SESSION_COOKIE, LOGIN_COOKIE, ENVIRONMENT_COOKIE, SECURE_ENVIRONMENT_COOKIE}
)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# Dependencies that do no blocking I/O are ``async``: FastAPI runs sync dependencies in the
# thread pool, and a thread hop per dependency costs more than the work on busy endpoints.


async def get_context(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


Context = Annotated[AppContext, Depends(get_context)]


#: where get_db keeps the request's session, for CloseRequestSession to close
REQUEST_SESSION_KEY = "cmbcluster.db_session"


async def get_db(request: Request) -> Session:
    """A session per request; it connects lazily, in whichever worker thread first queries, and
    :class:`CloseRequestSession` closes it when the request ends."""
    # Not a ``yield`` dependency: FastAPI wraps each of those in an exit stack and a cancel scope,
    # which cost the environment list (the busiest route) about 5 % of its time. The context from
    # the request, not through the Context dependency: one dependency fewer to resolve.
    session: Session | None = request.scope.get(REQUEST_SESSION_KEY)
    if session is None:
        session = request.scope[REQUEST_SESSION_KEY] = request.app.state.context.sessions()
    return session


class CloseRequestSession:
    """ASGI middleware: closes the session :func:`get_db` opened for a request (or WebSocket) once
    the app is done with it, whether the request succeeded or failed; its transaction, if any,
    is rolled back and its connection goes back to the pool."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            session: Session | None = scope.get(REQUEST_SESSION_KEY)
            if session is not None:
                session.close()


DbSession = Annotated[Session, Depends(get_db)]


def ending_transaction(db: Session, call: Callable[[], T]) -> T:
    """``call()``, then the transaction it left open on ``db`` ended, in the same thread: committed
    (the services commit their changes, so this closes a read), or rolled back when it raised.

    Blocking code run in a worker thread ends so before it hands back: the route goes on only when
    the event loop gets to it, and a sync route's answer is validated in one more worker thread. A
    connection held that long let 200 users' requests hold every connection of the pool while
    the workers waited for one: the server stopped until the pool's timeout."""
    try:
        result = call()
    except BaseException:
        with contextlib.suppress(Exception):  # the error to answer is call()'s
            db.rollback()
        raise
    db.commit()
    return result


async def in_worker(db: Session, call: Callable[[], T], *, limiter: anyio.CapacityLimiter | None = None) -> T:
    """``call()``, blocking code that uses the request's session ``db``, in a worker thread (of
    ``limiter``, else the general ones), holding no pool connection while it waits: the request's
    transaction ends first (under load a request may wait long for a thread), and the worker ends
    the one ``call`` leaves open before it hands back (:func:`ending_transaction`)."""
    db.commit()
    return await anyio.to_thread.run_sync(ending_transaction, db, call, limiter=limiter)


class SessionReleasingRoute(APIRoute):
    """Every route of the API: a sync endpoint, which FastAPI runs in a worker thread, ends its
    request session's transaction in that thread (:func:`ending_transaction`)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _releasing_session(endpoint)
        super().__init__(path, endpoint, **kwargs)


class ApiRouter(APIRouter):
    """Every router of the control plane: its routes are :class:`SessionReleasingRoute`, and a
    request whose path does not contain its prefix is not matched against them at all.

    FastAPI matches the routes of an included router one by one, each with bookkeeping in the
    request's scope, and the routers in the order they were included. A request for an
    environment's own traffic (the proxy, included after every API router) was matched against all
    80 API routes first, about 140 us of its time in process (profiled). A path that reaches one
    of these routes contains the prefix (after any root path), so nothing that matches is skipped."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("route_class", SessionReleasingRoute)
        super().__init__(**kwargs)
        if "{" in self.prefix:  # the check compares text: a parameter in the prefix would match nothing
            raise ValueError(f"ApiRouter's prefix must be literal, not {self.prefix!r}")

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if self.prefix not in scope.get("path", ""):
            return Match.NONE, {}
        return super().matches(scope)


def _releasing_session(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)  # FastAPI reads the endpoint's parameters through __wrapped__
    def run(**arguments: Any) -> Any:
        db = next((value for value in arguments.values() if isinstance(value, Session)), None)
        if db is None:
            return endpoint(**arguments)
        return ending_transaction(db, functools.partial(endpoint, **arguments))

    return run


# The two ways in, as security schemes for the OpenAPI document (and the client generated from it).
_bearer = HTTPBearer(auto_error=False, description="A session token (cmbs_...) or an API token (cmbt_...)")
_cookie = APIKeyCookie(
    name=SESSION_COOKIE,
    auto_error=False,
    description=f"The browser's session cookie ({SECURE_SESSION_COOKIE} where the public URL is https)",
)
BearerToken = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
SessionCookie = Annotated[str | None, Depends(_cookie)]


def secure_cookies(request: HTTPConnection) -> bool:
    """Whether the control plane's cookies are Secure: its public URL is https (else the request's
    own scheme, which uvicorn takes from X-Forwarded-Proto when the proxy is trusted: https, or wss
    for a WebSocket). Read from the scope: every request with a credential asks (building its base
    URL to ask was 3 % of the environment list's time)."""
    public: str | None = request.app.state.context.config.core.public_url
    if public:
        return public.startswith("https://")
    return request.scope.get("scheme") in ("https", "wss")


def session_cookie_name(request: HTTPConnection) -> str:
    """The session cookie's name: ``__Host-`` prefixed where cookies are Secure. Only that one is
    read there, so a cookie of the plain name planted by another host is never a session."""
    return SECURE_SESSION_COOKIE if secure_cookies(request) else SESSION_COOKIE


def session_cookie(request: HTTPConnection) -> str | None:
    """The session cookie a request carries, if any."""
    return request.cookies.get(session_cookie_name(request)) or None


def credentials(request: HTTPConnection) -> tuple[str | None, str | None]:
    """The bearer token and the session cookie a request carries (either may be None), read as
    ``_bearer`` and ``_cookie`` read them."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    bearer = token if scheme.lower() == "bearer" and token else None
    return bearer, session_cookie(request)


def own_credentials(request: HTTPConnection) -> tuple[str | None, str | None]:
    """:func:`credentials`, with a bearer token only when it is a CMBCluster session or API token: on
    an environment's traffic another one is the application's own (JupyterLab's), which the browser
    sends beside the cookie that signs it in."""
    bearer, cookie = credentials(request)
    return (bearer if is_control_plane_credential(request.headers.get("authorization", "")) else None), cookie


#: where the request guard leaves the caller it signed in (api/guard.py), for get_principal
SIGNED_IN_SCOPE_KEY = "cmbcluster.signed_in"


@dataclass(frozen=True)
class Principal:
    """The caller: the user, and the session or API token they signed in with."""

    user: sessions.SignedInUser
    credential: sessions.Credential
    via_cookie: bool

    @property
    def session_id(self) -> str | None:
        """The session's id when signed in through a session (None for an API token)."""
        return self.credential.id if self.credential.kind == "session" else None


# Authentication runs on every request, so it runs on the event loop: one indexed query (SQLite
# in WAL mode never blocks readers) costs less than the hop to a worker thread and back
# (measured on the environment list: about 550 -> 850 requests/s). The connection pool is larger
# than the worker thread limit, so the loop never waits for a connection. It reads plain columns on
# a connection of its own, returned at once: no ORM session or object (half the cost), and nothing
# held while the route waits for a worker thread or a cluster call.
# The credentials are read here, not through the _bearer and _cookie dependencies: two fewer
# dependencies to resolve on every request (document_security declares the schemes instead).
async def get_principal(request: Request) -> Principal:
    signed_in: Principal | None = request.scope.get(SIGNED_IN_SCOPE_KEY)
    if signed_in is not None:
        # The request guard signed this caller in before reading the body (at most 1 MiB: a session
        # revoked meanwhile still ends this one request): no second query.
        return signed_in
    return sign_in(request)


def sign_in(request: Request) -> Principal:
    """The caller of ``request`` (blocking: one query on a connection of its own); the route's
    get_principal, and the request guard before it reads a body."""
    with request.app.state.context.engine.connect() as connection:
        return authenticate_request(request, connection, *credentials(request))


def authenticate_request(
    request: Request, db: Session | Connection, bearer: str | None, cookie: str | None,
    *, owning_environment: str | None = None,
) -> Principal:  # fmt: skip
    """The caller of ``request``, from its bearer token or session cookie. AuthenticationFailed or
    PermissionDenied otherwise; with ``owning_environment``, NotFound unless it is the caller's."""
    if bearer is not None:
        token, via_cookie = bearer, False
    elif cookie:
        token, via_cookie = cookie, True
        _check_same_origin(request)
    else:
        raise AuthenticationFailed("sign in first: no session cookie or bearer token")
    user, credential = sessions.authenticate(db, token, owning_environment=owning_environment)
    return Principal(user=user, credential=credential, via_cookie=via_cookie)


def _check_same_origin(request: Request) -> None:
    """Cookie-authenticated changes must come from our own pages (a CSRF guard on top of SameSite):
    the Origin (or Referer) must be this server's scheme, host and port. Browsers send Origin with
    every POST, PUT, PATCH and DELETE, same-site ones too; scripts authenticate with a bearer token,
    which needs no check."""
    if request.method in SAFE_METHODS:
        return
    sent = sending_page(request, change=True, signed_in_with="the session cookie", pages="this site's pages")
    if origin(sent) not in own_origins(request):
        raise PermissionDenied("cross-site request refused")


def sending_page(request: HTTPConnection, *, change: bool, signed_in_with: str, pages: str) -> str | None:
    """The address of the page a cookie-signed request came from: its Origin, else, for a change, its
    Referer; None for a read without Origin (a navigation). A change with neither header comes from
    no page (an old plug-in, a proxy that strips them, a forged request): PermissionDenied. Compare
    what it returns with :func:`cmbcluster.services.environment_entry.origin`, which makes nothing of
    an address it cannot parse (a malformed header was a 500)."""
    sent = request.headers.get("origin")
    if sent is None and change:
        sent = request.headers.get("referer")
        if sent is None:
            raise PermissionDenied(
                f"a change signed in with {signed_in_with} must come from {pages}: the request carries "
                "neither Origin nor Referer (from a script, send a bearer token instead)"
            )
    return sent


def own_origins(request: HTTPConnection) -> set[tuple[str, str]]:
    """(scheme, host[:port]) pairs this server answers as: its public URL and the Host it was
    reached at, with the scheme the cookies use (the public URL's, else the request's own, which
    uvicorn takes from X-Forwarded-Proto when the proxy is trusted)."""
    public_url = request.app.state.context.config.core.public_url
    public = urlsplit(public_url) if public_url else None
    scheme = (public.scheme if public else request.url.scheme).lower()
    origins = {(scheme, request.headers.get("host", "").lower())}
    if public is not None:
        origins.add((public.scheme.lower(), public.netloc.lower()))
    return origins


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


async def get_environment_owner(request: Request, environment_id: str) -> Principal:
    """The caller, who must own the path's ``environment_id`` (NotFound otherwise, as for an unknown
    id): both in one query, on a connection returned at once (a progress stream then holds none)."""
    signed_in: Principal | None = request.scope.get(SIGNED_IN_SCOPE_KEY)
    with request.app.state.context.engine.connect() as connection:
        if signed_in is not None:  # signed in by the request guard: the check alone
            envs.check_owned(connection, signed_in.user, environment_id)
            return signed_in
        return authenticate_request(request, connection, *credentials(request), owning_environment=environment_id)


EnvironmentOwner = Annotated[Principal, Depends(get_environment_owner)]


def load_user(db: Session, principal: Principal) -> User:
    """The caller's user, loaded in ``db`` (blocking: one query); AuthenticationFailed when it was
    deleted since the sign-in query."""
    user = db.get(User, principal.user.id)
    if user is None:
        raise AuthenticationFailed(sessions.ACCOUNT_GONE)
    return user


async def get_user(principal: CurrentPrincipal, db: DbSession) -> User:
    """The caller's user, loaded in the request's session for routes that read or change it."""
    user = load_user(db, principal)
    # End the read transaction: its connection goes back to the pool instead of staying with a
    # request that may wait long for a worker thread or a cluster call (200 concurrent creates
    # would otherwise hold 200 connections). The user stays usable (expire_on_commit=False).
    db.commit()
    return user


CurrentUser = Annotated[User, Depends(get_user)]


async def get_admin(user: CurrentUser) -> User:
    if user.role != "admin":
        raise PermissionDenied("administrators only")
    return user


AdminUser = Annotated[User, Depends(get_admin)]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def depends_on(dependant: Dependant, call: Callable[..., Any]) -> bool:
    """Whether a route's dependency tree calls ``call``."""
    return any(dep.call is call or depends_on(dep, call) for dep in dependant.dependencies)


def document_security(app: FastAPI) -> None:
    """Declare in the OpenAPI document that every route needing a caller takes either way in (a
    bearer token or the session cookie), as FastAPI would had get_principal depended on
    ``_bearer`` and ``_cookie`` (or get_environment_owner). Install it before the document's other customisations, which
    read an operation's ``security``."""
    schemes = {
        scheme.scheme_name: jsonable_encoder(scheme.model, by_alias=True, exclude_none=True)
        for scheme in (_bearer, _cookie)
    }

    def add_security(schema: dict[str, Any]) -> None:
        schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(schemes)
        for route in iter_route_contexts(app.routes):  # included routers' routes with their prefixes
            original = route.original_route
            if (
                isinstance(original, APIRoute)
                and original.include_in_schema
                and any(depends_on(original.dependant, sign_in) for sign_in in (get_principal, get_environment_owner))
            ):
                for method in route.methods or ():
                    operation = schema["paths"][route.path_format][method.lower()]
                    operation["security"] = [{name: []} for name in schemes]

    customise_openapi(app, add_security)
