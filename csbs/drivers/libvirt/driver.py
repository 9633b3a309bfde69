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
  stays qcow2), after deleting csbs's checkpoints, so the next backup reads in full.

What csbs keeps per domain lives in ``<state_dir>/<uuid>/``: ``cbt.json`` (the trusted
checkpoint, the disks it covers, why a disk has none) and ``snapshots/<id>/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from csbs.drivers.base import Snapshot, SnapshotDisk
from csbs.drivers.common import check_disk_size, child_env, runtime_base, write_json
from csbs.drivers.libvirt.domain_xml import (
    PAUSED,
    REASON_RAW,
    DomainDisk,
    backup_socket,
    backup_xml,
    checkpoint_sizes,
    checkpoint_xml,
    dac_label,
    disk_xml,
    domain_disks,
    server_state,
)
from csbs.drivers.nbd import NbdClient, NbdError
from csbs.drivers.nbd_io import NbdDiskWriter, NbdSnapshotReader
from csbs.errors import DiskUnavailable, DriverError, InvalidInput, InvalidState, NotFound
from csbs.model import Disk, DiskRole, Server, check_id

try:
    import libvirt
except ImportError:  # pragma: no cover - depends on the host
    libvirt = None
else:
    # libvirt prints every error on stderr by default; we raise them with a reason instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

log = logging.getLogger(__name__)

REASON_FIRST = "no checkpoint yet (first backup of this server on this host)"
#: How long to wait for a process we start (qemu-storage-daemon) to listen.
START_TIMEOUT = 30.0


def _error(exc: Exception) -> str:
    """libvirt's own message, without the binding's prefix."""
    if libvirt is not None and isinstance(exc, libvirt.libvirtError):
        return exc.get_error_message() or str(exc)
    return str(exc)


def _socket_base() -> Path:
    """The directory under which per-snapshot socket directories are made: root's
    ``/run/csbs-libvirt``, else ``<tmp>/csbs-libvirt-<uid>``. Mode 0711: QEMU can pass
    through to its own subdirectory, nobody can list it."""
    if os.getuid() == 0 and os.path.isdir("/run"):
        base = Path("/run/csbs-libvirt")
    else:
        base = Path(tempfile.gettempdir() if len(tempfile.gettempdir()) <= 60 else "/tmp")
        base = base / f"csbs-libvirt-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        base.mkdir(mode=0o711)
    st = os.lstat(base)
    if not os.path.isdir(base) or os.path.islink(base) or st.st_uid != os.getuid():
        raise DriverError(f"socket directory {base} is not a directory of ours; remove it")
    os.chmod(base, 0o711)
    return base


