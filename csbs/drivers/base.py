"""The compute driver contracts: ``ComputeDriver`` (what production needs: servers, power,
group snapshots, restored data) and ``DevServers`` (servers csbs makes and plays the guest
of, for ``csbs dev`` and the tests)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from csbs.errors import NotFound
from csbs.model import Disk, Server, ServerState


class SnapshotDisk(BaseModel):
    """One disk inside a group snapshot."""

    disk_id: str
    size_bytes: int
    #: Name of the checkpoint that the changed-block map of this snapshot starts from; None
    #: when the driver cannot tell what changed (then every allocated range must be read).
    changed_since: str | None = None
    #: Why the driver has no changed-block map for this disk (recorded with the backup).
    full_read_reason: str | None = None


class RestoreBaseline(BaseModel):
    """What a disk holds now, relative to a backup (delta restore): the backup whose
    snapshot its changed-block tracking started from, and the ranges written since. No
    ``backup_id`` means the driver cannot tell (``reason`` says why): the disk must be
    written whole."""

    backup_id: str | None = None
    changed: list[tuple[int, int]] = []
    reason: str = ""


class InstantSource(BaseModel):
    """One disk of an instant restore: csbs serves the backed-up disk read-only over NBD
    on ``socket`` as ``export``; the server's disk reads through to it until streamed."""

    disk_id: str
    size_bytes: int
    socket: str
    export: str


class StreamState(BaseModel):
    """How far the background copy of one instantly restored disk has come."""

    disk_id: str
    done: int = 0
    total: int = 0
    finished: bool = False
    #: The last error of the copy (it is started again), for the task's notes.
    error: str | None = None


class Snapshot(BaseModel):
    """A crash-consistent point-in-time image of all disks of one server."""

    id: str
    server_id: str
    checkpoint: str
    created_at: str
    disks: list[SnapshotDisk]

    def disk(self, disk_id: str) -> SnapshotDisk:
        for disk in self.disks:
            if disk.disk_id == disk_id:
                return disk
        raise KeyError(disk_id)

    @classmethod
    def taken_now(cls, server_id: str, snapshot_id: str, disks: list[SnapshotDisk]) -> Snapshot:
        """A snapshot taken now, its changed-block checkpoint named after it."""
        return cls(
            id=snapshot_id,
            server_id=server_id,
            checkpoint=snapshot_id,
            created_at=datetime.now(UTC).isoformat(),
            disks=disks,
        )

    @classmethod
    def disk_of_record(
        cls, record: dict[str, Any] | None, server_id: str, snapshot_id: str, disk_id: str
    ) -> SnapshotDisk:
        """A disk of the snapshot a driver recorded (``record["snapshot"]``); NotFound when
        the snapshot is not complete or does not hold the disk."""
        if record is None or not record.get("complete"):
            raise NotFound(f"snapshot {snapshot_id} of server {server_id} does not exist")
        try:
            return cls.model_validate(record["snapshot"]).disk(disk_id)
        except KeyError:
            raise NotFound(f"disk {disk_id} is not in snapshot {snapshot_id}") from None


class SnapshotReader(Protocol):
    """Reads one disk of a snapshot as it was at the snapshot's instant."""

    size_bytes: int
    #: The checkpoint that ``changed_ranges`` starts from (None: unknown).
    changed_since: str | None
    #: Why ``changed_since`` is None, when the driver knows (bitmap lost, disk resized, ...).
    full_read_reason: str | None

    def allocated_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) ranges that may hold data; everything else reads as zeros."""

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        """Ranges written since ``changed_since``, or None when unknown."""

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """The bytes at a range (a bytearray is fine: it is only read)."""

    def close(self) -> None: ...


class DiskWriter(Protocol):
    """Writes a disk of a stopped server (restore)."""

    size_bytes: int

    def write(self, offset: int, data: bytes) -> None: ...

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros without storing them (punch a hole)."""

    def close(self) -> None: ...


