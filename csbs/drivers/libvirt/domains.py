"""The ``libvirt`` driver's domains: the connection, servers and their disks, power, and
the records csbs keeps per domain. See ``csbs.drivers.libvirt.driver``."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from csbs.drivers.common import write_json
from csbs.drivers.libvirt.domain_xml import (
    PAUSED,
    DomainDisk,
    domain_disks,
    server_state,
)
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


class LibvirtDomains:
    """Existing libvirt domains as servers (the half without snapshots and restore)."""

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

    def _stop_writers(self, server_id: str, disk_id: str | None = None) -> None:
        """Stop restore exports left running (the restore half of the driver has them)."""


__all__ = [
    "REASON_FIRST",
    "START_TIMEOUT",
    "LibvirtDomains",
    "_error",
    "_socket_base",
    "libvirt",
    "log",
]
