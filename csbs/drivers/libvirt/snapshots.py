"""The ``libvirt`` driver's group snapshots: pull-mode backup jobs with a checkpoint per
backup, the checks that decide between an incremental and a full read, and their release."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from csbs.drivers.base import Snapshot, SnapshotDisk
from csbs.drivers.common import refuse_other_snapshots, run_qemu_img, write_json
from csbs.drivers.libvirt.domain_xml import (
    REASON_RAW,
    DomainDisk,
    backup_socket,
    backup_xml,
    checkpoint_sizes,
    checkpoint_xml,
    dac_label,
    domain_disks,
)
from csbs.drivers.libvirt.domains import (
    REASON_FIRST,
    LibvirtDomains,
    _error,
    _socket_base,
    libvirt,
    log,
)
from csbs.drivers.nbd import NbdError
from csbs.drivers.nbd_io import NbdSnapshotReader
from csbs.errors import DiskUnavailable, DriverError, InvalidState, NotFound

#: How long an aborted backup job may take to end.
JOB_END_TIMEOUT = 60.0


class LibvirtSnapshots(LibvirtDomains):
    """Crash-consistent group snapshots of a domain's disks."""

    # -- checkpoints --------------------------------------------------------------------
    def _checkpoint(self, dom: Any, name: str) -> Any | None:
        try:
            return dom.checkpointLookupByName(name)
        except libvirt.libvirtError:
            return None

    @staticmethod
    def _created(checkpoint: Any) -> int | None:
        text = ET.fromstring(checkpoint.getXMLDesc(0)).findtext("creationTime")
        return int(text) if text else None

    def _delete_checkpoint(self, dom: Any, name: str) -> None:
        """Delete one of csbs's checkpoints: with its bitmaps while QEMU runs; otherwise
        libvirt can only drop the record, and the bitmaps go with ``qemu-img bitmap``."""
        checkpoint = self._checkpoint(dom, name)
        if dom.isActive():
            if checkpoint is None:
                return
            try:
                checkpoint.delete(0)
            except libvirt.libvirtError as exc:
                # Its bitmap was lost (QEMU died before writing it back): only the record
                # is left to drop.
                log.warning("checkpoint %s: %s; dropping its record", name, _error(exc))
                checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            return
        if checkpoint is not None:
            checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        for disk in domain_disks(dom.XMLDesc(0)):
            if disk.tracked and name in self._image_bitmaps(disk.source):
                self._img("bitmap", "--remove", "-f", "qcow2", disk.source, name)

    def _image_bitmaps(self, path: str) -> set[str]:
        info = json.loads(self._img("info", "--output=json", "-U", "-f", "qcow2", path))
        bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        return {b["name"] for b in bitmaps}

    def _img(self, *args: str) -> str:
        return run_qemu_img(self.qemu_img, *args)

    def _plan(self, dom: Any, server_id: str, disks: list[DomainDisk]) -> list[SnapshotDisk]:
        """Which disks can be read incrementally from the trusted checkpoint, and why the
        others are read in full. Every doubt means a full read, never a wrong incremental."""
        cbt = self._cbt(server_id)
        prev: str | None = cbt.get("checkpoint")
        doubt: str | None = None
        sizes: dict[str, int | None] = {}
        if prev is not None:
            checkpoint = self._checkpoint(dom, prev)
            if checkpoint is None:
                doubt = (
                    f"checkpoint {prev} is gone from libvirt (the domain was redefined or "
                    f"its checkpoints were deleted)"
                )
            elif self._created(checkpoint) != cbt.get("created"):
                doubt = f"checkpoint {prev} was redefined since csbs made it"
            else:
                try:
                    sizes = checkpoint_sizes(
                        checkpoint.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
                    )
                except libvirt.libvirtError as exc:
                    doubt = f"libvirt cannot size checkpoint {prev}: {_error(exc)}"
        planned = []
        for disk in disks:
            size = self._capacity(dom, disk)
            known = cbt.get("disks", {}).get(disk.target)
            reason: str | None
            if not disk.tracked:
                reason = f"{disk.target}: {REASON_RAW}"
            elif prev is None:
                reason = cbt.get("reasons", {}).get(disk.target) or REASON_FIRST
            elif doubt is not None:
                reason = doubt
            elif known is None:
                reason = f"disk {disk.target} was added since checkpoint {prev}"
            elif known["source"] != disk.source:
                reason = (
                    f"disk {disk.target} is now image {disk.source}, not {known['source']} "
                    f"(the domain was redefined)"
                )
            elif known["size"] != size:
                reason = f"disk {disk.target} was resized ({known['size']} -> {size} bytes)"
            elif sizes.get(disk.target) is None:
                reason = (
                    f"the bitmap of checkpoint {prev} on {disk.target} is missing or "
                    f"inconsistent (QEMU or the host stopped uncleanly)"
                )
            else:
                reason = None
            planned.append(
                SnapshotDisk(
                    disk_id=disk.target,
                    size_bytes=size,
                    changed_since=None if reason else prev,
                    full_read_reason=reason,
                )
            )
        return planned

    # -- snapshots --------------------------------------------------------------------
    def _our_job(self, dom: Any, socket: str | None) -> bool | None:
        """True: the domain runs our backup job; False: none; None: another tool's."""
        try:
            running = backup_socket(dom.backupGetXMLDesc(0))
        except libvirt.libvirtError:
            return False
        return True if running == socket else None

    def _wait_job_gone(self, dom: Any, snapshot_id: str) -> None:
        """libvirt ends an aborted backup job in the background: wait until it has, so
        that no job outlives its release and the next backup can begin at once."""
        deadline = time.monotonic() + JOB_END_TIMEOUT
        while self._our_job(dom, "") is not False:
            if time.monotonic() > deadline:
                raise DriverError(
                    f"the backup job of snapshot {snapshot_id} did not end within "
                    f"{JOB_END_TIMEOUT:g} s of its abort"
                )
            time.sleep(0.01)

    def _lost(self, server_id: str, snapshot_id: str) -> DiskUnavailable:
        return DiskUnavailable(
            f"snapshot {snapshot_id} of server {server_id} is lost: its backup job ended "
            f"(the domain stopped, or libvirtd restarted); back the server up again"
        )

    def _socket_dir(self, dom: Any, snapshot_id: str) -> Path:
        """A directory for the job's socket and scratch files that only csbs and QEMU
        (the domain's DAC user and group) can enter."""
        path = Path(tempfile.mkdtemp(prefix=f"{snapshot_id[-8:]}-", dir=_socket_base()))
        label = dac_label(dom.XMLDesc(0))
        if label is not None:
            uid, gid = label
            if os.getuid() == 0:
                os.chown(path, uid, gid)
                os.chmod(path, 0o700)
            else:
                os.chown(path, -1, gid)
                os.chmod(path, 0o770)
        return path

    def group_snapshot(self, server_id: str, snapshot_id: str) -> Snapshot:
        with self._lock(server_id):
            dom = self._domain(server_id)
            snap = self._snap_dir(server_id, snapshot_id)
            record = self._read_record(snap)
            if record is not None and record.get("complete"):
                if self._our_job(dom, record["socket"]) is not True:
                    raise self._lost(server_id, snapshot_id)
                return Snapshot.model_validate(record["snapshot"])
            refuse_other_snapshots(server_id, snapshot_id, self.snapshots(server_id))
            disks = self._disks(dom)
            if record is not None:  # an attempt that died half-way: undo what it did
                self._undo(dom, server_id, snapshot_id, record, committed=False)
            started_paused = not dom.isActive()
            if started_paused:
                try:
                    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
                except libvirt.libvirtError as exc:
                    raise DriverError(
                        f"server {server_id} is shut off and could not be started paused for "
                        f"its snapshot: {_error(exc)}"
                    ) from exc
            elif self._our_job(dom, None) is None:
                raise InvalidState(
                    f"server {server_id} is running a backup job that csbs did not start; "
                    f"back it up when that job has ended"
                )
            sockets = self._socket_dir(dom, snapshot_id)
            record = {
                "complete": False,
                "started_paused": started_paused,
                "socket": str(sockets / "nbd.sock"),
                "runtime": str(sockets),
            }
            snap.mkdir(parents=True, exist_ok=True)
            write_json(snap / "snapshot.json", record)
            planned = self._plan(dom, server_id, disks)
            planned = self._begin(dom, disks, planned, record, snapshot_id)
            checkpoint = self._checkpoint(dom, snapshot_id)
            snapshot = Snapshot.taken_now(server_id, snapshot_id, planned)
            record.update(
                complete=True,
                snapshot=snapshot.model_dump(mode="json"),
                created=self._created(checkpoint) if checkpoint is not None else None,
                sources={d.target: d.source for d in disks},
            )
            write_json(snap / "snapshot.json", record)
            return snapshot

    def _begin(
        self,
        dom: Any,
        disks: list[DomainDisk],
        planned: list[SnapshotDisk],
        record: dict[str, Any],
        snapshot_id: str,
    ) -> list[SnapshotDisk]:
        """Start the pull-mode backup job and its checkpoint. When libvirt refuses the
        incremental (a bitmap it finds broken), every disk is read in full instead."""
        runtime, socket = record["runtime"], record["socket"]
        checkpoint = checkpoint_xml(snapshot_id, disks)
        since = {d.disk_id: d.changed_since for d in planned}
        try:
            dom.backupBegin(backup_xml(socket, runtime, since), checkpoint, 0)
            return planned
        except libvirt.libvirtError as exc:
            if not any(since.values()):
                raise DriverError(f"libvirt could not start the backup job: {_error(exc)}") from exc
            refused = _error(exc)
        if self._checkpoint(dom, snapshot_id) is not None:
            self._delete_checkpoint(dom, snapshot_id)
        planned = [
            d.model_copy(
                update={
                    "changed_since": None,
                    "full_read_reason": d.full_read_reason
                    or f"libvirt refused the incremental backup ({refused})",
                }
            )
            for d in planned
        ]
        try:
            dom.backupBegin(
                backup_xml(socket, runtime, {d.disk_id: None for d in planned}), checkpoint, 0
            )
        except libvirt.libvirtError as exc:
            raise DriverError(f"libvirt could not start the backup job: {_error(exc)}") from exc
        return planned

    def open_snapshot(self, server_id: str, snapshot_id: str, disk_id: str) -> NbdSnapshotReader:
        with self._lock(server_id):
            record = self._read_record(self._snap_dir(server_id, snapshot_id))
            disk = Snapshot.disk_of_record(record, server_id, snapshot_id, disk_id)
            assert record is not None
            if self._our_job(self._domain(server_id), record["socket"]) is not True:
                raise self._lost(server_id, snapshot_id)
        return _Reader(self, server_id, snapshot_id, record["socket"], disk)

    def release_snapshot(self, server_id: str, snapshot_id: str, committed: bool) -> None:
        with self._lock(server_id):
            snap = self._snap_dir(server_id, snapshot_id)
            record = self._read_record(snap)
            if record is None:
                shutil.rmtree(snap, ignore_errors=True)
                return
            try:
                dom = self._domain(server_id)
            except NotFound:
                shutil.rmtree(snap, ignore_errors=True)
                return
            self._undo(dom, server_id, snapshot_id, record, committed)
            shutil.rmtree(snap, ignore_errors=True)

    def _undo(
        self,
        dom: Any,
        server_id: str,
        snapshot_id: str,
        record: dict[str, Any],
        committed: bool,
    ) -> None:
        """End the job, settle the checkpoints, stop a domain started only for this."""
        try:
            if self._our_job(dom, record.get("socket")):
                dom.abortJob()
                self._wait_job_gone(dom, snapshot_id)
            cbt = self._cbt(server_id)
            ours = [n for n in cbt.get("ours", []) if n != snapshot_id]
            if committed and record.get("complete"):
                for name in ours:
                    self._delete_checkpoint(dom, name)
                snapshot = Snapshot.model_validate(record["snapshot"])
                sources = record.get("sources", {})
                write_json(
                    self._cbt_path(server_id),
                    {
                        "checkpoint": snapshot_id,
                        "created": record.get("created"),
                        "disks": {
                            d.disk_id: {"source": sources.get(d.disk_id), "size": d.size_bytes}
                            for d in snapshot.disks
                        },
                        "reasons": {},
                        "ours": [snapshot_id],
                    },
                )
            else:
                self._delete_checkpoint(dom, snapshot_id)
                cbt["ours"] = ours
                write_json(self._cbt_path(server_id), cbt)
            if record.get("started_paused") and dom.isActive():
                dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        except libvirt.libvirtError as exc:
            raise DriverError(
                f"releasing snapshot {snapshot_id} of server {server_id}: {_error(exc)}"
            ) from exc
        shutil.rmtree(record.get("runtime") or "/nonexistent", ignore_errors=True)


