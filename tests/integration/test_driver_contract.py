"""The compute driver contract, run against every driver: ``local`` and ``qemu`` (a real
QEMU process per server, NBD reads, dirty bitmaps). Plus what only QEMU can get wrong:
bitmaps across clean restarts, kill -9 of QEMU, restore writes seen by the bitmap."""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csbs.drivers.base import DevServers
from csbs.drivers.local import LocalDriver
from csbs.drivers.qemu import QemuDriver
from csbs.drivers.sparse import BLOCK_SIZE
from csbs.errors import DiskUnavailable, InvalidInput, InvalidState, NotFound
from csbs.model import ServerState
from tests.conftest import kill_qemu
from tests.libvirt_support import LabServers
from tests.qemu_support import QEMU_SKIP

MIB = 1024 * 1024


@pytest.fixture(
    params=[
        "local",
        pytest.param("qemu", marks=QEMU_SKIP),
        pytest.param("libvirt", marks=[pytest.mark.libvirt, pytest.mark.slow]),
    ]
)
def drv(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DevServers]:
    if request.param == "local":
        yield LocalDriver(tmp_path / "servers")
        return
    if request.param == "libvirt":
        yield LabServers(tmp_path / "servers", request.getfixturevalue("lab"))
        return
    from csbs.drivers.qemu import QemuDriver

    driver = QemuDriver(tmp_path / "servers")
    try:
        yield driver
    finally:
        kill_qemu(driver)


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[QemuDriver]:
    driver = QemuDriver(tmp_path / "servers")
    try:
        yield driver
    finally:
        kill_qemu(driver)


def read_all(drv: DevServers, server_id: str, snap: str, disk_id: str) -> bytes:
    reader = drv.open_snapshot(server_id, snap, disk_id)
    try:
        return bytes(reader.read(0, reader.size_bytes))
    finally:
        reader.close()


def changed(drv: DevServers, server_id: str, snap: str, disk_id: str) -> object:
    reader = drv.open_snapshot(server_id, snap, disk_id)
    try:
        return reader.changed_ranges()
    finally:
        reader.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_create_gives_sparse_system_and_data_disks(drv: DevServers, tmp_path: Path) -> None:
    server = drv.create_server("web", [64 * MIB, 128 * MIB], [16 * MIB])
    assert server.state == ServerState.RUNNING and server.type == drv.name
    assert [(d.role.value, d.shared) for d in server.disks] == [
        ("system", False),
        ("data", False),
        ("data", True),
    ]
    if drv.name == "libvirt":
        # The images are the operator's (the lab's), not the driver's: nothing more to see.
        assert server.disks[2].unsupported and "shareable" in server.disks[2].unsupported
        return
    images = [p for p in (tmp_path / "servers" / server.id / "disks").iterdir()]
    assert len(images) == 3 and all(p.stat().st_blocks * 512 < MIB for p in images)
    assert drv.list_servers() == [server]
    assert drv.checksum(server.id)[server.disks[0].id] == sha(bytes(64 * MIB))


