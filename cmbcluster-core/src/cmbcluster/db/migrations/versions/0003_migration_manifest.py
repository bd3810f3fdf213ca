"""migration manifest: buckets being moved to another storage backend, and their verified objects

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 05:45:00

- ``migration_buckets``: one row per bucket ``cmbcluster migrate`` moves, with its state.
- ``migration_objects``: each object copied and verified on the target, so a migration that was
  killed resumes without copying it again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import cmbcluster.db.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "migration_buckets",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("storage_id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("source_backend", sa.String(length=40), nullable=False),
        sa.Column("source_bucket", sa.String(length=63), nullable=False),
        sa.Column("target_backend", sa.String(length=40), nullable=False),
        sa.Column("target_bucket", sa.String(length=63), nullable=True),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("objects_total", sa.BigInteger(), nullable=False),
        sa.Column("bytes_total", sa.BigInteger(), nullable=False),
        sa.Column("created_at", cmbcluster.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", cmbcluster.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("switched_at", cmbcluster.db.models.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["storage_id"], ["storages.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("storage_id", "target_backend"),
    )
    with op.batch_alter_table("migration_buckets") as batch:
        batch.create_index(batch.f("ix_migration_buckets_storage_id"), ["storage_id"], unique=False)
    op.create_table(
        "migration_objects",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("bucket_id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("md5", sa.String(length=32), nullable=False),
        sa.Column("source_etag", sa.String(length=200), nullable=False),
        sa.Column("source_modified", cmbcluster.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("target_etag", sa.String(length=200), nullable=False),
        sa.Column("verified_at", cmbcluster.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["bucket_id"], ["migration_buckets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("bucket_id", "key"),
    )


def downgrade() -> None:
    op.drop_table("migration_objects")
    with op.batch_alter_table("migration_buckets") as batch:
        batch.drop_index(batch.f("ix_migration_buckets_storage_id"))
    op.drop_table("migration_buckets")