class _Reader(NbdSnapshotReader):
    """A disk of a pull-mode backup job: export ``vda``, bitmap ``backup-vda``."""

    def __init__(
        self,
        driver: LibvirtSnapshots,
        server_id: str,
        snapshot_id: str,
        socket: str,
        disk: SnapshotDisk,
    ) -> None:
        self.driver = driver
        self.server_id = server_id
        self.snapshot_id = snapshot_id
        dirty = f"qemu:dirty-bitmap:backup-{disk.disk_id}"
        super().__init__(socket, disk.disk_id, disk, dirty)

    def _failure(self, exc: NbdError) -> Exception:
        snap = self.driver._snap_dir(self.server_id, self.snapshot_id)
        if not (snap / "snapshot.json").exists():
            return InvalidState(
                f"snapshot {self.snapshot_id} of server {self.server_id} was released; "
                f"its data can no longer be read"
            )
        record = self.driver._read_record(snap) or {}
        try:
            ours = self.driver._our_job(self.driver._domain(self.server_id), record.get("socket"))
        except NotFound:  # the domain is gone, and the snapshot with it
            ours = False
        if not ours:
            return self.driver._lost(self.server_id, self.snapshot_id)
        return DriverError(f"reading snapshot {self.snapshot_id} over NBD failed: {exc}")