def test_states_and_guest_writes(drv: DevServers) -> None:
    server = drv.create_server("web", [4 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 100, b"abc")
    warning = drv.stop(server.id)
    if drv.name == "libvirt":  # a guest-less domain never answers the power button
        assert warning is not None and "powered off (libvirt destroy)" in warning
    else:
        assert warning is None  # stopped at once: no warning
    assert drv.get_server(server.id).state == ServerState.STOPPED
    with pytest.raises(InvalidState, match="guest writes need a running server"):
        drv.write(server.id, disk, 0, b"x")
    assert drv.start(server.id).state == ServerState.RUNNING
    with pytest.raises(InvalidInput, match="outside the disk"):
        drv.write(server.id, disk, 4 * MIB - 1, b"xy")
    drv.write(server.id, disk, 4 * MIB - 2, b"yz")
    expected = bytearray(4 * MIB)
    expected[100:103] = b"abc"
    expected[-2:] = b"yz"
    assert drv.checksum(server.id) == {disk: sha(bytes(expected))}
    if drv.name != "libvirt":  # libvirt cannot be told to put a domain in fault
        drv.set_state(server.id, ServerState.FAULT)
        with pytest.raises(InvalidState):
            drv.start(server.id)
    with pytest.raises(NotFound):
        drv.get_server("srv-missing")
    with pytest.raises(ValueError):
        drv.get_server("../escape")


def test_group_snapshot_is_one_instant_across_disks(drv: DevServers) -> None:
    server = drv.create_server("db", [4 * MIB, 4 * MIB])
    a, b = (d.id for d in server.disks)
    drv.write(server.id, a, 0, b"A" * MIB)
    drv.write(server.id, b, 0, b"B" * MIB)
    image = {a: b"A" * MIB + bytes(3 * MIB), b: b"B" * MIB + bytes(3 * MIB)}
    snap = drv.group_snapshot(server.id, "snap1")
    assert drv.group_snapshot(server.id, "snap1") == snap  # idempotent
    # After the instant: overwrite, write into holes, partial blocks, on both disks.
    drv.write(server.id, a, 10, b"x" * (2 * MIB))
    drv.write(server.id, b, 3 * MIB + 5, b"y" * 1000)
    drv.write(server.id, a, 0, b"z" * 7)
    for disk_id in (a, b):
        assert read_all(drv, server.id, "snap1", disk_id) == image[disk_id]
    reader = drv.open_snapshot(server.id, "snap1", a)
    assert reader.read(MIB - 3, 6) == b"AAA\0\0\0"
    reader.close()
    live = drv.checksum(server.id)
    assert live[a] == sha(b"z" * 7 + b"AAA" + b"x" * (2 * MIB) + bytes(2 * MIB - 10))
    drv.release_snapshot(server.id, "snap1", committed=True)
    assert drv.snapshots(server.id) == []
    drv.release_snapshot(server.id, "snap1", committed=True)  # idempotent
    assert drv.checksum(server.id) == live


def test_changed_block_tracking_between_checkpoints(drv: DevServers) -> None:
    server = drv.create_server("db", [8 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 0, os.urandom(MIB))
    first = drv.group_snapshot(server.id, "c1")
    assert first.disks[0].changed_since is None  # nothing to compare with yet
    assert first.disks[0].full_read_reason
    drv.release_snapshot(server.id, "c1", committed=True)
    drv.write(server.id, disk, 3 * MIB + 10, b"q" * 100)
    second = drv.group_snapshot(server.id, "c2")
    assert second.disks[0].changed_since == "c1"
    assert changed(drv, server.id, "c2", disk) == [(3 * MIB, BLOCK_SIZE)]
    # A failed backup folds its changes back so the next snapshot still sees them.
    drv.write(server.id, disk, 5 * MIB, b"during the failed backup")
    drv.release_snapshot(server.id, "c2", committed=False)
    drv.write(server.id, disk, 0, b"w")
    third = drv.group_snapshot(server.id, "c3")
    assert third.disks[0].changed_since == "c1"
    assert changed(drv, server.id, "c3", disk) == [
        (0, BLOCK_SIZE),
        (3 * MIB, BLOCK_SIZE),
        (5 * MIB, BLOCK_SIZE),
    ]
    drv.release_snapshot(server.id, "c3", committed=True)
    fourth = drv.group_snapshot(server.id, "c4")
    assert fourth.disks[0].changed_since == "c3"
    assert changed(drv, server.id, "c4", disk) == []
    drv.release_snapshot(server.id, "c4", committed=True)


def test_allocated_ranges_skip_holes(drv: DevServers) -> None:
    server = drv.create_server("db", [64 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 32 * MIB, b"d" * MIB)
    drv.group_snapshot(server.id, "s")
    reader = drv.open_snapshot(server.id, "s", disk)
    ranges = reader.allocated_ranges()
    reader.close()
    assert sum(length for _, length in ranges) <= 2 * MIB
    assert any(start <= 32 * MIB < start + length for start, length in ranges)
    drv.release_snapshot(server.id, "s", committed=True)


def test_restore_writer_needs_a_stopped_server_and_restores_size(drv: DevServers) -> None:
    server = drv.create_server("db", [4 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 0, b"old" * MIB)
    with pytest.raises(InvalidState, match="stop it"):
        drv.open_disk_writer(server.id, disk, 4 * MIB)
    drv.stop(server.id)
    writer = drv.open_disk_writer(server.id, disk, 2 * MIB)
    writer.write(0, b"r" * MIB)
    writer.zero(MIB, MIB)
    writer.close()
    assert drv.get_server(server.id).disks[0].size_bytes == 2 * MIB
    assert drv.checksum(server.id)[disk] == sha(b"r" * MIB + bytes(MIB))
    drv.start(server.id)
    assert drv.checksum(server.id)[disk] == sha(b"r" * MIB + bytes(MIB))


def test_disks_are_added_grown_and_removed(drv: DevServers) -> None:
    server = drv.create_server("db", [4 * MIB, 4 * MIB])
    system, data = server.disks
    added = drv.add_disk(server.id, 2 * MIB)
    assert added.role.value == "data" and len(drv.get_server(server.id).disks) == 3
    drv.write(server.id, added.id, 0, b"new disk")
    with pytest.raises(InvalidInput, match="not smaller"):
        drv.resize_disk(server.id, data.id, MIB)
    drv.write(server.id, data.id, 0, b"kept")
    assert drv.resize_disk(server.id, data.id, 8 * MIB).size_bytes == 8 * MIB
    drv.write(server.id, data.id, 7 * MIB, b"grown")
    sums = drv.checksum(server.id)
    assert sums[data.id] == sha(b"kept" + bytes(7 * MIB - 4) + b"grown" + bytes(MIB - 5))
    assert sums[added.id] == sha(b"new disk" + bytes(2 * MIB - 8))
    with pytest.raises(InvalidInput, match="system disk"):
        drv.remove_disk(server.id, system.id)
    drv.remove_disk(server.id, data.id)
    assert data.id not in drv.checksum(server.id)
    again = drv.add_disk(server.id, 4 * MIB, like=data)
    assert again.id == data.id and again.size_bytes == 4 * MIB
    assert drv.checksum(server.id)[data.id] == sha(bytes(4 * MIB))
    with pytest.raises(InvalidInput, match="already"):
        drv.add_disk(server.id, 4 * MIB, like=data)


def test_restore_writes_wait_for_snapshots_and_released_snapshots_cannot_be_read(
    drv: DevServers,
) -> None:
    """A restore never resizes or rewrites disks under a held snapshot, and a stale reader
    of a released snapshot fails instead of silently reading live data."""
    server = drv.create_server("db", [4 * MIB])
    disk = server.disks[0].id
    drv.group_snapshot(server.id, "held")
    reader = drv.open_snapshot(server.id, "held", disk)
    drv.stop(server.id)
    with pytest.raises(InvalidState, match="being backed up"):
        drv.open_disk_writer(server.id, disk, 2 * MIB)
    drv.release_snapshot(server.id, "held", committed=True)
    with pytest.raises(InvalidState, match="was released"):
        reader.read(0, MIB)
    reader.close()
    drv.open_disk_writer(server.id, disk, 4 * MIB).close()


def test_offline_snapshot_survives_start_and_restore_writes_are_tracked(
    drv: DevServers,
) -> None:
    """The offline backup order (stop, snapshot, start, read) and a restore seen by CBT."""
    server = drv.create_server("db", [4 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 0, b"1" * MIB)
    drv.stop(server.id)
    drv.group_snapshot(server.id, "off")
    drv.start(server.id)
    drv.write(server.id, disk, 0, b"2" * MIB)
    assert read_all(drv, server.id, "off", disk) == b"1" * MIB + bytes(3 * MIB)
    drv.release_snapshot(server.id, "off", committed=True)
    drv.stop(server.id)
    writer = drv.open_disk_writer(server.id, disk, 4 * MIB)
    writer.write(2 * MIB, b"3" * BLOCK_SIZE)
    writer.close()
    drv.start(server.id)
    after = drv.group_snapshot(server.id, "next")
    assert after.disks[0].changed_since == "off"  # the chain went on through the restore
    # libvirt: the restore wrote through qemu-storage-daemon, which kept the image's
    # checkpoint bitmap recording.
    assert changed(drv, server.id, "next", disk) == [(0, MIB), (2 * MIB, BLOCK_SIZE)]
    drv.release_snapshot(server.id, "next", committed=True)


# -- what only a real hypervisor can get wrong -------------------------------------------
@QEMU_SKIP
def test_bitmaps_survive_a_clean_restart_of_qemu(qemu: QemuDriver) -> None:
    server = qemu.create_server("db", [8 * MIB, 8 * MIB])
    a, b = (d.id for d in server.disks)
    qemu.write(server.id, a, 0, b"a" * MIB)
    qemu.group_snapshot(server.id, "c1")
    qemu.release_snapshot(server.id, "c1", committed=True)
    before = qemu.pid(server.id)
    qemu.stop(server.id)
    assert qemu.pid(server.id) is None  # QEMU quit cleanly
    qemu.start(server.id)
    assert qemu.pid(server.id) not in (None, before)
    qemu.write(server.id, b, 6 * MIB, b"b" * 100)
    snap = qemu.group_snapshot(server.id, "c2")
    assert [d.changed_since for d in snap.disks] == ["c1", "c1"]
    assert changed(qemu, server.id, "c2", a) == []
    assert changed(qemu, server.id, "c2", b) == [(6 * MIB, BLOCK_SIZE)]
    qemu.release_snapshot(server.id, "c2", committed=True)


@QEMU_SKIP
def test_kill_9_of_qemu_falls_back_to_a_full_read_and_says_why(qemu: QemuDriver) -> None:
    server = qemu.create_server("db", [8 * MIB])
    disk = server.disks[0].id
    qemu.write(server.id, disk, 0, b"a" * MIB)
    qemu.group_snapshot(server.id, "c1")
    qemu.release_snapshot(server.id, "c1", committed=True)
    qemu.stop(server.id)
    qemu.start(server.id)  # the bitmap is now stored in the image and loaded "in use"
    qemu.write(server.id, disk, 4 * MIB, b"b" * MIB)
    pid = qemu.pid(server.id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while qemu.get_server(server.id).state != ServerState.STOPPED:
        assert time.monotonic() < deadline, "the driver did not notice QEMU died"
        time.sleep(0.05)
    qemu.start(server.id)
    qemu.write(server.id, disk, 6 * MIB, b"c" * 10)
    snap = qemu.group_snapshot(server.id, "c2")
    assert snap.disks[0].changed_since is None
    assert "uncleanly" in (snap.disks[0].full_read_reason or "")
    expected = b"a" * MIB + bytes(3 * MIB) + b"b" * MIB + bytes(MIB) + b"c" * 10
    assert read_all(qemu, server.id, "c2", disk) == expected + bytes(8 * MIB - len(expected))
    qemu.release_snapshot(server.id, "c2", committed=True)
    # From here the chain is whole again.
    qemu.write(server.id, disk, 0, b"d")
    qemu.group_snapshot(server.id, "c3")
    assert changed(qemu, server.id, "c3", disk) == [(0, BLOCK_SIZE)]
    qemu.release_snapshot(server.id, "c3", committed=True)


@QEMU_SKIP
def test_a_snapshot_whose_qemu_died_is_lost_not_misread(qemu: QemuDriver) -> None:
    server = qemu.create_server("db", [4 * MIB])
    disk = server.disks[0].id
    qemu.write(server.id, disk, 0, b"a" * MIB)
    qemu.group_snapshot(server.id, "held")
    reader = qemu.open_snapshot(server.id, "held", disk)
    pid = qemu.pid(server.id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    with pytest.raises(DiskUnavailable, match="is lost"):
        reader.read(0, MIB)
    reader.close()
    with pytest.raises(DiskUnavailable, match="is lost"):
        qemu.open_snapshot(server.id, "held", disk)
    qemu.release_snapshot(server.id, "held", committed=False)
    assert qemu.snapshots(server.id) == []
    qemu.start(server.id)
    snap = qemu.group_snapshot(server.id, "after")
    assert snap.disks[0].changed_since is None
    assert read_all(qemu, server.id, "after", disk) == b"a" * MIB + bytes(3 * MIB)
    qemu.release_snapshot(server.id, "after", committed=True)


@QEMU_SKIP
def test_a_stopped_server_keeps_no_process(qemu: QemuDriver) -> None:
    server = qemu.create_server("db", [4 * MIB])
    qemu.stop(server.id)
    qemu.group_snapshot(server.id, "s")
    assert qemu.pid(server.id) is not None  # paused, for the export
    qemu.release_snapshot(server.id, "s", committed=True)
    assert qemu.pid(server.id) is None
    qemu.checksum(server.id)
    assert qemu.pid(server.id) is None


@QEMU_SKIP
def test_guest_write_failures_are_reported_not_swallowed(qemu: QemuDriver) -> None:
    """qemu-io reports on QEMU's stdout; the driver reads it back for every command."""
    server = qemu.create_server("db", [4 * MIB])
    disk = server.disks[0].id
    with qemu._lock(server.id, exclusive=True), qemu._session(server.id) as qmp:
        said = qemu._qemu_io(qmp, server.id, disk, "write -s /nonexistent/source 0 4096")
    assert "No such file" in said
    qemu.write(server.id, disk, 0, b"fine")
    assert qemu.checksum(server.id)[disk] == sha(b"fine" + bytes(4 * MIB - 4))


@QEMU_SKIP
def test_processes_are_found_whatever_the_callers_tmpdir(
    qemu: QemuDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI and the worker may see different TMPDIRs: the socket paths come from the
    process record, and a stop that reached QEMU is the only stop recorded."""
    server = qemu.create_server("db", [4 * MIB])
    other = tmp_path / "other-tmp"
    other.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    qemu.write(server.id, server.disks[0].id, 0, b"x")
    assert qemu.stop(server.id) is None
    assert qemu.pid(server.id) is None
    assert qemu.start(server.id).state == ServerState.RUNNING


@QEMU_SKIP
def test_a_snapshot_left_held_refuses_a_new_one_until_released(qemu: QemuDriver) -> None:
    server = qemu.create_server("db", [4 * MIB])
    qemu.group_snapshot(server.id, "old")
    with pytest.raises(InvalidState, match="still holds snapshot old"):
        qemu.group_snapshot(server.id, "new")
    qemu.release_snapshot(server.id, "old", committed=False)
    qemu.group_snapshot(server.id, "new")
    qemu.release_snapshot(server.id, "new", committed=True)


# -- what only libvirt can get wrong ---------------------------------------------------------
@pytest.fixture
def lv(tmp_path: Path, request: pytest.FixtureRequest) -> LabServers:
    return LabServers(tmp_path / "servers", request.getfixturevalue("lab"))


def checkpoints(drv: LabServers, server_id: str) -> list[str]:
    return sorted(c.getName() for c in drv._domain(server_id).listAllCheckpoints(0))


def job_running(drv: LabServers, server_id: str) -> bool:
    import libvirt

    try:
        drv._domain(server_id).backupGetXMLDesc(0)
        return True
    except libvirt.libvirtError:
        return False


@pytest.mark.libvirt
@pytest.mark.slow
def test_libvirt_release_ends_the_job_and_keeps_only_the_checkpoint_the_next_needs(
    lv: LabServers,
) -> None:
    server = lv.create_server("db", [4 * MIB])
    lv.group_snapshot(server.id, "bk-1")
    assert job_running(lv, server.id) and checkpoints(lv, server.id) == ["bk-1"]
    lv.release_snapshot(server.id, "bk-1", committed=True)
    assert not job_running(lv, server.id) and checkpoints(lv, server.id) == ["bk-1"]
    lv.group_snapshot(server.id, "bk-2")
    assert checkpoints(lv, server.id) == ["bk-1", "bk-2"]
    lv.release_snapshot(server.id, "bk-2", committed=False)  # a failed backup
    assert not job_running(lv, server.id) and checkpoints(lv, server.id) == ["bk-1"]
    third = lv.group_snapshot(server.id, "bk-3")
    assert third.disks[0].changed_since == "bk-1"
    lv.release_snapshot(server.id, "bk-3", committed=True)
    assert not job_running(lv, server.id) and checkpoints(lv, server.id) == ["bk-3"]


@pytest.mark.libvirt
@pytest.mark.slow
def test_libvirt_snapshots_a_shut_off_domain_started_paused_and_stops_it_again(
    lv: LabServers,
) -> None:
    server = lv.create_server("off", [4 * MIB])
    lv.write(server.id, server.disks[0].id, 0, b"before")
    lv._domain(server.id).destroy()
    snap = lv.group_snapshot(server.id, "bk-1")
    assert lv.get_server(server.id).state == ServerState.STOPPED  # to its owner
    assert lv._domain(server.id).isActive()  # QEMU exports the disks, the guest is paused
    assert read_all(lv, server.id, "bk-1", snap.disks[0].disk_id)[:6] == b"before"
    lv.release_snapshot(server.id, "bk-1", committed=True)
    assert not lv._domain(server.id).isActive()


@pytest.mark.libvirt
@pytest.mark.slow
def test_libvirt_refuses_foreign_jobs_and_disks_it_cannot_back_up(lv: LabServers) -> None:
    shared = lv.create_server("shared", [4 * MIB], [4 * MIB])
    with pytest.raises(InvalidInput, match="vdb is shareable"):
        lv.group_snapshot(shared.id, "bk-1")
    assert not job_running(lv, shared.id)
    server = lv.create_server("busy", [4 * MIB])
    dom = lv._domain(server.id)
    import pwd

    other = lv.lab.dir / "other-tool"  # another backup tool's socket, where QEMU can bind
    other.mkdir()
    qemu = pwd.getpwnam("libvirt-qemu")
    os.chown(other, qemu.pw_uid, qemu.pw_gid)
    dom.backupBegin(
        f"<domainbackup mode='pull'><server transport='unix' socket='{other}/nbd.sock'/>"
        f"<disks><disk name='vda' backup='yes' type='file'>"
        f"<scratch file='{other}/vda.scratch'/></disk></disks></domainbackup>",
        None,
        0,
    )
    with pytest.raises(InvalidState, match="backup job that csbs did not start"):
        lv.group_snapshot(server.id, "bk-2")
    assert job_running(lv, server.id)  # not ours: left alone
    dom.abortJob()
