"""QMP, the names csbs gives QEMU's drives and nodes, and watching QEMU processes."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import threading
import time
from collections.abc import Coroutine
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from csbs.errors import (
    CsbsError,
    DiskUnavailable,
    DriverError,
)

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


def device_id(disk_id: str) -> str:
    """The virtio-blk device that shows a disk to a server's guest (servers with a boot
    configuration only)."""
    return f"vd-{_short(disk_id)}"


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
