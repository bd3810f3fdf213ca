"""Sign-in: provider list, the OIDC code flow (PKCE, nonce), token exchange, refresh, sign-out."""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import secrets
import time
from functools import partial
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import Form, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from cmbcluster import webui
from cmbcluster.api.deps import (
    LOGIN_COOKIE,
    ApiRouter,
    Context,
    CurrentPrincipal,
    CurrentUser,
    DbSession,
    client_address,
    in_worker,
    secure_cookies,
    session_cookie,
    session_cookie_name,
)
from cmbcluster.api.errors import error_responses
from cmbcluster.api.routes.admin import ActivityOut, ActivityPage, PageNumber, PageSize
from cmbcluster.context import AppContext
from cmbcluster.errors import AuthenticationFailed, CmbclusterError, InvalidRequest, NotFound, PermissionDenied
from cmbcluster.interfaces import AuthorizationRequest, AuthProvider
from cmbcluster.local.auth import DevLoginProvider
from cmbcluster.security import Sealer, pkce_challenge
from cmbcluster.services import admin as admin_service
from cmbcluster.services import ratelimit, sessions, users

router = ApiRouter(prefix="/api/v1/auth", tags=["auth"])

LOGIN_TTL_SECONDS = 600


class ProviderOut(BaseModel):
    name: str
    display_name: str
    login_url: str
    kind: str = Field(description="'oidc' for a redirect to an identity provider, 'development' for the local form")


class ProvidersOut(BaseModel):
    providers: list[ProviderOut]


class UserOut(BaseModel):
    id: str
    email: str
    name: str
    role: str
    status: str
    created_at: dt.datetime
    last_login_at: dt.datetime | None


class SessionOut(BaseModel):
    token: str = Field(description="Send as 'Authorization: Bearer <token>'")
    refresh_token: str
    expires_at: dt.datetime
    user: UserOut


class ExchangeIn(BaseModel):
    provider: str = Field(min_length=1, max_length=40)
    token: str = Field(min_length=1, max_length=16384, description="An ID token issued by that provider")


class RefreshIn(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=200)


def user_out(user: Any) -> UserOut:
    return UserOut.model_validate(user, from_attributes=True)


def _provider(context: Context, name: str, request: Request) -> AuthProvider:
    provider = context.auth.get(name)
    if provider is None:
        raise NotFound(f"no enabled sign-in provider named {name!r}")
    if isinstance(provider, DevLoginProvider):
        _check_local_host(request, context)
    return provider


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _check_local_host(request: Request, context: AppContext) -> None:
    """The development sign-in lets anyone be anyone: it answers only requests addressed to this
    machine (a loopback name, or the configured public URL's host), so a web page whose name an
    attacker re-points at 127.0.0.1 (DNS rebinding) cannot use it. CMBCLUSTER_DEV_LOGIN_ALLOW_REMOTE
    lifts this with the loopback rule."""
    core = context.config.core
    if core.dev_login_allow_remote:
        return
    host = (urlsplit(f"//{request.headers.get('host', '')}").hostname or "").lower()
    public = (urlsplit(core.public_url).hostname or "").lower() if core.public_url else None
    if host in LOOPBACK_NAMES or host.startswith("127.") or host == public:
        return
    raise PermissionDenied(
        f"the development sign-in answers only at http://127.0.0.1 or http://localhost, not at {host or 'no host'}"
    )


def _callback_url(request: Request, context: Context, provider: str) -> str:
    base = context.config.core.public_url or str(request.base_url)
    return f"{base.rstrip('/')}/api/v1/auth/{provider}/callback"


def _safe_next(next_path: str | None, context: AppContext) -> str:
    """Where to go after signing in, never an open redirect: a relative path on this site (an
    environment on a host of its own comes back through its ``enter`` path), or an absolute
    http(s) URL on the public host."""
    if not next_path or "\\" in next_path or any(ord(ch) < 32 for ch in next_path):
        return "/"
    if next_path.startswith("/") and not next_path.startswith("//"):
        return next_path
    url = urlsplit(next_path)
    core = context.config.core
    public_host = (urlsplit(core.public_url).hostname or "").lower() if core.public_url else ""
    allowed = bool(public_host) and (url.hostname or "").lower() == public_host
    return next_path if url.scheme in ("http", "https") and allowed else "/"


