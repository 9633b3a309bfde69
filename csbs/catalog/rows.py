"""The catalog's tables (SQLModel rows) and what reads them raw: each row type, the
backup filter, and the times SQLite hands back naive."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Field, SQLModel

from csbs.model import BackedUpDisk, BackupKind, DiskRole


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; every stored time is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _ts() -> Any:
    return sa.Column(sa.DateTime(timezone=True), nullable=True)


class BackupRow(SQLModel, table=True):
    __tablename__ = "backups"
    #: Issue 16: a page of a project's backups is read by (created_at, id) descending, and
    #: the parent of a new incremental by (server_id, snapshot_at) descending.
    __table_args__ = (
        sa.Index("ix_backups_project_created", "project", "created_at", "id"),
        sa.Index("ix_backups_project_server_snapshot", "project", "server_id", "snapshot_at"),
    )

    id: str = Field(primary_key=True, max_length=64)
    project: str = Field(index=True, max_length=64)
    name: str = Field(index=True, max_length=300)
    description: str = Field(default="", max_length=255)
    server_id: str = Field(index=True, max_length=64)
    server_name: str = Field(default="", max_length=255)
    server_type: str = Field(default="", max_length=64)
    status: str = Field(index=True, max_length=32)
    kind: str = Field(default=BackupKind.MANUAL.value, max_length=32)
    policy_id: str | None = Field(default=None, max_length=64)
    parent_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), index=True))
    snapshot_at: datetime | None = Field(default=None, sa_column=_ts())
    finished_at: datetime | None = Field(default=None, sa_column=_ts())
    progress: int = 0
    size_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    data_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    stored_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    error: str | None = Field(default=None, sa_type=sa.Text)
    workflow_id: str | None = Field(default=None, max_length=255)
    #: The last verification (every chunk read and its digest checked): when, ok or
    #: failed, and what it found. A backup that failed verification is never restored.
    verified_at: datetime | None = Field(default=None, sa_column=_ts())
    verify_status: str = Field(default="", max_length=16)
    verify_error: str | None = Field(default=None, sa_type=sa.Text)
    #: The Temporal run that creates the backup: a step of any other run is refused.
    run_id: str | None = Field(default=None, max_length=64)
    #: S3 Object Lock (issue 17): its manifests and descriptor are locked in compliance
    #: mode until ``locked_until`` (it cannot be deleted before); every chunk it references
    #: at least until ``chunks_locked_until``. None: not locked.
    locked_until: datetime | None = Field(default=None, sa_column=_ts())
    chunks_locked_until: datetime | None = Field(default=None, sa_column=_ts())
    #: Replication to the second site (issue 17): "" (never), replicating, replicated or
    #: failed; when it last completed, and why it last failed.
    replica_status: str = Field(
        default="",
        sa_column=sa.Column(sa.String(16), nullable=False, server_default=""),
    )
    replicated_at: datetime | None = Field(default=None, sa_column=_ts())
    replica_error: str | None = Field(default=None, sa_type=sa.Text)


class DiskBackupRow(SQLModel, table=True):
    __tablename__ = "disk_backups"

    backup_id: str = Field(primary_key=True, max_length=64, foreign_key="backups.id")
    disk_id: str = Field(primary_key=True, max_length=64)
    disk_name: str = Field(default="", max_length=255)
    role: str = Field(default="data", max_length=16)
    size_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    data_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    stored_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    bytes_read: int = Field(default=0, sa_type=sa.BigInteger)
    chunks_total: int = 0
    chunks_uploaded: int = 0
    chunks_reused: int = 0
    chunks_zero: int = 0
    read_mode: str = Field(default="", max_length=32)
    #: Why the disk was read in full instead of by changed blocks (empty when it was not).
    read_note: str = Field(default="", max_length=500)
    progress: int = 0
    done: bool = False
    #: Every chunk this disk's manifest references is locked at least until then.
    chunks_locked_until: datetime | None = Field(default=None, sa_column=_ts())

    def view(self) -> BackedUpDisk:
        """The disk as the domain rules see it."""
        return BackedUpDisk(
            disk_id=self.disk_id,
            name=self.disk_name,
            role=DiskRole(self.role),
            size_bytes=self.size_bytes,
        )


class TaskRow(SQLModel, table=True):
    __tablename__ = "tasks"
    __table_args__ = (sa.Index("ix_tasks_project_started", "project", "started_at", "id"),)

    id: str = Field(primary_key=True, max_length=64)
    project: str = Field(index=True, max_length=64)
    kind: str = Field(index=True, max_length=16)
    status: str = Field(index=True, max_length=16)
    backup_id: str | None = Field(default=None, index=True, max_length=64)
    backup_name: str = Field(default="", max_length=300)
    server_id: str | None = Field(default=None, index=True, max_length=64)
    server_name: str = Field(default="", max_length=255)
    workflow_id: str | None = Field(default=None, max_length=255)
    started_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), index=True))
    finished_at: datetime | None = Field(default=None, sa_column=_ts())
    progress: int = 0
    reason: str | None = Field(default=None, sa_type=sa.Text)
    detail: str | None = Field(default=None, sa_type=sa.Text)
    #: The Temporal run of the task (reconciliation asks Temporal whether it still runs).
    run_id: str | None = Field(default=None, max_length=64)
    #: A running restore's progress per disk, JSON ``{disk_id: [done, total]}`` in chunks:
    #: its disks may be written by different workers, and ``progress`` is their sum.
    disks_progress: str | None = Field(default=None, sa_type=sa.Text)


class ServerLockRow(SQLModel, table=True):
    """A server's operation lock (B14): one backup or one restore at a time, the primary
    key makes a second claim fail. The row ``gc:<project>`` is the project's sweep lease.

    ``backup_id`` holds the owner: the backup id (backup), the restore task id (restore)
    or the sweep's token (gc); ``claimed_at`` is when it was taken, or for the sweep lease
    when it was last renewed (docs/format.md, "Locks and leases").
    """

    __tablename__ = "server_locks"

    server_id: str = Field(primary_key=True, max_length=80)
    backup_id: str = Field(max_length=64)
    claimed_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))
    operation: str = Field(
        default="backup",
        sa_column=sa.Column(sa.String(16), nullable=False, server_default="backup"),
    )


class SuspectChunkRow(SQLModel, table=True):
    """A chunk that a verify (or a restore's check) found missing or corrupt. Backups never
    reuse it: the next one that reads its data uploads it again, and the row goes."""

    __tablename__ = "suspect_chunks"

    project: str = Field(primary_key=True, max_length=64)
    chunk_id: str = Field(primary_key=True, max_length=64)
    problem: str = Field(max_length=16)
    backup_id: str | None = Field(default=None, max_length=64)
    found_at: datetime | None = Field(default=None, sa_column=_ts())


class HostRow(SQLModel, table=True):
    """A hypervisor host whose agent reported its servers (``python worker.py --host``)."""

    __tablename__ = "hosts"

    project: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=64)
    driver: str = Field(max_length=32)
    servers: int = 0
    seen_at: datetime | None = Field(default=None, sa_column=_ts())


class HostServerRow(SQLModel, table=True):
    """A server as its host's agent last saw it (the inventory): ``server`` is the JSON
    of :class:`csbs.model.Server`. The central worker reads it for servers it cannot
    reach itself."""

    __tablename__ = "host_servers"

    project: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)
    host: str = Field(index=True, max_length=64)
    server: str = Field(sa_type=sa.Text)
    seen_at: datetime | None = Field(default=None, sa_column=_ts())


class QuotaRow(SQLModel, table=True):
    """A tenant's own quota (B15), set with ``csbs quota set``; a limit left None falls
    back to the settings' default (``CSBS_QUOTA_DISK_BACKUPS``, ``CSBS_QUOTA_BYTES``), and
    0 means no limit for this tenant."""

    __tablename__ = "quotas"

    project: str = Field(primary_key=True, max_length=64)
    disk_backups: int | None = None
    bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    updated_at: datetime | None = Field(default=None, sa_column=_ts())


class UsageRow(SQLModel, table=True):
    """A tenant's stored chunk bytes: measured exactly by every sweep (which lists the
    chunks), plus what each backup committed since uploaded anew. A chunk that several
    backups share is counted once."""

    __tablename__ = "project_usage"

    project: str = Field(primary_key=True, max_length=64)
    stored_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    measured_at: datetime | None = Field(default=None, sa_column=_ts())


class ReplicaTombstoneRow(SQLModel, table=True):
    """A backup deleted from the primary that the replica may still hold (issue 17): the
    replica's sweep deletes its copy once ``created_at`` is ``CSBS_REPLICA_RETENTION_DAYS``
    old, then the row. A copy with neither a backup row nor a tombstone is left alone
    (after a lost catalog, nothing on the replica is deleted before a rebuild)."""

    __tablename__ = "replica_tombstones"

    project: str = Field(primary_key=True, max_length=64)
    backup_id: str = Field(primary_key=True, max_length=64)
    created_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))
    deleted_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))


class ApiTokenRow(SQLModel, table=True):
    """A token of the REST API and the console (issue 16): it acts in ``project`` only,
    with ``role`` (viewer, operator, admin). Only the SHA-256 of its secret is kept."""

    __tablename__ = "api_tokens"

    id: str = Field(primary_key=True, max_length=64)
    project: str = Field(index=True, max_length=64)
    name: str = Field(max_length=255)
    role: str = Field(max_length=16)
    secret_hash: str = Field(max_length=64)
    created_at: datetime | None = Field(default=None, sa_column=_ts())
    expires_at: datetime | None = Field(default=None, sa_column=_ts())
    revoked_at: datetime | None = Field(default=None, sa_column=_ts())
    last_used_at: datetime | None = Field(default=None, sa_column=_ts())


class AuditRow(SQLModel, table=True):
    """One change made through the API, the console or the CLI (issue 16): who, what, on
    what, when, and how it ended."""

    __tablename__ = "audit_log"
    __table_args__ = (sa.Index("ix_audit_log_project_at", "project", "at", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    project: str = Field(index=True, max_length=64)
    at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), index=True))
    #: ``token <name> (<id>)`` through the API and console; ``local <user>@<host>`` from
    #: the CLI.
    actor: str = Field(max_length=300)
    action: str = Field(max_length=64)
    target: str = Field(default="", max_length=1000)
    result: str = Field(max_length=16)
    reason: str | None = Field(default=None, sa_type=sa.Text)


class ConsoleSessionRow(SQLModel, table=True):
    """A signed-in console session (issue 16): made by logging in with a token, it acts as
    that token for as long as the token stays valid and the session has not expired. Only
    the SHA-256 of the cookie's secret is kept; ``csrf`` is what the session's forms
    carry."""

    __tablename__ = "console_sessions"

    id: str = Field(primary_key=True, max_length=64)
    token_id: str = Field(index=True, max_length=64)
    csrf: str = Field(max_length=64)
    created_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))
    expires_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))


class PolicyRow(SQLModel, table=True):
    """A backup policy; ``spec`` is the JSON of :class:`csbs.policy.PolicySpec`."""

    __tablename__ = "policies"

    id: str = Field(primary_key=True, max_length=64)
    project: str = Field(index=True, max_length=64)
    name: str = Field(max_length=255)
    enabled: bool = True
    spec: str = Field(sa_type=sa.Text)
    created_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))
    updated_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))


class BindingRow(SQLModel, table=True):
    """A server bound to a policy; the key makes it one policy per server (P6)."""

    __tablename__ = "policy_bindings"

    server_id: str = Field(primary_key=True, max_length=64)
    policy_id: str = Field(index=True, max_length=64, foreign_key="policies.id")
    project: str = Field(index=True, max_length=64)
    bound_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))


class BackupFilter(SQLModel):
    """Every filter of ``backup list``."""

    status: str | None = None
    server_id: str | None = None
    server_name: str | None = None
    server_type: str | None = None
    name: str | None = None
    id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    policy_id: str | None = None


def _fix_times(row: SQLModel, *names: str) -> None:
    """Make the row's stored times aware (SQLite hands them back naive) without marking the
    row changed: a read must never write (an UPDATE of a row deleted meanwhile fails)."""
    for name in names:
        value = getattr(row, name)
        if value is not None and value.tzinfo is None:
            set_committed_value(row, name, value.replace(tzinfo=UTC))


def _fix_backup(row: BackupRow) -> BackupRow:
    _fix_times(row, "created_at", "snapshot_at", "finished_at", "verified_at", "replicated_at")
    return row


def _fix_task(row: TaskRow) -> TaskRow:
    _fix_times(row, "started_at", "finished_at")
    return row