class LibvirtDriver:
    """Existing libvirt domains as servers; see the module docstring."""

    name = "libvirt"

    def __init__(
        self,
        state_dir: Path,
        uri: str = "qemu:///system",
        project: str = "default",
        host: str = "default",
        qemu_img: str = "qemu-img",
        storage_daemon: str = "qemu-storage-daemon",
        shutdown_timeout: float = 90.0,
    ) -> None:
        if libvirt is None:
            raise DriverError(
                "compute_driver 'libvirt' needs libvirt-python: pip install 'csbs[libvirt]' "
                "(it builds against libvirt-dev and pkg-config)"
            )
        self.root = Path(state_dir) / "libvirt"
        self.uri = uri
        self.project = project
        self.host = host
        self.qemu_img = qemu_img
        self.storage_daemon = storage_daemon
        self.shutdown_timeout = shutdown_timeout
        self._conn: Any = None
        self._conn_lock = threading.Lock()

    # -- connection and domains ----------------------------------------------------------
    def _connection(self) -> Any:
        with self._conn_lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise DiskUnavailable(
                    f"cannot reach libvirt at {self.uri} on host {self.host}: {_error(exc)}"
                ) from exc
            return self._conn

    def _retry(self, call: Any) -> Any:
        """``call(connection)``, once more on a new connection when libvirtd hung up on
        the old one (it restarted: its domains and checkpoints are still there)."""
        try:
            return call(self._connection())
        except libvirt.libvirtError as exc:
            if exc.get_error_domain() != libvirt.VIR_FROM_RPC and exc.get_error_code() not in (
                libvirt.VIR_ERR_SYSTEM_ERROR,
                libvirt.VIR_ERR_RPC,
            ):
                raise
            with self._conn_lock:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
            return call(self._connection())

    def _domain(self, server_id: str) -> Any:
        check_id(server_id, "server_id")
        try:
            uuid.UUID(server_id)
        except ValueError:
            raise NotFound(f"server {server_id} does not exist on host {self.host}") from None
        try:
            return self._retry(lambda conn: conn.lookupByUUIDString(server_id))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"server {server_id} does not exist on host {self.host}") from None
            raise DriverError(f"libvirt: {_error(exc)}") from exc

    def _dir(self, server_id: str) -> Path:
        path = self.root / check_id(server_id, "server_id")
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def _lock(self, server_id: str) -> Iterator[None]:
        """One csbs process at a time changes a domain (worker, agent, CLI)."""
        fd = os.open(self._dir(server_id) / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _capacity(self, dom: Any, disk: DomainDisk) -> int:
        try:
            return int(dom.blockInfo(disk.target)[0])
        except libvirt.libvirtError:
            return 0

    def _describe(self, dom: Any) -> Server:
        server_id = dom.UUIDString()
        disks = []
        for i, disk in enumerate(domain_disks(dom.XMLDesc(0))):
            disks.append(
                Disk(
                    id=disk.target,
                    name=os.path.basename(disk.source) or disk.target,
                    size_bytes=self._capacity(dom, disk),
                    role=DiskRole.SYSTEM if i == 0 else DiskRole.DATA,
                    shared="shareable" in (disk.refused or ""),
                    unsupported=disk.refused,
                )
            )
        state, _ = dom.state()
        return Server(
            id=server_id,
            name=dom.name(),
            type=self.name,
            state=server_state(state, self._started_for_snapshot(server_id)),
            disks=disks,
            project=self.project,
            host=self.host,
        )

    def list_servers(self) -> list[Server]:
        try:
            domains = self._retry(lambda conn: conn.listAllDomains(0))
        except libvirt.libvirtError as exc:
            raise DriverError(f"libvirt could not list domains: {_error(exc)}") from exc
        servers = []
        for dom in domains:
            with contextlib.suppress(libvirt.libvirtError):  # undefined while we looked
                servers.append(self._describe(dom))
        return sorted(servers, key=lambda s: (s.name, s.id))

    def get_server(self, server_id: str) -> Server:
        check_id(server_id, "server_id")
        dom = self._domain(server_id)
        try:
            return self._describe(dom)
        except libvirt.libvirtError as exc:
            raise DriverError(f"libvirt: {_error(exc)}") from exc

    def _disks(self, dom: Any) -> list[DomainDisk]:
        disks = domain_disks(dom.XMLDesc(0))
        refused = [d.refused for d in disks if d.refused]
        if refused:
            raise InvalidInput(
                f"server {dom.UUIDString()} ({dom.name()}) cannot be backed up or restored: "
                + "; ".join(r for r in refused if r)
            )
        return disks

    # -- power --------------------------------------------------------------------------
    def stop(self, server_id: str) -> str | None:
        """Press the power button and wait; power off after ``shutdown_timeout``."""
        with self._lock(server_id):
            dom = self._domain(server_id)
            if self._started_for_snapshot(server_id):
                raise InvalidState(f"server {server_id} is being backed up; stop it afterwards")
            if not dom.isActive():
                return None
            # A domain that cannot take the button is powered off below.
            with contextlib.suppress(libvirt.libvirtError):
                dom.shutdown()
            deadline = time.monotonic() + self.shutdown_timeout
            while time.monotonic() < deadline:
                if not dom.isActive():
                    return None
                time.sleep(0.2)
            try:
                dom.destroy()
            except libvirt.libvirtError as exc:
                if dom.isActive():
                    raise DriverError(
                        f"server {server_id} did not shut down and could not be powered off: "
                        f"{_error(exc)}"
                    ) from exc
                return None
            return (
                f"server {dom.name()} did not shut down within {self.shutdown_timeout:g} s "
                f"of the power button, so it was powered off (libvirt destroy): its guest "
                f"did not flush its caches"
            )

    def start(self, server_id: str) -> Server:
        with self._lock(server_id):
            dom = self._domain(server_id)
            try:
                if dom.isActive():
                    if dom.state()[0] == PAUSED and self._started_for_snapshot(server_id):
                        # Started paused for an offline backup's snapshot: it runs now.
                        for snap in self._snapshot_dirs(server_id):
                            record = self._read_record(snap)
                            if record is not None and record.get("started_paused"):
                                record["started_paused"] = False
                                write_json(snap / "snapshot.json", record)
                        dom.resume()
                else:
                    self._stop_writers(server_id)
                    dom.create()
            except libvirt.libvirtError as exc:
                raise DriverError(f"server {server_id} could not start: {_error(exc)}") from exc
            return self._describe(dom)

    # -- records ----------------------------------------------------------------------------
    def _cbt_path(self, server_id: str) -> Path:
        return self._dir(server_id) / "cbt.json"

    def _cbt(self, server_id: str) -> dict[str, Any]:
        try:
            record: dict[str, Any] = json.loads(self._cbt_path(server_id).read_text())
        except FileNotFoundError:
            return {"checkpoint": None, "created": None, "disks": {}, "reasons": {}, "ours": []}
        return record

    def _snapshot_dirs(self, server_id: str) -> list[Path]:
        snaps = self._dir(server_id) / "snapshots"
        if not snaps.is_dir():
            return []
        return sorted(p for p in snaps.iterdir() if (p / "snapshot.json").exists())

    def _snap_dir(self, server_id: str, snapshot_id: str) -> Path:
        return self._dir(server_id) / "snapshots" / check_id(snapshot_id, "snapshot_id")

    @staticmethod
    def _read_record(snap: Path) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads((snap / "snapshot.json").read_text())
        except FileNotFoundError:
            return None
        return record

    def _started_for_snapshot(self, server_id: str) -> bool:
        for snap in self._snapshot_dirs(server_id):
            record = self._read_record(snap)
            if record is not None and record.get("started_paused"):
                return True
        return False

    def snapshots(self, server_id: str) -> list[str]:
        return [p.name for p in self._snapshot_dirs(server_id)]

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
        try:
            done = subprocess.run(
                [self.qemu_img, *args], env=child_env(), capture_output=True, text=True
            )
        except FileNotFoundError:
            raise DiskUnavailable(
                f"{self.qemu_img!r} is not installed (install qemu-utils)"
            ) from None
        if done.returncode != 0:
            raise DriverError(f"qemu-img {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

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
            others = [s for s in self.snapshots(server_id) if s != snapshot_id]
            if others:
                raise InvalidState(
                    f"server {server_id} still holds snapshot {', '.join(others)} of an earlier "
                    f"backup; it must be released first"
                )
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
            snapshot = Snapshot(
                id=snapshot_id,
                server_id=server_id,
                checkpoint=snapshot_id,
                created_at=datetime.now(UTC).isoformat(),
                disks=planned,
            )
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
            if record is None or not record.get("complete"):
                raise NotFound(f"snapshot {snapshot_id} of server {server_id} does not exist")
            snapshot = Snapshot.model_validate(record["snapshot"])
            try:
                disk = snapshot.disk(disk_id)
            except KeyError:
                raise NotFound(f"disk {disk_id} is not in snapshot {snapshot_id}") from None
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

    # -- restore --------------------------------------------------------------------------
    def _shut_off(self, dom: Any, server_id: str) -> None:
        if dom.isActive():
            raise InvalidState(f"server {server_id} is running; stop it before restoring")
        if self._snapshot_dirs(server_id):
            raise InvalidState(
                f"server {server_id} is being backed up (a snapshot is held); restore it when "
                f"the backup has finished"
            )

    def invalidate(self, dom: Any, server_id: str, why: str) -> None:
        """Delete csbs's checkpoints: the disks no longer hold what they recorded."""
        cbt = self._cbt(server_id)
        for name in cbt.get("ours", []):
            self._delete_checkpoint(dom, name)
        targets = [d.target for d in domain_disks(dom.XMLDesc(0))]
        write_json(
            self._cbt_path(server_id),
            {
                "checkpoint": None,
                "created": None,
                "disks": {},
                "reasons": dict.fromkeys(targets, why),
                "ours": [],
            },
        )

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

    def open_disk_writer(self, server_id: str, disk_id: str, size_bytes: int) -> NbdDiskWriter:
        check_disk_size(size_bytes)
        with self._lock(server_id):
            dom = self._domain(server_id)
            self._shut_off(dom, server_id)
            disks = {d.target: d for d in self._disks(dom)}
            disk = disks.get(disk_id)
            if disk is None:
                raise NotFound(f"disk {disk_id} is not a disk of server {server_id}")
            self.invalidate(
                dom,
                server_id,
                f"disk {disk_id} of this server was restored from a backup, which deleted "
                f"csbs's checkpoints",
            )
            self._stop_writers(server_id, disk_id)
            if self._capacity(dom, disk) != size_bytes:
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

    def _serve(self, disk: DomainDisk, socket: str, folder: Path) -> int:
        """A writable NBD export of the image by qemu-storage-daemon (QEMU's block layer,
        so qcow2 stays qcow2, with its backing chain); returns its pid."""
        blockdev = {
            "driver": disk.format,
            "node-name": "disk",
            "file": {"driver": "file", "filename": disk.source},
        }
        cmd = [
            self.storage_daemon,
            "--blockdev", json.dumps(blockdev),
            "--nbd-server", f"addr.type=unix,addr.path={socket}",
            "--export", f"type=nbd,id=w,node-name=disk,name={disk.target},writable=on",
        ]  # fmt: skip
        log = folder / "qsd.log"
        try:
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    cmd,
                    env=child_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
        except FileNotFoundError:
            raise DiskUnavailable(
                f"{self.storage_daemon!r} is not installed (install qemu-utils)"
            ) from None
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


class _Reader(NbdSnapshotReader):
    """A disk of a pull-mode backup job: export ``vda``, bitmap ``backup-vda``."""

    def __init__(
        self,
        driver: LibvirtDriver,
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


__all__ = ["REASON_FIRST", "LibvirtDriver"]
