"""The ``qemu`` driver's public face: servers, power, guest writes, disks, checksums."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from csbs.drivers.base import RestoreBaseline
from csbs.drivers.common import (
    check_disk_size,
    write_json,
)
from csbs.drivers.nbd import STATE_DIRTY, NbdClient, NbdError, dirty_bitmap_context
from csbs.drivers.nbd_io import NbdDiskWriter, hash_export
from csbs.drivers.qemu.boot import QemuBoot
from csbs.drivers.qemu.instant import QemuInstant
from csbs.drivers.qemu.qmp import (
    GUEST_WRITE_PIECE,
    REASON_ADDED,
    REASON_FIRST,
    REASON_RESIZED,
    _Qmp,
    _short,
    device_id,
    drive_id,
    node_name,
)
from csbs.errors import (
    DriverError,
    InvalidInput,
    InvalidState,
    NotFound,
)
from csbs.model import Disk, Server, ServerState


class QemuDriver(QemuInstant):
    """Servers as QEMU processes; see the module docstring."""

    # -- servers ----------------------------------------------------------------------------
    def create_server(
        self,
        name: str,
        disk_sizes: list[int],
        shared_disk_sizes: list[int] | None = None,
        boot: QemuBoot | dict[str, Any] | None = None,
    ) -> Server:
        """Make a server and start it. With ``boot`` (a ``QemuBoot`` or its JSON form) it
        boots a real Linux guest on machine ``pc`` with its disks as virtio-blk devices
        (``vda`` first) and its serial console in ``serial_path()``; without, it is
        guest-less (machine ``none``)."""
        config = None if boot is None else QemuBoot.of(boot)
        server = self._new_server(name, disk_sizes, shared_disk_sizes)
        if config is not None:
            write_json(self._boot_path(server.id), config.model_dump(mode="json"))
        for disk in server.disks:
            self._img(
                "create",
                "-q",
                "-f",
                "qcow2",
                str(self._disk_path(server.id, disk.id)),
                str(disk.size_bytes),
            )
            self._set_cbt(server.id, disk.id, None, REASON_FIRST)
        self._save(server)
        with self._lock(server.id, exclusive=True):
            self._launch(server, paused=False)
        return server

    def boot_config(self, server_id: str) -> QemuBoot | None:
        """The server's boot configuration; None for a guest-less server."""
        self.get_server(server_id)
        return self._boot(server_id)

    def serial(self, server_id: str) -> str:
        """What the guest wrote on its serial console so far, every boot ("" if none)."""
        try:
            return self.serial_path(server_id).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def set_state(self, server_id: str, state: ServerState) -> Server:
        """Force a power state at once, as a test needs it: stopped pauses the VM (no
        power button, even for a guest), running continues it (a guest that powered off
        or was paused boots afresh)."""
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            server.state = ServerState(state)
            self._save(server)
            pid = self._pid(server_id)
            if state == ServerState.RUNNING:
                self._ensure(server)
                with self._session(server_id) as qmp:
                    if self._boot(server_id) is None:
                        qmp.cmd("cont")
                    else:
                        self._boot_guest(qmp)
            elif pid is not None:
                with self._session(server_id) as qmp:
                    qmp.cmd("stop")
                self._settle(server_id)
            return server

    def stop(self, server_id: str) -> str | None:
        """Stop the server (offline backup B12, restore R3).

        A server with a guest gets the ACPI power button (QMP ``system_powerdown``) and up
        to ``shutdown_timeout`` seconds to power off; a guest that does not is forced off
        (its VM stops at once) and the warning saying so is returned. A guest-less server
        has no guest to ask: its VM stops at once, with no wait and no warning. Either way
        QEMU then quits cleanly (``quit``) once no snapshot or export needs it, so the dirty
        bitmaps are written to the images and the next incremental still reads only the
        changed blocks; a snapshot relaunches it paused, as for any stopped server."""
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            warning = None
            if server.state == ServerState.RUNNING:
                if self._pid(server_id) is not None:
                    with self._session(server_id) as qmp:
                        if self._boot(server_id) is None:
                            qmp.cmd("stop")
                        else:
                            warning = self._power_down(qmp, server)
                server.state = ServerState.STOPPED
                self._save(server)
                self._settle(server_id)
            elif server.state != ServerState.STOPPED:
                raise InvalidState(f"server {server_id} is {server.state}; it cannot be stopped")
            return warning

    def start(self, server_id: str) -> Server:
        """Run a stopped server. A guest boots afresh (in the QEMU process that may hold
        an offline backup's snapshot); a guest-less VM continues."""
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            if server.state == ServerState.STOPPED:
                if self._pid(server_id) is None:
                    self._launch(server, paused=False)
                else:
                    with self._session(server_id) as qmp:
                        # A restore writer left by a killed worker must not outlive it.
                        for export in qmp.cmd("query-block-exports"):
                            if export["id"].startswith("w-"):
                                self._export_del(qmp, export["id"])
                        self._nbd_stop_if_idle(qmp)
                        if self._boot(server_id) is None:
                            qmp.cmd("cont")
                        else:
                            self._boot_guest(qmp)
                server.state = ServerState.RUNNING
                self._save(server)
            elif server.state != ServerState.RUNNING:
                raise InvalidState(f"server {server_id} is {server.state}; it cannot be started")
            return server

    # -- guest writes and checksums ------------------------------------------------------
    def write(self, server_id: str, disk_id: str, offset: int, data: bytes) -> None:
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            if server.state != ServerState.RUNNING:
                raise InvalidState(
                    f"server {server_id} is {server.state}; guest writes need a running server"
                )
            disk = self._find_disk(server, disk_id)
            if offset < 0 or offset + len(data) > disk.size_bytes:
                raise InvalidInput(
                    f"offset/length: range {offset}+{len(data)} is outside the disk "
                    f"({disk.size_bytes} bytes)"
                )
            self._ensure(server)
            source = Path(self._record(server_id)["runtime"]) / f"write-{uuid.uuid4().hex}"
            try:
                with self._session(server_id) as qmp:
                    for pos in range(0, len(data), GUEST_WRITE_PIECE):
                        piece = data[pos : pos + GUEST_WRITE_PIECE]
                        at = offset + pos
                        if piece.count(0) == len(piece):
                            command = f"write -z {at} {len(piece)}"
                        else:
                            source.write_bytes(piece)
                            command = f"write -s {source} {at} {len(piece)}"
                        said = self._qemu_io(qmp, server_id, disk_id, command)
                        if f"wrote {len(piece)}/{len(piece)} bytes at offset {at}" not in said:
                            raise DriverError(
                                f"guest write on disk {disk_id} at {at} failed: "
                                f"{said.strip() or 'QEMU said nothing'}"
                            )
                    # Like a guest's fsync: the data survives a crash of QEMU from here on.
                    said = self._qemu_io(qmp, server_id, disk_id, "flush")
                    if said.strip():
                        raise DriverError(f"guest flush on disk {disk_id} failed: {said.strip()}")
            finally:
                source.unlink(missing_ok=True)

    def _qemu_io(self, qmp: _Qmp, server_id: str, disk_id: str, command: str) -> str:
        """Run a qemu-io command on a drive; return what it printed (QEMU's stdout)."""
        log = self._log_path(server_id)
        before = log.stat().st_size
        reply = qmp.hmp(f'qemu-io {drive_id(disk_id)} "{command}"')
        with open(log, "rb") as f:
            f.seek(before)
            return reply + f.read().decode(errors="replace")

    def checksum(self, server_id: str) -> dict[str, str]:
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            self._ensure(server)
            try:
                return self._checksum(server)
            finally:
                self._settle(server_id)

    def _checksum(self, server: Server) -> dict[str, str]:
        sums: dict[str, str] = {}
        nbd_path = self._nbd_path(server.id)
        with self._session(server.id) as qmp:
            self._nbd_start(qmp, nbd_path)
            for disk in server.disks:
                export = f"chk-{_short(disk.id)}"
                qmp.cmd(
                    "block-export-add",
                    type="nbd",
                    id=export,
                    name=f"checksum/{disk.id}",
                    **{"node-name": node_name(disk.id)},
                )
                try:
                    sums[disk.id] = hash_export(nbd_path, f"checksum/{disk.id}")
                finally:
                    self._export_del(qmp, export)
            self._nbd_stop_if_idle(qmp)
        return sums

    def recreate_disk(self, server_id: str, like: Disk, size_bytes: int) -> Disk:
        """Re-create a removed disk (R5) for a restore to write."""
        return self.add_disk(server_id, size_bytes, like)

    def add_disk(self, server_id: str, size_bytes: int, like: Disk | None = None) -> Disk:
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            disk = self._new_disk(server, size_bytes, like)
            path = self._disk_path(server_id, disk.id)
            self._img("create", "-q", "-f", "qcow2", str(path), str(size_bytes))
            if self._pid(server_id) is not None:
                with self._session(server_id) as qmp:
                    reply = qmp.hmp(f"drive_add 0 {self._drive_spec(server_id, disk.id)}")
                    if "OK" not in reply:
                        path.unlink(missing_ok=True)
                        raise DriverError(f"QEMU could not attach disk {disk.id}: {reply.strip()}")
                    if self._boot(server_id) is not None:
                        self._hotplug(qmp, server_id, disk.id)
            self._set_cbt(server_id, disk.id, None, REASON_ADDED)
            server.disks.append(disk)
            self._save(server)
            return disk

    def _hotplug(self, qmp: _Qmp, server_id: str, disk_id: str) -> None:
        """Show a drive just added to the guest as a new virtio-blk device. Its id is new
        each time: a disk removed earlier may leave its (empty) device until QEMU quits."""
        device = f"{device_id(disk_id)}-{uuid.uuid4().hex[:6]}"
        try:
            qmp.cmd(
                "device_add",
                driver="virtio-blk-pci",
                drive=drive_id(disk_id),
                id=device,
                **{"share-rw": True},
            )
        except DriverError:
            qmp.hmp(f"drive_del {drive_id(disk_id)}")
            self._disk_path(server_id, disk_id).unlink(missing_ok=True)
            raise

    def resize_disk(self, server_id: str, disk_id: str, size_bytes: int) -> Disk:
        """Grow a disk (disks are never shrunk in place, as on a cloud)."""
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            disk = self._find_disk(server, disk_id)
            self._check_grow(disk, size_bytes)
            self._refuse_while_snapshot(server_id, "resize it")
            self._resize(server_id, disk_id, size_bytes)
            disk.size_bytes = size_bytes
            self._save(server)
            return disk

    def _resize(self, server_id: str, disk_id: str, size_bytes: int) -> None:
        """Resize an image, dropping its bitmaps first (their changes no longer line up)."""
        self._set_cbt(server_id, disk_id, None, REASON_RESIZED)
        if self._pid(server_id) is not None:
            node = node_name(disk_id)
            with self._session(server_id) as qmp:
                for bitmap in self._bitmaps(qmp, node):
                    qmp.cmd("block-dirty-bitmap-remove", node=node, name=bitmap["name"])
                qmp.cmd("block_resize", **{"node-name": node, "size": size_bytes})
            return
        path = str(self._disk_path(server_id, disk_id))
        info = json.loads(self._img("info", "--output=json", "-f", "qcow2", path))
        for bitmap in info.get("format-specific", {}).get("data", {}).get("bitmaps", []):
            self._img("bitmap", "--remove", "-f", "qcow2", path, bitmap["name"])
        self._img("resize", "-q", "-f", "qcow2", "--shrink", path, str(size_bytes))

    def remove_disk(self, server_id: str, disk_id: str) -> None:
        """Detach and delete a data disk."""
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            disk = self._find_disk(server, disk_id)
            self._check_removable(disk)
            self._refuse_while_snapshot(server_id, "remove the disk")
            if self._pid(server_id) is not None:
                with self._session(server_id) as qmp:
                    qmp.hmp(f"drive_del {drive_id(disk_id)}")
            server.disks = [d for d in server.disks if d.id != disk_id]
            self._save(server)
            self._disk_path(server_id, disk_id).unlink(missing_ok=True)
            self._cbt_path(server_id, disk_id).unlink(missing_ok=True)

    # -- restore ---------------------------------------------------------------------------
    def restore_baseline(self, server_id: str, disk_id: str) -> RestoreBaseline:
        """The disk's checkpoint is the last committed backup; its persistent dirty bitmap
        (named after it, recording since its snapshot) holds every write since, the
        guest's and a restore's alike. It is read over NBD block status from a read-only
        export of the disk; any doubt about the bitmap is no baseline."""
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            if not any(d.id == disk_id for d in server.disks):
                raise NotFound(f"disk {disk_id} is not a disk of server {server_id}")
            if self._active_snapshots(server_id):
                return RestoreBaseline(reason="a snapshot of the server is held")
            expected, reason = self._cbt(server_id, disk_id)
            if expected is None:
                return RestoreBaseline(reason=reason or REASON_FIRST)
            self._ensure(server)
            node, export = node_name(disk_id), f"rb-{_short(disk_id)}"
            with self._session(server_id) as qmp:
                found = {b["name"]: b for b in self._bitmaps(qmp, node)}.get(expected)
                if found is None or found.get("inconsistent") or not found.get("recording"):
                    return RestoreBaseline(
                        reason=f"changed-block bitmap {expected} is missing, inconsistent or "
                        f"not recording"
                    )
                # A read-only export takes only a disabled bitmap: read a frozen copy.
                frozen = f"{export}-copy"
                qmp.try_cmd("block-dirty-bitmap-remove", node=node, name=frozen)
                qmp.cmd(
                    "transaction",
                    actions=[
                        {
                            "type": "block-dirty-bitmap-add",
                            "data": {"node": node, "name": frozen, "disabled": True},
                        },
                        {
                            "type": "block-dirty-bitmap-merge",
                            "data": {"node": node, "target": frozen, "bitmaps": [expected]},
                        },
                    ],
                )
                try:
                    self._nbd_start(qmp, self._nbd_path(server_id))
                    qmp.cmd(
                        "block-export-add",
                        type="nbd",
                        id=export,
                        **{"node-name": node},
                        name=export,
                        bitmaps=[frozen],
                    )
                    context = dirty_bitmap_context(frozen)
                    with NbdClient(self._nbd_path(server_id), export, [context]) as nbd:
                        changed = nbd.ranges(context, STATE_DIRTY, STATE_DIRTY)
                except NbdError as exc:
                    return RestoreBaseline(reason=f"the dirty bitmap could not be read ({exc})")
                finally:
                    self._export_del(qmp, export)
                    self._nbd_stop_if_idle(qmp)
                    qmp.try_cmd("block-dirty-bitmap-remove", node=node, name=frozen)
            self._settle(server_id)
        return RestoreBaseline(backup_id=expected, changed=changed)

    def open_disk_writer(self, server_id: str, disk_id: str, size_bytes: int) -> NbdDiskWriter:
        check_disk_size(size_bytes)
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            if server.state == ServerState.RUNNING:
                raise InvalidState(f"server {server_id} is running; stop it before restoring")
            self._refuse_while_snapshot(server_id, "restore it")
            disk = self._find_disk(server, disk_id)
            self._ensure(server)
            if disk.size_bytes != size_bytes:
                self._resize(server_id, disk_id, size_bytes)
                disk.size_bytes = size_bytes
                self._save(server)
            export = f"w-{_short(disk_id)}"
            with self._session(server_id) as qmp:
                self._nbd_start(qmp, self._nbd_path(server_id))
                self._export_del(qmp, export)  # a writer left over by a killed attempt
                qmp.cmd(
                    "block-export-add",
                    type="nbd",
                    id=export,
                    name=f"restore/{disk_id}",
                    writable=True,
                    **{"node-name": node_name(disk_id)},
                )
            try:
                client = NbdClient(self._nbd_path(server_id), f"restore/{disk_id}")
            except NbdError as exc:
                raise DriverError(f"disk {disk_id}: cannot open it for restore ({exc})") from exc
        return NbdDiskWriter(
            disk_id, size_bytes, client, lambda: self._close_writer(server_id, disk_id)
        )

    def _close_writer(self, server_id: str, disk_id: str) -> None:
        with self._lock(server_id, exclusive=True):
            if self._pid(server_id) is None:
                return
            with self._session(server_id) as qmp:
                self._export_del(qmp, f"w-{_short(disk_id)}")
                self._nbd_stop_if_idle(qmp)
            self._settle(server_id)
