"""group storage quotas, upload reservations, and work owned by a live server instance

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 08:45:00

- ``groups.storage_quota_bytes``: what a group's members' buckets may hold together (admins).
- ``upload_journal.reserved_bytes``: what a running upload holds against the quotas, so uploads
  running at once cannot together pass one.
- ``server_instances`` with a heartbeat, ``upload_journal.owner`` and ``storages.delete_owner``:
  with several replicas, the leader recovers only the work of instances that are gone.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import cmbcluster.db.models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("groups") as batch:
        batch.add_column(sa.Column("storage_quota_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("upload_journal") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("reserved_bytes", sa.BigInteger(), server_default="0", nullable=False))
    with op.batch_alter_table("storages") as batch:
        batch.add_column(sa.Column("delete_owner", sa.String(length=32), nullable=True))
    op.create_table(
        "server_instances",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("started_at", cmbcluster.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", cmbcluster.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("server_instances")
    with op.batch_alter_table("storages") as batch:
        batch.drop_column("delete_owner")
    with op.batch_alter_table("upload_journal") as batch:
        batch.drop_column("reserved_bytes")
        batch.drop_column("owner")
    with op.batch_alter_table("groups") as batch:
        batch.drop_column("storage_quota_bytes")
