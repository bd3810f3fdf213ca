"""admins made by a sign-in rule lose the role when the rule no longer grants it: users.admin_because

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 17:20:00

- ``users.admin_because``: ``provider_group`` or ``admin_emails`` when a sign-in rule made the user
  an administrator (None otherwise). Found by a review: someone removed from the identity
  provider's admin group, or from CMBCLUSTER_ADMIN_EMAILS, stayed an administrator for ever. A
  sign-in the rule no longer grants now takes the role back; an administrator's own choice, the
  first user and the admins of before this revision (whose reason is unknown) are left as they are.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("admin_because", sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("admin_because")
