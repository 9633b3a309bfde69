"""Operation safety (issue 14): the run that owns a backup or task, the operation that
holds a server's lock, and chunks that verification found missing or corrupt.

- ``backups.run_id`` and ``tasks.run_id``: the Temporal run that owns the row. A step of
  another run (a reset, a reused id) is refused and changes nothing; a row whose run has
  closed without finishing it is reconciled.
- ``server_locks.operation``: ``backup``, ``restore`` or ``gc`` (the project's sweep lease);
  ``server_locks.backup_id`` holds the owner (backup id, restore task id or sweep token).
- ``suspect_chunks``: chunk ids that a verify or restore check found missing or corrupt;
  the next backup that reads their data uploads them again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backups") as batch:
        batch.add_column(sa.Column("run_id", sa.String(length=64), nullable=True))
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("run_id", sa.String(length=64), nullable=True))
    with op.batch_alter_table("server_locks") as batch:
        batch.add_column(
            sa.Column("operation", sa.String(length=16), nullable=False, server_default="backup")
        )
    op.create_table(
        "suspect_chunks",
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("chunk_id", sa.String(length=64), nullable=False),
        sa.Column("problem", sa.String(length=16), nullable=False),
        sa.Column("backup_id", sa.String(length=64), nullable=True),
        sa.Column("found_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("project", "chunk_id"),
    )


def downgrade() -> None:
    op.drop_table("suspect_chunks")
    with op.batch_alter_table("server_locks") as batch:
        batch.drop_column("operation")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("run_id")
    with op.batch_alter_table("backups") as batch:
        batch.drop_column("run_id")
