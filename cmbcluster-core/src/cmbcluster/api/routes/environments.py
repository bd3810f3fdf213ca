"""Environments: create from the catalog, list, get, start, stop, restart, delete, progress, activity."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Annotated, Any, TypeVar
from urllib.parse import urljoin, urlsplit

from fastapi import Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import BaseModel, Field, TypeAdapter

from cmbcluster import webui
from cmbcluster.api.deps import (
    CONTROL_PLANE_COOKIES,
    ENVIRONMENT_COOKIE,
    SAFE_METHODS,
    SECURE_ENVIRONMENT_COOKIE,
    ApiRouter,
    Context,
    CurrentPrincipal,
    CurrentUser,
    DbSession,
    EnvironmentOwner,
    Principal,
    authenticate_request,
    credentials,
    in_worker,
    load_user,
    own_credentials,
    own_origins,
    sending_page,
)
from cmbcluster.api.errors import error_responses
from cmbcluster.bodies import RequestBody
from cmbcluster.context import AppContext
from cmbcluster.db.engine import CHANGED_MEANWHILE
from cmbcluster.db.models import User, utcnow
from cmbcluster.errors import AuthenticationFailed, Conflict, NotFound, PermissionDenied
from cmbcluster.services import environment_entry as entry
from cmbcluster.services import environments as envs
from cmbcluster.services.environment_proxy import is_control_plane_credential, without_cookies
from cmbcluster.services.progress import TERMINAL
from cmbcluster.services.sessions import Credential
from cmbcluster.services.status import apply_status

router = ApiRouter(prefix="/api/v1/environments", tags=["environments"])

EVENT_KEEPALIVE_SECONDS = 15.0


class MountIn(RequestBody):
    storage_id: str = Field(min_length=1, max_length=32)
    mount_path: str = Field(default="/home/user/data", min_length=2, max_length=400)
    read_only: bool = False


class EnvironmentIn(RequestBody):
    application: str = Field(min_length=1, max_length=63, description="Application id or slug from the catalog")
    name: str | None = Field(default=None, max_length=100)
    preset: str | None = Field(default=None, max_length=40, description="light, standard, heavy; or give cpu/memory")
    cpu: float | None = Field(default=None, gt=0, le=1024, allow_inf_nan=False)
    memory_mib: int | None = Field(default=None, gt=0, le=4 * 1024 * 1024)
    mounts: list[MountIn] = Field(default_factory=list, max_length=envs.MAX_MOUNTS)
    env: dict[str, str] = Field(default_factory=dict, description="This environment's own variables")
    start: bool = Field(default=True, description="Start right away")


class ApplicationRef(BaseModel):
    id: str
    slug: str
    name: str


class MountOut(BaseModel):
    storage_id: str
    display_name: str
    mount_path: str
    read_only: bool


class OwnerRef(BaseModel):
    id: str
    email: str
    name: str


class EnvironmentOut(BaseModel):
    id: str
    name: str
    application: ApplicationRef
    owner: OwnerRef
    status: str = Field(description="pending, starting, running, stopping (a stop under way), stopped or failed")
    status_message: str
    desired_state: str
    url: str | None
    preset: str
    cpu: float
    memory_mib: int
    mounts: list[MountOut]
    env: dict[str, str]
    created_at: dt.datetime
    started_at: dt.datetime | None
    stopped_at: dt.datetime | None
    last_activity_at: dt.datetime | None
    shutdown_at: dt.datetime | None = Field(description="When it stops automatically (uptime or idleness)")
    idle_shutdown_at: dt.datetime | None = Field(
        description="When it stops if nobody uses it meanwhile (any activity postpones it); null: no idle stop"
    )
    uptime_shutdown_at: dt.datetime | None = Field(
        description="When it stops having run its maximum uptime (Extend postpones it); null: no such stop"
    )
    extendable: bool = Field(description="Whether POST .../extend would postpone its automatic stop")
    shutdown_warning: bool = Field(description="True once the shutdown is near; activity postpones an idle stop")


class LimitsOut(BaseModel):
    max_active: int = Field(description="Running or starting environments one user may have")
    active: int = Field(description="How many of yours are running or starting now")
    idle_timeout_minutes: int = Field(description="An environment without activity this long stops; 0: never")
    max_uptime_minutes: int = Field(description="Your environments stop after running this long; 0: never")
    max_extension_minutes: int = Field(description="How much longer than that Extend may keep one running")
    shutdown_warning_minutes: int = Field(description="How long before an automatic stop you are warned")


class EnvironmentList(BaseModel):
    items: list[EnvironmentOut]
    limits: LimitsOut


class EnvironmentChange(RequestBody):
    """What may change on a stopped environment; a field left out stays as it is."""

    name: str | None = Field(default=None, min_length=1, max_length=100)
    preset: str | None = Field(default=None, max_length=40)
    cpu: float | None = Field(default=None, gt=0, le=1024, allow_inf_nan=False)
    memory_mib: int | None = Field(default=None, gt=0, le=4 * 1024 * 1024)
    mounts: list[MountIn] | None = Field(default=None, max_length=envs.MAX_MOUNTS)
    env: dict[str, str] | None = None


class ResourceUseOut(BaseModel):
    environment_id: str
    cpu: float = Field(description="CPU cores in use")
    memory_bytes: int = Field(description="Memory in use (resident)")


class ResourceUseList(BaseModel):
    measured: bool = Field(description="False when this server cannot measure (no metrics API): show nothing")
    items: list[ResourceUseOut] = Field(description="Your running environments that could be measured")


class LogsOut(BaseModel):
    lines: str


_JSON = TypeAdapter(Any)
T = TypeVar("T")


async def _in_worker(db: DbSession, context: AppContext, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking service code that waits on the compute backend in one of its own threads
    (``context.cluster_workers``), holding no pool connection meanwhile (:func:`in_worker`)."""
    return await in_worker(db, partial(fn, *args, **kwargs), limiter=context.cluster_workers)


