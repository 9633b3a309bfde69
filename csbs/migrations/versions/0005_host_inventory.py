"""Host agents (issue 13): the hosts whose agents reported, and the servers each saw.

- ``hosts``: one row per host and project, with the agent's driver, how many servers it
  saw and when it last reported.
- ``host_servers``: the servers of every host as its agent last saw them (JSON), read by
  the central worker for servers on other hosts.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("driver", sa.String(length=32), nullable=False),
        sa.Column("servers", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("project", "name"),
    )
    op.create_table(
        "host_servers",
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=64), nullable=False),
        sa.Column("server", sa.Text(), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("project", "id"),
    )
    op.create_index("ix_host_servers_host", "host_servers", ["host"])


def downgrade() -> None:
    op.drop_index("ix_host_servers_host", table_name="host_servers")
    op.drop_table("host_servers")
    op.drop_table("hosts")
