"""Indexes for lists that scale, and console sessions (issue 16).

A page of backups, tasks or operation log entries is read by key (``csbs.paging``): the
project, then the time and id descending. The parent of a new incremental backup is the
newest available backup of its server.

``console_sessions``: who is signed in to the console, by the hash of the cookie's secret.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

INDEXES = [
    ("ix_backups_project_created", "backups", ["project", "created_at", "id"]),
    ("ix_backups_project_server_snapshot", "backups", ["project", "server_id", "snapshot_at"]),
    ("ix_tasks_project_started", "tasks", ["project", "started_at", "id"]),
    ("ix_audit_log_project_at", "audit_log", ["project", "at", "id"]),
]


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("token_id", sa.String(length=64), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_console_sessions_token_id", "console_sessions", ["token_id"])


def downgrade() -> None:
    op.drop_index("ix_console_sessions_token_id", table_name="console_sessions")
    op.drop_table("console_sessions")
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