def _json(payload: Any, status_code: int = 200) -> Response:
    """Views are built by the service in the documented shape: serialise them once, directly."""
    return Response(_JSON.dump_json(payload), status_code=status_code, media_type="application/json")


def _answer(db: DbSession, context: AppContext, user: User, environment_id: str, status_code: int = 200) -> Response:
    """The environment as recorded now, by id (the request's object may be expired, its row deleted
    by another request meanwhile: then 404)."""
    return _json(envs.view(db, context, user.id, environment_id), status_code)


@router.post("", response_model=EnvironmentOut, status_code=201, summary="Create (and by default start) an environment")
async def create_environment(
    body: EnvironmentIn, principal: CurrentPrincipal, db: DbSession, context: Context
) -> Response:
    request = envs.EnvironmentRequest(
        application=body.application, name=body.name, preset=body.preset, cpu=body.cpu, memory_mib=body.memory_mib,
        mounts=[envs.MountChoice(m.storage_id, m.mount_path, m.read_only) for m in body.mounts], env=body.env,
    )  # fmt: skip

    def create() -> dict[str, Any]:
        # The user is loaded here, in the worker's first transaction (as get_user would, with the
        # same refusal): not in one more transaction of its own on the event loop.
        user = load_user(db, principal)
        env = envs.create(db, context, user, request, start=body.start)
        # Read as recorded in the worker's last transaction, as the launch leaves it: a second
        # transaction on the event loop (a connection checked out again) cost a burst more.
        return envs.view(db, context, user.id, env.id)

    return _json(await _in_worker(db, context, create), 201)


@router.get("", response_model=EnvironmentList, summary="My environments, and the limits they run under")
async def list_environments(principal: CurrentPrincipal, context: Context) -> Response:
    # The busiest read of the API (the environments page polls it): one indexed query on the event
    # loop (see api/deps.py for why), on a plain connection (no ORM session: a third of the route's
    # time), as the caller was signed in. Budgets are not here: they cost more than the list itself,
    # and the dashboard reads them from GET /api/v1/usage/me; a start a budget refuses says why.
    with context.engine.connect() as connection:
        items = envs.views(connection, context, principal.user.id)
    return _json({"items": items, "limits": envs.limits(context, principal.user, items)})


