"""Backups and tasks as every entry point shows them: one view model each, which the REST
API uses as its ``response_model``, the CLI's ``--json`` prints and the console renders."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, field_validator

from csbs.catalog.rows import BackupRow, DiskBackupRow, TaskRow
from csbs.model import BackupKind, BackupStatus, DiskRole, TaskKind, TaskStatus, VerifyStatus


class View(BaseModel):
    """A view of catalog rows: times as ISO strings (as ``--json`` has always printed
    them), enums by value, unknown fields of the rows left out."""

    @field_validator("*", mode="before")
    @classmethod
    def _times(cls, value: Any) -> Any:
        return value.isoformat() if isinstance(value, datetime) else value


class DiskBackupView(View):
    """One disk of a backup: its size, what was read and what was stored."""

    disk_id: str
    name: str
    role: DiskRole
    size_bytes: int
    data_bytes: int
    stored_bytes: int
    chunks_total: int
    chunks_uploaded: int
    chunks_reused: int
    chunks_zero: int
    bytes_read: int
    read_mode: str
    read_note: str

    @classmethod
    def of(cls, row: DiskBackupRow) -> DiskBackupView:
        return cls.model_validate({**row.model_dump(), "name": row.disk_name})


class TaskView(View):
    """One task: a backup, restore, verify or delete, with its status and reason."""

    id: str
    kind: TaskKind
    status: TaskStatus
    backup_id: str | None
    backup_name: str
    server_id: str | None
    server_name: str
    started_at: str | None
    finished_at: str | None
    progress: int
    reason: str | None
    detail: str | None
    workflow_id: str | None
    project: str

    @classmethod
    def of(cls, row: TaskRow) -> TaskView:
        return cls.model_validate(row.model_dump())


class BackupView(View):
    """A backup (the contract's fields first, then extras) with its disks."""

    id: str
    name: str
    description: str
    server_id: str
    server_name: str
    server_type: str
    status: BackupStatus
    kind: BackupKind
    policy_id: str | None
    parent_id: str | None
    created_at: str | None
    finished_at: str | None
    progress: int
    size_bytes: int
    stored_bytes: int
    disks: list[DiskBackupView]
    snapshot_at: str | None
    data_bytes: int
    error: str | None
    project: str
    verified_at: str | None
    verify_status: VerifyStatus | None
    verify_error: str | None
    #: S3 Object Lock (issue 17): it cannot be deleted before then (None: not locked).
    locked_until: str | None = None
    #: Replication to the second site (issue 17): None (never), replicating, replicated
    #: or failed; when it last completed; why it last failed.
    replica_status: str | None = None
    replicated_at: str | None = None
    replica_error: str | None = None

    @classmethod
    def of(cls, row: BackupRow, disks: list[DiskBackupRow]) -> BackupView:
        return cls.model_validate(
            {
                **row.model_dump(),
                "disks": [DiskBackupView.of(d) for d in disks],
                "verify_status": row.verify_status or None,
                "replica_status": row.replica_status or None,
            }
        )

    def json_dict(self) -> dict[str, Any]:
        """As ``--json`` prints it and the API answers it (enums as their values)."""
        return self.model_dump(mode="json")


class DiskBackupListView(DiskBackupView):
    """A disk backup with the server backup it is part of (guide 1.6, 4.4 Q2): every
    server backup is also one disk backup per disk, each restorable on its own (R7)."""

    backup_id: str
    backup_name: str
    status: BackupStatus
    kind: BackupKind
    server_id: str
    server_name: str
    policy_id: str | None
    created_at: str | None
    progress: int

    @classmethod
    def of_backup(cls, row: BackupRow, disk: DiskBackupRow) -> DiskBackupListView:
        return cls.model_validate(
            {
                **DiskBackupView.of(disk).model_dump(),
                "backup_id": row.id,
                "backup_name": row.name,
                "status": row.status,
                "kind": row.kind,
                "server_id": row.server_id,
                "server_name": row.server_name,
                "policy_id": row.policy_id,
                "created_at": row.created_at,
                "progress": row.progress,
            }
        )


class BackupDetailView(BackupView):
    """A backup with every task that touched it."""

    tasks: list[TaskView]


def backup_json(row: BackupRow, disks: list[DiskBackupRow]) -> dict[str, Any]:
    """A backup as the CLI's ``--json`` prints it (see ``BackupView``)."""
    return BackupView.of(row, disks).json_dict()


def task_json(row: TaskRow) -> dict[str, Any]:
    """A task as the CLI's ``--json`` prints it (see ``TaskView``)."""
    return TaskView.of(row).model_dump(mode="json")
