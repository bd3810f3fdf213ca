"""Server-side sessions and API tokens: only hashes are stored; revocation is immediate.

Immediate for open responses too: :mod:`cmbcluster.services.revocation` ends the progress streams and
proxied WebSockets of a credential that stops working, by the rules of :func:`refusal`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Connection, bindparam, delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cmbcluster.db.engine import in_batches
from cmbcluster.db.models import ApiToken, Environment, UsedToken, User, utcnow
from cmbcluster.db.models import Session as SessionRow
from cmbcluster.errors import AuthenticationFailed, CmbclusterError, NotFound, PermissionDenied
from cmbcluster.security import new_token, token_hash
from cmbcluster.text import check_display_name

SESSION_PREFIX, REFRESH_PREFIX, API_TOKEN_PREFIX = "cmbs", "cmbr", "cmbt"
#: an API token's last use is written at most this often, not on every request
TOUCH_INTERVAL = dt.timedelta(minutes=1)
#: Why a credential no longer works, as a request is refused and an open response ends.
SESSION_ENDED = "your session has ended; sign in again"
TOKEN_ENDED = "this API token is unknown, expired or revoked"  # noqa: S105 - a message, not a secret
DEACTIVATED = "this account is deactivated; ask an administrator"
ACCOUNT_GONE = "this account no longer exists"
CredentialKind = Literal["session", "api_token"]


@dataclass(frozen=True)
class Credential:
    """What a caller signed in with: a session or an API token (its row id, never the token)."""

    kind: CredentialKind
    id: str
    user_id: str


@dataclass(frozen=True)
class _State:
    """What decides whether a credential still works (``user_status`` None: the user is gone)."""

    revoked_at: dt.datetime | None
    expires_at: dt.datetime | None
    user_status: str | None


def refusal(kind: CredentialKind, state: _State | None, now: dt.datetime) -> CmbclusterError | None:
    """Why a credential in ``state`` (None: unknown) no longer works; None while it does. The one
    rule for a request (:func:`authenticate`) and for an open response (:func:`refusals`)."""
    if state is None:
        return AuthenticationFailed(SESSION_ENDED if kind == "session" else TOKEN_ENDED)
    if state.user_status is None:
        return AuthenticationFailed(ACCOUNT_GONE)
    if state.user_status != "active":  # say why, even though deactivation also revoked their sessions
        return PermissionDenied(DEACTIVATED)
    if state.revoked_at is not None or (state.expires_at is not None and state.expires_at <= now):
        return AuthenticationFailed(SESSION_ENDED if kind == "session" else TOKEN_ENDED)
    return None


@dataclass(frozen=True)
class SignedInUser:
    """The user a credential signs in, as requests need them: read with the credential in one query
    of plain columns, no ORM object (authentication runs on every request, and the busiest routes
    need no more; a route that does loads the user, see ``cmbcluster.api.deps.get_user``)."""

    id: str
    role: str
    max_uptime_minutes: int | None  #: their own maximum uptime (None: the server's)


# Built once: these run on every request.
_USER_COLUMNS = (
    User.id.label("user_id"), User.role, User.status.label("user_status"), User.max_uptime_minutes,
)  # fmt: skip
_CREDENTIAL_QUERIES = {
    # A session whose user is gone is unknown; an API token names its missing owner (ACCOUNT_GONE).
    "session": select(SessionRow.id, SessionRow.revoked_at, SessionRow.expires_at, *_USER_COLUMNS)
    .join(User, User.id == SessionRow.user_id)
    .where(SessionRow.token_hash == bindparam("token_hash")),
    "api_token": select(ApiToken.id, ApiToken.revoked_at, ApiToken.expires_at, ApiToken.last_used_at, *_USER_COLUMNS)
    .outerjoin(User, User.id == ApiToken.user_id)
    .where(ApiToken.token_hash == bindparam("token_hash")),
}
# The same, with whether the user owns environment :environment_id: a progress stream checks both
# in one query (a burst of launch dialogs opens five streams each).
_OWNING_QUERIES = {
    kind: query.add_columns(
        exists().where(Environment.id == bindparam("environment_id"), Environment.user_id == User.id).label("owns")
    )
    for kind, query in _CREDENTIAL_QUERIES.items()
}


@dataclass(frozen=True)
class IssuedSession:
    token: str
    refresh_token: str
    expires_at: dt.datetime
    session_id: str
    user: User  #: whom it was issued to, as loaded to issue it


def create_session(
    db: Session, user: User, *, ttl: dt.timedelta, user_agent: str = "", signed_in_at: dt.datetime | None = None
) -> IssuedSession:
    """A new session and its refresh token, for a sign-in (``signed_in_at``: now) or a refresh (the
    sign-in it continues)."""
    token, refresh = new_token(SESSION_PREFIX), new_token(REFRESH_PREFIX)
    now = utcnow()
    row = SessionRow(
        user_id=user.id, token_hash=token_hash(token), refresh_hash=token_hash(refresh),
        expires_at=now + ttl, user_agent=user_agent[:400], signed_in_at=signed_in_at or now,
    )  # fmt: skip
    db.add(row)
    db.commit()
    return IssuedSession(token=token, refresh_token=refresh, expires_at=row.expires_at, session_id=row.id, user=user)


def authenticate(
    db: Session | Connection, token: str, *, owning_environment: str | None = None
) -> tuple[SignedInUser, Credential]:
    """The active user a session or API token belongs to, and the credential it is: one query.

    AuthenticationFailed for an unknown, expired or revoked token; PermissionDenied for a
    deactivated user, at their very next request. An API token's use is recorded (and committed)
    at most every :data:`TOUCH_INTERVAL`. With ``owning_environment``, that environment must be the
    user's, checked in the same query: NotFound otherwise, as for an unknown id.
    """
    kind: CredentialKind
    if token.startswith(SESSION_PREFIX + "_"):
        kind = "session"
    elif token.startswith(API_TOKEN_PREFIX + "_"):
        kind = "api_token"
    else:
        raise AuthenticationFailed("not a CMBCluster session or API token")
    now = utcnow()
    if owning_environment is None:
        row = db.execute(_CREDENTIAL_QUERIES[kind], {"token_hash": token_hash(token)}).one_or_none()
    else:
        parameters = {"token_hash": token_hash(token), "environment_id": owning_environment}
        row = db.execute(_OWNING_QUERIES[kind], parameters).one_or_none()
    refused = refusal(kind, None if row is None else _State(row.revoked_at, row.expires_at, row.user_status), now)
    if refused is not None:
        raise refused
    assert row is not None  # refusal() answered for an unknown token
    if owning_environment is not None and not row.owns:
        raise NotFound(f"environment {owning_environment} not found")
    if kind == "api_token" and (row.last_used_at is None or now - row.last_used_at > TOUCH_INTERVAL):
        db.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
        db.commit()
    return SignedInUser(row.user_id, row.role, row.max_uptime_minutes), Credential(kind, row.id, row.user_id)


def refusals(db: Session, credentials: Collection[Credential]) -> dict[Credential, CmbclusterError]:
    """Why each of ``credentials`` no longer works (those that do are absent): a query per kind (and
    per :data:`~cmbcluster.db.engine.IN_BATCH`), whatever their number (a whole process's open responses)."""
    now = utcnow()
    found: dict[tuple[CredentialKind, str], _State] = {}
    tables: tuple[tuple[CredentialKind, type[SessionRow] | type[ApiToken]], ...] = (
        ("session", SessionRow), ("api_token", ApiToken),
    )  # fmt: skip
    for kind, table in tables:
        ids = sorted({c.id for c in credentials if c.kind == kind})
        for batch in in_batches(ids):
            query = (
                select(table.id, table.revoked_at, table.expires_at, User.status)
                .outerjoin(User, User.id == table.user_id)
                .where(table.id.in_(batch))
            )
            for row_id, revoked_at, expires_at, status in db.execute(query):
                found[(kind, row_id)] = _State(revoked_at, expires_at, status)
    refused = {c: refusal(c.kind, found.get((c.kind, c.id)), now) for c in credentials}
    return {c: error for c, error in refused.items() if error is not None}


def refresh_session(db: Session, refresh_token: str, *, ttl: dt.timedelta, refresh_ttl: dt.timedelta) -> IssuedSession:
    """Rotate: the old session and refresh token stop working, a new pair is issued, for the same
    sign-in: none past ``refresh_ttl`` after the user signed in with their identity provider (whose
    word, a disabled account or an admin group left, a new sign-in then hears).

    The old pair is revoked by one conditional UPDATE before anything else is read: of two refreshes
    with one token at once (a stolen copy sent beside the real one, through another replica), one
    wins and the other is refused, on every database. (A read first, then a write, let PostgreSQL
    issue several sessions for one refresh token.)"""
    now = utcnow()
    used = db.execute(
        update(SessionRow)
        .where(
            SessionRow.refresh_hash == token_hash(refresh_token),
            SessionRow.revoked_at.is_(None),
            func.coalesce(SessionRow.signed_in_at, SessionRow.created_at) > now - refresh_ttl,
        )
        .values(revoked_at=now)
        .returning(SessionRow.user_id, SessionRow.user_agent, SessionRow.signed_in_at, SessionRow.created_at)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if used is None:
        db.rollback()
        raise AuthenticationFailed(
            f"this refresh token is unknown, already used, or of a sign-in over {_days(refresh_ttl)} old: sign in again"
        )
    user = db.get(User, used.user_id)
    if user is None or user.status != "active":
        db.rollback()  # the token stays as it was: an administrator may reactivate the user
        raise AuthenticationFailed(ACCOUNT_GONE) if user is None else PermissionDenied(DEACTIVATED)
    return create_session(
        db, user, ttl=ttl, user_agent=used.user_agent, signed_in_at=used.signed_in_at or used.created_at
    )


def _days(span: dt.timedelta) -> str:
    days = span / dt.timedelta(days=1)
    return f"{days:g} day" + ("" if days == 1 else "s")


def revoke_session(db: Session, session_id: str) -> None:
    db.execute(update(SessionRow).where(SessionRow.id == session_id).values(revoked_at=utcnow()))
    db.commit()


def revoke_all_sessions(db: Session, user_id: str) -> None:
    db.execute(
        update(SessionRow)
        .where(SessionRow.user_id == user_id, SessionRow.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


# -- API tokens ----------------------------------------------------------------------------------
def create_api_token(db: Session, user: User, *, name: str, expires_in_days: int | None) -> tuple[ApiToken, str]:
    name = check_display_name(name, what="a token name", limit=100)  # listed to its owner and in the audit
    token = new_token(API_TOKEN_PREFIX)
    expires = utcnow() + dt.timedelta(days=expires_in_days) if expires_in_days else None
    row = ApiToken(
        user_id=user.id, name=name, token_hash=token_hash(token), display_prefix=token[:12], expires_at=expires
    )
    db.add(row)
    db.commit()
    return row, token


def list_api_tokens(db: Session, user: User) -> list[ApiToken]:
    return list(
        db.execute(
            select(ApiToken)
            .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
            .order_by(ApiToken.created_at)
        ).scalars()
    )


def revoke_api_token(db: Session, user: User, token_id: str) -> None:
    row = db.get(ApiToken, token_id)
    if row is None or row.user_id != user.id or row.revoked_at is not None:
        raise NotFound(f"API token {token_id} not found")
    row.revoked_at = utcnow()
    db.commit()


# -- single use ------------------------------------------------------------------------------------
def use_once(db: Session, kind: str, value: str, *, until: dt.datetime, refusal: str) -> None:
    """Record ``value`` (a sign-in state, an exchanged ID token) as used until ``until``;
    AuthenticationFailed(``refusal``) if it was used before. Shared by every replica (the database
    decides), and forgotten once it could not be accepted anyway (expired)."""
    now = utcnow()
    db.execute(delete(UsedToken).where(UsedToken.expires_at < now))
    db.add(UsedToken(key=token_hash(f"{kind}:{value}"), expires_at=max(until, now)))
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise AuthenticationFailed(refusal) from None
