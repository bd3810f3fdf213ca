"""what a sign-in grants ends: users.admin_because, sessions.signed_in_at

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 17:20:00

- ``users.admin_because``: ``provider_group`` or ``admin_emails`` when a sign-in rule made the user
  an administrator (None otherwise). Found by a review: someone removed from the identity
  provider's admin group, or from CMBCLUSTER_ADMIN_EMAILS, stayed an administrator for ever. A
  sign-in the rule no longer grants now takes the role back; an administrator's own choice, the
  first user and the admins of before this revision (whose reason is unknown) are left as they are.
- ``sessions.signed_in_at``: when the user signed in with their identity provider, carried from
  session to session by refreshes. Each refresh issued a new pair whose window counted from its own
  issue, so an API client refreshing once a month stayed signed in for ever, past the provider's
  say (a disabled account, a group left). None for sessions of before this revision: counted from
  their ``created_at``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import cmbcluster.db.models

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("admin_because", sa.String(length=20), nullable=True))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("signed_in_at", cmbcluster.db.models.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("signed_in_at")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("admin_because")
