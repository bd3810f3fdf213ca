"""upload holds expire, and measurements never drop an upload: upload heartbeats, usage versions

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 15:30:00

- ``upload_journal.heartbeat_at``: renewed while an upload's bytes arrive; a hold whose heartbeat is
  older than the upload idle timeout (and a heartbeat's interval) no longer counts against the
  quotas, and its entry is recovered like a gone server's. Entries already there count from now
  (their uploads may be running on a server of the previous version, which does not renew them);
  the database's default fills it in for such servers' new uploads during a rolling update.
- ``storages.usage_version``: counts the changes made through the API; a usage measurement stores
  its figures only if none happened while it ran (else an upload's bytes, counted in the meantime,
  would be lost from a quota).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import cmbcluster.db.models

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("storages") as batch:
        batch.add_column(sa.Column("usage_version", sa.BigInteger(), server_default="0", nullable=False))
    with op.batch_alter_table("upload_journal") as batch:
        batch.add_column(sa.Column("heartbeat_at", cmbcluster.db.models.UTCDateTime(timezone=True), nullable=True))
    op.execute("UPDATE upload_journal SET heartbeat_at = CURRENT_TIMESTAMP")
    # Not null, with the database's clock as default, set apart: SQLite adds no column whose
    # default is not a constant (this rebuilds the table there).
    with op.batch_alter_table("upload_journal") as batch:
        batch.alter_column(
            "heartbeat_at", existing_type=cmbcluster.db.models.UTCDateTime(timezone=True), nullable=False,
            server_default=sa.func.now(),
        )  # fmt: skip


def downgrade() -> None:
    with op.batch_alter_table("upload_journal") as batch:
        batch.drop_column("heartbeat_at")
    with op.batch_alter_table("storages") as batch:
        batch.drop_column("usage_version")
