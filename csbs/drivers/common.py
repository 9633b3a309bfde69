"""What the directory-based drivers (``local``, ``qemu``) share: one directory per server
with its ``server.json``, a ``lock`` file for flock, and a ``snapshots/`` folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from csbs.errors import (
    DiskUnavailable,
    DriverError,
    InvalidInput,
    InvalidState,
    NotFound,
    UnsafePath,
)
from csbs.model import Disk, DiskRole, Server, ServerState, check_id


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``data`` as JSON."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge overlapping or touching (offset, length) ranges."""
    merged: list[tuple[int, int]] = []
    for start, length in sorted(ranges):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            last_start, last_len = merged[-1]
            merged[-1] = (last_start, max(last_len, start + length - last_start))
        else:
            merged.append((start, length))
    return merged


def hash_zeros(digest: Any, count: int) -> None:
    """Feed ``count`` zero bytes to a hashlib digest without allocating them all."""
    zeros = bytes(min(count, 8 * 1024 * 1024))
    while count > 0:
        n = min(count, len(zeros))
        digest.update(zeros[:n] if n != len(zeros) else zeros)
        count -= n


#: The only variables a child process (QEMU, qemu-img) inherits: never a secret such as
#: AWS_SECRET_ACCESS_KEY or CSBS_ENCRYPTION_KEY, which it would keep after the worker.
CHILD_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR")


