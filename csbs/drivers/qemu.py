"""The ``qemu`` driver: every server is a real QEMU process with qcow2 disks, driven over QMP.

Layout of one server (like ``local``; the sockets live in a short runtime directory because
Unix socket paths are limited to 107 bytes)::

    <servers_dir>/<server_id>/server.json           id, name, type "qemu", state, disks
    <servers_dir>/<server_id>/lock                  flock: one QMP conversation at a time
    <servers_dir>/<server_id>/qemu.json             {pid, qmp}: the process we started
    <servers_dir>/<server_id>/disks/<disk>.qcow2    the disk images
    <servers_dir>/<server_id>/cbt/<disk>.json       {"checkpoint": bitmap | null, "reason"}
    <servers_dir>/<server_id>/snapshots/<id>/       snapshot.json + fleecing overlays
    $XDG_RUNTIME_DIR/csbs-qemu/<hash>/qmp.sock|nbd.sock   (else $TMPDIR/csbs-qemu-<uid>/)

The socket base directory must belong to us with no access for group or others (and not
be a symlink): one that another local user created first is refused, since whoever
controls it could put their own socket where QEMU's should be. QEMU and qemu-img get a
minimal environment (``child_env``): never the worker's S3 secret or encryption key.

Process model. ``running`` means a QEMU process whose VM runs. ``stopped`` means no
process, or a paused maintenance process (``-S``) while a snapshot, restore or checksum
needs QEMU's block layer; it quits cleanly (persisting the dirty bitmaps) as soon as
nothing needs it. QEMU runs with ``-machine none``: no guest OS, but the real block layer.
Guest writes go through QEMU (``qemu-io`` on the drive over HMP), so QEMU's dirty bitmaps
and copy-before-write see them exactly as they would see a guest's.

Group snapshot = one QMP ``transaction`` over all disks: a new persistent dirty bitmap
named after the snapshot, ``block-dirty-bitmap-disable`` of the previous checkpoint's
bitmap (which now holds exactly the changes between the two instants), and
``blockdev-backup sync=none`` into a qcow2 overlay whose backing is the disk (image
fleecing). Each overlay is exported over NBD (Unix socket) with the previous bitmap, so a
reader gets the disk as of the instant, its allocation (``base:allocation``) and what
changed (``qemu:dirty-bitmap:<prev>``).

Never a wrong incremental: the checkpoint a disk's changes are tracked from is recorded
in ``cbt/<disk>.json`` and cross-checked with QEMU's bitmaps at every snapshot. A process
that died without our ``quit`` (kill -9, crash), a missing or inconsistent bitmap, an
added or resized disk: the disk is read in full with chunk diffing, and the reason is
recorded with the backup.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from csbs.drivers.base import Snapshot, SnapshotDisk
from csbs.drivers.common import (
    DirectoryDriver,
    check_disk_size,
    child_env,
    hash_zeros,
    merge_ranges,
    runtime_base,
    write_json,
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
from csbs.nbd import ALLOCATION, STATE_DIRTY, STATE_ZERO, NbdClient, NbdError, dirty_bitmap_context

T = TypeVar("T")

#: Largest guest write handed to qemu-io in one HMP command.
GUEST_WRITE_PIECE = 32 * 1024 * 1024
#: Seconds to wait for QEMU to start, answer, or quit.
QEMU_TIMEOUT = 30.0

REASON_FIRST = "no changed-block bitmap yet: this disk was never backed up by the qemu driver"
REASON_ADDED = "the disk was added to the server since the last backup"
REASON_RESIZED = "the disk was resized since the last backup, which drops its bitmap"


def _short(disk_id: str) -> str:
    """A short stable token for QEMU ids (node names are limited to 31 characters)."""
    return hashlib.sha1(disk_id.encode()).hexdigest()[:12]


def _snap_token(snapshot_id: str, disk_id: str) -> str:
    """Token of one disk of one snapshot: its overlay, job and export never collide with
    those of another snapshot, even one leaked by a crash."""
    return _short(f"{snapshot_id}/{disk_id}")


def drive_id(disk_id: str) -> str:
    return f"drv-{_short(disk_id)}"


def node_name(disk_id: str) -> str:
    return f"node-{_short(disk_id)}"


def _opt(value: str) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return value.replace(",", ",,")


def _pid_alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process whose command line has ``marker``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and marker.encode() in cmdline


#: QEMU processes this process started, so it can reap them (no zombies in the worker).
_children: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int) -> None:
    proc = _children.get(pid)
    if proc is not None and proc.poll() is not None:
        del _children[pid]


def _launch_error(server_id: str, log: Path) -> CsbsError:
    """Why QEMU did not start, from the end of its log; a locked or missing image is a
    case for a person, not for a retry."""
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    last = lines[-1] if lines else "no message"
    message = f"QEMU failed to start for server {server_id}: {last}"
    if "Could not open" in last or "lock" in last:
        return DiskUnavailable(message)
    return DriverError(message)


class QmpError(DriverError):
    """QEMU refused a QMP command."""

    def __init__(self, command: str, desc: str, error_class: str = "") -> None:
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.desc = desc
        self.error_class = error_class


class _Qmp:
    """A synchronous QMP session over ``qemu.qmp``'s asyncio client.

    The client runs on a private event loop in its own thread, so the driver can be used
    from plain threads (activities, the CLI) and from code that already runs a loop (tests).
    """

    def __init__(self, path: str, timeout: float = QEMU_TIMEOUT) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + min(timeout, 5.0)
        while True:
            # A QEMU that has just created its socket may not greet properly yet; try again.
            self._client = QMPClient("csbs")
            try:
                self._run(self._client.connect(path))
                return
            except (QMPError, OSError, TimeoutError) as exc:
                with suppress(Exception):
                    self._run(self._client.disconnect())
                if time.monotonic() > deadline:
                    self._stop_loop()
                    raise DriverError(f"cannot talk to QEMU over QMP at {path}: {exc}") from exc
                time.sleep(0.02)
            except BaseException:
                self._stop_loop()
                raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, self.timeout), self._loop)
        return future.result()

    def cmd(self, command: str, **arguments: Any) -> Any:
        try:
            return self._run(self._client.execute(command, arguments or None))
        except ExecuteError as exc:
            raise QmpError(command, str(exc), exc.error_class) from None
        except (QMPError, OSError, TimeoutError) as exc:
            raise DriverError(f"QMP {command} failed: {exc!r}") from exc

    def try_cmd(self, command: str, **arguments: Any) -> Any:
        """Run a clean-up command whose target may already be gone."""
        with suppress(QmpError):
            return self.cmd(command, **arguments)
        return None

    def hmp(self, line: str) -> str:
        return str(self.cmd("human-monitor-command", **{"command-line": line}))

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():  # closing a running loop would hide the real error
            self._loop.close()

    def close(self) -> None:
        with suppress(Exception):
            self._run(self._client.disconnect())
        self._stop_loop()


class QemuDriver(DirectoryDriver):
    """Servers as QEMU processes; see the module docstring."""

    name = "qemu"

    def __init__(
        self,
        root: Path,
        project: str = "default",
        qemu_binary: str = "qemu-system-x86_64",
        qemu_img: str = "qemu-img",
    ) -> None:
        super().__init__(root, project)
        self.qemu_binary = qemu_binary
        self.qemu_img = qemu_img

    # -- paths --------------------------------------------------------------------------
    def _disk_path(self, server_id: str, disk_id: str) -> Path:
        return self._dir(server_id) / "disks" / f"{check_id(disk_id, 'disk_id')}.qcow2"

    def _new_runtime(self, server_id: str) -> Path:
        """A fresh short directory for the sockets of a process about to start, inside a
        private base directory (``$XDG_RUNTIME_DIR/csbs-qemu``, else
        ``$TMPDIR/csbs-qemu-<uid>``) that must be ours and closed to everyone else."""
        key = hashlib.sha1(str(self._dir(server_id).resolve()).encode()).hexdigest()[:12]
        base = runtime_base()
        return Path(tempfile.mkdtemp(prefix=f"{key}-", dir=base))

    def _record(self, server_id: str) -> dict[str, Any]:
        """The running process's record: pid and the socket paths it was started with
        (every process uses these, whatever its own TMPDIR)."""
        try:
            record: dict[str, Any] = json.loads(self._record_path(server_id).read_text())
        except FileNotFoundError:
            raise DriverError(f"server {server_id} has no QEMU process") from None
        return record

    def _qmp_path(self, server_id: str) -> str:
        return str(self._record(server_id)["qmp"])

    def _nbd_path(self, server_id: str) -> str:
        return str(self._record(server_id)["nbd"])

    def _log_path(self, server_id: str) -> Path:
        return self._dir(server_id) / "qemu.log"

    # -- changed-block records ------------------------------------------------------------
    def _cbt_path(self, server_id: str, disk_id: str) -> Path:
        return self._dir(server_id) / "cbt" / f"{check_id(disk_id, 'disk_id')}.json"

    def _cbt(self, server_id: str, disk_id: str) -> tuple[str | None, str | None]:
        """(checkpoint bitmap name, reason there is none)."""
        try:
            record = json.loads(self._cbt_path(server_id, disk_id).read_text())
        except FileNotFoundError:
            return None, REASON_FIRST
        return record.get("checkpoint"), record.get("reason")

    def _set_cbt(
        self, server_id: str, disk_id: str, checkpoint: str | None, reason: str | None
    ) -> None:
        write_json(self._cbt_path(server_id, disk_id), {"checkpoint": checkpoint, "reason": reason})

    # -- the process ----------------------------------------------------------------------
    def _record_path(self, server_id: str) -> Path:
        return self._dir(server_id) / "qemu.json"

    def _pid(self, server_id: str) -> int | None:
        """The live QEMU process of the server, or None. Notices a process that died
        without our ``quit`` and marks every disk's changed-block record as untrusted."""
        path = self._record_path(server_id)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        pid = int(record["pid"])
        if _pid_alive(pid, record["qmp"]):
            return pid
        _reap(pid)
        reason = f"QEMU (pid {pid}) exited uncleanly, so its dirty bitmaps cannot be trusted"
        self._distrust(server_id, reason)
        server = self._load(server_id)
        if server.state == ServerState.RUNNING:
            server.state = ServerState.STOPPED
            self._save(server)
        path.unlink(missing_ok=True)
        shutil.rmtree(record.get("runtime", "/nonexistent"), ignore_errors=True)
        return None

    def _distrust(self, server_id: str, reason: str) -> None:
        for disk in self._load(server_id).disks:
            self._set_cbt(server_id, disk.id, None, reason)

    def _observe(self, server: Server) -> Server:
        if server.state == ServerState.RUNNING:
            try:
                record = json.loads(self._record_path(server.id).read_text())
                alive = _pid_alive(int(record["pid"]), record["qmp"])
            except FileNotFoundError:
                alive = False
            if not alive:
                server = server.model_copy(update={"state": ServerState.STOPPED})
        return server

    def _server(self, server_id: str) -> Server:
        """The server, after supervision (call with the lock held)."""
        self.get_server(server_id)
        self._pid(server_id)
        return self._load(server_id)

    def _launch(self, server: Server, paused: bool) -> int:
        """Start QEMU for the server and wait until it answers on QMP.

        Not ``-daemonize``: QEMU's stdout (where ``qemu-io`` reports) goes to
        ``qemu.log``, which the guest-write path reads. QEMU runs in its own session, so it
        outlives the worker that started it, as a VM outlives its management service."""
        runtime = self._new_runtime(server.id)
        qmp, nbd = str(runtime / "qmp.sock"), str(runtime / "nbd.sock")
        cmd = [
            self.qemu_binary,
            "-nodefaults",
            "-display", "none",
            "-machine", "none",
            "-accel", "tcg",
            "-name", f"csbs-{server.id}",
            "-qmp", f"unix:{_opt(qmp)},server=on,wait=off",
        ]  # fmt: skip
        if paused:
            cmd.append("-S")
        for disk in server.disks:
            cmd += ["-drive", self._drive_spec(server.id, disk.id)]
        log_path = self._log_path(server.id)
        try:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    cmd,
                    env=child_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
        except FileNotFoundError:
            shutil.rmtree(runtime, ignore_errors=True)
            raise DiskUnavailable(
                f"the QEMU binary {self.qemu_binary!r} is not installed "
                f"(install qemu-system-x86 or set CSBS_QEMU_BINARY)"
            ) from None
        _children[proc.pid] = proc
        # Recorded before anything else can fail, so no process is ever left unrecorded.
        write_json(
            self._record_path(server.id),
            {"pid": proc.pid, "qmp": qmp, "nbd": nbd, "runtime": str(runtime)},
        )
        deadline = time.monotonic() + QEMU_TIMEOUT
        while not os.path.exists(qmp):
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                self._record_path(server.id).unlink(missing_ok=True)
                shutil.rmtree(runtime, ignore_errors=True)
                raise _launch_error(server.id, log_path)
            time.sleep(0.005)
        return proc.pid

    def _drive_spec(self, server_id: str, disk_id: str) -> str:
        path = _opt(str(self._disk_path(server_id, disk_id)))
        return (
            f"if=none,id={drive_id(disk_id)},file={path},format=qcow2,"
            f"node-name={node_name(disk_id)},discard=unmap"
        )

    def _ensure(self, server: Server) -> int:
        """A live QEMU for the server: running if the server runs, else paused."""
        pid = self._pid(server.id)
        if pid is None:
            pid = self._launch(server, paused=server.state != ServerState.RUNNING)
        return pid

    @contextmanager
    def _session(self, server_id: str) -> Iterator[_Qmp]:
        qmp = _Qmp(self._qmp_path(server_id))
        try:
            yield qmp
        finally:
            qmp.close()

    def _quit(self, server_id: str, qmp: _Qmp, pid: int) -> None:
        """Quit QEMU cleanly (dirty bitmaps are written to the images) and wait for it."""
        record = self._record(server_id)
        with suppress(DriverError):
            qmp.cmd("quit")
        deadline = time.monotonic() + QEMU_TIMEOUT
        while _pid_alive(pid, record["qmp"]):
            _reap(pid)
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                self._distrust(server_id, f"QEMU (pid {pid}) did not quit and was killed")
                break
            time.sleep(0.005)
        _reap(pid)
        if not _pid_alive(pid, record["qmp"]):
            self._record_path(server_id).unlink(missing_ok=True)
            shutil.rmtree(record["runtime"], ignore_errors=True)

    def _settle(self, server_id: str) -> None:
        """Quit a maintenance process that nothing needs any more (call with the lock)."""
        server = self._load(server_id)
        pid = self._pid(server_id)
        if pid is None or server.state == ServerState.RUNNING or self._active_snapshots(server_id):
            return
        with self._session(server_id) as qmp:
            if qmp.cmd("query-block-exports"):
                return
            self._quit(server_id, qmp, pid)

    @staticmethod
    def _nbd_start(qmp: _Qmp, path: str) -> None:
        try:
            qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": path}})
        except QmpError as exc:
            if "already running" not in exc.desc:
                raise

    @staticmethod
    def _nbd_stop_if_idle(qmp: _Qmp) -> None:
        if not qmp.cmd("query-block-exports"):
            qmp.try_cmd("nbd-server-stop")

    @staticmethod
    def _export_del(qmp: _Qmp, export_id: str) -> None:
        """Remove an export now, dropping clients, and wait until it is gone."""
        qmp.try_cmd("block-export-del", id=export_id, mode="hard")
        deadline = time.monotonic() + QEMU_TIMEOUT
        while any(e["id"] == export_id for e in qmp.cmd("query-block-exports")):
            if time.monotonic() > deadline:
                raise DriverError(f"QEMU did not remove export {export_id}")
            time.sleep(0.01)

    @staticmethod
    def _bitmaps(qmp: _Qmp, node: str) -> list[dict[str, Any]]:
        for info in qmp.cmd("query-named-block-nodes", flat=True):
            if info.get("node-name") == node:
                return [b for b in info.get("dirty-bitmaps", []) if b.get("name")]
        raise DriverError(f"QEMU has no block node {node}")

    # -- servers ----------------------------------------------------------------------------
    def create_server(
        self, name: str, disk_sizes: list[int], shared_disk_sizes: list[int] | None = None
    ) -> Server:
        server = self._new_server(name, disk_sizes, shared_disk_sizes)
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

    def _img(self, *args: str) -> str:
        try:
            result = subprocess.run(
                [self.qemu_img, *args],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                env=child_env(),
            )
        except FileNotFoundError:
            raise DiskUnavailable(
                f"{self.qemu_img!r} is not installed (install qemu-utils or set CSBS_QEMU_IMG)"
            ) from None
        if result.returncode != 0:
            raise DriverError(f"qemu-img {args[0]} failed: {result.stderr.strip()}")
        return result.stdout

    def set_state(self, server_id: str, state: ServerState) -> Server:
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            server.state = ServerState(state)
            self._save(server)
            pid = self._pid(server_id)
            if state == ServerState.RUNNING:
                self._ensure(server)
                with self._session(server_id) as qmp:
                    qmp.cmd("cont")
            elif pid is not None:
                with self._session(server_id) as qmp:
                    qmp.cmd("stop")
                self._settle(server_id)
            return server

    def stop(self, server_id: str) -> Server:
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            if server.state == ServerState.RUNNING:
                if self._pid(server_id) is not None:
                    with self._session(server_id) as qmp:
                        qmp.cmd("stop")
                server.state = ServerState.STOPPED
                self._save(server)
                self._settle(server_id)
            elif server.state != ServerState.STOPPED:
                raise InvalidState(f"server {server_id} is {server.state}; it cannot be stopped")
            return server

    def start(self, server_id: str) -> Server:
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
                        qmp.cmd("cont")
                server.state = ServerState.RUNNING
                self._save(server)
            elif server.state != ServerState.RUNNING:
                raise InvalidState(f"server {server_id} is {server.state}; it cannot be started")
            return server

    def pid(self, server_id: str) -> int | None:
        """The server's QEMU process id, if one runs (for tests and diagnostics)."""
        with self._lock(server_id, exclusive=True):
            return self._pid(server_id)

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
                    sums[disk.id] = _hash_export(nbd_path, f"checksum/{disk.id}")
                finally:
                    self._export_del(qmp, export)
            self._nbd_stop_if_idle(qmp)
        return sums

    # -- snapshots --------------------------------------------------------------------------
    def _read_record(self, server_id: str, snapshot_id: str) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(
                (self._snap_dir(server_id, snapshot_id) / "snapshot.json").read_text()
            )
        except FileNotFoundError:
            return None
        return record

    def _lost(self, server_id: str, snapshot_id: str) -> DiskUnavailable:
        return DiskUnavailable(
            f"snapshot {snapshot_id} of server {server_id} is lost: its QEMU process exited "
            f"while the snapshot was held; back the server up again"
        )

    def group_snapshot(self, server_id: str, snapshot_id: str) -> Snapshot:
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            snap = self._snap_dir(server_id, snapshot_id)
            record = self._read_record(server_id, snapshot_id)
            if record is not None and record.get("complete"):
                if self._pid(server_id) != record["pid"]:
                    raise self._lost(server_id, snapshot_id)
                return Snapshot.model_validate(record["snapshot"])
            others = [s for s in self.snapshots(server_id) if s != snapshot_id]
            if others:
                raise InvalidState(
                    f"server {server_id} still holds snapshot {', '.join(others)} of an earlier "
                    f"backup; it must be released first"
                )
            pid = self._ensure(server)
            with self._session(server_id) as qmp:
                if record is not None and record["pid"] == pid:
                    self._teardown(qmp, server_id, snapshot_id, record, committed=False)
                shutil.rmtree(snap, ignore_errors=True)
                snap.mkdir(parents=True)
                disks = [self._plan_disk(qmp, server_id, d.id, d.size_bytes) for d in server.disks]
                snapshot = Snapshot(
                    id=snapshot_id,
                    server_id=server_id,
                    checkpoint=snapshot_id,
                    created_at=datetime.now(UTC).isoformat(),
                    disks=disks,
                )
                record = {
                    "pid": pid,
                    "complete": False,
                    "snapshot": snapshot.model_dump(mode="json"),
                }
                write_json(snap / "snapshot.json", record)
                self._fleece(qmp, server_id, snapshot)
                for disk in disks:
                    self._set_cbt(server_id, disk.disk_id, snapshot_id, None)
                record["complete"] = True
                write_json(snap / "snapshot.json", record)
            return snapshot

    def _plan_disk(self, qmp: _Qmp, server_id: str, disk_id: str, size: int) -> SnapshotDisk:
        """Cross-check the recorded checkpoint with QEMU's bitmaps; drop every bitmap that
        is not the trusted previous checkpoint."""
        node = node_name(disk_id)
        expected, reason = self._cbt(server_id, disk_id)
        bitmaps = {b["name"]: b for b in self._bitmaps(qmp, node)}
        prev = None
        if expected is not None:
            found = bitmaps.get(expected)
            if found is None:
                reason = f"changed-block bitmap {expected} is missing (QEMU exited uncleanly?)"
            elif found.get("inconsistent"):
                reason = f"changed-block bitmap {expected} is inconsistent: QEMU exited uncleanly"
            elif not found.get("recording") or not found.get("persistent"):
                reason = f"changed-block bitmap {expected} was not recording"
            else:
                prev, reason = expected, None
        for name in bitmaps:
            if name != prev:
                qmp.cmd("block-dirty-bitmap-remove", node=node, name=name)
        return SnapshotDisk(
            disk_id=disk_id,
            size_bytes=size,
            changed_since=prev,
            full_read_reason=None if prev else (reason or REASON_FIRST),
        )

    def _fleece(self, qmp: _Qmp, server_id: str, snapshot: Snapshot) -> None:
        snap = self._snap_dir(server_id, snapshot.id)
        for disk in snapshot.disks:
            overlay = snap / f"{disk.disk_id}.qcow2"
            self._img(
                "create", "-q", "-f", "qcow2", "-F", "qcow2", "-u",
                "-b", str(self._disk_path(server_id, disk.disk_id)),
                str(overlay), str(disk.size_bytes),
            )  # fmt: skip
            qmp.cmd(
                "blockdev-add",
                driver="qcow2",
                file={"driver": "file", "filename": str(overlay)},
                backing=node_name(disk.disk_id),
                **{"node-name": f"ov-{_snap_token(snapshot.id, disk.disk_id)}"},
            )
        actions: list[dict[str, Any]] = []
        for disk in snapshot.disks:
            node, short = node_name(disk.disk_id), _snap_token(snapshot.id, disk.disk_id)
            actions.append(
                {
                    "type": "block-dirty-bitmap-add",
                    "data": {"node": node, "name": snapshot.id, "persistent": True},
                }
            )
            if disk.changed_since:
                actions.append(
                    {
                        "type": "block-dirty-bitmap-disable",
                        "data": {"node": node, "name": disk.changed_since},
                    }
                )
            actions.append(
                {
                    "type": "blockdev-backup",
                    "data": {
                        "device": node,
                        "target": f"ov-{short}",
                        "sync": "none",
                        "job-id": f"fleece-{short}",
                        "auto-dismiss": True,
                    },
                }
            )
        qmp.cmd("transaction", actions=actions)
        self._nbd_start(qmp, self._nbd_path(server_id))
        for disk in snapshot.disks:
            args: dict[str, Any] = {
                "type": "nbd",
                "id": f"ex-{_snap_token(snapshot.id, disk.disk_id)}",
                "node-name": f"ov-{_snap_token(snapshot.id, disk.disk_id)}",
                "name": f"{snapshot.id}/{disk.disk_id}",
            }
            if disk.changed_since:
                args["bitmaps"] = [disk.changed_since]
            qmp.cmd("block-export-add", **args)

    def _teardown(
        self,
        qmp: _Qmp,
        server_id: str,
        snapshot_id: str,
        record: dict[str, Any],
        committed: bool,
    ) -> None:
        """Remove exports, fleecing jobs and overlays, then settle the bitmaps: on commit the
        previous checkpoint goes; otherwise the new bitmap is merged back into it."""
        disks = [SnapshotDisk.model_validate(d) for d in record["snapshot"]["disks"]]
        for disk in disks:
            self._export_del(qmp, f"ex-{_snap_token(snapshot_id, disk.disk_id)}")
        for disk in disks:
            job = f"fleece-{_snap_token(snapshot_id, disk.disk_id)}"
            qmp.try_cmd("block-job-cancel", device=job, force=True)
            deadline = time.monotonic() + QEMU_TIMEOUT
            while any(j["id"] == job for j in qmp.cmd("query-jobs")):
                if time.monotonic() > deadline:
                    raise DriverError(f"QEMU did not end fleecing job {job}")
                time.sleep(0.01)
            overlay = f"ov-{_snap_token(snapshot_id, disk.disk_id)}"
            deadline = time.monotonic() + QEMU_TIMEOUT
            while True:  # the node stays busy until a hard-deleted export has let go of it
                try:
                    qmp.cmd("blockdev-del", **{"node-name": overlay})
                    break
                except QmpError as exc:
                    if "find" in exc.desc.lower():  # "Failed to find node ...": gone already
                        break
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        for disk in disks:
            node, prev = node_name(disk.disk_id), disk.changed_since
            names = {b["name"] for b in self._bitmaps(qmp, node)}
            if committed:
                if prev in names:
                    qmp.cmd("block-dirty-bitmap-remove", node=node, name=prev)
                continue
            actions: list[dict[str, Any]] = []
            if prev in names and snapshot_id in names:
                actions += [
                    {
                        "type": "block-dirty-bitmap-merge",
                        "data": {"node": node, "target": prev, "bitmaps": [snapshot_id]},
                    },
                    {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": prev}},
                ]
            if snapshot_id in names:
                actions.append(
                    {
                        "type": "block-dirty-bitmap-remove",
                        "data": {"node": node, "name": snapshot_id},
                    }
                )
            if actions:
                qmp.cmd("transaction", actions=actions)
            if prev in names:
                self._set_cbt(server_id, disk.disk_id, prev, None)
            else:
                self._set_cbt(server_id, disk.disk_id, None, disk.full_read_reason or REASON_FIRST)
        self._nbd_stop_if_idle(qmp)

    def open_snapshot(self, server_id: str, snapshot_id: str, disk_id: str) -> QemuSnapshotReader:
        with self._lock(server_id, exclusive=True):
            record = self._read_record(server_id, snapshot_id)
            if record is None or not record.get("complete"):
                raise NotFound(f"snapshot {snapshot_id} of server {server_id} does not exist")
            snapshot = Snapshot.model_validate(record["snapshot"])
            try:
                disk = snapshot.disk(disk_id)
            except KeyError:
                raise NotFound(f"disk {disk_id} is not in snapshot {snapshot_id}") from None
            if self._pid(server_id) != record["pid"]:
                raise self._lost(server_id, snapshot_id)
        return QemuSnapshotReader(self, server_id, snapshot_id, disk)

    def release_snapshot(self, server_id: str, snapshot_id: str, committed: bool) -> None:
        with self._lock(server_id, exclusive=True):
            snap = self._snap_dir(server_id, snapshot_id)
            if not snap.exists():
                self._settle(server_id)  # a snapshot that failed before its record
                return
            self._server(server_id)
            record = self._read_record(server_id, snapshot_id)
            pid = self._pid(server_id)
            if record is not None and pid is not None and pid == record["pid"]:
                with self._session(server_id) as qmp:
                    self._teardown(qmp, server_id, snapshot_id, record, committed)
            shutil.rmtree(snap)
            self._settle(server_id)

    # -- disk changes (R5) ---------------------------------------------------------------
    def _refuse_while_snapshot(self, server_id: str, what: str) -> None:
        if self._active_snapshots(server_id):
            raise InvalidState(
                f"server {server_id} is being backed up (a snapshot is held); {what} when "
                f"the backup has finished"
            )

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
            self._set_cbt(server_id, disk.id, None, REASON_ADDED)
            server.disks.append(disk)
            self._save(server)
            return disk

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
    def open_disk_writer(self, server_id: str, disk_id: str, size_bytes: int) -> QemuDiskWriter:
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
        return QemuDiskWriter(self, server_id, disk_id, size_bytes, client)

    def _close_writer(self, server_id: str, disk_id: str) -> None:
        with self._lock(server_id, exclusive=True):
            if self._pid(server_id) is None:
                return
            with self._session(server_id) as qmp:
                self._export_del(qmp, f"w-{_short(disk_id)}")
                self._nbd_stop_if_idle(qmp)
            self._settle(server_id)


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

    def __init__(self, driver: QemuDriver, server_id: str, snapshot_id: str, disk: SnapshotDisk):
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
