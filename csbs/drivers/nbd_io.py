"""Reading a snapshot and writing a disk over an NBD export: what the ``qemu`` and
``libvirt`` drivers share. A driver subclasses the reader to turn a protocol error into the
reason a person can act on (snapshot released, process gone, ...)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from csbs.drivers.base import SnapshotDisk
from csbs.drivers.common import hash_zeros, merge_ranges
from csbs.drivers.nbd import (
    ALLOCATION,
    STATE_DIRTY,
    STATE_ZERO,
    NbdClient,
    NbdError,
)
from csbs.errors import DriverError

#: How much one hashing read asks for.
HASH_PIECE = 8 * 1024 * 1024


def hash_export(path: str, export: str) -> str:
    """sha256 hex of a whole export (holes hashed as zeros without reading them)."""
    digest = hashlib.sha256()
    with NbdClient(path, export, [ALLOCATION]) as nbd:
        for offset, length, flags in nbd.extents(ALLOCATION):
            if flags & STATE_ZERO:
                hash_zeros(digest, length)
                continue
            for pos in range(offset, offset + length, HASH_PIECE):
                digest.update(nbd.read(pos, min(HASH_PIECE, offset + length - pos)))
    return digest.hexdigest()


class NbdSnapshotReader:
    """Reads one disk of a snapshot from a point-in-time NBD export (QEMU's fleecing node,
    libvirt's pull-mode backup). ``dirty_context`` is the export's changed-block bitmap
    (``qemu:dirty-bitmap:<name>``), when it has one."""

    def __init__(
        self, socket_path: str, export: str, disk: SnapshotDisk, dirty_context: str | None
    ) -> None:
        self.size_bytes = disk.size_bytes
        self.changed_since = disk.changed_since
        self.full_read_reason = disk.full_read_reason
        self._dirty = dirty_context if disk.changed_since else None
        contexts = [ALLOCATION] + ([self._dirty] if self._dirty else [])
        try:
            self._nbd = NbdClient(socket_path, export, contexts)
        except NbdError as exc:
            raise self._failure(exc) from exc

    def _failure(self, exc: NbdError) -> Exception:
        """The error to raise for a protocol failure (drivers say why it happened)."""
        return DriverError(f"reading the snapshot over NBD failed: {exc}")

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


class NbdDiskWriter:
    """Writes a stopped server's disk for restore through a writable NBD export of it;
    ``on_close`` removes the export once the data is flushed."""

    def __init__(
        self, disk_id: str, size_bytes: int, nbd: NbdClient, on_close: Callable[[], None]
    ) -> None:
        self.disk_id = disk_id
        self.size_bytes = size_bytes
        self._nbd = nbd
        self._on_close = on_close

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
            self._on_close()
