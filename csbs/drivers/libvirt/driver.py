"""The ``libvirt`` driver: the domains that already run on a host, backed up through
libvirt's pull-mode backup with checkpoints, restored through QEMU's block layer.

- **Servers** are the host's domains, running or shut off; a server's id is the domain's
  UUID (stable across restarts and renames), its name the domain's name.
- **Disks** are the domain's file-backed qcow2 and raw disks, named by target (``vda``);
  the first is the system disk. Shareable, network, CD-ROM (with media) and LUN disks are
  reported with the reason csbs refuses them (``Disk.unsupported``).
- **Group snapshot**: one ``backup-begin`` over every disk, creating a checkpoint named
  after the backup, so every disk is read at one instant. Each disk is exported on a Unix
  socket in a directory that only csbs and QEMU can enter. A disk is incremental from the
  previous backup's checkpoint only when that checkpoint can be trusted; otherwise it is
  read in full with the reason (``SnapshotDisk.full_read_reason``). A shut-off domain is
  started paused for the snapshot (its guest runs no code) and stopped again on release.
- **Release** aborts the backup job (never left running), then keeps only the checkpoint
  the next incremental needs: the new one if the backup was committed, else the old one.
- **Stop** presses the power button (``shutdown``) and waits; after the timeout it powers
  the domain off (``destroy``) and says so.
- **Restore** writes a shut-off domain's images through ``qemu-storage-daemon`` (qcow2
  stays qcow2). Its writes land in the checkpoint's bitmap like the guest's, so the chain
  goes on, and a delta restore reads from that bitmap what changed since the checkpoint's
  backup (``restore_baseline``). A restore that resizes a disk deletes csbs's
  checkpoints: the next backup reads in full.
- **Instant restore** runs the domain from images backed by the backup while block pulls
  copy it (``csbs.drivers.libvirt.instant``).

What csbs keeps per domain lives in ``<state_dir>/<uuid>/``: ``cbt.json`` (the trusted
checkpoint, the disks it covers, why a disk has none) and ``snapshots/<id>/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from csbs.drivers.base import RestoreBaseline
from csbs.drivers.common import (
    check_disk_size,
    runtime_base,
    spawn,
    write_json,
)
from csbs.drivers.libvirt.domain_xml import (
    REASON_RAW,
    DomainDisk,
    disk_xml,
    domain_disks,
)
from csbs.drivers.libvirt.domains import REASON_FIRST, START_TIMEOUT, _error, libvirt
from csbs.drivers.libvirt.instant import LibvirtInstant
from csbs.drivers.nbd import STATE_DIRTY, NbdClient, NbdError, dirty_bitmap_context
from csbs.drivers.nbd_io import NbdDiskWriter
from csbs.errors import DriverError, InvalidState, NotFound
from csbs.model import Disk, check_id


class LibvirtDriver(LibvirtInstant):
    """Existing libvirt domains as servers; see the module docstring."""

    # -- restore --------------------------------------------------------------------------
    def recreate_disk(self, server_id: str, like: Disk, size_bytes: int) -> Disk:
        """Re-create a disk removed since the backup (R5): a new qcow2 image beside the
        system disk's, attached to the domain's definition under the same target."""
        check_disk_size(size_bytes)
        check_id(like.id, "disk_id")
        with self._lock(server_id):
            dom = self._domain(server_id)
            self._shut_off(dom, server_id)
            disks = domain_disks(dom.XMLDesc(0))
            if not disks:
                raise InvalidState(f"server {server_id} has no disk to put the new one beside")
            folder = os.path.dirname(disks[0].source)
            path = os.path.join(folder, f"{dom.name()}-{like.id}-{uuid.uuid4().hex[:8]}.qcow2")
            self._img("create", "-q", "-f", "qcow2", path, str(size_bytes))
            st = os.stat(disks[0].source)
            with contextlib.suppress(PermissionError):
                os.chown(path, st.st_uid, st.st_gid)
            try:
                dom.attachDeviceFlags(disk_xml(like.id, path), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            except libvirt.libvirtError as exc:
                os.unlink(path)
                raise DriverError(
                    f"could not attach a new {like.id} to server {server_id}: {_error(exc)}"
                ) from exc
            return like.model_copy(
                update={"size_bytes": size_bytes, "name": os.path.basename(path)}
            )

    def restore_baseline(self, server_id: str, disk_id: str) -> RestoreBaseline:
        """The trusted checkpoint's bitmap in the shut-off domain's qcow2 image: it records
        every write since that backup's instant, the guest's and a restore's alike (the
        restore writes through qemu-storage-daemon, which keeps the image's enabled
        bitmaps recording). Read over NBD block status from a read-only export; any doubt
        (another checkpoint, a redefined disk, a resize, a bitmap left in use by a QEMU
        that died) is no baseline."""
        with self._lock(server_id):
            dom = self._domain(server_id)
            disk = {d.target: d for d in domain_disks(dom.XMLDesc(0))}.get(disk_id)
            if disk is None:
                raise NotFound(f"disk {disk_id} is not a disk of server {server_id}")
            if dom.isActive():
                return RestoreBaseline(reason="the domain is running")
            # A writer left by a killed attempt holds the image (its bitmap in use): stop
            # it cleanly, so that its writes are in the bitmap and the bitmap is closed.
            self._stop_writers(server_id, disk_id)
            prev, reason = self._trusted_bitmap(dom, server_id, disk)
            if prev is None:
                return RestoreBaseline(reason=reason)
            socket_dir = Path(tempfile.mkdtemp(prefix="b-", dir=runtime_base()))
            socket = str(socket_dir / "nbd.sock")
            try:
                pid = self._serve(disk, socket, socket_dir, bitmap=prev)
                try:
                    context = dirty_bitmap_context(prev)
                    with NbdClient(socket, disk.target, [context]) as nbd:
                        changed = nbd.ranges(context, STATE_DIRTY, STATE_DIRTY)
                finally:
                    _terminate(pid)
            except (NbdError, DriverError) as exc:
                return RestoreBaseline(
                    reason=f"the bitmap of checkpoint {prev} could not be read ({exc})"
                )
            finally:
                shutil.rmtree(socket_dir, ignore_errors=True)
        return RestoreBaseline(backup_id=prev, changed=changed)

    def _trusted_bitmap(self, dom: Any, server_id: str, disk: DomainDisk) -> tuple[str | None, str]:
        """The checkpoint whose bitmap in ``disk``'s image can be trusted, or why none."""
        cbt = self._cbt(server_id)
        prev: str | None = cbt.get("checkpoint")
        known = cbt.get("disks", {}).get(disk.target)
        if not disk.tracked:
            return None, REASON_RAW
        if prev is None:
            return None, cbt.get("reasons", {}).get(disk.target) or REASON_FIRST
        checkpoint = self._checkpoint(dom, prev)
        if checkpoint is None:
            return None, f"checkpoint {prev} is gone from libvirt"
        if self._created(checkpoint) != cbt.get("created"):
            return None, f"checkpoint {prev} was redefined since csbs made it"
        if known is None:
            return None, f"disk {disk.target} was added since checkpoint {prev}"
        if known["source"] != disk.source:
            return None, f"disk {disk.target} is now image {disk.source}, not {known['source']}"
        info = json.loads(self._img("info", "--output=json", "-U", "-f", "qcow2", disk.source))
        if info.get("virtual-size") != known["size"]:
            return None, f"disk {disk.target} was resized since checkpoint {prev}"
        bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        flags = {b["name"]: b.get("flags", []) for b in bitmaps}.get(prev)
        if flags is None or "in-use" in flags or "auto" not in flags:
            return None, (
                f"the bitmap of checkpoint {prev} on {disk.target} is missing, disabled or "
                f"inconsistent (QEMU or the host stopped uncleanly)"
            )
        return prev, ""

    def open_disk_writer(self, server_id: str, disk_id: str, size_bytes: int) -> NbdDiskWriter:
        check_disk_size(size_bytes)
        with self._lock(server_id):
            dom = self._domain(server_id)
            self._shut_off(dom, server_id)
            disks = {d.target: d for d in self._disks(dom)}
            disk = disks.get(disk_id)
            if disk is None:
                raise NotFound(f"disk {disk_id} is not a disk of server {server_id}")
            self._stop_writers(server_id, disk_id)
            if self._capacity(dom, disk) != size_bytes:
                # A resize changes what the bitmaps cover: the next backup reads in full.
                self.invalidate(
                    dom,
                    server_id,
                    f"disk {disk_id} of this server was resized by a restore, which deleted "
                    f"csbs's checkpoints",
                )
                self._img("resize", "-q", "-f", disk.format, "--shrink", disk.source,
                          str(size_bytes))  # fmt: skip
            socket_dir = Path(tempfile.mkdtemp(prefix="w-", dir=runtime_base()))
            socket = str(socket_dir / "nbd.sock")
            pid = self._serve(disk, socket, socket_dir)
            write_json(self._writer_path(server_id, disk_id), {"pid": pid, "dir": str(socket_dir)})
            try:
                client = NbdClient(socket, disk_id)
            except NbdError as exc:
                self._stop_writers(server_id, disk_id)
                raise DriverError(f"disk {disk_id}: cannot open it for restore ({exc})") from exc
        return NbdDiskWriter(
            disk_id, size_bytes, client, lambda: self._close_writer(server_id, disk_id)
        )

    def _writer_path(self, server_id: str, disk_id: str) -> Path:
        folder = self._dir(server_id) / "writers"
        folder.mkdir(exist_ok=True)
        return folder / f"{check_id(disk_id, 'disk_id')}.json"

    def _serve(self, disk: DomainDisk, socket: str, folder: Path, bitmap: str | None = None) -> int:
        """An NBD export of the image by qemu-storage-daemon (QEMU's block layer, so
        qcow2 stays qcow2, with its backing chain and its enabled bitmaps recording);
        writable, or read-only with ``bitmap``'s dirty ranges; returns its pid."""
        blockdev: dict[str, Any] = {
            "driver": disk.format,
            "node-name": "disk",
            "file": {"driver": "file", "filename": disk.source},
        }
        export: dict[str, Any] = {
            "type": "nbd", "id": "w", "node-name": "disk", "name": disk.target, "writable": True,
        }  # fmt: skip
        if bitmap is not None:
            blockdev["read-only"] = True
            export.update(writable=False, bitmaps=[bitmap])
        cmd = [
            self.storage_daemon,
            "--blockdev", json.dumps(blockdev),
            "--nbd-server", f"addr.type=unix,addr.path={socket}",
            "--export", json.dumps(export),
        ]  # fmt: skip
        log = folder / "qsd.log"
        missing = f"{self.storage_daemon!r} is not installed (install qemu-utils)"
        proc = spawn(cmd, log, missing)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(socket):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise DriverError(
                    f"qemu-storage-daemon could not export {disk.source}: "
                    f"{log.read_text(errors='replace').strip()[-500:]}"
                )
            time.sleep(0.02)
        _children[proc.pid] = proc
        return proc.pid

    def _close_writer(self, server_id: str, disk_id: str) -> None:
        with self._lock(server_id):
            self._stop_writers(server_id, disk_id)

    def _stop_writers(self, server_id: str, disk_id: str | None = None) -> None:
        """Stop restore exports (a killed worker's too: none may outlive its restore)."""
        folder = self._dir(server_id) / "writers"
        if not folder.is_dir():
            return
        for path in folder.glob("*.json" if disk_id is None else f"{disk_id}.json"):
            record = json.loads(path.read_text())
            _terminate(int(record["pid"]))
            shutil.rmtree(record["dir"], ignore_errors=True)
            path.unlink()


#: Processes this process started, reaped when they are stopped.

_children: dict[int, subprocess.Popen[bytes]] = {}


def _terminate(pid: int) -> None:
    """SIGTERM (qemu-storage-daemon then closes its images cleanly), SIGKILL after 10 s."""
    proc = _children.pop(pid, None)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()


__all__ = ["LibvirtDriver"]
