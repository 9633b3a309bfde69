"""Instant restore on the ``libvirt`` driver (issue 18; the guide's 即时恢复).

Each disk to restore is replaced by a new qcow2 image whose backing file is an NBD export
of the backed-up disk, and the domain is started at once; ``virDomainBlockPull`` then
copies, in the background, what the guest has not written yet. When a pull ends, QEMU drops
the backing file from the image and libvirt from the domain: the disk no longer depends on
csbs. A raw disk comes back as a qcow2 image (a raw image cannot have a backing file): its
definition says so from then on.

libvirt 9.0 reads the image's ``json:`` backing file as a network backing store but keeps
only its socket and export, so QEMU would get no ``reconnect-delay``: every read of the
guest and of the pull would fail while the worker serving the backup restarts. So QEMU
reads through a relay of csbs's own, a ``qemu-storage-daemon`` that outlives the worker
(as a domain outlives its management service). It exports each disk to QEMU on a socket in
a directory only csbs and QEMU's user can enter, and reads it from csbs's export with a
reconnect delay: while the worker is away, the guest's reads and the pull wait.

``instant.json`` in the domain's directory records the restore in progress (the backup,
each disk's source, the relay's socket): a retried step finds the disks attached already
and only resumes the copy, so the guest's writes since it started are never overwritten.
While it exists, snapshots and restore writes of the domain are refused; a domain whose
guest powered off during the copy is started paused to finish it, and shows as stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from csbs.drivers.base import InstantSource, Snapshot, StreamState
from csbs.drivers.common import InstantRecords, runtime_base, spawn, write_json
from csbs.drivers.libvirt.domain_xml import DomainDisk, dac_label, domain_disks
from csbs.drivers.libvirt.domains import START_TIMEOUT, _error, _socket_base, libvirt, log
from csbs.drivers.libvirt.snapshots import LibvirtSnapshots
from csbs.errors import DiskUnavailable, DriverError, InvalidInput, InvalidState, NotFound
from csbs.model import Server, check_id

#: How long the relay's reads wait for csbs's export to come back (a worker restart)
#: before the guest's reads fail.
RECONNECT_DELAY = 300

#: The domain locks this thread holds (``LibvirtInstant._lock`` is re-entrant).
_HELD = threading.local()
#: Relays this process started, reaped when they stop.
_relays: dict[int, subprocess.Popen[bytes]] = {}


def relay_backing(socket: str, export: str) -> str:
    """The backing file name of an instantly restored image: QEMU's ``json:`` pseudo
    protocol for the relay's NBD export of the disk on a Unix socket."""
    nbd = {"driver": "nbd", "server": {"type": "unix", "path": socket}, "export": export}
    return "json:" + json.dumps({"driver": "raw", "file": nbd}, separators=(",", ":"))


def relay_command(binary: str, socket: str, sources: dict[str, dict[str, Any]]) -> list[str]:
    """qemu-storage-daemon exporting each disk (by target) read-only on ``socket``, read
    from csbs's export of the backup (``InstantSource``) with a reconnect delay."""
    blockdevs, exports = [], []
    for target, source in sources.items():
        node = f"src-{target}"
        nbd = {
            "driver": "nbd",
            "node-name": node,
            "read-only": True,
            "server": {"type": "unix", "path": source["socket"]},
            "export": source["export"],
            "reconnect-delay": RECONNECT_DELAY,
        }
        export = {"type": "nbd", "id": f"e-{target}", "node-name": node, "name": target}
        blockdevs += ["--blockdev", json.dumps(nbd)]
        exports += ["--export", json.dumps({**export, "writable": False})]
    server = {"addr": {"type": "unix", "path": socket}}
    return [binary, *blockdevs, "--nbd-server", json.dumps(server), *exports]


