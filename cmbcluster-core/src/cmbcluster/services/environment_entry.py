"""Signing a browser in to an environment served on a host of its own (host routing).

The control plane's session cookie stays on the control plane's host: a cookie of a parent domain
would reach every environment's host, and any page there could plant a cookie of that name for the
control plane (signing its owner's browser in as someone else). Instead, the first request to an
environment's host without its cookie goes (the ingress's ``auth-signin``) to the control plane's
``GET /api/v1/environments/{id}/enter``, where the session cookie is; that answers with the
environment's address and a **ticket**: sealed, for that environment alone, usable once, for a
minute. The ingress's access check (``authorize``) finds the ticket in the address it checks,
redeems it, and answers a cookie of the environment's own host, sealed the same way, which
ingress-nginx passes to the browser. The ticket stays in the address the application sees, spent.

Both carry the session's token, sealed (AES-GCM, a key of their own): the access check then asks
what every request asks of a session (expired, revoked at sign-out, user deactivated), and an
environment's cookie is nothing anywhere else.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import secrets
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from sqlalchemy.orm import Session

from cmbcluster.errors import AuthenticationFailed
from cmbcluster.security import Sealer
from cmbcluster.services import sessions

#: the query parameter that carries a ticket to the environment's host
TICKET_PARAMETER = "cmbcluster_ticket"
#: a ticket is spent at once by the redirect it comes with; a minute covers a slow network
TICKET_LIFETIME = dt.timedelta(minutes=1)
TICKET_PURPOSE = "environment-ticket"
COOKIE_PURPOSE = "environment-cookie"


def _seal(sealer: Sealer, payload: dict[str, str | float]) -> str:
    return base64.urlsafe_b64encode(sealer.seal(json.dumps(payload).encode())).decode().rstrip("=")


def _unseal(sealer: Sealer, value: str) -> dict[str, object] | None:
    try:
        data = json.loads(sealer.unseal(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))))
    except (ValueError, TypeError):  # not base64, not ours, tampered with, not JSON
        return None
    return data if isinstance(data, dict) else None


def issue_ticket(sealer: Sealer, environment_id: str, session_token: str, *, now: dt.datetime) -> str:
    """A ticket to ``environment_id`` for the session ``session_token``."""
    expires = (now + TICKET_LIFETIME).timestamp()
    return _seal(sealer, {"e": environment_id, "s": session_token, "x": expires, "n": secrets.token_urlsafe(12)})


def redeem_ticket(db: Session, sealer: Sealer, environment_id: str, ticket: str, *, now: dt.datetime) -> str:
    """The session token a ticket to ``environment_id`` carries, once: AuthenticationFailed for a
    ticket that is forged, for another environment, expired, or spent (on any replica)."""
    data = _unseal(sealer, ticket)
    if data is None or data.get("e") != environment_id or not isinstance(data.get("s"), str):
        raise AuthenticationFailed("the environment's sign-in ticket is not valid here")
    expires = data.get("x")
    if not isinstance(expires, int | float) or expires < now.timestamp():
        raise AuthenticationFailed("the environment's sign-in ticket has expired")
    sessions.use_once(
        db, TICKET_PURPOSE, str(data.get("n")), until=dt.datetime.fromtimestamp(expires, dt.UTC),
        refusal="the environment's sign-in ticket was used already",
    )  # fmt: skip
    return str(data["s"])


def environment_cookie(sealer: Sealer, environment_id: str, session_token: str) -> str:
    """The value of the cookie that keeps the session's owner signed in to ``environment_id``."""
    return _seal(sealer, {"e": environment_id, "s": session_token})


def session_of_cookie(sealer: Sealer, environment_id: str, value: str) -> str | None:
    """The session token of an environment's cookie, if it is ours and for ``environment_id``."""
    data = _unseal(sealer, value)
    if data is None or data.get("e") != environment_id or not isinstance(data.get("s"), str):
        return None
    return str(data["s"])


def ticket_in(url: str | None) -> str | None:
    """The ticket in an address (what the ingress asks about), if any."""
    if not url:
        return None
    try:
        query = urlsplit(url).query
    except ValueError:  # not a URL Python can parse ("https://[x/"): no ticket of ours
        return None
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == TICKET_PARAMETER and value:
            return value
    return None


def entry_address(environment_url: str, requested: str | None) -> str:
    """Where ``enter`` sends the browser: the page of the environment it asked for (``requested``,
    the address the ingress sent to sign-in) when it is one of the environment's, else the
    environment's own address (never a redirect elsewhere); without a ticket yet."""
    own = urlsplit(environment_url)
    if requested:
        try:
            asked = urlsplit(requested)
        except ValueError:  # not a URL Python can parse ("https://[::1", a fullwidth solidus in the host)
            return environment_url
        same_origin = (asked.scheme, asked.netloc.lower()) == (own.scheme, own.netloc.lower())
        if same_origin and asked.path.startswith(own.path or "/") and not _climbs(asked.path):
            query = [(k, v) for k, v in parse_qsl(asked.query, keep_blank_values=True) if k != TICKET_PARAMETER]
            return urlunsplit((own.scheme, own.netloc, asked.path, urlencode(query), ""))
    return environment_url


def origin(url: str | None) -> tuple[str, str] | None:
    """(scheme, host[:port]) of an absolute address, lower-cased; None for anything else (a path,
    ``null``, text Python cannot parse)."""
    try:
        parts = urlsplit(url or "")
    except ValueError:
        return None
    return (parts.scheme.lower(), parts.netloc.lower()) if parts.scheme and parts.netloc else None


def _climbs(path: str) -> bool:
    """Whether a browser would take ``path`` up a level (out of an environment's prefix): a ``..``
    segment, also escaped (``%2e%2e``) or between backslashes, which browsers take for slashes."""
    return ".." in re.split(r"[/\\]", unquote(path))


def with_ticket(address: str, ticket: str) -> str:
    parts = urlsplit(address)
    query = [*parse_qsl(parts.query, keep_blank_values=True), (TICKET_PARAMETER, ticket)]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
