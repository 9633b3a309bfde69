"""Pure rules of backup and restore (B8, B12, R4, R5), on domain types only: which states
allow what, when a disk must be read in full, what a backup warns about, and which
backed-up disk goes onto which disk of the server; requests as every entry point makes
them (B7 names, ISO times, which task records may go). No I/O, no catalog rows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

from pydantic import BaseModel, ValidationInfo, field_validator

from csbs.errors import InvalidInput
from csbs.format import Manifest
from csbs.model import (
    BackedUpDisk,
    BackupServerInput,
    BackupStatus,
    DiskRole,
    RestoreItem,
    Server,
    ServerState,
    TaskStatus,
    check_id,
)
from csbs.naming import default_name, numbered

BACKUP_STATES = {ServerState.RUNNING, ServerState.STOPPED}
RESTORE_REFUSED_STATES = {ServerState.FAULT, ServerState.RESIZING, ServerState.RESIZE_VERIFYING}
#: Servers larger than this get a warning (B8): their backups take long.
LARGE_SERVER_BYTES = 4 * 1024**4
DELETABLE = {BackupStatus.AVAILABLE, BackupStatus.ERROR, BackupStatus.DELETE_FAILED}


class ChangeTracking(Protocol):
    """What a snapshot reader says about the changes it can name (drivers' readers)."""

    size_bytes: int
    changed_since: str | None
    full_read_reason: str | None


def full_read_note(
    reader: ChangeTracking, parent: Manifest | None, parent_id: str | None
) -> str | None:
    """Why a disk must be read in full (allocated ranges, diffed by chunk id) rather than
    by its changed blocks; None when the changed blocks since the parent can be trusted."""
    if parent_id is None:
        return "first backup of this server: every allocated range is read"
    if parent is None:
        return "the disk is not in the parent backup: every allocated range is read"
    if parent.size_bytes != reader.size_bytes:
        return (
            f"the disk changed size since the parent backup ({parent.size_bytes} -> "
            f"{reader.size_bytes} bytes): every allocated range is read"
        )
    if reader.changed_since != parent_id:
        why = reader.full_read_reason or (
            f"changed blocks are tracked since {reader.changed_since}, not since the parent "
            f"backup {parent_id}"
        )
        return f"{why}: every allocated range is read and diffed by chunk"
    return None


def backup_warnings(server: Server) -> list[str]:
    """Warnings a backup of ``server`` carries but does not refuse on (B8)."""
    if server.size_bytes > LARGE_SERVER_BYTES:
        return [
            f"server {server.id} has {server.size_bytes / 1024**4:.1f} TiB of disks (over 4 TiB): "
            f"its backups will take long"
        ]
    return []


def _shown(value: str) -> str:
    """An id as a person should see it in a message: quoted when it is not a plain id."""
    try:
        return check_id(value)
    except ValueError:
        return repr(value)


def plan_disk_mapping(
    server: Server,
    disks: list[BackedUpDisk],
    mapping: dict[str, str],
    only: list[str] | None = None,
) -> tuple[list[RestoreItem], list[str]]:
    """Decide which backed-up disk goes onto which disk of the server (R4).

    Default: each disk onto itself; a one-disk backup of a server that has one disk goes
    onto that disk even if it was replaced. Rules: a mapped source must be in the backup, a target
    must be a disk of the server with capacity not smaller than the source, a data disk
    never goes onto the system disk, and no target is used twice.
    """
    by_id = {d.disk_id: d for d in disks}
    for src in [*mapping, *(only or [])]:
        if src not in by_id:
            raise InvalidInput(f"disk_mapping: disk {_shown(src)} is not in this backup")
    chosen = [d for d in disks if not only or d.disk_id in only]
    for src in mapping:
        if only and src not in only:
            raise InvalidInput(
                f"disk_mapping: disk {_shown(src)} is mapped but not chosen for restore"
            )
    items: list[RestoreItem] = []
    warnings: list[str] = []
    targets_used: set[str] = set()
    server_disks = {d.id: d for d in server.disks}
    for disk in chosen:
        target_id = mapping.get(disk.disk_id, disk.disk_id)
        target = server_disks.get(target_id)
        if target is None and not mapping and len(disks) == 1 and len(server.disks) == 1:
            # R4, guide 3.1.2: a server with one disk is restored onto its one disk, even
            # when that disk was replaced since the backup.
            target_id, target = server.disks[0].id, server.disks[0]
            warnings.append(
                f"disk {disk.disk_id} was replaced since the backup: restored onto the "
                f"server's one disk {target_id}"
            )
        if target is None and disk.disk_id not in mapping:
            # R5: the disk was removed since the backup; it comes back as it was.
            warnings.append(f"disk {disk.disk_id} was removed since the backup: it is re-created")
            items.append(
                RestoreItem(
                    source_disk_id=disk.disk_id,
                    target_disk_id=disk.disk_id,
                    size_bytes=disk.size_bytes,
                    create=True,
                    name=disk.name,
                    role=disk.role,
                )
            )
            targets_used.add(disk.disk_id)
            continue
        if target is None:
            raise InvalidInput(
                f"disk_mapping: disk {_shown(target_id)} is not a disk of server {server.id}"
            )
        if target_id != disk.disk_id and target.size_bytes < disk.size_bytes:
            raise InvalidInput(
                f"disk_mapping: target disk {target_id} ({target.size_bytes} bytes) is smaller "
                f"than backed-up disk {disk.disk_id} ({disk.size_bytes} bytes)"
            )
        if disk.role == DiskRole.DATA and target.role == DiskRole.SYSTEM:
            raise InvalidInput(
                f"disk_mapping: data disk {disk.disk_id} cannot be restored onto system disk "
                f"{target_id}"
            )
        if target_id in targets_used:
            raise InvalidInput(f"disk_mapping: target disk {target_id} is used more than once")
        targets_used.add(target_id)
        items.append(
            RestoreItem(
                source_disk_id=disk.disk_id, target_disk_id=target_id, size_bytes=disk.size_bytes
            )
        )
    if only:
        warnings.append(
            f"only disk(s) {', '.join(only)} restored: the server's other disks keep their "
            f"current data, so data across disks may not be consistent"
        )
    elif len(server.disks) > len(disks):
        warnings.append(
            f"server {server.id} now has {len(server.disks)} disks, the backup {len(disks)}: "
            f"disks not in the backup keep their data, so data across disks may not be consistent"
        )
    return items, warnings


def backup_requests(
    server_ids: list[str], name: str | None, description: str | None, offline: bool
) -> list[BackupServerInput]:
    """One validated request per server; names numbered -0001, -0002, ... for several (B7)."""
    if not server_ids:
        raise InvalidInput("server_ids: give at least one server")
    if len(set(server_ids)) != len(server_ids):
        raise InvalidInput("server_ids: a server is listed twice")
    base = name or default_name("manual")
    return [
        BackupServerInput(
            server_id=sid,
            name=numbered(base, i, len(server_ids)),
            description=description,
            offline=offline,
        )
        for i, sid in enumerate(server_ids)
    ]


class BackupQuery(BaseModel):
    """The filters of ``csbs backup list`` and ``GET /v1/backups`` (B11); ``since`` and
    ``until`` are ISO dates or times, UTC unless they say otherwise."""

    status: BackupStatus | None = None
    server_id: str | None = None
    server_name: str | None = None
    server_type: str | None = None
    name: str | None = None
    id: str | None = None
    since: str | None = None
    until: str | None = None

    @field_validator("since", "until")
    @classmethod
    def _time(cls, value: str | None, info: ValidationInfo) -> str | None:
        parse_time(value, info.field_name or "time")
        return value

    def since_time(self) -> datetime | None:
        return parse_time(self.since, "since")

    def until_time(self) -> datetime | None:
        return parse_time(self.until, "until")


def parse_time(value: str | None, field: str) -> datetime | None:
    """An ISO date or time (UTC unless it says otherwise), or InvalidInput naming the field."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _BadTime(
            f"{field} must be an ISO date or time like 2026-11-25 or 2026-11-25T08:00 "
            f"(got {value!r})"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class _BadTime(InvalidInput, ValueError):
    """A time that is not ISO: an InvalidInput for callers, a ValueError for pydantic."""


def deletable_tasks(tasks: list[tuple[str, str]]) -> list[str]:
    """T2: only failed task records may be deleted; ``tasks`` are (id, status) pairs. The
    ids, or InvalidInput listing every record that is not failed."""
    not_failed = [f"{tid} ({status})" for tid, status in tasks if status != TaskStatus.FAILED]
    if not_failed:
        raise InvalidInput(f"only failed task records can be deleted: {', '.join(not_failed)}")
    return [tid for tid, _ in tasks]
