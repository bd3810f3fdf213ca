"""usage rollups: closed intervals summed per day and per month, so reports need not read them all

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 09:00:00

New tables, filled from every closed interval already recorded
(:func:`cmbcluster.services.accounting.rebuild_rollups`); from then on the control plane adds to
them in the transaction that closes an interval. An index on the intervals' end: the part of a report
after its last midnight (today's, usually) is read from the intervals that ended since.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_rollups",
        sa.Column("span", sa.String(length=5), nullable=False),
        sa.Column("start_s", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("application", sa.String(length=63), nullable=False),
        sa.Column("preset", sa.String(length=40), nullable=False),
        sa.Column("seconds", sa.BigInteger(), nullable=False),
        sa.Column("cpu_seconds", sa.Float(), nullable=False),
        sa.Column("memory_gib_seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("span", "start_s", "user_id", "application", "preset"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_usage_rollups_user", "usage_rollups", ["user_id", "span", "start_s"])
    op.create_table(
        "storage_rollups",
        sa.Column("span", sa.String(length=5), nullable=False),
        sa.Column("start_s", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("storage_class", sa.String(length=20), nullable=False),
        sa.Column("byte_seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("span", "start_s", "user_id", "storage_class"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_storage_rollups_user", "storage_rollups", ["user_id", "span", "start_s"])
    op.create_index("ix_usage_intervals_end", "usage_intervals", ["end_s"])
    op.create_index("ix_storage_intervals_end", "storage_intervals", ["end_s"])
    from cmbcluster.services.accounting import rebuild_rollups

    rebuild_rollups(op.get_bind())


def downgrade() -> None:
    op.drop_index("ix_storage_intervals_end", table_name="storage_intervals")
    op.drop_index("ix_usage_intervals_end", table_name="usage_intervals")
    op.drop_index("ix_storage_rollups_user", table_name="storage_rollups")
    op.drop_table("storage_rollups")
    op.drop_index("ix_usage_rollups_user", table_name="usage_rollups")
    op.drop_table("usage_rollups")