def child_env() -> dict[str, str]:
    """A minimal environment for a child process."""
    env = {k: os.environ[k] for k in CHILD_ENV_KEYS if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


def run_qemu_img(binary: str, *args: str, timeout: float | None = None) -> str:
    """Run ``qemu-img ARGS``; its stdout. A missing binary is DiskUnavailable (naming the
    package and the setting), a failure DriverError with what qemu-img said."""
    try:
        done = subprocess.run(
            [binary, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=child_env(),
        )
    except FileNotFoundError:
        raise DiskUnavailable(
            f"{binary!r} is not installed (install qemu-utils or set CSBS_QEMU_IMG)"
        ) from None
    if done.returncode != 0:
        raise DriverError(f"qemu-img {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def spawn(
    cmd: list[str], log_path: Path, missing: str, append: bool = False
) -> subprocess.Popen[bytes]:
    """Start a helper process (QEMU, qemu-storage-daemon) in its own session, so that it
    outlives the worker as a VM outlives its management service, with the minimal
    environment and its output in ``log_path``. DiskUnavailable(``missing``) when the
    binary is not installed."""
    try:
        with open(log_path, "ab" if append else "wb") as log:
            return subprocess.Popen(
                cmd,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
    except FileNotFoundError:
        raise DiskUnavailable(missing) from None


def refuse_other_snapshots(server_id: str, snapshot_id: str, held: list[str]) -> None:
    """One snapshot per server at a time: an earlier backup's must be released first."""
    others = [s for s in held if s != snapshot_id]
    if others:
        raise InvalidState(
            f"server {server_id} still holds snapshot {', '.join(others)} of an earlier "
            f"backup; it must be released first"
        )


def runtime_base() -> Path:
    """The private directory under which socket directories are made, created if need be.

    ``$XDG_RUNTIME_DIR/csbs-qemu`` when that is set (a per-user directory the system made),
    else ``$TMPDIR/csbs-qemu-<uid>`` (``/tmp`` when TMPDIR is too long for socket paths).
    Refused (UnsafePath) unless it is a real directory (not a symlink) owned by us with
    no access for group or others: another user who made it first could swap sockets.
    """
    import tempfile

    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and len(xdg) <= 60 and os.path.isdir(xdg):
        base = Path(xdg) / "csbs-qemu"
    else:
        tmp = tempfile.gettempdir()
        if len(tmp) > 60:  # Unix socket paths must stay under 108 bytes
            tmp = "/tmp"
        base = Path(tmp) / f"csbs-qemu-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        base.mkdir(mode=0o700)
    st = os.lstat(base)
    problem = None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory (a symlink or another file)"
    elif st.st_uid != os.getuid():
        problem = f"is owned by uid {st.st_uid}, not by us (uid {os.getuid()})"
    elif stat.S_IMODE(st.st_mode) & 0o077:
        problem = f"has mode {stat.S_IMODE(st.st_mode):o}: group or others may use it"
    if problem is not None:
        raise UnsafePath(
            f"QEMU socket directory {base} {problem}; remove it (or set XDG_RUNTIME_DIR or "
            f"TMPDIR to a private directory) and try again"
        )
    return base


def check_disk_size(size: int, field: str = "size") -> None:
    if size <= 0 or size % 512:
        raise InvalidInput(f"{field} must be a positive multiple of 512 (got {size})")


class DirectoryDriver:
    """Servers as directories under ``root``; subclasses add disks and snapshots."""

    name = "directory"

    def __init__(self, root: Path, project: str = "default", host: str = "default") -> None:
        self.root = Path(root)
        self.project = project
        self.host = host

    # -- paths and locking ---------------------------------------------------------------
    def _dir(self, server_id: str) -> Path:
        return self.root / check_id(server_id, "server_id")

    def _snap_dir(self, server_id: str, snapshot_id: str) -> Path:
        return self._dir(server_id) / "snapshots" / check_id(snapshot_id, "snapshot_id")

    @contextlib.contextmanager
    def _lock(self, server_id: str, exclusive: bool) -> Iterator[None]:
        path = self._dir(server_id) / "lock"
        if not path.parent.is_dir():
            raise NotFound(f"server {server_id} does not exist")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # -- servers ----------------------------------------------------------------------------
    def _load(self, server_id: str) -> Server:
        path = self._dir(server_id) / "server.json"
        try:
            return Server.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"server {server_id} does not exist") from None

    def _save(self, server: Server) -> None:
        write_json(self._dir(server.id) / "server.json", server.model_dump(mode="json"))

    def _mine(self, server: Server) -> bool:
        return server.project == self.project and server.type == self.name

    def list_servers(self) -> list[Server]:
        if not self.root.is_dir():
            return []
        servers = []
        for path in sorted(self.root.glob("*/server.json")):
            server = Server.model_validate_json(path.read_text())
            if self._mine(server):
                servers.append(self._observe(server).model_copy(update={"host": self.host}))
        return servers

    def get_server(self, server_id: str) -> Server:
        server = self._load(server_id)
        if not self._mine(server):
            raise NotFound(f"server {server_id} does not exist")
        return self._observe(server).model_copy(update={"host": self.host})

    def _observe(self, server: Server) -> Server:
        """The server as it is now (a hypervisor driver checks its process here)."""
        return server

    @staticmethod
    def _find_disk(server: Server, disk_id: str) -> Disk:
        try:
            return server.disk(disk_id)
        except KeyError:
            raise NotFound(f"disk {disk_id} is not a disk of server {server.id}") from None

    def _new_server(
        self, name: str, disk_sizes: list[int], shared_disk_sizes: list[int] | None
    ) -> Server:
        """Validate a create request and make the server's record (not yet saved)."""
        if not name or len(name) > 255:
            raise InvalidInput("name must be 1-255 characters")
        if not disk_sizes:
            raise InvalidInput("disk: a server needs at least one disk (the system disk)")
        for size in [*disk_sizes, *(shared_disk_sizes or [])]:
            check_disk_size(size, "disk size")
        disks = [
            Disk(
                id=f"disk-{uuid.uuid4().hex[:12]}",
                name="system" if i == 0 else f"data-{i}",
                size_bytes=size,
                role=DiskRole.SYSTEM if i == 0 else DiskRole.DATA,
            )
            for i, size in enumerate(disk_sizes)
        ]
        disks += [
            Disk(
                id=f"disk-{uuid.uuid4().hex[:12]}",
                name=f"shared-{i + 1}",
                size_bytes=size,
                role=DiskRole.DATA,
                shared=True,
            )
            for i, size in enumerate(shared_disk_sizes or [])
        ]
        server = Server(
            id=f"srv-{uuid.uuid4().hex[:12]}",
            name=name,
            type=self.name,
            state=ServerState.RUNNING,
            disks=disks,
            project=self.project,
            host=self.host,
        )
        for sub in ("disks", "cbt", "snapshots"):
            (self._dir(server.id) / sub).mkdir(parents=True, exist_ok=True)
        return server

    @staticmethod
    def _new_disk(server: Server, size_bytes: int, like: Disk | None) -> Disk:
        """The record of a disk to attach: new, or ``like`` re-created (same id and name)."""
        check_disk_size(size_bytes)
        disk = (
            like.model_copy(update={"size_bytes": size_bytes})
            if like is not None
            else Disk(
                id=f"disk-{uuid.uuid4().hex[:12]}",
                name=f"data-{len(server.disks)}",
                size_bytes=size_bytes,
                role=DiskRole.DATA,
            )
        )
        check_id(disk.id, "disk_id")
        if any(d.id == disk.id for d in server.disks):
            raise InvalidInput(f"disk {disk.id} is already a disk of server {server.id}")
        return disk

    @staticmethod
    def _check_grow(disk: Disk, size_bytes: int) -> None:
        if size_bytes < disk.size_bytes or size_bytes % 512:
            raise InvalidInput(
                f"size must be a multiple of 512 not smaller than the disk's "
                f"{disk.size_bytes} bytes (got {size_bytes})"
            )

    @staticmethod
    def _check_removable(disk: Disk) -> None:
        if disk.role == DiskRole.SYSTEM:
            raise InvalidInput(f"disk {disk.id} is the system disk; it cannot be removed")

    # -- snapshots --------------------------------------------------------------------------
    def _active_snapshots(self, server_id: str) -> list[Path]:
        snaps = self._dir(server_id) / "snapshots"
        if not snaps.is_dir():
            return []
        return [p for p in sorted(snaps.iterdir()) if (p / "snapshot.json").exists()]

    def snapshots(self, server_id: str) -> list[str]:
        """Ids of the snapshots currently held (for tests and diagnostics)."""
        return [p.name for p in self._active_snapshots(server_id)]


class NoInstantRestore:
    """The instant-restore half of a driver that cannot run a server from its backup:
    ``instant_support`` says why, and every step refuses with that reason."""

    instant_reason = "this driver cannot restore instantly"

    def instant_support(self) -> str | None:
        return self.instant_reason

    def instant_socket(self, server_id: str, disk_id: str) -> str:
        raise InvalidState(self.instant_reason)

    def instant_backup(self, server_id: str) -> str | None:
        return None

    def instant_attach(self, server_id: str, backup_id: str, sources: list[Any]) -> None:
        raise InvalidState(self.instant_reason)

    def instant_stream(self, server_id: str) -> list[Any]:
        raise InvalidState(self.instant_reason)


class InstantRecords:
    """``instant.json`` in a server's directory: the instant restore in progress (its
    backup and each disk's source), so a retried step resumes instead of re-attaching."""

    if TYPE_CHECKING:

        def _dir(self, server_id: str) -> Path: ...

    def _instant_path(self, server_id: str) -> Path:
        return self._dir(server_id) / "instant.json"

    def _instant(self, server_id: str) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(self._instant_path(server_id).read_text())
        except FileNotFoundError:
            return None
        return record

    def _save_instant(self, server_id: str, record: dict[str, Any]) -> None:
        write_json(self._instant_path(server_id), record)