def qemu_baselabel(capabilities_xml: str, domain_type: str) -> tuple[int, int] | None:
    """The uid and gid QEMU runs as unless a domain says otherwise: the host's DAC
    ``baselabel`` for the domain type (``+64055:+64055``), from libvirt's capabilities."""
    for model in ET.fromstring(capabilities_xml).findall("./host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for base in model.findall("baselabel"):
            if base.get("type") == domain_type:
                user, _, group = (base.text or "").partition(":")
                try:
                    return int(user.lstrip("+")), int(group.lstrip("+"))
                except ValueError:
                    return None
    return None


def qcow2_definition(inactive_xml: str, target: str) -> str | None:
    """The ``<disk>`` of ``target`` redefined as a qcow2 image whose backing chain libvirt
    reads from the image, or None when its definition already is one. A raw disk must
    become qcow2 to have a backing file, and a ``<backingStore>`` in the definition would
    hide the new backing file (an empty one even tells QEMU there is none)."""
    for element in ET.fromstring(inactive_xml).findall("./devices/disk"):
        dev = element.find("target")
        if dev is None or dev.get("dev") != target:
            continue
        driver = element.find("driver")
        backing = element.find("backingStore")
        if driver is not None and driver.get("type") == "qcow2" and backing is None:
            return None
        if driver is None:
            driver = ET.SubElement(element, "driver", name="qemu")
        driver.set("type", "qcow2")
        if backing is not None:
            element.remove(backing)
        return ET.tostring(element, encoding="unicode")
    return None


def backed_targets(live_xml: str) -> set[str]:
    """The disks of a running domain that still read through to a backing store."""
    targets = set()
    for element in ET.fromstring(live_xml).findall("./devices/disk"):
        dev = element.find("target")
        backing = element.find("backingStore")
        if dev is not None and backing is not None and backing.find("source") is not None:
            targets.add(dev.get("dev", ""))
    return targets


def _grant(path: Path, label: tuple[int, int] | None, folder: bool) -> None:
    """Let QEMU (the domain's DAC user and group) and csbs alone use ``path``."""
    if label is None:
        return
    uid, gid = label
    try:
        if os.getuid() == 0:
            os.chown(path, uid, gid)
            os.chmod(path, 0o700 if folder else 0o600)
        else:
            os.chown(path, -1, gid)
            os.chmod(path, 0o770 if folder else 0o660)
    except PermissionError as exc:
        raise DriverError(f"cannot let QEMU ({uid}:{gid}) use {path}: {exc}") from exc


def _is_relay(pid: int, socket: str) -> bool:
    """Whether ``pid`` is still the relay listening on ``socket`` (not a reused pid)."""
    proc = _relays.get(pid)
    if proc is not None and proc.poll() is not None:
        _relays.pop(pid, None)
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return socket.encode() in cmdline


def _lost_libvirtd(exc: Exception) -> bool:
    """Whether a libvirt call failed because libvirtd went away (it restarts)."""
    return isinstance(exc, libvirt.libvirtError) and (
        exc.get_error_domain() == libvirt.VIR_FROM_RPC
        or exc.get_error_code() in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC)
    )


