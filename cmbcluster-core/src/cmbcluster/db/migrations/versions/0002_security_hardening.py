"""security hardening: verified addresses, single-use sign-in states, encrypted variables

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 02:30:00

- ``users.email_verified``: existing accounts start unverified; their next verified sign-in sets it.
- ``used_tokens``: sign-in states and exchanged ID tokens, each usable once.
- ``env_vars.value`` (plaintext) becomes ``env_vars.ciphertext``, sealed with the control plane's
  secret key, which core hands over as ``config.attributes["secret_key"]``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import cmbcluster.db.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Checked before any change: SQLite runs DDL outside the transaction, so a migration that
    # stopped half-way could not be rolled back.
    connection = op.get_bind()
    rows = connection.execute(sa.text("SELECT id, value FROM env_vars")).all()
    key = op.get_context().config.attributes.get("secret_key") if op.get_context().config else None
    if rows and not key:
        raise RuntimeError(
            "encrypting stored environment variables needs the control plane's secret key: "
            "run `cmbcluster db upgrade` (or start the server) instead of alembic directly"
        )

    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("email_verified", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "used_tokens",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("expires_at", cmbcluster.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    with op.batch_alter_table("used_tokens") as batch:
        batch.create_index(batch.f("ix_used_tokens_expires_at"), ["expires_at"], unique=False)

    with op.batch_alter_table("env_vars") as batch:
        batch.add_column(sa.Column("ciphertext", sa.LargeBinary(), nullable=True))
    if rows:
        from cmbcluster.security import Sealer

        sealer = Sealer(key, "env-vars")
        for row_id, value in rows:
            connection.execute(
                sa.text("UPDATE env_vars SET ciphertext = :c WHERE id = :i"),
                {"c": sealer.seal(value.encode()), "i": row_id},
            )
    with op.batch_alter_table("env_vars") as batch:
        batch.alter_column("ciphertext", existing_type=sa.LargeBinary(), nullable=False)
        batch.drop_column("value")


def downgrade() -> None:
    raise NotImplementedError("0002 encrypts stored values: restore a backup taken before it to go back")
