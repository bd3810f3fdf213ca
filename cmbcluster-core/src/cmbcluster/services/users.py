"""Users: sign-in (creating or linking the account), roles and status.

An e-mail address is trusted only when the identity provider vouches for it
(``UserInfo.email_verified``): only then does it grant admin through CMBCLUSTER_ADMIN_EMAILS,
link a sign-in to an existing account, or become an account's address.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cmbcluster.db.engine import begin_serialised
from cmbcluster.db.models import User, utcnow
from cmbcluster.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound, PermissionDenied
from cmbcluster.interfaces import UserInfo
from cmbcluster.services.audit import activity, audit
from cmbcluster.text import check_email_address, shown_name

log = logging.getLogger(__name__)

#: ``users.name``'s size
MAX_USER_NAME = 200
#: The PostgreSQL advisory lock new accounts are created under (starts take 4242001, START_LOCK)
NEW_ACCOUNT_LOCK = 4242002
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def normalise_email(email: str) -> str:
    """The address as the provider verified it, ASCII letters lower-cased: nothing else changes
    (Unicode case rules would turn a verified ``\u212aim@`` into another person's ``kim@``).
    InvalidRequest for text that is no address people could read as itself (``check_email_address``)."""
    return check_email_address(email).translate(_ASCII_LOWER)


def by_email(db: Session, email: str) -> User | None:
    """The user with this address, compared in ASCII case only (as addresses are stored: an admin's
    ``ALICE@Example.org`` is ``alice@example.org``); None for text that is no address."""
    try:
        address = normalise_email(email)
    except InvalidRequest:
        return None
    return db.execute(select(User).where(User.email == address)).scalar_one_or_none()


def sign_in(db: Session, info: UserInfo, *, admin_emails: list[str]) -> User:
    """The user for a verified identity: found by provider and subject, else linked by a verified
    e-mail address to an account whose address was verified too, else created.

    The first user ever is an admin; so is a user whose provider groups map to ``admin``, and one
    whose *verified*, unchanged address is in ADMIN_EMAILS, until a sign-in neither rule grants
    (:func:`_apply_admin_rules`). A sign-in whose token carries another
    address than the account's is audited (``user.email_changed``) and changes no role; the new
    address is adopted only when verified.
    """
    if not info.email:
        raise AuthenticationFailed("the identity provider sent no e-mail address")
    try:
        email = normalise_email(info.email)
    except InvalidRequest:
        raise AuthenticationFailed("the identity provider sent an invalid e-mail address") from None
    name = shown_name(info.name or "", limit=MAX_USER_NAME)  # shown to admins, like the address
    user, email_changed = _existing(db, email, info)
    if user is None:
        # A new account: looked up again and created under a lock, so that two people signing in
        # at once on a fresh install are not both the first user (an admin), and one person's two
        # sign-ins at once (two tabs) make one account, on every replica. New accounts are rare.
        db.rollback()
        begin_serialised(db, NEW_ACCOUNT_LOCK)
        user, email_changed = _existing(db, email, info)
    if user is None:
        first = db.execute(select(func.count()).select_from(User)).scalar_one() == 0
        user = User(
            email=email, name=name or email.split("@")[0], auth_provider=info.provider, subject=info.subject,
            role="admin" if first else "user", email_verified=info.email_verified,
        )  # fmt: skip
        db.add(user)
        db.flush()
        audit(db, actor_id=user.id, action="user.created", target_type="user", target_id=user.id,
              provider=info.provider, first_user=first, email_verified=info.email_verified)  # fmt: skip
    elif not email_changed and info.email_verified and not user.email_verified:
        user.email_verified = True
    if user.status != "active":
        raise PermissionDenied("this account is deactivated; ask an administrator")
    _apply_admin_rules(db, user, info, email_trusted=info.email_verified and not email_changed,
                       admin_emails=admin_emails)  # fmt: skip
    if name and not user.name:
        user.name = name
    user.last_login_at = utcnow()
    activity(db, user_id=user.id, kind="sign_in", provider=info.provider)
    db.commit()
    return user


def _existing(db: Session, email: str, info: UserInfo) -> tuple[User | None, bool]:
    """The account of this identity (by provider and subject, else linked by a verified address),
    and whether the token carries another address than the account's (recorded, see sign_in)."""
    user = db.execute(
        select(User).where(User.auth_provider == info.provider, User.subject == info.subject)
    ).scalar_one_or_none()
    if user is None:
        return _link_by_email(db, email, info), False
    if user.email != email:
        _record_email_change(db, user, email, info)
        return user, True
    return user, False


def _link_by_email(db: Session, email: str, info: UserInfo) -> User | None:
    """The existing account with this address, when both sides' addresses are verified."""
    user = by_email(db, email)
    if user is None:
        return None
    if not info.email_verified:
        raise Conflict("an account with this e-mail address exists; sign in with a verified address")
    if not user.email_verified:
        raise Conflict(
            "an account with this e-mail address exists, but its address was never verified; "
            "ask an administrator to remove it, then sign in again"
        )
    return user


def _record_email_change(db: Session, user: User, email: str, info: UserInfo) -> None:
    taken = db.execute(select(User.id).where(func.lower(User.email) == email, User.id != user.id)).scalar_one_or_none()
    adopted = info.email_verified and taken is None
    audit(db, actor_id=user.id, action="user.email_changed", target_type="user", target_id=user.id,
          previous=user.email, reported=email, verified=info.email_verified, adopted=adopted)  # fmt: skip
    if adopted:
        user.email, user.email_verified = email, True


#: Why a sign-in rule makes someone an administrator (``User.admin_because``), as the audit says it.
_ADMIN_RULES = {"provider_group": "provider group", "admin_emails": "CMBCLUSTER_ADMIN_EMAILS (verified address)"}


def _apply_admin_rules(
    db: Session, user: User, info: UserInfo, *, email_trusted: bool, admin_emails: list[str]
) -> None:
    """Grant the admin role a sign-in rule gives (a provider group, a verified address in
    ADMIN_EMAILS), and take back one a rule gave that no rule gives any more: removing someone from
    the admin group, or the list, ends their role at their next sign-in. A role an administrator
    gave, the first user's, and the last active administrator's are never taken back here."""
    listed = email_trusted and user.email in {a.strip().translate(_ASCII_LOWER) for a in admin_emails}
    because = "provider_group" if "admin" in info.roles else "admin_emails" if listed else None
    if because is not None:
        if user.role != "admin":
            user.role = "admin"
            audit(db, actor_id=None, action="user.role_changed", target_type="user", target_id=user.id,
                  role="admin", reason=_ADMIN_RULES[because])  # fmt: skip
            user.admin_because = because
        elif user.admin_because is not None:
            user.admin_because = because  # still granted, now (perhaps) by the other rule
    elif user.role == "admin" and user.admin_because is not None and user.status == "active":
        others = other_active_admins(db, user.id)
        reason = f"no longer granted by {_ADMIN_RULES[user.admin_because]}"
        if others == 0:  # the deployment would have no administrator left: kept, and said so
            log.warning("%s keeps the admin role, %s, as the last active administrator", user.email, reason)
            return
        user.role, user.admin_because = "user", None
        audit(db, actor_id=None, action="user.role_changed", target_type="user", target_id=user.id,
              role="user", reason=reason)  # fmt: skip


def operator_token(
    db: Session, email: str, *, name: str, expires_in_days: int | None, create_local: bool, admin_emails: list[str]
) -> tuple[User, str, bool]:
    """An API token for ``email``, made by the operator (``cmbcluster users token``): ``(user,
    token, created)``. A missing user is created as the development sign-in would create them
    when ``create_local`` (the embedded default); otherwise they must sign in once first."""
    from cmbcluster.services import sessions

    address = normalise_email(email)
    user = by_email(db, address)
    created = user is None
    if user is None:
        if not create_local:
            raise NotFound(
                f"no user {address}: on this server people are created when they first sign in; ask them to "
                "sign in once, then run this again"
            )
        info = UserInfo(provider="local", subject=address, email=address, email_verified=True, name="")
        user = sign_in(db, info, admin_emails=admin_emails)
    if user.status != "active":
        raise PermissionDenied(f"{address}'s account is deactivated: activate it first")
    row, token = sessions.create_api_token(db, user, name=name, expires_in_days=expires_in_days)
    audit(db, actor_id=None, action="api_token.created", target_type="api_token", target_id=row.id, name=row.name,
          user_id=user.id, via="cli", expires_at=row.expires_at.isoformat() if row.expires_at else None)  # fmt: skip
    db.commit()
    return user, token, created


def other_active_admins(db: Session, user_id: str) -> int:
    """How many active administrators there are besides ``user_id``. FOR UPDATE (where the database
    has it) serializes two demotions at once (two admins demoting each other, two sign-ins that
    each take a role back), so that they cannot both leave the other as the last one and demote it."""
    rows = db.execute(
        select(User.id).where(User.role == "admin", User.status == "active", User.id != user_id).with_for_update()
    ).all()
    return len(rows)