def _terminate(pid: int, socket: str) -> None:
    """SIGTERM, SIGKILL after 10 s; reaped when this process started it (a zombie whose
    parent does not reap it has no command line left: it counts as gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _is_relay(pid, socket):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    proc = _relays.pop(pid, None)
    if proc is not None:
        proc.wait()


class LibvirtInstant(InstantRecords, LibvirtSnapshots):
    """Instant restore, and what keeps the domain's other operations from breaking it
    while its disks are copied (see the module docstring)."""

    def __init__(
        self,
        state_dir: Path,
        uri: str = "qemu:///system",
        project: str = "default",
        host: str = "default",
        qemu_img: str = "qemu-img",
        storage_daemon: str = "qemu-storage-daemon",
        shutdown_timeout: float = 90.0,
        stream_speed: int = 0,
    ) -> None:
        super().__init__(state_dir, uri, project, host, qemu_img, storage_daemon, shutdown_timeout)
        #: Bytes per second an instant restore copies per disk (the block pull's
        #: bandwidth; 0 is no limit; ``Settings.instant_stream_speed``).
        self.stream_speed = stream_speed
        #: Each domain's last reported copy, repeated while libvirtd cannot be reached.
        self._last: dict[str, dict[str, StreamState]] = {}

    @contextlib.contextmanager
    def _lock(self, server_id: str) -> Iterator[None]:
        """The domain's lock, re-entrant within a thread: an override checks, under the
        lock, what the operation it wraps then does under the same lock."""
        key = str(self._dir(server_id))
        held: set[str] = _HELD.__dict__.setdefault("keys", set())
        if key in held:
            yield
            return
        with super()._lock(server_id):
            held.add(key)
            try:
                yield
            finally:
                held.discard(key)

    # -- records ----------------------------------------------------------------------------
    def _key(self, server_id: str) -> str:
        """Names this driver's sockets of a domain apart from another state dir's."""
        return hashlib.sha1(str(self._dir(server_id).resolve()).encode()).hexdigest()[:12]

    def _refuse_while_instant(self, server_id: str, what: str) -> None:
        record = self._instant(server_id)
        if record is not None:
            raise InvalidState(
                f"server {server_id} is being restored instantly from backup "
                f"{record['backup_id']}; {what} when its disks are copied"
            )

    # -- what the other operations must respect -----------------------------------------------
    def _shut_off(self, dom: Any, server_id: str) -> None:
        """Restore writes need a shut-off domain with no snapshot held and no copy going."""
        self._refuse_while_instant(server_id, "restore it")
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

    def group_snapshot(self, server_id: str, snapshot_id: str) -> Snapshot:
        """Refused while the disks still read through to a backup: a backup job and a
        block pull on the same disk would stand in each other's way."""
        with self._lock(server_id):
            self._refuse_while_instant(server_id, "back it up")
            return super().group_snapshot(server_id, snapshot_id)

    def _started_for_snapshot(self, server_id: str) -> bool:
        """A domain started paused only to finish its copy is stopped to its owner too."""
        record = self._instant(server_id)
        paused = record is not None and bool(record.get("started_paused"))
        return paused or super()._started_for_snapshot(server_id)

    def stop(self, server_id: str) -> str | None:
        """Stopped already when it runs paused only to finish its copy. Otherwise as
        usual: the copy, ended with QEMU, goes on with the domain started paused."""
        with self._lock(server_id):
            record = self._instant(server_id)
            if record is not None and record.get("started_paused"):
                return None
            return super().stop(server_id)

    def start(self, server_id: str) -> Server:
        """A domain running paused only to finish its copy is resumed (and then stays)."""
        with self._lock(server_id):
            record = self._instant(server_id)
            if record is not None and record.get("started_paused"):
                dom = self._domain(server_id)
                if dom.isActive():
                    try:
                        dom.resume()
                    except libvirt.libvirtError as exc:
                        raise DriverError(
                            f"server {server_id} could not start: {_error(exc)}"
                        ) from exc
                    record["started_paused"] = False
                    self._save_instant(server_id, record)
                    return self._describe(dom)
            return super().start(server_id)

    # -- instant restore ----------------------------------------------------------------------
    def instant_support(self) -> str | None:
        return None

    def instant_backup(self, server_id: str) -> str | None:
        with self._lock(server_id):
            record = self._instant(server_id)
        return None if record is None else str(record["backup_id"])

    def instant_socket(self, server_id: str, disk_id: str) -> str:
        """csbs's export of a disk, in csbs's private runtime directory: only the relay,
        which runs as csbs, connects to it."""
        with self._lock(server_id):
            record = self._instant(server_id)
        if record is not None and disk_id in record["disks"]:
            return str(record["disks"][disk_id]["socket"])
        name = f"lv-{self._key(server_id)}-{check_id(disk_id, 'disk_id')}.sock"
        return str(runtime_base() / name)

    def instant_attach(self, server_id: str, backup_id: str, sources: list[InstantSource]) -> None:
        """Put in place of each disk an image backed by the relay's export of it and start
        the domain. Done already for this backup: nothing to do (the guest may have
        written since)."""
        with self._lock(server_id):
            record = self._instant(server_id)
            if record is not None:
                if record["backup_id"] == backup_id:
                    return
                raise InvalidState(
                    f"server {server_id} is being restored instantly from backup "
                    f"{record['backup_id']}; wait until its disks are copied"
                )
            dom = self._domain(server_id)
            self._shut_off(dom, server_id)
            disks = {d.target: d for d in domain_disks(dom.XMLDesc(0))}
            for source in sources:
                disk = disks.get(source.disk_id)
                if disk is None:
                    raise NotFound(f"disk {source.disk_id} is not a disk of server {server_id}")
                if disk.refused is not None:
                    raise InvalidInput(
                        f"server {server_id} cannot be restored instantly: {disk.refused}"
                    )
            self._stop_writers(server_id)
            record = {
                "backup_id": backup_id,
                "relay": str(_socket_base() / f"i-{self._key(server_id)}" / "nbd.sock"),
                "disks": {s.disk_id: s.model_dump() for s in sources},
                "launched": False,
                "started_paused": False,
                "pulling": [],
                "finished": [],
            }
            self._start_relay(dom, server_id, record)
            try:
                self.invalidate(
                    dom,
                    server_id,
                    f"this server was restored instantly from backup {backup_id}, which "
                    f"deleted csbs's checkpoints",
                )
                for source in sources:
                    self._replace(dom, disks[source.disk_id], source, record["relay"])
            except BaseException:
                self._stop_relay(server_id)
                raise
            self._save_instant(server_id, record)
            self._launch(dom, server_id, record, paused=False)

    def _replace(self, dom: Any, disk: DomainDisk, source: InstantSource, relay: str) -> None:
        """A new qcow2 image backed by the relay's export, in place of the disk's image,
        with its owner and mode (libvirt relabels it for QEMU when the domain starts)."""
        path = Path(disk.source)
        fresh = path.with_name(path.name + ".instant")
        self._img(
            "create", "-q", "-u", "-f", "qcow2",
            "-b", relay_backing(relay, disk.target), "-F", "raw",
            str(fresh), str(source.size_bytes),
        )  # fmt: skip
        with contextlib.suppress(FileNotFoundError, PermissionError):
            st = os.stat(path)
            os.chown(fresh, st.st_uid, st.st_gid)
            os.chmod(fresh, stat.S_IMODE(st.st_mode))
        fresh.replace(path)
        changed = qcow2_definition(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), disk.target)
        if changed is None:
            return
        try:
            dom.updateDeviceFlags(changed, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as exc:
            raise DriverError(
                f"could not redefine disk {disk.target} as a qcow2 image: {_error(exc)}"
            ) from exc

    def _launch(self, dom: Any, server_id: str, record: dict[str, Any], paused: bool) -> None:
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        try:
            dom.createWithFlags(flags)
        except libvirt.libvirtError as exc:
            raise DriverError(
                f"server {server_id} could not start from backup {record['backup_id']}: "
                f"{_error(exc)}"
            ) from exc
        record.update(launched=True, started_paused=paused)
        self._save_instant(server_id, record)

    def instant_stream(self, server_id: str) -> list[StreamState]:
        """Start each disk's pull if none runs (one that failed copies only what the image
        does not hold yet), and report. A domain that stopped is started again, paused
        (the copy ended with QEMU), and a dead relay too. When every disk is copied the
        relay stops, the record goes and the domain is on its own.

        While libvirtd cannot be reached (it restarts) QEMU, the relay and the pulls go on
        without it: the last progress is reported until it answers again, rather than
        failing a step that a domain reading through to csbs depends on."""
        with self._lock(server_id):
            record = self._instant(server_id)
            if record is None:
                return []
            try:
                dom = self._domain(server_id)
            except DiskUnavailable as exc:
                return self._unreachable(server_id, record, str(exc))
            try:
                states = self._stream(dom, server_id, record)
            except libvirt.libvirtError as exc:
                if not _lost_libvirtd(exc):
                    raise DriverError(
                        f"the copy of server {server_id}'s disks: {_error(exc)}"
                    ) from exc
                return self._unreachable(server_id, record, _error(exc))
            self._last[server_id] = {s.disk_id: s for s in states}
            return states

    def _unreachable(self, server_id: str, record: dict[str, Any], why: str) -> list[StreamState]:
        log.warning("instant restore of server %s: %s; the copy goes on", server_id, why)
        last = self._last.get(server_id, {})
        return [
            last.get(t) or StreamState(disk_id=t, finished=t in record["finished"])
            for t in record["disks"]
        ]

    def _stream(self, dom: Any, server_id: str, record: dict[str, Any]) -> list[StreamState]:
        finished: list[str] = record["finished"]
        if len(finished) < len(record["disks"]):
            if not self._relay_alive(server_id):
                self._start_relay(dom, server_id, record)
            if not dom.isActive():
                # Never started (its start failed), or the guest powered off mid-copy.
                self._launch(dom, server_id, record, paused=bool(record["launched"]))
        backed = backed_targets(dom.XMLDesc(0))
        states = []
        for target in record["disks"]:
            if target in finished:
                states.append(StreamState(disk_id=target, finished=True))
                continue
            state = self._pull(dom, server_id, record, target, target in backed)
            if state.finished:
                finished.append(target)
                self._save_instant(server_id, record)
            states.append(state)
        if all(s.finished for s in states):
            self._finish(dom, server_id, record)
        return states

    def _pull(
        self, dom: Any, server_id: str, record: dict[str, Any], target: str, backed: bool
    ) -> StreamState:
        """How far the disk's pull is; started when none runs and the disk still reads
        through to the backup (a pull started before and gone since has failed)."""
        job = dom.blockJobInfo(target, 0)
        if job:
            return StreamState(disk_id=target, done=int(job["cur"]), total=int(job["end"]))
        if not backed:
            return StreamState(disk_id=target, finished=True)
        error = None
        if target in record["pulling"]:
            error = "the block pull ended before the disk was copied"
        try:
            dom.blockPull(target, self.stream_speed, libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES)
        except libvirt.libvirtError as exc:
            return StreamState(disk_id=target, error=f"libvirt: {_error(exc)}")
        if target not in record["pulling"]:
            record["pulling"].append(target)
            self._save_instant(server_id, record)
        return StreamState(disk_id=target, error=error)

    def _finish(self, dom: Any, server_id: str, record: dict[str, Any]) -> None:
        """Every disk is copied: nothing of csbs is read any more."""
        self._stop_relay(server_id)
        shutil.rmtree(Path(record["relay"]).parent, ignore_errors=True)
        if record.get("started_paused") and dom.isActive():
            dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        self._instant_path(server_id).unlink(missing_ok=True)

    # -- the relay ------------------------------------------------------------------------------
    def _relay_path(self, server_id: str) -> Path:
        return self._dir(server_id) / "relay.json"

    def _qemu_label(self, dom: Any) -> tuple[int, int] | None:
        """The uid and gid QEMU runs as: the domain's own DAC label (a running domain has
        one), else the host's default for its type."""
        xml = dom.XMLDesc(0)
        label = dac_label(xml)
        if label is not None:
            return label
        capabilities = self._retry(lambda conn: conn.getCapabilities())
        return qemu_baselabel(capabilities, ET.fromstring(xml).get("type", "qemu"))

    def _start_relay(self, dom: Any, server_id: str, record: dict[str, Any]) -> None:
        """(Re)start the relay of the disks still to copy, on the recorded socket (the
        images' backing files name it)."""
        self._stop_relay(server_id)
        socket = Path(record["relay"])
        label = self._qemu_label(dom)
        _socket_base()  # after a reboot of the host, /run is empty
        socket.parent.mkdir(mode=0o700, exist_ok=True)
        _grant(socket.parent, label, folder=True)
        socket.unlink(missing_ok=True)
        todo = {t: s for t, s in record["disks"].items() if t not in record["finished"]}
        cmd = relay_command(self.storage_daemon, str(socket), todo)
        log = self._dir(server_id) / "relay.log"
        missing = f"{self.storage_daemon!r} is not installed (install qemu-utils)"
        proc = spawn(cmd, log, missing, append=True)
        _relays[proc.pid] = proc
        write_json(self._relay_path(server_id), {"pid": proc.pid, "socket": str(socket)})
        deadline = time.monotonic() + START_TIMEOUT
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                self._stop_relay(server_id)
                said = log.read_text(errors="replace").strip()[-500:]
                raise DriverError(f"qemu-storage-daemon could not relay the backup: {said}")
            time.sleep(0.02)
        _grant(socket, label, folder=False)

    def _relay_alive(self, server_id: str) -> bool:
        try:
            relay = json.loads(self._relay_path(server_id).read_text())
        except FileNotFoundError:
            return False
        return _is_relay(int(relay["pid"]), str(relay["socket"]))

    def _stop_relay(self, server_id: str) -> None:
        path = self._relay_path(server_id)
        try:
            relay = json.loads(path.read_text())
        except FileNotFoundError:
            return
        if _is_relay(int(relay["pid"]), str(relay["socket"])):
            _terminate(int(relay["pid"]), str(relay["socket"]))
        path.unlink()


__all__ = ["RECONNECT_DELAY", "LibvirtInstant"]