def _sealer(context: Context) -> Sealer:
    return context.sealer("login-state")


def _set_session_cookie(response: Response, request: Request, context: Context, issued: sessions.IssuedSession) -> None:
    max_age = max(1, int((issued.expires_at - dt.datetime.now(dt.UTC)).total_seconds()))
    # Host-only (no Domain): environments on hosts of their own get a cookie of their own (enter)
    response.set_cookie(
        session_cookie_name(request), issued.token, max_age=max_age, httponly=True, samesite="lax",
        secure=secure_cookies(request), path="/",
    )  # fmt: skip


def _rate_limit(db: DbSession, request: Request, context: Context) -> None:
    ratelimit.hit(
        db, f"sign-in:{client_address(request)}", limit=context.config.core.login_attempts_per_minute,
        what="sign-in attempts",
    )  # fmt: skip


@router.get("/providers", response_model=ProvidersOut, summary="The sign-in providers enabled on this server")
def list_providers(context: Context) -> ProvidersOut:
    return ProvidersOut(
        providers=[
            ProviderOut(
                name=name,
                display_name=provider.display_name or name,
                login_url=f"/api/v1/auth/{name}/login",
                kind="development" if isinstance(provider, DevLoginProvider) else "oidc",
            )
            for name, provider in context.auth.items()
        ]
    )


@router.get(
    "/{provider}/login",
    summary="Start signing in: redirects to the identity provider",
    status_code=303,
    responses={303: {"description": "To the identity provider's sign-in page"}, **error_responses(429)},
)
def login(
    provider: str, request: Request, context: Context, db: DbSession, next: Annotated[str | None, Query()] = None
) -> RedirectResponse:
    auth = _provider(context, provider, request)
    _rate_limit(db, request, context)
    state, nonce, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48)
    redirect_uri = _callback_url(request, context, provider)
    url = auth.authorization_url(
        AuthorizationRequest(
            redirect_uri=redirect_uri, state=state, nonce=nonce, code_challenge=pkce_challenge(verifier)
        )
    )
    sealed = _sealer(context).seal(
        json.dumps(
            {
                "p": provider,
                "s": state,
                "n": nonce,
                "v": verifier,
                "next": _safe_next(next, context),
                "exp": time.time() + LOGIN_TTL_SECONDS,
            }
        ).encode()
    )
    response = RedirectResponse(url, status_code=303)
    response.set_cookie(
        LOGIN_COOKIE, base64.urlsafe_b64encode(sealed).decode(), max_age=LOGIN_TTL_SECONDS, httponly=True,
        samesite="lax", secure=secure_cookies(request), path="/api/v1/auth",
    )  # fmt: skip
    return response


@router.get(
    "/{provider}/callback",
    summary="Where the identity provider sends the browser back",
    status_code=303,
    responses={303: {"description": "Signed in: to the page asked for (or to the sign-in page with the reason)"},
               **error_responses(401, 403, 409, 429)},
)  # fmt: skip
async def callback(
    provider: str,
    request: Request,
    context: Context,
    db: DbSession,
    code: Annotated[str | None, Query(max_length=4096)] = None,
    state: Annotated[str | None, Query(max_length=200)] = None,
    error: Annotated[str | None, Query(max_length=200)] = None,
) -> RedirectResponse:
    try:
        return await _complete_sign_in(provider, request, context, db, code, state, error)
    except CmbclusterError as exc:
        # A browser lands here from the identity provider: show it the reason on the sign-in
        # page rather than a JSON document. API clients (and servers without the UI) get the JSON.
        if exc.http_status >= 500 or not webui.shows_ui(request):
            raise
        return RedirectResponse(f"/signin/?{urlencode({'error': exc.message})}", status_code=303)


