"""The QEMU process of a server: its runtime directory and record, launching and quitting
it, QMP sessions, NBD exports and the changed-block records of its disks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from csbs.drivers.common import (
    DirectoryDriver,
    run_qemu_img,
    runtime_base,
    spawn,
    write_json,
)
from csbs.drivers.qemu.boot import QemuBoot
from csbs.drivers.qemu.qmp import (
    QEMU_TIMEOUT,
    REASON_FIRST,
    QmpError,
    _children,
    _launch_error,
    _opt,
    _pid_alive,
    _Qmp,
    _reap,
    device_id,
    drive_id,
    node_name,
)
from csbs.errors import (
    DiskUnavailable,
    DriverError,
)
from csbs.model import Server, ServerState, check_id


class QemuProcesses(DirectoryDriver):
    """Servers as QEMU processes (the process half of the driver)."""

    name = "qemu"

    def __init__(
        self,
        root: Path,
        project: str = "default",
        qemu_binary: str = "qemu-system-x86_64",
        qemu_img: str = "qemu-img",
        host: str = "default",
        shutdown_timeout: float = 90.0,
        stream_speed: int = 0,
    ) -> None:
        super().__init__(root, project, host)
        self.qemu_binary = qemu_binary
        self.qemu_img = qemu_img
        #: How long a guest may take to power off after the ACPI power button before it
        #: is forced off (``Settings.shutdown_timeout``, as for the libvirt driver; B12).
        self.shutdown_timeout = shutdown_timeout
        #: Bytes per second an instant restore copies per disk (``block-stream`` speed;
        #: 0 is no limit; ``Settings.instant_stream_speed``).
        self.stream_speed = stream_speed

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

    # -- the guest (servers with a boot configuration) ---------------------------------------
    def _boot_path(self, server_id: str) -> Path:
        return self._dir(server_id) / "boot.json"

    def serial_path(self, server_id: str) -> Path:
        """The file the guest's serial console is appended to (every boot)."""
        return self._dir(server_id) / "serial.log"

    def _boot(self, server_id: str) -> QemuBoot | None:
        """The server's boot configuration; None for a guest-less server."""
        try:
            return QemuBoot.model_validate_json(self._boot_path(server_id).read_text())
        except FileNotFoundError:
            return None

    @staticmethod
    def _status(qmp: _Qmp) -> str:
        """QEMU's run state: ``running``, ``prelaunch`` (never ran), ``paused``,
        ``shutdown`` (the guest powered off; ``-no-shutdown`` keeps QEMU), ..."""
        return str(qmp.cmd("query-status")["status"])

    def _guest_powered_off(self, server: Server) -> bool:
        """Whether the guest of a running server has powered itself off (call with the
        lock and a live process)."""
        if self._boot(server.id) is None:
            return False
        with self._session(server.id) as qmp:
            return self._status(qmp) == "shutdown"

    def _power_down(self, qmp: _Qmp, server: Server) -> str | None:
        """Press the ACPI power button and wait up to ``shutdown_timeout`` for the guest to
        power off (QEMU then stays, status ``shutdown``); else force it off (the VM stops
        at once, as on a power cut). The warning when forced, else None (B12)."""
        status = self._status(qmp)
        if status in ("shutdown", "prelaunch"):
            return None  # off already, or never booted
        if status != "running":  # paused, panicked, ...: there is no guest to ask
            qmp.cmd("stop")
            return (
                f"server {server.name} ({server.id}) was not running (QEMU status {status}) "
                f"and could not take the ACPI power button; it was powered off (QEMU)"
            )
        qmp.cmd("system_powerdown")
        deadline = time.monotonic() + self.shutdown_timeout
        while time.monotonic() < deadline:
            if self._status(qmp) == "shutdown":
                return None
            time.sleep(0.2)
        qmp.cmd("stop")
        if self._status(qmp) == "shutdown":  # it made it after all
            return None
        return (
            f"server {server.name} ({server.id}) did not shut down within "
            f"{self.shutdown_timeout:g} s after the ACPI power button; it was powered off "
            f"(QEMU): its guest did not flush its caches"
        )

    def _boot_guest(self, qmp: _Qmp) -> None:
        """Run the VM from a fresh boot: a VM that never ran just continues; one that
        powered off or was paused is reset first (a running one is left alone)."""
        status = self._status(qmp)
        if status == "running":
            return
        if status != "prelaunch":
            qmp.cmd("system_reset")
            deadline = time.monotonic() + QEMU_TIMEOUT
            while self._status(qmp) != "prelaunch":  # the main loop resets asynchronously
                if time.monotonic() > deadline:
                    raise DriverError("QEMU did not reset the guest for a fresh boot")
                time.sleep(0.01)
        qmp.cmd("cont")

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
        """The server, after supervision (call with the lock held): a server whose QEMU
        died, or whose guest powered itself off, is stopped."""
        self.get_server(server_id)
        pid = self._pid(server_id)
        server = self._load(server_id)
        if (
            pid is not None
            and server.state == ServerState.RUNNING
            and self._guest_powered_off(server)
        ):
            server.state = ServerState.STOPPED
            self._save(server)
        return server

    def _launch(self, server: Server, paused: bool) -> int:
        """Start QEMU for the server and wait until it answers on QMP.

        Not ``-daemonize``: QEMU's stdout (where ``qemu-io`` reports) goes to
        ``qemu.log``, which the guest-write path reads. QEMU runs in its own session, so it
        outlives the worker that started it, as a VM outlives its management service.

        A server with a boot configuration gets machine ``pc`` booting its kernel, its
        drives as virtio-blk devices (``share-rw``: a restore writes a stopped server's
        disk through an NBD export while the device stays attached), the serial console
        appended to ``serial.log``, and ``-no-shutdown``: when the guest powers off, QEMU
        stays (status ``shutdown``) and the driver quits it cleanly itself, so the dirty
        bitmaps are persisted and stay trusted."""
        boot = self._boot(server.id)
        runtime = self._new_runtime(server.id)
        qmp, nbd = str(runtime / "qmp.sock"), str(runtime / "nbd.sock")
        cmd = [
            self.qemu_binary,
            "-nodefaults",
            "-display", "none",
            "-machine", "none" if boot is None else "pc",
            "-accel", "tcg",
            "-name", f"csbs-{server.id}",
            "-qmp", f"unix:{_opt(qmp)},server=on,wait=off",
        ]  # fmt: skip
        if boot is not None:
            serial = _opt(str(self.serial_path(server.id)))
            cmd += [
                "-m", str(boot.memory_mib),
                "-no-shutdown",
                "-kernel", str(boot.kernel),
                "-append", boot.cmdline,
                "-chardev", f"file,id=serial0,path={serial},append=on",
                "-serial", "chardev:serial0",
            ]  # fmt: skip
            if boot.initrd is not None:
                cmd += ["-initrd", str(boot.initrd)]
        if paused:
            cmd.append("-S")
        for disk in server.disks:
            cmd += ["-drive", self._drive_spec(server.id, disk.id)]
            if boot is not None:
                cmd += [
                    "-device",
                    f"virtio-blk-pci,drive={drive_id(disk.id)},id={device_id(disk.id)},share-rw=on",
                ]
        log_path = self._log_path(server.id)
        missing = (
            f"the QEMU binary {self.qemu_binary!r} is not installed "
            f"(install qemu-system-x86 or set CSBS_QEMU_BINARY)"
        )
        try:
            proc = spawn(cmd, log_path, missing, append=True)
        except DiskUnavailable:
            shutil.rmtree(runtime, ignore_errors=True)
            raise
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

    def _img(self, *args: str) -> str:
        return run_qemu_img(self.qemu_img, *args, timeout=120)

    def pid(self, server_id: str) -> int | None:
        """The server's QEMU process id, if one runs (for tests and diagnostics)."""
        with self._lock(server_id, exclusive=True):
            return self._pid(server_id)