@router.get(
    "/resources",
    response_model=ResourceUseList,
    summary="CPU and memory in use by my running environments (when the server can measure them)",
)
async def resource_use(principal: CurrentPrincipal, db: DbSession, context: Context) -> ResourceUseList:
    running = envs.running_ids(db, principal.user)
    measured = await _in_worker(db, context, context.compute.resource_use, running) if running else {}
    if measured is None:
        return ResourceUseList(measured=False, items=[])
    return ResourceUseList(
        measured=True,
        items=[ResourceUseOut(environment_id=k, cpu=v.cpu, memory_bytes=v.memory_bytes) for k, v in measured.items()],
    )


@router.get(
    "/authorize",
    status_code=204,
    summary="For an ingress auth-url: may the caller reach this environment?",
    responses=error_responses(401, 403, 404),
)
def authorize(
    environment_id: Annotated[str, Query(min_length=1, max_length=32)],
    db: DbSession,
    request: Request,
    context: Context,
) -> Response:
    """204 for the owner of a running environment (and counts as activity); 404 otherwise; 401 for
    no credentials (ingress-nginx then sends the browser to the ``auth-signin`` address, ``enter``),
    and for the 404s when the ingress asks (``X-Original-URL``), which would show its 500 page.

    The caller: a bearer token or the session cookie; on an environment's own host (host routing)
    the environment's cookie, or the ticket ``enter`` put in the address the ingress checks
    (``X-Original-URL``), which answers that cookie (``Set-Cookie``, passed on by ingress-nginx).

    The answer carries what the ingress passes on to the environment in place of the request's own
    ``Cookie`` and ``Authorization`` (ingress-nginx's ``auth-response-headers``): the same, without
    the control plane's session, sign-in and environment cookies and its bearer tokens, which the
    application (and any code in it) must never see, as the control plane's own proxy never shows
    them. An application with a token of its start's own gets it as ``Authorization`` instead, as
    from the control plane's proxy."""
    principal, entered_with, plain_cookie = _environment_visitor(request, db, context, environment_id)
    try:
        env = envs.open_for_traffic(db, principal.user, environment_id)
    except NotFound:
        if request.headers.get("x-original-url") is None:
            raise  # asked directly (a script): as every other route answers it
        # ingress-nginx shows any answer but 2xx, 401 and 403 as a 500 page: 401 sends the browser to
        # enter, which says why (404 to anyone else; the owner of a stopped environment to the web UI)
        raise AuthenticationFailed(f"environment {environment_id} is not running, or not yours") from None
    if plain_cookie and (env.url or "").startswith("https://"):
        # over https the check answers the __Host- cookie alone, which only the environment's host can
        # set; one of the plain name may come from any host of the domain (Domain=...)
        raise AuthenticationFailed("sign in first: no session cookie or bearer token")
    if principal.via_cookie:
        _check_environment_origin(request, context, env.url)
    authorization = request.headers.get("authorization", "")
    if is_control_plane_credential(authorization):
        authorization = ""
    own = {name.lower(): value for name, value in context.compute.application_headers(environment_id).items()}
    response = Response(status_code=204, headers={
        "Cookie": without_cookies(request.headers.get("cookie", ""), CONTROL_PLANE_COOKIES),
        "Authorization": own.get("authorization", authorization),
    })  # fmt: skip
    if entered_with is not None:
        secure = (env.url or request.headers.get("x-original-url", "")).startswith("https://")
        response.set_cookie(
            SECURE_ENVIRONMENT_COOKIE if secure else ENVIRONMENT_COOKIE,
            entry.environment_cookie(context.sealer(entry.COOKIE_PURPOSE), environment_id, entered_with),
            httponly=True, samesite="lax", secure=secure, path="/",
        )  # fmt: skip
    return response