async def _complete_sign_in(
    provider: str, request: Request, context: Context, db: DbSession,
    code: str | None, state: str | None, error: str | None,
) -> RedirectResponse:  # fmt: skip
    auth = _provider(context, provider, request)
    await in_worker(db, partial(_rate_limit, db, request, context))
    if error:
        raise AuthenticationFailed(f"the identity provider reported: {error}")
    if not code or not state:
        raise InvalidRequest("the callback needs 'code' and 'state'")
    login_state = _read_login_state(request, context)
    if login_state.get("p") != provider or not secrets.compare_digest(str(login_state.get("s")), state):
        raise AuthenticationFailed("sign-in state does not match; start again")
    # Each state (and the nonce sealed with it) completes one sign-in, even if the identity
    # provider would accept its code twice.
    await in_worker(db, partial(
        sessions.use_once, db, "login-state", state, until=_expiry(float(login_state["exp"])),
        refusal="this sign-in was already completed; start again",
    ))  # fmt: skip
    redirect_uri = _callback_url(request, context, provider)
    tokens = await run_in_threadpool(
        auth.exchange_code, code, redirect_uri=redirect_uri, code_verifier=login_state["v"]
    )
    if not tokens.id_token:
        raise AuthenticationFailed("the identity provider returned no ID token")
    claims = await run_in_threadpool(auth.validate_token, tokens.id_token, nonce=login_state["n"])
    info = auth.user_info(claims)
    user = await in_worker(db, partial(users.sign_in, db, info, admin_emails=context.config.core.admin_emails))
    issued = sessions.create_session(
        db, user, ttl=context.session_ttl, user_agent=request.headers.get("user-agent", "")
    )
    response = RedirectResponse(login_state.get("next") or "/", status_code=303)
    _set_session_cookie(response, request, context, issued)
    response.delete_cookie(LOGIN_COOKIE, path="/api/v1/auth")
    return response


def _expiry(timestamp: object) -> dt.datetime:
    """When a used token can be forgotten: after its expiry (plus clock skew), a day at most."""
    now = time.time()
    seconds = now + LOGIN_TTL_SECONDS
    if isinstance(timestamp, (int, float)) and math.isfinite(timestamp):
        seconds = float(timestamp)
    return dt.datetime.fromtimestamp(min(seconds, now + 86400) + 300, dt.UTC)


def _read_login_state(request: Request, context: Context) -> dict[str, Any]:
    raw = request.cookies.get(LOGIN_COOKIE)
    if not raw:
        raise AuthenticationFailed("no sign-in in progress in this browser; start again")
    try:
        data: dict[str, Any] = json.loads(_sealer(context).unseal(base64.urlsafe_b64decode(raw.encode())))
    except (ValueError, UnicodeError):
        raise AuthenticationFailed("the sign-in state was tampered with; start again") from None
    if float(data.get("exp", 0)) < time.time():
        raise AuthenticationFailed("the sign-in took too long; start again")
    return data


