"""Backups and tasks as the CLI's ``--json`` and the REST API print them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from csbs.catalog.rows import BackupRow, DiskBackupRow, TaskRow


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def backup_json(row: BackupRow, disks: list[DiskBackupRow]) -> dict[str, Any]:
    """A backup as the CLI's ``--json`` prints it (the contract's fields, then extras)."""
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "server_id": row.server_id,
        "server_name": row.server_name,
        "server_type": row.server_type,
        "status": row.status,
        "kind": row.kind,
        "policy_id": row.policy_id,
        "parent_id": row.parent_id,
        "created_at": _iso(row.created_at),
        "finished_at": _iso(row.finished_at),
        "progress": row.progress,
        "size_bytes": row.size_bytes,
        "stored_bytes": row.stored_bytes,
        "disks": [
            {
                "disk_id": d.disk_id,
                "name": d.disk_name,
                "role": d.role,
                "size_bytes": d.size_bytes,
                "data_bytes": d.data_bytes,
                "stored_bytes": d.stored_bytes,
                "chunks_total": d.chunks_total,
                "chunks_uploaded": d.chunks_uploaded,
                "chunks_reused": d.chunks_reused,
                "chunks_zero": d.chunks_zero,
                "bytes_read": d.bytes_read,
                "read_mode": d.read_mode,
                "read_note": d.read_note,
            }
            for d in disks
        ],
        "snapshot_at": _iso(row.snapshot_at),
        "data_bytes": row.data_bytes,
        "error": row.error,
        "project": row.project,
        "verified_at": _iso(row.verified_at),
        "verify_status": row.verify_status or None,
        "verify_error": row.verify_error,
    }


def task_json(row: TaskRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "status": row.status,
        "backup_id": row.backup_id,
        "backup_name": row.backup_name,
        "server_id": row.server_id,
        "server_name": row.server_name,
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "progress": row.progress,
        "reason": row.reason,
        "detail": row.detail,
        "workflow_id": row.workflow_id,
        "project": row.project,
    }
