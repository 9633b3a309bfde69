"""Immutable backups with S3 Object Lock (issue 17).

- ``backups.locked_until``: the backup's objects (manifests, descriptor) are locked in
  compliance mode until then; it cannot be deleted before (None: not locked).
- ``backups.chunks_locked_until`` and ``disk_backups.chunks_locked_until``: every chunk
  the backup (that disk) references is locked at least until then (a lock generation, at
  or after ``locked_until``). The next backup of the disk extends its reused chunks only
  when this falls short of its own lock date.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backups") as batch:
        batch.add_column(sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("chunks_locked_until", sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("disk_backups") as batch:
        batch.add_column(
            sa.Column("chunks_locked_until", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("disk_backups") as batch:
        batch.drop_column("chunks_locked_until")
    with op.batch_alter_table("backups") as batch:
        batch.drop_column("chunks_locked_until")
        batch.drop_column("locked_until")