# -- the development sign-in form (the `local` provider) ---------------------------------------
DEV_FORM = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Development sign-in · CMBCluster</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="/favicon.svg"><link rel="shortcut icon" href="/favicon.ico">
<style>
:root{{--bg:#f7f8fa;--fg:#1a1d23;--muted:#5b6472;--line:#d9dde3;--accent:#1d4ed8;--warn-bg:#fff4d6;--warn-fg:#7a4b00;
font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;line-height:1.5;color-scheme:light}}
*{{box-sizing:border-box}}body{{margin:0;background:var(--bg);color:var(--fg);overflow-wrap:anywhere}}
header{{padding:.6rem 1.5rem;background:#0f172a;color:#fff;font-weight:700;font-size:1.1rem}}
main{{max-width:30rem;margin:3rem auto;padding:0 1rem}}h1{{font-size:1.6rem;margin:0 0 1rem}}
.card{{background:#fff;border:1px solid var(--line);border-radius:8px;padding:1rem 1.2rem}}
label{{display:block;margin:.6rem 0 .2rem;font-weight:500}}
input{{font:inherit;padding:.45rem .55rem;border:1px solid #aab2bd;border-radius:6px;width:100%;background:#fff}}
:focus-visible{{outline:3px solid #f59e0b;outline-offset:2px}}
button{{font:inherit;margin-top:1rem;padding:.55rem 1rem;border:1px solid var(--accent);border-radius:6px;
background:var(--accent);color:#fff;cursor:pointer;width:100%}}
.note{{background:var(--warn-bg);color:var(--warn-fg);border:1px solid #f3d38a;padding:.6rem .8rem;border-radius:6px;
font-size:.9rem}}.muted{{color:var(--muted);font-size:.9rem}}
</style></head>
<body><header>CMBCluster</header><main><h1>Development sign-in</h1>
<p class="note">This server runs the embedded default: anyone who reaches it may choose who to be.
Configure a real identity provider before letting others in.</p>
<form method="post" class="card">{hidden}
<label for="email">E-mail address</label><input id="email" name="email" type="email" required autofocus
autocomplete="email">
<label for="name">Name (optional)</label><input id="name" name="name" type="text" maxlength="200" autocomplete="name">
<button type="submit">Sign in</button></form>
<p class="muted">The first person to sign in on a new server becomes its administrator.</p></main></body></html>"""


def _dev_provider(context: Context, request: Request) -> DevLoginProvider:
    provider = context.auth.get("local")
    if not isinstance(provider, DevLoginProvider):
        raise NotFound("the development sign-in is not enabled on this server")
    _check_local_host(request, context)
    return provider


def _check_redirect(request: Request, context: Context, redirect_uri: str) -> None:
    if redirect_uri != _callback_url(request, context, "local"):
        raise InvalidRequest("redirect_uri is not this server's callback")
    if urlsplit(redirect_uri).scheme not in ("http", "https"):
        raise InvalidRequest("invalid redirect_uri")


@router.get(
    "/local/form",
    response_class=HTMLResponse,
    summary="Development sign-in: the page where a person types an address (HTML)",
    description="A step of the development sign-in's browser flow, reached from `GET /api/v1/auth/local/login`, "
    "whose redirect carries these parameters; only on servers with the development sign-in (the embedded "
    "default). Scripts do not sign in here: they send an API token (`cmbcluster users token EMAIL`, or "
    "Settings → API tokens in the web UI).",
    responses={200: {"content": {"text/html": {}}, "description": "The sign-in form"}, **error_responses(404)},
)
def dev_form(
    request: Request,
    context: Context,
    redirect_uri: Annotated[str, Query(max_length=500)],
    state: Annotated[str, Query(max_length=200)],
    nonce: Annotated[str, Query(max_length=200)],
    code_challenge: Annotated[str, Query(max_length=200)],
) -> HTMLResponse:
    _dev_provider(context, request)
    _check_redirect(request, context, redirect_uri)
    fields = {"redirect_uri": redirect_uri, "state": state, "nonce": nonce, "code_challenge": code_challenge}
    hidden = "".join(
        f'<input type="hidden" name="{k}" value="{html.escape(v, quote=True)}">' for k, v in fields.items()
    )
    return HTMLResponse(DEV_FORM.format(hidden=hidden))


@router.post(
    "/local/form",
    status_code=303,
    summary="Development sign-in: the form's submission; redirects to the callback",
    description="What the form above posts: the browser goes on to `GET /api/v1/auth/local/callback`, which "
    "sets the session cookie. Rate-limited like every sign-in.",
    responses={303: {"description": "To this server's sign-in callback, with a code"}, **error_responses(404, 429)},
)
def dev_form_submit(
    request: Request,
    context: Context,
    db: DbSession,
    email: Annotated[str, Form(max_length=320)],
    redirect_uri: Annotated[str, Form(max_length=500)],
    state: Annotated[str, Form(max_length=200)],
    nonce: Annotated[str, Form(max_length=200)],
    code_challenge: Annotated[str, Form(max_length=200)],
    name: Annotated[str, Form(max_length=200)] = "",
) -> RedirectResponse:
    provider = _dev_provider(context, request)
    _check_redirect(request, context, redirect_uri)
    _rate_limit(db, request, context)
    code = provider.issue_code(email=email.strip(), name=name.strip(), nonce=nonce, code_challenge=code_challenge)
    return RedirectResponse(f"{redirect_uri}?{urlencode({'code': code, 'state': state})}", status_code=303)


# -- API clients -----------------------------------------------------------------------------------
@router.post(
    "/exchange",
    response_model=SessionOut,
    summary="Trade an identity-provider ID token for a session",
    responses=error_responses(401, 403, 409, 429),
)
async def exchange(body: ExchangeIn, request: Request, context: Context, db: DbSession) -> SessionOut:
    auth = _provider(context, body.provider, request)
    await in_worker(db, partial(_rate_limit, db, request, context))
    info = await run_in_threadpool(auth.exchange_token, body.token)
    # An ID token buys one session: a token copied from a log or a proxy cannot buy another.
    jti = info.claims.get("jti")
    await in_worker(db, partial(
        sessions.use_once, db, "id-token", f"{body.provider}:{jti}" if isinstance(jti, str) and jti else body.token,
        until=_expiry(info.claims.get("exp")), refusal="this ID token was already exchanged; get a new one",
    ))  # fmt: skip
    user = await in_worker(db, partial(users.sign_in, db, info, admin_emails=context.config.core.admin_emails))
    issued = sessions.create_session(
        db, user, ttl=context.session_ttl, user_agent=request.headers.get("user-agent", "")
    )
    return SessionOut(
        token=issued.token, refresh_token=issued.refresh_token, expires_at=issued.expires_at, user=user_out(user)
    )


@router.post(
    "/refresh",
    response_model=SessionOut,
    summary="Rotate a session with its refresh token",
    responses=error_responses(401, 403, 429),
)
def refresh(body: RefreshIn, request: Request, response: Response, context: Context, db: DbSession) -> SessionOut:
    _rate_limit(db, request, context)
    issued = sessions.refresh_session(db, body.refresh_token, ttl=context.session_ttl, refresh_ttl=context.refresh_ttl)
    if session_cookie(request):
        _set_session_cookie(response, request, context, issued)
    return SessionOut(
        token=issued.token, refresh_token=issued.refresh_token, expires_at=issued.expires_at,
        user=user_out(issued.user),
    )  # fmt: skip


@router.post("/logout", status_code=204, summary="Sign out: the session stops working at once")
def logout(principal: CurrentPrincipal, request: Request, context: Context, db: DbSession) -> Response:
    if principal.session_id is None:  # a 204 here would let a script believe a leaked token stopped
        raise InvalidRequest(
            "an API token is not signed out: revoke it to stop it "
            f"(DELETE /api/v1/settings/tokens/{principal.credential.id}, or Settings -> API tokens)"
        )
    sessions.revoke_session(db, principal.session_id)
    # its open progress streams and WebSockets end now (on other replicas, at their next check)
    context.revocations.ended(sessions.SESSION_ENDED, session_id=principal.session_id)
    response = Response(status_code=204)
    response.delete_cookie(
        session_cookie_name(request), path="/", httponly=True, samesite="lax", secure=secure_cookies(request)
    )
    return response


@router.get("/me", response_model=UserOut, summary="The signed-in user")
def me(user: CurrentUser) -> UserOut:
    return user_out(user)


@router.get("/me/activity", response_model=ActivityPage, summary="The signed-in user's activity, newest first")
def my_activity(
    user: CurrentUser, db: DbSession, context: Context, page: PageNumber = 1, page_size: PageSize = 20
) -> ActivityPage:
    """What the web UI's dashboard shows: sign-ins (``provider_name``: the sign-in's name for people),
    environments running, stopping, failing, warnings."""
    rows, total = admin_service.list_activity(db, user.id, page=page, page_size=page_size)
    items = [ActivityOut.model_validate(row, from_attributes=True) for row in rows]
    for item in items:
        provider = item.detail.get("provider") if item.kind == "sign_in" else None
        if isinstance(provider, str):
            found = context.auth.get(provider)
            item.detail = {**item.detail, "provider_name": (found.display_name if found else "") or provider}
    return ActivityPage(items=items, total=total, page=page, page_size=page_size)