def _environment_visitor(
    request: Request, db: DbSession, context: AppContext, environment_id: str
) -> tuple[Principal, str | None, bool]:
    """Who asks to reach ``environment_id``, the session token of the ticket they came with (None
    without one: their environment cookie, bearer token or session cookie decided), and whether the
    environment cookie of the plain name did (which only an environment served over http may use)."""
    ticket = entry.ticket_in(request.headers.get("x-original-url"))
    if ticket is not None:
        sealer = context.sealer(entry.TICKET_PURPOSE)
        try:
            token = entry.redeem_ticket(db, sealer, environment_id, ticket, now=utcnow())
        except AuthenticationFailed:
            pass  # a spent ticket left in the address (a reload): the cookie or credentials decide
        else:
            return authenticate_request(request, db, None, token), token, False
    bearer, cookie = own_credentials(request)
    plain = False
    if bearer is None and cookie is None:
        value = request.cookies.get(SECURE_ENVIRONMENT_COOKIE)
        if not value:
            value = request.cookies.get(ENVIRONMENT_COOKIE)
            plain = bool(value)
        if value:
            cookie = entry.session_of_cookie(context.sealer(entry.COOKIE_PURPOSE), environment_id, value)
    return authenticate_request(request, db, bearer, cookie), None, plain


def _check_environment_origin(request: Request, context: AppContext, environment_url: str | None) -> None:
    """A request signed in with a cookie (the environment's, the session's, or a ticket) must come from
    the environment's own pages, as through the control plane's proxy: the check is a GET whatever the
    request was (``X-Original-Method`` names it), and it hands an application with a token of its own
    (JupyterLab) that token, with which the application skips its own XSRF and origin checks. Browsers
    send Origin with every change and every WebSocket handshake, and SameSite=Lax sends the cookie from
    any page of the same site (another environment's host, any other host of the domain); a change
    without Origin is judged by its Referer, and one with neither refused, as the API refuses it.
    PermissionDenied (403, which ingress-nginx answers) else."""
    change = request.headers.get("x-original-method", "GET").upper() not in SAFE_METHODS
    sent = sending_page(request, change=change, signed_in_with="a cookie", pages="the environment's own pages")
    if sent is None:
        return  # a navigation, or a same-origin read
    original = request.headers.get("x-original-url")
    base = context.config.core.public_url or original or str(request.base_url)
    ours = {entry.origin(urljoin(base, environment_url or ""))}
    if original is not None:  # through the ingress: the address the browser asked for is the page's origin
        ours.add(entry.origin(original))
    else:  # asked directly (another ingress controller): the environment is on this host, or on its own
        ours.update(own_origins(request))
    if entry.origin(sent) not in ours - {None}:
        raise PermissionDenied("a request to the environment from another site's page is refused")


@router.get(
    "/{environment_id}/enter",
    status_code=303,
    summary="Open an environment in the browser (where an ingress sends a browser not yet signed in to it)",
    responses={303: {"description": "To the environment (with a ticket on a host of its own), or to sign in"},
               **error_responses(401, 403, 404, 409)},
)  # fmt: skip
def enter_environment(
    environment_id: str,
    request: Request,
    db: DbSession,
    context: Context,
    next_url: Annotated[str | None, Query(alias="next", max_length=32768, description="The page asked for")] = None,
) -> Response:
    """Signed in (the session cookie, or a bearer token): to ``next`` (a page of the environment,
    else its own address), with a ticket for the environment's access check where the environment
    is on a host of its own (host routing), which the session cookie never reaches. Not signed in:
    a browser to the sign-in page, which comes back here (401 to a script). Not running: to the web
    UI, which offers to start it, then comes back here with ``next``."""
    bearer, cookie = credentials(request)
    try:
        principal = authenticate_request(request, db, bearer, cookie) if bearer or cookie else None
    except AuthenticationFailed:
        principal = None
    if principal is None:
        if not webui.shows_ui(request):
            raise AuthenticationFailed("sign in first: no session cookie or bearer token")  # a script
        return webui.sign_in_first(request)
    env = envs.get_owned(db, principal.user, environment_id)
    if env.status != "running" or not env.url:
        if not webui.ui_available():
            raise Conflict(f"environment {environment_id} is not running: start it first")
        return webui.start_first(environment_id, next_url or "")
    base = context.config.core.public_url or str(request.base_url)  # an address may be a path on this host
    try:
        requested = urljoin(base, next_url) if next_url else None
    except ValueError:  # not a URL Python can parse: the environment's own address
        requested = None
    address = entry.entry_address(urljoin(base, env.url), requested)
    target = urlsplit(address)
    if not target.netloc or (target.scheme, target.netloc.lower()) in own_origins(request):
        return RedirectResponse(address, status_code=303)  # served on this host: the session cookie does
    # the ticket carries the credential that signed in here (a script's bearer token, a browser's cookie)
    token = bearer or cookie or ""
    ticket = entry.issue_ticket(context.sealer(entry.TICKET_PURPOSE), environment_id, token, now=utcnow())
    return RedirectResponse(entry.with_ticket(address, ticket), status_code=303)


