"""backups.verified_at, verify_status, verify_error: the last verification of a backup
(issue 7).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backups") as batch:
        batch.add_column(sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("verify_status", sa.String(length=16), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("verify_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("backups") as batch:
        batch.drop_column("verify_error")
        batch.drop_column("verify_status")
        batch.drop_column("verified_at")
