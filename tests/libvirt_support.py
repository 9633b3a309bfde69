"""libvirt for the tests: the daemons, domains defined from XML as an operator would, and
``LabServers``, the libvirt driver plus the dev half of the contract (create a domain, play
its guest with ``qemu-io``, checksum its images) so the driver contract suite runs on it.
The production driver never does any of that: only this test adapter does."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import pytest

from csbs.drivers.common import check_disk_size
from csbs.drivers.libvirt import LibvirtDriver
from csbs.drivers.libvirt.domain_xml import domain_disks
from csbs.errors import DriverError, InvalidInput, InvalidState, NotFound
from csbs.model import Disk, DiskRole, Server, ServerState

try:
    import libvirt
except ImportError:  # pragma: no cover
    libvirt = None

URI = "qemu:///system"
#: Domains the tests define are named with this prefix (and removed by it).
PREFIX = "csbs-t-"
GUEST_DIR = Path(__file__).resolve().parents[2] / "shared" / "guest"


def missing() -> str | None:
    """Why libvirt tests cannot run here, or None."""
    if libvirt is None:
        return "libvirt-python is not installed (apt-get install libvirt-dev pkg-config)"
    if shutil.which("libvirtd") is None or shutil.which("qemu-storage-daemon") is None:
        return "libvirtd or qemu-storage-daemon is not installed (apt-get install libvirt-daemon-system)"
    if os.getuid() != 0:
        return "the libvirt tests start libvirtd and run as root"
    return None


def need_libvirt() -> None:
    """Skip loudly where libvirt cannot run; in CI that is a failure, never a skip."""
    reason = missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"libvirt is required in CI: {reason}")
    pytest.skip(f"LIBVIRT TESTS SKIPPED: {reason}")


def _alive() -> bool:
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


@contextlib.contextmanager
def libvirtd() -> Iterator[None]:
    """libvirtd and virtlogd, started if they are not running (and stopped again after)."""
    started: list[str] = []
    if not _alive():
        for daemon in ("virtlogd", "libvirtd"):
            if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode != 0:
                subprocess.run([daemon, "-d"], check=True)
                started.append(daemon)
        deadline = time.monotonic() + 30
        while not _alive():
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd did not answer on qemu:///system within 30 s")
            time.sleep(0.2)
    _remove_leftovers()
    try:
        yield
    finally:
        for daemon in reversed(started):
            subprocess.run(["pkill", "-x", daemon], check=False)


def _remove_leftovers() -> None:
    """Domains and folders of an earlier session that ended before its clean-up (a test
    stopped at its timeout): one libvirt test session runs on a machine at a time."""
    conn = libvirt.open(URI)
    try:
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(PREFIX):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    finally:
        conn.close()
    for folder in Path("/var/tmp").glob("csbs-lv-*"):
        shutil.rmtree(folder, ignore_errors=True)


def restart_libvirtd() -> None:
    """Stop libvirtd and start it again (its domains keep running, as on a real host)."""
    subprocess.run(["pkill", "-x", "libvirtd"], check=False)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("libvirtd did not stop")
        time.sleep(0.1)
    subprocess.run(["libvirtd", "-d"], check=True)
    while not _alive():
        if time.monotonic() > deadline:
            raise RuntimeError("libvirtd did not come back")
        time.sleep(0.2)


def sha_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(8 * 1024 * 1024):
            digest.update(piece)
    return digest.hexdigest()


class Lab:
    """A folder QEMU (user libvirt-qemu) can reach, and the domains defined in it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="csbs-lv-", dir="/var/tmp"))
        os.chmod(self.dir, 0o755)
        self.conn = libvirt.open(URI)
        self.tag = uuid.uuid4().hex[:6]

    def image(self, name: str, size: int, fmt: str = "qcow2") -> Path:
        path = self.dir / f"{name}-{uuid.uuid4().hex[:6]}.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
        return path

    def define(
        self,
        name: str,
        disks: list[tuple[Path, str]],
        *,
        kernel: Path | None = None,
        cmdline: str = "",
        extra_devices: str = "",
        start: bool = True,
    ) -> Any:
        """Define a domain from XML, as an operator would with ``virsh define``."""
        devices = []
        for i, (path, fmt) in enumerate(disks):
            devices.append(
                f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
                f"<source file={quoteattr(str(path))}/>"
                f"<target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
            )
        boot = ""
        if kernel is not None:
            serial = self.dir / f"{name}.serial.log"
            boot = (
                f"<kernel>{kernel / 'vmlinuz'}</kernel><initrd>{kernel / 'initrd.gz'}</initrd>"
                f"<cmdline>console=ttyS0 panic=-1 loglevel=3 {cmdline}</cmdline>"
            )
            devices.append(
                f"<serial type='file'><source path={quoteattr(str(serial))} append='on'/>"
                f"<target port='0'/></serial>"
            )
        xml = f"""<domain type='qemu'>
  <name>{PREFIX}{self.tag}-{name}</name>
  <memory unit='MiB'>{256 if kernel else 64}</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>{"".join(devices)}{extra_devices}<memballoon model='none'/></devices>
</domain>"""
        # As an operator would: the XML in a file, then virsh define.
        path = self.dir / f"{name}-{uuid.uuid4().hex[:6]}.xml"
        path.write_text(xml)
        subprocess.run(["virsh", "-q", "-c", URI, "define", str(path)], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        dom = self.conn.lookupByName(f"{PREFIX}{self.tag}-{name}")
        if start:
            dom.create()
        return dom

    def reconnect(self) -> None:
        """A new connection (after libvirtd restarted); domains must be looked up again."""
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()
        self.conn = libvirt.open(URI)

    def serial(self, dom: Any) -> str:
        path = self.dir / f"{dom.name().removeprefix(f'{PREFIX}{self.tag}-')}.serial.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_serial(self, dom: Any, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while text not in (out := self.serial(dom)):
            if time.monotonic() > deadline:
                raise AssertionError(f"the guest never said {text!r}; it said:\n{out}")
            time.sleep(0.2)
        return out

    def qemu_io(self, dom: Any, target: str, command: str) -> str:
        """A guest write with ``qemu-io`` on the disk's device (HMP); what QEMU printed."""
        alias = None
        import xml.etree.ElementTree as ET

        for disk in ET.fromstring(dom.XMLDesc(0)).findall("./devices/disk"):
            t = disk.find("target")
            a = disk.find("alias")
            if t is not None and t.get("dev") == target and a is not None:
                alias = a.get("name")
        if alias is None:
            raise NotFound(f"disk {target} is not attached to a running domain")
        import libvirt_qemu

        return str(
            libvirt_qemu.qemuMonitorCommand(
                dom,
                f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "{command}"',
                libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
            )
        )

    def image_sha(self, path: str | Path, fmt: str = "qcow2") -> str:
        """sha256 of an image's guest-visible content (read with qemu-img, shared)."""
        out = self.dir / f"sum-{uuid.uuid4().hex[:6]}.raw"
        try:
            subprocess.run(
                ["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out)],
                check=True,
            )
            return sha_file(out)
        finally:
            out.unlink(missing_ok=True)

    def cleanup(self) -> None:
        for dom in self.conn.listAllDomains(0):
            if dom.name().startswith(f"{PREFIX}{self.tag}-"):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        self.conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class LabServers(LibvirtDriver):
    """The libvirt driver with the dev half of the contract, for the contract suite."""

    def __init__(self, state_dir: Path, lab: Lab, shutdown_timeout: float = 1.0) -> None:
        super().__init__(state_dir, uri=URI, shutdown_timeout=shutdown_timeout)
        self.lab = lab

    def create_server(
        self, name: str, disk_sizes: list[int], shared_disk_sizes: list[int] | None = None
    ) -> Server:
        disks = [(self.lab.image(name, size), "qcow2") for size in disk_sizes]
        shared = ""
        for i, size in enumerate(shared_disk_sizes or []):
            path = self.lab.image(f"{name}-shared", size, "raw")
            target = f"vd{chr(ord('a') + len(disks) + i)}"
            shared += (
                f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                f"<source file={quoteattr(str(path))}/><target dev='{target}' bus='virtio'/>"
                f"<shareable/></disk>"
            )
        dom = self.lab.define(name, disks, extra_devices=shared)
        return self.get_server(dom.UUIDString())

    def set_state(self, server_id: str, state: ServerState) -> Server:
        dom = self._domain(server_id)
        if state == ServerState.RUNNING and not dom.isActive():
            dom.create()
        elif state != ServerState.RUNNING and dom.isActive():
            dom.destroy()
        if state not in (ServerState.RUNNING, ServerState.STOPPED):
            raise InvalidInput(f"libvirt cannot put a domain in state {state.value}")
        return self.get_server(server_id)

    def write(self, server_id: str, disk_id: str, offset: int, data: bytes) -> None:
        dom = self._domain(server_id)
        server = self.get_server(server_id)
        if server.state != ServerState.RUNNING:
            raise InvalidState(
                f"server {server_id} is {server.state}; guest writes need a running server"
            )
        disk = server.disk(disk_id)
        if offset < 0 or offset + len(data) > disk.size_bytes:
            raise InvalidInput(
                f"offset/length: range {offset}+{len(data)} is outside the disk "
                f"({disk.size_bytes} bytes)"
            )
        source = self.lab.dir / f"w-{uuid.uuid4().hex[:8]}"
        source.write_bytes(data)
        os.chmod(source, 0o644)
        try:
            # qemu-io reports on QEMU's stdout (libvirt's log), not here: the contract
            # tests check what was written by reading it back.
            self.lab.qemu_io(dom, disk_id, f"write -s {source} {offset} {len(data)}")
            self.lab.qemu_io(dom, disk_id, "flush")
        finally:
            source.unlink(missing_ok=True)

    def _image(self, server_id: str, disk_id: str) -> tuple[str, str]:
        for disk in domain_disks(self._domain(server_id).XMLDesc(0)):
            if disk.target == disk_id:
                return disk.source, disk.format
        raise NotFound(f"disk {disk_id} is not a disk of server {server_id}")

    def checksum(self, server_id: str) -> dict[str, str]:
        dom = self._domain(server_id)
        sums = {}
        for disk in domain_disks(dom.XMLDesc(0)):
            if dom.isActive():
                self.lab.qemu_io(dom, disk.target, "flush")
            sums[disk.target] = self.lab.image_sha(disk.source, disk.format)
        return sums

    def _flags(self, dom: Any) -> int:
        flags = int(libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        return flags

    def add_disk(self, server_id: str, size_bytes: int, like: Disk | None = None) -> Disk:
        check_disk_size(size_bytes)
        dom = self._domain(server_id)
        taken = [d.target for d in domain_disks(dom.XMLDesc(0))]
        if like is not None and like.id in taken:
            raise InvalidInput(f"disk {like.id} is already attached to server {server_id}")
        target = (
            like.id
            if like is not None
            else next(f"vd{c}" for c in "bcdefghijklmnop" if f"vd{c}" not in taken)
        )
        path = self.lab.image(dom.name(), size_bytes)
        from csbs.drivers.libvirt.domain_xml import disk_xml

        dom.attachDeviceFlags(disk_xml(target, str(path)), self._flags(dom))
        return self.get_server(server_id).disk(target)

    def resize_disk(self, server_id: str, disk_id: str, size_bytes: int) -> Disk:
        dom = self._domain(server_id)
        disk = self.get_server(server_id).disk(disk_id)
        if size_bytes < disk.size_bytes or size_bytes % 512:
            raise InvalidInput(
                f"size must be a multiple of 512 not smaller than the disk's "
                f"{disk.size_bytes} bytes (got {size_bytes})"
            )
        if dom.isActive():
            dom.blockResize(disk_id, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        else:
            source, fmt = self._image(server_id, disk_id)
            subprocess.run(["qemu-img", "resize", "-q", "-f", fmt, source, str(size_bytes)],
                           check=True)  # fmt: skip
        return self.get_server(server_id).disk(disk_id)

    def remove_disk(self, server_id: str, disk_id: str) -> None:
        dom = self._domain(server_id)
        disk = self.get_server(server_id).disk(disk_id)
        if disk.role == DiskRole.SYSTEM:
            raise InvalidInput(f"disk {disk_id} is the system disk; it cannot be removed")
        source, _ = self._image(server_id, disk_id)
        from csbs.drivers.libvirt.domain_xml import disk_xml

        # A guest-less domain never acknowledges a hot unplug: detach it cold.
        running = dom.isActive()
        if running:
            dom.destroy()
        dom.detachDeviceFlags(disk_xml(disk_id, source), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if running:
            dom.create()
        if disk_id in [d.target for d in domain_disks(dom.XMLDesc(0))]:
            raise DriverError(f"disk {disk_id} was not detached")


def build_guest(out: Path) -> Path:
    """The real Linux guest of ../shared/guest (kernel and initramfs), built once into
    ``out`` (a folder QEMU can read)."""
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o755)
    subprocess.run([str(GUEST_DIR / "build-guest"), str(out)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    for name in ("vmlinuz", "initrd.gz"):
        os.chmod(out / name, 0o644)
    return out


def guest_disk(lab: Lab, script: str, size: str = "64M", fmt: str = "qcow2") -> Path:
    """An ext4 system disk holding ``guest.sh`` (built with mkfs.ext4 -d, no mount)."""
    return ext4_image(lab.dir, script, size, fmt)


def ext4_image(folder: Path, script: str, size: str = "64M", fmt: str = "qcow2") -> Path:
    """An ext4 image in ``folder`` holding an executable ``guest.sh`` (mkfs.ext4 -d, no
    mount): raw, or converted to qcow2."""
    src = Path(tempfile.mkdtemp(dir=folder))
    (src / "guest.sh").write_text(script)
    os.chmod(src / "guest.sh", 0o755)
    raw = folder / f"fs-{uuid.uuid4().hex[:6]}.raw"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(src), str(raw), size], check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    shutil.rmtree(src)
    if fmt == "raw":
        return raw
    out = raw.with_suffix(".qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out)], check=True)
    raw.unlink()
    return out
