"""The ``qemu`` driver with a real Linux guest (../shared/guest: a kernel and a busybox
initramfs that boot in a few seconds under TCG, print ``GUEST:`` lines on the serial
console and power off cleanly on the ACPI power button).

B12: an offline backup presses the power button and waits ``shutdown_timeout``; a guest
that ignores it (``guest.ignore_power``) is forced off with a warning on the backup's task.
Either way the backup is ``available``, the server runs again (a fresh boot) and the next
incremental still reads only the changed blocks. The block layer the driver relies on
(qemu-io writes, dirty bitmaps persisted by ``quit``, fleecing snapshots, NBD exports,
hot-plugged disks, restore through a writable export) works with the disks attached to
the guest as virtio-blk devices."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from csbs.config import Settings
from csbs.drivers.qemu import DEFAULT_CMDLINE, QemuBoot, QemuDriver
from csbs.drivers.qemu.qmp import _Qmp
from csbs.errors import InvalidInput
from csbs.model import Server, ServerState
from csbs.services import Services
from starter.stack import SeaweedS3
from tests.conftest import (
    MIB,
    Stack,
    backup,
    dev_servers,
    kill_qemu,
    make_settings,
    restore,
    settings_env,
)
from tests.libvirt_support import build_guest, ext4_image
from tests.qemu_support import QEMU_AVAILABLE, SKIP_REASON
from worker import build_worker

pytestmark = pytest.mark.slow

#: Short enough for a test, long enough for the guest (it powers off in well under 1 s).
SHUTDOWN_TIMEOUT = 12.0

#: The guest's /mnt/guest.sh: say it is up, then idle.
IDLE = "#!/bin/sh\necho 'GUEST: ready'\nwhile true; do sleep 1; done\n"


@pytest.fixture(scope="session")
def guest_kernel() -> Path:
    if not QEMU_AVAILABLE:
        pytest.skip(SKIP_REASON)
    return build_guest(Path("/var/tmp/csbs-guest"))


def boot_of(kernel: Path, *extra: str) -> QemuBoot:
    return QemuBoot(
        kernel=kernel / "vmlinuz",
        initrd=kernel / "initrd.gz",
        cmdline=" ".join([DEFAULT_CMDLINE, *extra]),
    )


def wait_serial(drv: QemuDriver, sid: str, text: str, count: int = 1, timeout: float = 90) -> str:
    """The serial console once ``text`` is on it ``count`` times (every boot appends)."""
    deadline = time.monotonic() + timeout
    while (said := drv.serial(sid)).count(text) < count:
        assert time.monotonic() < deadline, f"the guest never said {text!r} x{count}:\n{said}"
        time.sleep(0.2)
    return said


async def await_serial(drv: QemuDriver, sid: str, text: str, count: int = 1) -> str:
    """``wait_serial`` without blocking the event loop that runs the worker."""
    return await asyncio.to_thread(wait_serial, drv, sid, text, count)


def write_image(drv: QemuDriver, server_id: str, disk_id: str, raw: Path) -> None:
    """Write a raw image onto a disk as guest writes, skipping its empty MiBs."""
    image = raw.read_bytes()
    for at in range(0, len(image), MIB):
        piece = image[at : at + MIB]
        if piece.count(0) != len(piece):
            drv.write(server_id, disk_id, at, piece)


def guest_server(drv: QemuDriver, folder: Path, kernel: Path, name: str, *extra: str) -> Server:
    """A running guest whose ``vda`` (64 MiB) holds an ext4 with ``IDLE`` as guest.sh and
    whose ``vdb`` (16 MiB) is an empty data disk, booted up to "GUEST: ready".

    Disks start empty: the first boot finds no filesystem and idles; the image is then
    written as guest writes (qemu-io) and the guest boots again from it."""
    server = drv.create_server(name, [64 * MIB, 16 * MIB], boot=boot_of(kernel, *extra))
    wait_serial(drv, server.id, "vda holds no ext4 filesystem")
    write_image(drv, server.id, server.disks[0].id, ext4_image(folder, IDLE, fmt="raw"))
    drv.set_state(server.id, ServerState.STOPPED)
    drv.start(server.id)
    said = wait_serial(drv, server.id, "GUEST: ready")
    assert "GUEST: up, disks: vda vdb" in said
    return drv.get_server(server.id)


@pytest.fixture
def qemu_guests(tmp_path: Path) -> Iterator[QemuDriver]:
    if not QEMU_AVAILABLE:
        pytest.skip(SKIP_REASON)
    drv = QemuDriver(tmp_path / "servers", shutdown_timeout=SHUTDOWN_TIMEOUT)
    try:
        yield drv
    finally:
        kill_qemu(drv)


def read_all(drv: QemuDriver, sid: str, snap: str, disk_id: str) -> bytes:
    reader = drv.open_snapshot(sid, snap, disk_id)
    try:
        return bytes(reader.read(0, reader.size_bytes))
    finally:
        reader.close()


def test_a_boot_configuration_names_missing_files(qemu_guests: QemuDriver, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"boot\.kernel"):
        qemu_guests.create_server("g", [MIB], boot={"kernel": str(tmp_path / "none")})
    assert qemu_guests.list_servers() == []


def test_the_block_layer_works_under_a_real_guest(
    qemu_guests: QemuDriver, tmp_path: Path, guest_kernel: Path
) -> None:
    """qemu-io writes, snapshots with dirty bitmaps (kept across a clean shutdown and QEMU's
    quit), NBD reads, a hot-plugged disk, restore writes and checksums, all with the disks
    attached to the guest; stop presses the power button (B12), start boots afresh."""
    drv = qemu_guests
    server = guest_server(drv, tmp_path, guest_kernel, "block")
    sid, data = server.id, server.disks[1].id
    assert drv.boot_config(sid) == boot_of(guest_kernel)
    pattern = bytes(range(256)) * 4096  # 1 MiB
    drv.write(sid, data, 2 * MIB, pattern)
    drv.group_snapshot(sid, "s1")
    assert read_all(drv, sid, "s1", data)[2 * MIB : 3 * MIB] == pattern
    drv.release_snapshot(sid, "s1", committed=True)

    drv.write(sid, data, 8 * MIB, b"\x5a" * 65536)
    added = drv.add_disk(sid, 8 * MIB)  # hot-plugged into the running guest
    drv.write(sid, added.id, 0, b"\x77" * 4096)

    assert drv.stop(sid) is None  # the guest powered off on the button, in time
    said = drv.serial(sid)
    assert "GUEST: clean shutdown" in said
    assert drv.get_server(sid).state == ServerState.STOPPED and drv.pid(sid) is None

    # QEMU quit cleanly: the bitmap of s1 came back with the images and is trusted.
    snap = drv.group_snapshot(sid, "s2")
    by_disk = {d.disk_id: d for d in snap.disks}
    assert by_disk[data].changed_since == "s1" and by_disk[data].full_read_reason is None
    assert by_disk[added.id].changed_since is None
    reader = drv.open_snapshot(sid, "s2", data)
    try:
        assert reader.changed_ranges() == [(8 * MIB, 65536)]
    finally:
        reader.close()
    drv.release_snapshot(sid, "s2", committed=True)

    # Restore writes a stopped guest's disk through a writable export beside its device.
    writer = drv.open_disk_writer(sid, data, 16 * MIB)
    try:
        writer.write(0, b"\x11" * MIB)
    finally:
        writer.close()
    content = bytearray(16 * MIB)
    content[0:MIB] = b"\x11" * MIB
    content[2 * MIB : 3 * MIB] = pattern
    content[8 * MIB : 8 * MIB + 65536] = b"\x5a" * 65536
    sums = drv.checksum(sid)
    assert sums[data] == hashlib.sha256(content).hexdigest()

    drv.start(sid)
    assert drv.get_server(sid).state == ServerState.RUNNING
    said = wait_serial(drv, sid, "GUEST: ready", count=2)
    assert "GUEST: up, disks: vda vdb vdc" in said  # a fresh boot sees the added disk
    drv.remove_disk(sid, added.id)
    assert drv.checksum(sid)[data] == sums[data]  # the guest does not touch vdb


def test_a_guest_that_powered_itself_off_is_stopped(
    qemu_guests: QemuDriver, tmp_path: Path, guest_kernel: Path
) -> None:
    """QEMU stays after the guest's own power-off (``-no-shutdown``): the server reads as
    stopped at the next operation, and start boots it again."""
    drv = qemu_guests
    server = guest_server(drv, tmp_path, guest_kernel, "self-off")
    drv.write(server.id, server.disks[1].id, 0, b"\x01" * 4096)
    drv.checksum(server.id)
    pid = drv.pid(server.id)
    assert pid is not None
    qmp = _Qmp(drv._qmp_path(server.id))
    try:
        qmp.cmd("system_powerdown")
    finally:
        qmp.close()
    wait_serial(drv, server.id, "GUEST: clean shutdown")
    assert drv.stop(server.id) is None
    assert drv.get_server(server.id).state == ServerState.STOPPED
    drv.start(server.id)
    wait_serial(drv, server.id, "GUEST: ready", count=2)


@asynccontextmanager
async def guest_running_stack(
    temporal: WorkflowEnvironment, settings: Settings
) -> AsyncIterator[Stack]:
    """``running_stack`` with one ``Services`` for the worker and the test, whose qemu
    driver waits ``settings.shutdown_timeout`` for a guest to power off."""
    service = Services(settings)
    drv = dev_servers(service.driver)
    assert isinstance(drv, QemuDriver)
    drv.shutdown_timeout = settings.shutdown_timeout  # in case make_driver does not pass it
    address = temporal.client.service_client.config.target_host
    try:
        with ThreadPoolExecutor(settings.max_concurrent_activities) as executor:
            async with build_worker(temporal.client, settings, executor, service):
                yield Stack(settings, service, temporal.client, settings_env(settings, address))
    finally:
        kill_qemu(drv)
        service.catalog.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def guest_stack(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment, guest_kernel: Path
) -> AsyncIterator[Stack]:
    settings = make_settings(tmp_path, s3, compute_driver="qemu", shutdown_timeout=SHUTDOWN_TIMEOUT)
    async with guest_running_stack(temporal, settings) as st:
        yield st


def task_of(st: Stack, backup_id: str, kind: str) -> Any:
    return next(t for t in st.catalog.list_tasks(kind=kind) if t.backup_id == backup_id)


async def test_offline_backup_shuts_a_real_qemu_guest_down_or_powers_it_off(
    guest_stack: Stack, tmp_path: Path, guest_kernel: Path
) -> None:
    """B12 through Temporal: the ACPI power button first, so the guest flushes its caches
    ("GUEST: clean shutdown", no warning); a guest that ignores it is powered off after
    ``shutdown_timeout`` with a warning in the backup task's detail. Both backups are
    ``available``, the guest boots again, the next incremental reads only the changed
    blocks (the bitmaps survived the stop), and a restore boots it once more."""
    st = guest_stack
    drv = dev_servers(st.service.driver)
    assert isinstance(drv, QemuDriver)
    for ignores in (False, True):
        extra = ("guest.ignore_power",) if ignores else ()
        name = "ignores" if ignores else "clean"
        server = await asyncio.to_thread(guest_server, drv, tmp_path, guest_kernel, name, *extra)
        sid, data = server.id, server.disks[1].id
        await asyncio.to_thread(drv.write, sid, data, 4 * MIB, b"\xab" * MIB)
        before = await asyncio.to_thread(drv.checksum, sid)
        boots, readies = (drv.serial(sid).count(s) for s in ("GUEST: up", "GUEST: ready"))

        started = time.monotonic()
        record = await backup(st, sid, offline=True)
        took = time.monotonic() - started
        assert record["status"] == "available"
        detail = task_of(st, record["id"], "backup").detail or ""
        said = drv.serial(sid)
        if ignores:
            assert f"did not shut down within {SHUTDOWN_TIMEOUT:g} s" in detail
            assert "powered off (QEMU)" in detail
            assert "clean shutdown" not in said
            assert took >= SHUTDOWN_TIMEOUT
        else:
            assert "GUEST: clean shutdown" in said and "powered off" not in detail
        assert drv.get_server(sid).state == ServerState.RUNNING
        said = await await_serial(drv, sid, "GUEST: ready", count=readies + 1)  # afresh
        assert said.count("GUEST: up") == boots + 1

        # The stop quit QEMU cleanly: the bitmaps are trusted and the incremental reads
        # the 1 MiB written since (and what the booting guest wrote on vda) only.
        await asyncio.to_thread(drv.write, sid, data, 10 * MIB, b"\xcd" * MIB)
        second = await backup(st, sid)
        assert second["status"] == "available" and second["parent_id"] == record["id"]
        disks = {d["disk_id"]: d for d in second["disks"]}
        assert {d["read_mode"] for d in second["disks"]} == {"cbt"}, second["disks"]
        assert disks[data]["bytes_read"] == MIB

        if not ignores:
            # R3: restore stops the guest (power button), writes its disks, boots it.
            await restore(st, record["id"])
            said = await await_serial(drv, sid, "GUEST: ready", count=readies + 2)
            assert said.count("GUEST: clean shutdown") == 2
            assert drv.get_server(sid).state == ServerState.RUNNING
            assert (await asyncio.to_thread(drv.checksum, sid))[data] == before[data]
