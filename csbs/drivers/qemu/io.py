"""Reading a snapshot over the ``qemu`` driver's NBD exports: why a read failed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from csbs.drivers.base import SnapshotDisk
from csbs.drivers.nbd import NbdError, dirty_bitmap_context
from csbs.drivers.nbd_io import NbdSnapshotReader
from csbs.errors import DriverError, InvalidState

if TYPE_CHECKING:
    from csbs.drivers.qemu.snapshots import QemuSnapshots


class QemuSnapshotReader(NbdSnapshotReader):
    """Reads one disk of a snapshot from its NBD export."""

    def __init__(self, driver: QemuSnapshots, server_id: str, snapshot_id: str, disk: SnapshotDisk):
        self.driver = driver
        self.server_id = server_id
        self.snapshot_id = snapshot_id
        dirty = dirty_bitmap_context(disk.changed_since) if disk.changed_since else None
        super().__init__(driver._nbd_path(server_id), f"{snapshot_id}/{disk.disk_id}", disk, dirty)

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