@router.get("/{environment_id}", response_model=EnvironmentOut, summary="One environment, its status refreshed")
async def get_environment(environment_id: str, user: CurrentUser, db: DbSession, context: Context) -> Response:
    env = envs.get_owned(db, user, environment_id)
    if env.status in envs.ACTIVE_STATUSES:
        status = await _in_worker(db, context, context.compute.status, env.id)
        if apply_status(db, env, status):
            try:
                db.commit()
            except CHANGED_MEANWHILE:
                # Recorded meanwhile by another writer (the progress hub, the reconcile loop, a start's
                # launch, another replica), which opened the usage interval first, or deleted: a read
                # answers what the database holds (or 404), never a conflict it did not ask for.
                db.rollback()
    return _answer(db, context, user, environment_id)


@router.post("/{environment_id}/start", response_model=EnvironmentOut, summary="Start a stopped environment")
async def start_environment(environment_id: str, user: CurrentUser, db: DbSession, context: Context) -> Response:
    env = envs.get_owned(db, user, environment_id)
    await _in_worker(db, context, envs.start, db, context, user, env)
    return _answer(db, context, user, environment_id)


@router.post(
    "/{environment_id}/stop",
    response_model=EnvironmentOut,
    summary="Stop; every choice is kept",
    description="Answers the environment as it is once the stop is done, as GET does, not a record of the stop: "
    "a start sent meanwhile (another tab, a script) that came after this stop has the last word, and the answer "
    'shows it (desired_state "running", status pending, starting or running).',
)
async def stop_environment(environment_id: str, user: CurrentUser, db: DbSession, context: Context) -> Response:
    env = envs.get_owned(db, user, environment_id)
    await _in_worker(db, context, envs.stop, db, context, env, actor_id=user.id, reason="stopped by its owner")
    return _answer(db, context, user, environment_id)


@router.post("/{environment_id}/restart", response_model=EnvironmentOut, summary="Stop and start with the same choices")
async def restart_environment(environment_id: str, user: CurrentUser, db: DbSession, context: Context) -> Response:
    env = envs.get_owned(db, user, environment_id)
    await _in_worker(db, context, envs.restart, db, context, user, env)
    return _answer(db, context, user, environment_id)


@router.patch(
    "/{environment_id}",
    response_model=EnvironmentOut,
    summary="Change a stopped environment's name, size, buckets or variables (used at its next start)",
)
def change_environment(
    environment_id: str, body: EnvironmentChange, user: CurrentUser, db: DbSession, context: Context
) -> Response:
    env = envs.get_owned(db, user, environment_id)
    mounts = (
        None
        if body.mounts is None
        else [envs.MountChoice(m.storage_id, m.mount_path, m.read_only) for m in body.mounts]
    )
    change = envs.EnvironmentChange(
        name=body.name, preset=body.preset, cpu=body.cpu, memory_mib=body.memory_mib, mounts=mounts, env=body.env
    )
    envs.update(db, context, user, env, change)
    return _answer(db, context, user, environment_id)


