"""disk_backups.read_note: why a disk was read in full rather than by changed blocks
(issue 5). Catalogs created by ``create_all`` after issue 5 already have the column.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("disk_backups")}
    if "read_note" in columns:
        return
    with op.batch_alter_table("disk_backups") as batch:
        batch.add_column(
            sa.Column("read_note", sa.String(length=500), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("disk_backups") as batch:
        batch.drop_column("read_note")
