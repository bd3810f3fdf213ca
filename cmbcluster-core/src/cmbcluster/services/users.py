"""Users: sign-in (creating or linking the account), roles and status."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cmbcluster.db.models import User, utcnow
from cmbcluster.errors import AuthenticationFailed, Conflict, PermissionDenied
from cmbcluster.interfaces import UserInfo
from cmbcluster.services.audit import activity, audit

ROLES = ("admin", "user")


def sign_in(db: Session, info: UserInfo, *, admin_emails: list[str]) -> User:
    """The user for a verified identity: found by provider and subject, else linked by verified
    e-mail, else created. The first user ever, and every ADMIN_EMAILS address, is an admin."""
    if not info.email:
        raise AuthenticationFailed("the identity provider sent no e-mail address")
    email = info.email.strip().lower()
    user = db.execute(
        select(User).where(User.auth_provider == info.provider, User.subject == info.subject)
    ).scalar_one_or_none()
    if user is None:
        user = db.execute(select(User).where(func.lower(User.email) == email)).scalar_one_or_none()
        if user is not None and not info.email_verified:
            raise Conflict("an account with this e-mail address exists; sign in with a verified address")
    if user is None:
        first = db.execute(select(func.count()).select_from(User)).scalar_one() == 0
        user = User(
            email=email, name=info.name or email.split("@")[0], auth_provider=info.provider, subject=info.subject,
            role="admin" if first else "user",
        )  # fmt: skip
        db.add(user)
        db.flush()
        audit(db, actor_id=user.id, action="user.created", target_type="user", target_id=user.id,
              provider=info.provider, first_user=first)  # fmt: skip
    if user.status != "active":
        raise PermissionDenied("this account is deactivated; ask an administrator")
    wanted_admin = email in {a.strip().lower() for a in admin_emails} or "admin" in info.roles
    if wanted_admin and user.role != "admin":
        user.role = "admin"
        audit(db, actor_id=None, action="user.role_changed", target_type="user", target_id=user.id,
              role="admin", reason="ADMIN_EMAILS or provider group")  # fmt: skip
    if info.name and not user.name:
        user.name = info.name
    user.last_login_at = utcnow()
    activity(db, user_id=user.id, kind="sign_in", provider=info.provider)
    db.commit()
    return user
