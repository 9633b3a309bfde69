"""Reading a snapshot and writing a disk over QEMU's NBD exports."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from csbs.drivers.base import SnapshotDisk
from csbs.drivers.common import (
    hash_zeros,
    merge_ranges,
)
from csbs.drivers.nbd import (
    ALLOCATION,
    STATE_DIRTY,
    STATE_ZERO,
    NbdClient,
    NbdError,
    dirty_bitmap_context,
)
from csbs.errors import (
    DriverError,
    InvalidState,
)

if TYPE_CHECKING:
    from csbs.drivers.qemu.driver import QemuDriver
    from csbs.drivers.qemu.snapshots import QemuSnapshots


def _hash_export(path: str, export: str) -> str:
    digest = hashlib.sha256()
    with NbdClient(path, export, [ALLOCATION]) as nbd:
        for offset, length, flags in nbd.extents(ALLOCATION):
            if flags & STATE_ZERO:
                hash_zeros(digest, length)
                continue
            for pos in range(offset, offset + length, 8 * 1024 * 1024):
                digest.update(nbd.read(pos, min(8 * 1024 * 1024, offset + length - pos)))
    return digest.hexdigest()


class QemuSnapshotReader:
    """Reads one disk of a snapshot from its NBD export."""

    def __init__(self, driver: QemuSnapshots, server_id: str, snapshot_id: str, disk: SnapshotDisk):
        self.driver = driver
        self.server_id = server_id
        self.snapshot_id = snapshot_id
        self.size_bytes = disk.size_bytes
        self.changed_since = disk.changed_since
        self.full_read_reason = disk.full_read_reason
        contexts = [ALLOCATION]
        self._dirty = dirty_bitmap_context(disk.changed_since) if disk.changed_since else None
        if self._dirty:
            contexts.append(self._dirty)
        try:
            self._nbd = NbdClient(
                driver._nbd_path(server_id), f"{snapshot_id}/{disk.disk_id}", contexts
            )
        except NbdError as exc:
            raise self._failure(exc) from exc

    def _failure(self, exc: NbdError) -> Exception:
        if not (self.driver._snap_dir(self.server_id, self.snapshot_id) / "snapshot.json").exists():
            return InvalidState(
                f"snapshot {self.snapshot_id} of server {self.server_id} was released; "
                f"its data can no longer be read"
            )
        with self.driver._lock(self.server_id, exclusive=True):
            if self.driver._pid(self.server_id) is None:
                return self.driver._lost(self.server_id, self.snapshot_id)
        if "refused" in str(exc) or "closed the connection" in str(exc):
            return InvalidState(
                f"snapshot {self.snapshot_id} of server {self.server_id} is no longer "
                f"exported (it is being released): {exc}"
            )
        return DriverError(f"reading snapshot {self.snapshot_id} over NBD failed: {exc}")

    def allocated_ranges(self) -> list[tuple[int, int]]:
        """Where the snapshot may hold data. QEMU does not serialise block status with
        copy-before-write: while a guest zeroes or discards a range, one scan can see the
        overlay before the old data is copied into it and the live disk after it was zeroed.
        The copy always lands before the guest's write, so a second scan that starts after
        the first ended sees it; the union of both is exact (never too little)."""
        try:
            first = self._nbd.ranges(ALLOCATION, 0, STATE_ZERO)
            second = self._nbd.ranges(ALLOCATION, 0, STATE_ZERO)
        except NbdError as exc:
            raise self._failure(exc) from exc
        return merge_ranges(first + second)

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        if self._dirty is None:
            return None
        try:
            return self._nbd.ranges(self._dirty, STATE_DIRTY, STATE_DIRTY)
        except NbdError as exc:
            raise self._failure(exc) from exc

    def read(self, offset: int, length: int) -> bytes | bytearray:
        length = min(length, self.size_bytes - offset)
        if length <= 0:
            return b""
        try:
            # Unfragmented: QEMU then reads every byte (serialised with copy-before-write)
            # instead of answering holes from block status.
            return self._nbd.read(offset, length, whole=True)
        except NbdError as exc:
            raise self._failure(exc) from exc

    def close(self) -> None:
        self._nbd.close()


class QemuDiskWriter:
    """Writes a stopped server's disk for restore through a writable NBD export of it."""

    def __init__(
        self, driver: QemuDriver, server_id: str, disk_id: str, size_bytes: int, nbd: NbdClient
    ):
        self.driver = driver
        self.server_id = server_id
        self.disk_id = disk_id
        self.size_bytes = size_bytes
        self._nbd = nbd

    def _wrap(self, exc: NbdError) -> DriverError:
        return DriverError(f"restore write to disk {self.disk_id} failed: {exc}")

    def write(self, offset: int, data: bytes) -> None:
        try:
            self._nbd.write(offset, data)
        except NbdError as exc:
            raise self._wrap(exc) from exc

    def zero(self, offset: int, length: int) -> None:
        try:
            self._nbd.write_zeroes(offset, length)
        except NbdError as exc:
            raise self._wrap(exc) from exc

    def close(self) -> None:
        try:
            self._nbd.flush()
        except NbdError as exc:
            raise self._wrap(exc) from exc
        finally:
            self._nbd.close()
            self.driver._close_writer(self.server_id, self.disk_id)