@runtime_checkable
class ComputeDriver(Protocol):
    """What csbs needs from a hypervisor in production: find servers and their disks, take
    a group snapshot and read it (allocated or changed ranges), stop and start a server,
    write restored data. A production driver never fakes a guest: see ``DevServers``."""

    name: str

    def list_servers(self) -> list[Server]: ...

    def get_server(self, server_id: str) -> Server: ...

    def stop(self, server_id: str) -> str | None:
        """Stop the server, gracefully where the driver can (the power button first);
        return a warning when it had to be forced off, else None."""

    def start(self, server_id: str) -> Server: ...

    def group_snapshot(self, server_id: str, snapshot_id: str) -> Snapshot:
        """Snapshot every disk at one instant and start a new changed-block checkpoint
        named ``snapshot_id``. Idempotent for the same id."""

    def open_snapshot(self, server_id: str, snapshot_id: str, disk_id: str) -> SnapshotReader: ...

    def release_snapshot(self, server_id: str, snapshot_id: str, committed: bool) -> None:
        """Drop the snapshot. If it was not committed as a backup, its changed blocks are
        folded back so the next incremental still sees them. Idempotent."""

    def snapshots(self, server_id: str) -> list[str]:
        """Ids of the snapshots the server holds now (diagnostics, reconciliation)."""

    def recreate_disk(self, server_id: str, like: Disk, size_bytes: int) -> Disk:
        """Re-create a disk that was removed since the backup (R5): same id, name and role,
        empty, ``size_bytes`` long; restore then writes it."""

    def open_disk_writer(self, server_id: str, disk_id: str, size_bytes: int) -> DiskWriter:
        """Open a disk of a stopped server for restore, resizing it to ``size_bytes``."""

    def instant_support(self) -> str | None:
        """Why this driver cannot restore instantly (run a server from its backup while
        the data is copied in the background), or None when it can."""
        ...

    def instant_socket(self, server_id: str, disk_id: str) -> str:
        """Where csbs must serve the disk's backup for an instant restore (the path an
        instant restore in progress recorded, else a new private one)."""
        ...

    def instant_backup(self, server_id: str) -> str | None:
        """The backup an instant restore of the server is still copying from, or None."""
        ...

    def instant_attach(self, server_id: str, backup_id: str, sources: list[InstantSource]) -> None:
        """Put each source disk in place of the server's disk, reading through to its NBD
        export, and run the server (stopped before, with each export being served)."""
        ...

    def instant_stream(self, server_id: str) -> list[StreamState]:
        """Move the background copy on (start or restart its jobs) and say how far it is.
        Once every disk is finished the server no longer depends on csbs."""
        ...

    def restore_baseline(self, server_id: str, disk_id: str) -> RestoreBaseline:
        """The backup a disk's changed-block tracking started from and what was written
        since (guest writes and restores alike), or why that is not known. Never too
        little: a doubt is no baseline."""


@runtime_checkable
class DevServers(ComputeDriver, Protocol):
    """Servers that csbs itself makes and plays the guest of, for ``csbs dev`` and the
    tests: ``local`` (sparse files) and ``qemu`` (guest-less QEMU processes)."""

    def create_server(
        self, name: str, disk_sizes: list[int], shared_disk_sizes: list[int] | None = None
    ) -> Server: ...

    def set_state(self, server_id: str, state: ServerState) -> Server: ...

    def write(self, server_id: str, disk_id: str, offset: int, data: bytes) -> None:
        """A guest write (the server must be running)."""

    def checksum(self, server_id: str) -> dict[str, str]:
        """sha256 hex of every disk's whole content."""

    def add_disk(self, server_id: str, size_bytes: int, like: Disk | None = None) -> Disk:
        """Attach a new empty data disk."""

    def resize_disk(self, server_id: str, disk_id: str, size_bytes: int) -> Disk: ...

    def remove_disk(self, server_id: str, disk_id: str) -> None: ...
