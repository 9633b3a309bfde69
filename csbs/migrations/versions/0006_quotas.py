"""Quotas per tenant (issue 15, B15), and restore progress per disk.

- ``quotas``: a tenant's own limits on disk backups and stored bytes (None: the default
  from the settings).
- ``project_usage``: a tenant's stored chunk bytes, measured by every sweep and added to by
  every committed backup.
- ``tasks.disks_progress``: a running restore's progress per disk (B9, T1).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quotas",
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("disk_backups", sa.Integer(), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("project"),
    )
    op.create_table(
        "project_usage",
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("measured_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("project"),
    )

    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("disks_progress", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("disks_progress")
    op.drop_table("project_usage")
    op.drop_table("quotas")
