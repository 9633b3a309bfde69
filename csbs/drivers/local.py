"""The ``local`` driver: servers as directories of sparse raw disk files, no hypervisor.

Layout of one server::

    <servers_dir>/<server_id>/server.json         id, name, type, state, disks, project
    <servers_dir>/<server_id>/lock                 flock: writers exclusive, readers shared
    <servers_dir>/<server_id>/disks/<disk>.raw     sparse raw image
    <servers_dir>/<server_id>/cbt/<disk>.json      {"checkpoint": name | null}
    <servers_dir>/<server_id>/cbt/<disk>.bits      blocks written since that checkpoint
    <servers_dir>/<server_id>/snapshots/<id>/      one group snapshot:
        snapshot.json, <disk>.cow (preserved old blocks), <disk>.map (which blocks),
        <disk>.cbt (the changed blocks frozen at the snapshot's instant)

Every guest write goes through :meth:`LocalDriver.write`, which holds the server's lock
exclusively, copies the old content of each block it is about to overwrite into every
active snapshot that has not preserved it yet (copy-before-write), writes, and marks the
block in the changed-block bitmap. A group snapshot is taken under the same lock for all
disks at once, so it is one instant across disks (crash-consistent). Locks are ``flock``
on a file, so they hold between the worker and ``csbs dev server write`` processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from csbs.drivers.base import RestoreBaseline, Snapshot, SnapshotDisk
from csbs.drivers.common import (
    DirectoryDriver,
    NoInstantRestore,
    hash_zeros,
    merge_ranges,
    write_json,
)

#: Why a disk without a checkpoint is read whole.
from csbs.drivers.sparse import (
    BLOCK_SIZE,
    _Bitmap,
    _blocks,
    _blocks_to_ranges,
    data_ranges,
    punch_hole,
)
from csbs.errors import (
    CsbsError,
    DiskUnavailable,
    DriverError,
    InvalidInput,
    InvalidState,
    NotFound,
)
from csbs.model import Disk, Server, ServerState, check_id

NO_CHECKPOINT = (
    "no changed-block checkpoint: the disk is new, was resized or restored, or was never backed up"
)


class LocalDriver(NoInstantRestore, DirectoryDriver):
    """Servers as directories; see the module docstring."""

    name = "local"
    instant_reason = (
        "the local driver has no hypervisor to run a server from its backup; instant "
        "restore needs the qemu or libvirt driver"
    )

    def _disk_path(self, server_id: str, disk_id: str) -> Path:
        return self._dir(server_id) / "disks" / f"{check_id(disk_id, 'disk_id')}.raw"

    def create_server(
        self, name: str, disk_sizes: list[int], shared_disk_sizes: list[int] | None = None
    ) -> Server:
        server = self._new_server(name, disk_sizes, shared_disk_sizes)
        server_id = server.id
        for disk in server.disks:
            with open(self._disk_path(server_id, disk.id), "wb") as f:
                f.truncate(disk.size_bytes)
            self._set_checkpoint(server_id, disk.id, None)
        self._save(server)
        return server

    def set_state(self, server_id: str, state: ServerState) -> Server:
        with self._lock(server_id, exclusive=True):
            server = self.get_server(server_id)
            server.state = ServerState(state)
            self._save(server)
            return server

    def stop(self, server_id: str) -> str | None:
        with self._lock(server_id, exclusive=True):
            server = self.get_server(server_id)
            if server.state == ServerState.RUNNING:
                server.state = ServerState.STOPPED
                self._save(server)
            elif server.state != ServerState.STOPPED:
                raise InvalidState(f"server {server_id} is {server.state}; it cannot be stopped")
            return None

    def start(self, server_id: str) -> Server:
        with self._lock(server_id, exclusive=True):
            server = self.get_server(server_id)
            if server.state == ServerState.STOPPED:
                server.state = ServerState.RUNNING
                self._save(server)
            elif server.state != ServerState.RUNNING:
                raise InvalidState(f"server {server_id} is {server.state}; it cannot be started")
            return server

    # -- changed-block tracking ----------------------------------------------------------
    def _cbt_meta(self, server_id: str, disk_id: str) -> Path:
        return self._dir(server_id) / "cbt" / f"{disk_id}.json"

    def _cbt_bits(self, server_id: str, disk_id: str) -> _Bitmap:
        return _Bitmap(self._dir(server_id) / "cbt" / f"{disk_id}.bits")

    def _checkpoint(self, server_id: str, disk_id: str) -> str | None:
        try:
            value = json.loads(self._cbt_meta(server_id, disk_id).read_text()).get("checkpoint")
        except FileNotFoundError:
            return None
        return str(value) if value else None

    def _set_checkpoint(self, server_id: str, disk_id: str, name: str | None) -> None:
        write_json(self._cbt_meta(server_id, disk_id), {"checkpoint": name})

    # -- writes -----------------------------------------------------------------------------
    def _write_locked(
        self,
        server_id: str,
        disk_id: str,
        fd: int,
        size: int,
        offset: int,
        data: bytes | None,
        length: int,
    ) -> None:
        """Write (or zero when ``data`` is None) under the exclusive lock, with COW + CBT."""
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidInput(
                f"offset/length: range {offset}+{length} is outside the disk ({size} bytes)"
            )
        if length == 0:
            return
        blocks = _blocks(offset, length)
        for snap in self._active_snapshots(server_id):
            snap_size = json.loads((snap / "snapshot.json").read_text())["sizes"].get(disk_id)
            if snap_size is None:
                continue
            cow_map = _Bitmap(snap / f"{disk_id}.map")
            todo = [
                b
                for b, done in zip(blocks, cow_map.test(blocks), strict=True)
                if not done and b * BLOCK_SIZE < snap_size
            ]
            if not todo:
                continue
            cow_fd = os.open(snap / f"{disk_id}.cow", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                for b in todo:
                    start = b * BLOCK_SIZE
                    old = os.pread(fd, min(BLOCK_SIZE, snap_size - start), start)
                    if old.count(0) != len(old):
                        os.pwrite(cow_fd, old, start)
            finally:
                os.close(cow_fd)
            cow_map.set(todo)
        # Mark before writing: a writer that dies in between over-reports, never misses.
        self._cbt_bits(server_id, disk_id).set(blocks)
        if data is None:
            punch_hole(fd, offset, length)
        else:
            os.pwrite(fd, data, offset)

    def write(self, server_id: str, disk_id: str, offset: int, data: bytes) -> None:
        with self._lock(server_id, exclusive=True):
            server = self.get_server(server_id)
            if server.state != ServerState.RUNNING:
                raise InvalidState(
                    f"server {server_id} is {server.state}; guest writes need a running server"
                )
            disk = self._find_disk(server, disk_id)
            fd = os.open(self._disk_path(server_id, disk_id), os.O_RDWR)
            try:
                self._write_locked(server_id, disk_id, fd, disk.size_bytes, offset, data, len(data))
            finally:
                os.close(fd)

    def checksum(self, server_id: str) -> dict[str, str]:
        with self._lock(server_id, exclusive=False):
            server = self.get_server(server_id)
            sums: dict[str, str] = {}
            for disk in server.disks:
                digest = hashlib.sha256()
                with open(self._disk_path(server_id, disk.id), "rb") as f:
                    fd = f.fileno()
                    pos = 0
                    for start, length in data_ranges(fd, disk.size_bytes):
                        hash_zeros(digest, start - pos)
                        f.seek(start)
                        remaining = length
                        while remaining:
                            block = f.read(min(remaining, 8 * 1024 * 1024))
                            digest.update(block)
                            remaining -= len(block)
                        pos = start + length
                    hash_zeros(digest, disk.size_bytes - pos)
                sums[disk.id] = digest.hexdigest()
            return sums

    # -- snapshots --------------------------------------------------------------------------
    def group_snapshot(self, server_id: str, snapshot_id: str) -> Snapshot:
        with self._lock(server_id, exclusive=True):
            server = self.get_server(server_id)
            snap = self._snap_dir(server_id, snapshot_id)
            if (snap / "snapshot.json").exists():
                return self._read_snapshot(server_id, snapshot_id)
            shutil.rmtree(snap, ignore_errors=True)
            snap.mkdir(parents=True)
            disks = []
            for disk in server.disks:
                since = self._checkpoint(server_id, disk.id)
                # Name the new checkpoint before moving the bits: if we die in between, a
                # retry sees its own id as `since` and reads the disk whole (never too little).
                self._set_checkpoint(server_id, disk.id, snapshot_id)
                bits = self._cbt_bits(server_id, disk.id).path
                if bits.exists():
                    os.replace(bits, snap / f"{disk.id}.cbt")
                disks.append(
                    SnapshotDisk(
                        disk_id=disk.id,
                        size_bytes=disk.size_bytes,
                        changed_since=since,
                        full_read_reason=None if since else NO_CHECKPOINT,
                    )
                )
            snapshot = Snapshot.taken_now(server_id, snapshot_id, disks)
            record = snapshot.model_dump(mode="json")
            record["sizes"] = {d.disk_id: d.size_bytes for d in disks}
            write_json(snap / "snapshot.json", record)
            return snapshot

    def _read_snapshot(self, server_id: str, snapshot_id: str) -> Snapshot:
        path = self._snap_dir(server_id, snapshot_id) / "snapshot.json"
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"snapshot {snapshot_id} of server {server_id} does not exist") from None
        record.pop("sizes", None)
        return Snapshot.model_validate(record)

    def open_snapshot(self, server_id: str, snapshot_id: str, disk_id: str) -> _LocalSnapshotReader:
        snapshot = self._read_snapshot(server_id, snapshot_id)
        try:
            disk = snapshot.disk(disk_id)
        except KeyError:
            raise NotFound(f"disk {disk_id} is not in snapshot {snapshot_id}") from None
        return _LocalSnapshotReader(self, server_id, snapshot_id, disk)

    def release_snapshot(self, server_id: str, snapshot_id: str, committed: bool) -> None:
        with self._lock(server_id, exclusive=True):
            snap = self._snap_dir(server_id, snapshot_id)
            if not snap.exists():
                return
            if not committed and (snap / "snapshot.json").exists():
                snapshot = self._read_snapshot(server_id, snapshot_id)
                for disk in snapshot.disks:
                    if self._checkpoint(server_id, disk.disk_id) != snapshot_id:
                        # Another checkpoint came after: we cannot fold back exactly.
                        self._set_checkpoint(server_id, disk.disk_id, None)
                        continue
                    frozen = _Bitmap(snap / f"{disk.disk_id}.cbt").all_set()
                    self._cbt_bits(server_id, disk.disk_id).set(frozen)
                    self._set_checkpoint(server_id, disk.disk_id, disk.changed_since)
            shutil.rmtree(snap)

    # -- disk changes (R5) ---------------------------------------------------------------
    def recreate_disk(self, server_id: str, like: Disk, size_bytes: int) -> Disk:
        """Re-create a removed disk (R5) for a restore to write."""
        return self.add_disk(server_id, size_bytes, like)

    def add_disk(self, server_id: str, size_bytes: int, like: Disk | None = None) -> Disk:
        """Attach a new empty data disk, or re-create ``like`` (same id, name and role)."""
        with self._lock(server_id, exclusive=True):
            server = self.get_server(server_id)
            disk = self._new_disk(server, size_bytes, like)
            with open(self._disk_path(server_id, disk.id), "wb") as f:
                f.truncate(size_bytes)
            self._set_checkpoint(server_id, disk.id, None)
            self._cbt_bits(server_id, disk.id).path.unlink(missing_ok=True)
            server.disks.append(disk)
            self._save(server)
            return disk

    def replace_disk(self, server_id: str, disk_id: str, size_bytes: int) -> Disk:
        """Swap a disk for a new empty one with a new id, the same name and role (a
        system disk re-installed, a failed disk replaced), as a cloud does."""
        with self._lock(server_id, exclusive=True):
            server = self.get_server(server_id)
            old = self._find_disk(server, disk_id)
            if self._active_snapshots(server_id):
                raise InvalidState(f"server {server_id} has a snapshot in use; try again later")
            new = self._new_disk(server, size_bytes, None).model_copy(
                update={"name": old.name, "role": old.role}
            )
            with open(self._disk_path(server_id, new.id), "wb") as f:
                f.truncate(size_bytes)
            self._set_checkpoint(server_id, new.id, None)
            server.disks = [new if d.id == disk_id else d for d in server.disks]
            self._save(server)
            self._disk_path(server_id, disk_id).unlink(missing_ok=True)
            self._cbt_meta(server_id, disk_id).unlink(missing_ok=True)
            self._cbt_bits(server_id, disk_id).path.unlink(missing_ok=True)
            return new

    def resize_disk(self, server_id: str, disk_id: str, size_bytes: int) -> Disk:
        """Grow a disk (disks are never shrunk in place, as on a cloud)."""
        with self._lock(server_id, exclusive=True):
            server = self.get_server(server_id)
            disk = self._find_disk(server, disk_id)
            self._check_grow(disk, size_bytes)
            with open(self._disk_path(server_id, disk_id), "r+b") as f:
                f.truncate(size_bytes)
            disk.size_bytes = size_bytes
            self._save(server)
            return disk

    def remove_disk(self, server_id: str, disk_id: str) -> None:
        """Detach and delete a data disk."""
        with self._lock(server_id, exclusive=True):
            server = self.get_server(server_id)
            disk = self._find_disk(server, disk_id)
            self._check_removable(disk)
            if self._active_snapshots(server_id):
                raise InvalidState(f"server {server_id} has a snapshot in use; try again later")
            server.disks = [d for d in server.disks if d.id != disk_id]
            self._save(server)
            self._disk_path(server_id, disk_id).unlink(missing_ok=True)
            self._cbt_meta(server_id, disk_id).unlink(missing_ok=True)
            self._cbt_bits(server_id, disk_id).path.unlink(missing_ok=True)

    # -- restore ---------------------------------------------------------------------------
    def restore_baseline(self, server_id: str, disk_id: str) -> RestoreBaseline:
        """The checkpoint names the last backup whose snapshot was committed (or kept);
        the bits are every block written since, by the guest or by a restore."""
        with self._lock(server_id, exclusive=True):
            server = self.get_server(server_id)
            disk = self._find_disk(server, disk_id)
            if self._active_snapshots(server_id):
                return RestoreBaseline(reason="a snapshot of the server is held")
            since = self._checkpoint(server_id, disk_id)
            if since is None:
                return RestoreBaseline(reason=NO_CHECKPOINT)
            blocks = self._cbt_bits(server_id, disk_id).all_set()
            return RestoreBaseline(
                backup_id=since, changed=_blocks_to_ranges(blocks, disk.size_bytes)
            )

    def open_disk_writer(self, server_id: str, disk_id: str, size_bytes: int) -> _LocalDiskWriter:
        with self._lock(server_id, exclusive=True):
            server = self.get_server(server_id)
            if server.state == ServerState.RUNNING:
                raise InvalidState(f"server {server_id} is running; stop it before restoring")
            if self._active_snapshots(server_id):
                raise InvalidState(
                    f"server {server_id} is being backed up (a snapshot is held); restore it "
                    f"when the backup has finished"
                )
            disk = self._find_disk(server, disk_id)
            if disk.size_bytes != size_bytes:
                with open(self._disk_path(server_id, disk_id), "r+b") as f:
                    f.truncate(size_bytes)
                disk.size_bytes = size_bytes
                self._save(server)
                self._set_checkpoint(server_id, disk_id, None)
        return _LocalDiskWriter(self, server_id, disk_id, size_bytes)


def _disk_error(disk_id: str, purpose: str, exc: OSError) -> CsbsError:
    """A missing or forbidden disk image will not heal by retrying; other I/O errors may."""
    message = f"disk {disk_id}: cannot open its image for {purpose} ({exc.strerror})"
    if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM):
        return DiskUnavailable(message)
    return DriverError(message)


class _LocalSnapshotReader:
    """Reads a snapshot disk: preserved blocks from the COW file, the rest from the disk."""

    def __init__(self, driver: LocalDriver, server_id: str, snapshot_id: str, disk: SnapshotDisk):
        self.driver = driver
        self.server_id = server_id
        self.disk = disk
        self.size_bytes = disk.size_bytes
        self.changed_since = disk.changed_since
        self.full_read_reason = disk.full_read_reason
        self.snap = driver._snap_dir(server_id, snapshot_id)
        self.map = _Bitmap(self.snap / f"{disk.disk_id}.map")
        try:
            self.fd = os.open(driver._disk_path(server_id, disk.disk_id), os.O_RDONLY)
            self.cow_fd = os.open(self.snap / f"{disk.disk_id}.cow", os.O_RDONLY | os.O_CREAT)
        except OSError as exc:
            raise _disk_error(disk.disk_id, "reading", exc) from exc

    def allocated_ranges(self) -> list[tuple[int, int]]:
        with self.driver._lock(self.server_id, exclusive=False):
            live = data_ranges(self.fd, self.size_bytes)
            preserved = _blocks_to_ranges(self.map.all_set(), self.size_bytes)
        return merge_ranges(live + preserved)

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        if self.changed_since is None:
            return None
        frozen = _Bitmap(self.snap / f"{self.disk.disk_id}.cbt").all_set()
        return _blocks_to_ranges(frozen, self.size_bytes)

    def read(self, offset: int, length: int) -> bytes | bytearray:
        length = min(length, self.size_bytes - offset)
        if length <= 0:
            return b""
        blocks = _blocks(offset, length)
        out = bytearray(length)  # zeros: what a short read past a file's end must give
        view = memoryview(out)
        with self.driver._lock(self.server_id, exclusive=False):
            if not (self.snap / "snapshot.json").exists():
                raise InvalidState(
                    f"snapshot {self.snap.name} of server {self.server_id} was released; "
                    f"its data can no longer be read"
                )
            preserved = self.map.test(blocks)
            # One preadv per run of blocks that come from the same file, straight into
            # the output buffer.
            pos, end, i = offset, offset + length, 0
            while i < len(preserved):
                j = i
                while j + 1 < len(preserved) and preserved[j + 1] == preserved[i]:
                    j += 1
                stop = min((blocks[j] + 1) * BLOCK_SIZE, end)
                fd = self.cow_fd if preserved[i] else self.fd
                os.preadv(fd, [view[pos - offset : stop - offset]], pos)
                pos, i = stop, j + 1
        return out

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.cow_fd)


class _LocalDiskWriter:
    """Writes a stopped server's disk for restore, keeping COW and CBT in step."""

    def __init__(self, driver: LocalDriver, server_id: str, disk_id: str, size_bytes: int):
        self.driver = driver
        self.server_id = server_id
        self.disk_id = disk_id
        self.size_bytes = size_bytes
        try:
            self.fd = os.open(driver._disk_path(server_id, disk_id), os.O_RDWR)
        except OSError as exc:
            raise _disk_error(disk_id, "writing", exc) from exc

    def write(self, offset: int, data: bytes) -> None:
        with self.driver._lock(self.server_id, exclusive=True):
            self.driver._write_locked(
                self.server_id, self.disk_id, self.fd, self.size_bytes, offset, data, len(data)
            )

    def zero(self, offset: int, length: int) -> None:
        with self.driver._lock(self.server_id, exclusive=True):
            self.driver._write_locked(
                self.server_id, self.disk_id, self.fd, self.size_bytes, offset, None, length
            )

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
