"""one move at a time in a bucket: storages.move_owner

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 14:40:00

- ``storages.move_owner``: the server instance running a move of objects in the bucket (None: no
  move). A move copies and then deletes: two moves of one folder at once each copied it, so it
  ended up in both places (found by an outsider's trial), past the quota too. A second move waits
  for none: it is refused until the first ends, or its server is gone.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("storages") as batch:
        batch.add_column(sa.Column("move_owner", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("storages") as batch:
        batch.drop_column("move_owner")
