"""storage that is never billed unseen: noncurrent usage, resumable deletes, upload journal, quotas

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 05:30:00

- ``storages.usage_noncurrent_bytes``/``usage_noncurrent_objects``: earlier versions the backend
  keeps and bills, measured beside the current objects; ``usage_bytes`` becomes a big integer
  (PostgreSQL's ``integer`` ends at 2 GiB).
- ``storages.delete_force``: a delete interrupted by a crash is resumed as it was asked.
- ``upload_journal``: uploads under way, so the next start aborts what a crash left unfinished.
- ``users.storage_quota_bytes``: a per-user storage quota set by admins.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import cmbcluster.db.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("storages") as batch:
        batch.alter_column("usage_bytes", existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=True)
        batch.add_column(sa.Column("usage_noncurrent_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("usage_noncurrent_objects", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("delete_force", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("storage_quota_bytes", sa.BigInteger(), nullable=True))
    op.create_table(
        "upload_journal",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("storage_id", sa.String(length=32), nullable=False),
        sa.Column("backend", sa.String(length=40), nullable=False),
        sa.Column("bucket_name", sa.String(length=63), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("started_at", cmbcluster.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_upload_journal_storage_id"), "upload_journal", ["storage_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_upload_journal_storage_id"), table_name="upload_journal")
    op.drop_table("upload_journal")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("storage_quota_bytes")
    with op.batch_alter_table("storages") as batch:
        batch.drop_column("delete_force")
        batch.drop_column("usage_noncurrent_objects")
        batch.drop_column("usage_noncurrent_bytes")
        batch.alter_column("usage_bytes", existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=True)
