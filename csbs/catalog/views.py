"""Backups and tasks as every entry point shows them: one view model each, which the REST
API uses as its ``response_model``, the CLI's ``--json`` prints and the console renders."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from csbs.catalog.rows import BackupRow, DiskBackupRow, TaskRow
from csbs.model import BackupKind, BackupStatus, DiskRole, TaskKind, TaskStatus, VerifyStatus


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


class DiskBackupView(BaseModel):
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
    def of(cls, d: DiskBackupRow) -> DiskBackupView:
        return cls(
            disk_id=d.disk_id,
            name=d.disk_name,
            role=DiskRole(d.role),
            size_bytes=d.size_bytes,
            data_bytes=d.data_bytes,
            stored_bytes=d.stored_bytes,
            chunks_total=d.chunks_total,
            chunks_uploaded=d.chunks_uploaded,
            chunks_reused=d.chunks_reused,
            chunks_zero=d.chunks_zero,
            bytes_read=d.bytes_read,
            read_mode=d.read_mode,
            read_note=d.read_note,
        )


class TaskView(BaseModel):
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
        return cls(
            id=row.id,
            kind=TaskKind(row.kind),
            status=TaskStatus(row.status),
            backup_id=row.backup_id,
            backup_name=row.backup_name,
            server_id=row.server_id,
            server_name=row.server_name,
            started_at=_iso(row.started_at),
            finished_at=_iso(row.finished_at),
            progress=row.progress,
            reason=row.reason,
            detail=row.detail,
            workflow_id=row.workflow_id,
            project=row.project,
        )


class BackupView(BaseModel):
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

    @classmethod
    def of(cls, row: BackupRow, disks: list[DiskBackupRow]) -> BackupView:
        return cls(
            id=row.id,
            name=row.name,
            description=row.description,
            server_id=row.server_id,
            server_name=row.server_name,
            server_type=row.server_type,
            status=BackupStatus(row.status),
            kind=BackupKind(row.kind),
            policy_id=row.policy_id,
            parent_id=row.parent_id,
            created_at=_iso(row.created_at),
            finished_at=_iso(row.finished_at),
            progress=row.progress,
            size_bytes=row.size_bytes,
            stored_bytes=row.stored_bytes,
            disks=[DiskBackupView.of(d) for d in disks],
            snapshot_at=_iso(row.snapshot_at),
            data_bytes=row.data_bytes,
            error=row.error,
            project=row.project,
            verified_at=_iso(row.verified_at),
            verify_status=VerifyStatus(row.verify_status) if row.verify_status else None,
            verify_error=row.verify_error,
        )

    def json_dict(self) -> dict[str, Any]:
        """As ``--json`` prints it and the API answers it (enums as their values)."""
        return self.model_dump(mode="json")


class BackupDetailView(BackupView):
    """A backup with every task that touched it."""

    tasks: list[TaskView]


def backup_json(row: BackupRow, disks: list[DiskBackupRow]) -> dict[str, Any]:
    """A backup as the CLI's ``--json`` prints it (see ``BackupView``)."""
    return BackupView.of(row, disks).json_dict()


def task_json(row: TaskRow) -> dict[str, Any]:
    """A task as the CLI's ``--json`` prints it (see ``TaskView``)."""
    return TaskView.of(row).model_dump(mode="json")
