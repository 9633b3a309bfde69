"""Replication to a second site (issue 17).

- ``backups.replica_status``: "" (never replicated), replicating, replicated or failed.
- ``backups.replicated_at``: when its last replication completed.
- ``backups.replica_error``: why its last replication (or replica verify) failed.
- ``replica_tombstones``: backups deleted from the primary whose replica copies are kept
  until the replica's retention lets them go.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backups") as batch:
        batch.add_column(
            sa.Column("replica_status", sa.String(16), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("replicated_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("replica_error", sa.Text(), nullable=True))
    op.create_table(
        "replica_tombstones",
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("backup_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("project", "backup_id"),
    )


def downgrade() -> None:
    op.drop_table("replica_tombstones")
    with op.batch_alter_table("backups") as batch:
        batch.drop_column("replica_error")
        batch.drop_column("replicated_at")
        batch.drop_column("replica_status")