@router.post(
    "/{environment_id}/extend",
    response_model=EnvironmentOut,
    summary="Postpone the automatic stop: the idle timer restarts, the uptime stop moves an hour later",
)
def extend_environment(environment_id: str, user: CurrentUser, db: DbSession, context: Context) -> Response:
    env = envs.get_owned(db, user, environment_id)
    envs.extend(db, context, user, env)
    return _answer(db, context, user, environment_id)


@router.delete("/{environment_id}", status_code=204, summary="Delete the environment (its buckets stay)")
async def delete_environment(environment_id: str, user: CurrentUser, db: DbSession, context: Context) -> Response:
    env = envs.get_owned(db, user, environment_id)
    await _in_worker(db, context, envs.remove, db, context, env, actor_id=user.id)
    return Response(status_code=204)


@router.post("/{environment_id}/activity", status_code=204, summary="Heartbeat: the user is working in it")
def heartbeat(environment_id: str, user: CurrentUser, db: DbSession) -> Response:
    env = envs.get_owned(db, user, environment_id)
    if env.status not in envs.ACTIVE_STATUSES:
        raise Conflict(f"{env.name!r} is {env.status}")
    envs.touch(db, env)
    return Response(status_code=204)


@router.get("/{environment_id}/logs", response_model=LogsOut, summary="The last lines of the environment's output")
async def environment_logs(
    environment_id: str,
    user: CurrentUser,
    db: DbSession,
    context: Context,
    tail: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> LogsOut:
    env = envs.get_owned(db, user, environment_id)
    return LogsOut(lines=await _in_worker(db, context, context.compute.logs, env.id, tail=tail))


@router.get(
    "/{environment_id}/events",
    summary="Progress while starting (Server-Sent Events); ends once running, stopped or failed, or once the "
    "caller's session or API token stops working",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def environment_events(environment_id: str, principal: EnvironmentOwner, context: Context) -> StreamingResponse:
    """Events: ``status`` (the environment's progress), ``deleted``, and ``signed_out`` (the caller
    signed out, their API token was revoked or their account deactivated: ``message`` says which; sign
    in again). The stream ends after ``deleted``, ``signed_out`` and a ``status`` that is running,
    stopped or failed."""
    # Signed in and checked to own it on the event loop, as the list is (one indexed query, see
    # get_environment_owner): a launch dialog opens its stream right after the create, when the
    # worker threads are busiest with starts.
    return StreamingResponse(
        _progress(context, principal.credential, environment_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _progress(context: AppContext, credential: Credential, environment_id: str) -> AsyncIterator[str]:
    """Status events as the progress hub sees them (it reads for every stream of this process at
    once); a comment line keeps idle proxies from closing the stream. The stream holds no
    database connection or thread while it waits; a client that goes away cancels it, and so does
    the caller's credential ceasing to work (the revocation watch ends the subscription)."""
    hub = context.progress
    subscription = hub.subscribe(environment_id, credential.user_id)
    hold = context.revocations.hold(credential, subscription.end)
    try:
        while True:
            try:
                # asyncio.timeout, not wait_for: no task of its own per wait (a burst's 1,000 streams)
                async with asyncio.timeout(EVENT_KEEPALIVE_SECONDS):
                    await subscription.changed.wait()
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            subscription.changed.clear()
            if subscription.signed_out is not None:
                ended = {"status": "signed_out", "message": subscription.signed_out}
                yield f"event: signed_out\ndata: {json.dumps(ended)}\n\n"
                return
            event = subscription.latest
            if event is None:
                yield 'event: deleted\ndata: {"status": "deleted"}\n\n'
                return
            yield f"event: status\ndata: {json.dumps(event)}\n\n"
            if event["status"] in TERMINAL:
                return
    finally:
        context.revocations.release(hold)
        hub.unsubscribe(subscription)
