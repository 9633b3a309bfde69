"""Baseline: the catalog as csbs created it before migrations (issues 2-4).

A catalog made by ``SQLModel.metadata.create_all`` before Alembic arrived is stamped with
this revision and upgraded from here.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backups",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=300), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=False),
        sa.Column("server_id", sa.String(length=64), nullable=False),
        sa.Column("server_name", sa.String(length=255), nullable=False),
        sa.Column("server_type", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("policy_id", sa.String(length=64), nullable=True),
        sa.Column("parent_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("snapshot_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("data_bytes", sa.BigInteger(), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("workflow_id", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("backups", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_backups_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_backups_name"), ["name"], unique=False)
        batch_op.create_index(batch_op.f("ix_backups_project"), ["project"], unique=False)
        batch_op.create_index(batch_op.f("ix_backups_server_id"), ["server_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_backups_status"), ["status"], unique=False)

    op.create_table(
        "policies",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_policies_project"), ["project"], unique=False)

    op.create_table(
        "server_locks",
        sa.Column("server_id", sa.String(length=80), nullable=False),
        sa.Column("backup_id", sa.String(length=64), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("server_id"),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("backup_id", sa.String(length=64), nullable=True),
        sa.Column("backup_name", sa.String(length=300), nullable=False),
        sa.Column("server_id", sa.String(length=64), nullable=True),
        sa.Column("server_name", sa.String(length=255), nullable=False),
        sa.Column("workflow_id", sa.String(length=255), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tasks_backup_id"), ["backup_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_tasks_kind"), ["kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_tasks_project"), ["project"], unique=False)
        batch_op.create_index(batch_op.f("ix_tasks_server_id"), ["server_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_tasks_started_at"), ["started_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_tasks_status"), ["status"], unique=False)

    op.create_table(
        "disk_backups",
        sa.Column("backup_id", sa.String(length=64), nullable=False),
        sa.Column("disk_id", sa.String(length=64), nullable=False),
        sa.Column("disk_name", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("data_bytes", sa.BigInteger(), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("bytes_read", sa.BigInteger(), nullable=False),
        sa.Column("chunks_total", sa.Integer(), nullable=False),
        sa.Column("chunks_uploaded", sa.Integer(), nullable=False),
        sa.Column("chunks_reused", sa.Integer(), nullable=False),
        sa.Column("chunks_zero", sa.Integer(), nullable=False),
        sa.Column("read_mode", sa.String(length=32), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["backup_id"],
            ["backups.id"],
        ),
        sa.PrimaryKeyConstraint("backup_id", "disk_id"),
    )
    op.create_table(
        "policy_bindings",
        sa.Column("server_id", sa.String(length=64), nullable=False),
        sa.Column("policy_id", sa.String(length=64), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("bound_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["policies.id"],
        ),
        sa.PrimaryKeyConstraint("server_id"),
    )
    with op.batch_alter_table("policy_bindings", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_policy_bindings_policy_id"), ["policy_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_policy_bindings_project"), ["project"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("policy_bindings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_policy_bindings_project"))
        batch_op.drop_index(batch_op.f("ix_policy_bindings_policy_id"))

    op.drop_table("policy_bindings")
    op.drop_table("disk_backups")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tasks_status"))
        batch_op.drop_index(batch_op.f("ix_tasks_started_at"))
        batch_op.drop_index(batch_op.f("ix_tasks_server_id"))
        batch_op.drop_index(batch_op.f("ix_tasks_project"))
        batch_op.drop_index(batch_op.f("ix_tasks_kind"))
        batch_op.drop_index(batch_op.f("ix_tasks_backup_id"))

    op.drop_table("tasks")
    op.drop_table("server_locks")
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_policies_project"))

    op.drop_table("policies")
    with op.batch_alter_table("backups", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_backups_status"))
        batch_op.drop_index(batch_op.f("ix_backups_server_id"))
        batch_op.drop_index(batch_op.f("ix_backups_project"))
        batch_op.drop_index(batch_op.f("ix_backups_name"))
        batch_op.drop_index(batch_op.f("ix_backups_created_at"))

    op.drop_table("backups")
