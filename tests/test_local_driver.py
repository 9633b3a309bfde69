"""The local driver: sparse disks, states, guest writes, COW group snapshots, CBT."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from csbs.drivers.local import BLOCK_SIZE, LocalDriver
from csbs.errors import InvalidInput, InvalidState, NotFound
from csbs.model import ServerState

MIB = 1024 * 1024


@pytest.fixture
def drv(tmp_path: Path) -> LocalDriver:
    return LocalDriver(tmp_path / "servers")


def read_all(drv: LocalDriver, server_id: str, snap: str, disk_id: str) -> bytes:
    reader = drv.open_snapshot(server_id, snap, disk_id)
    try:
        return reader.read(0, reader.size_bytes)
    finally:
        reader.close()


def test_create_gives_sparse_system_and_data_disks(drv: LocalDriver) -> None:
    server = drv.create_server("web", [64 * MIB, 128 * MIB], [16 * MIB])
    assert server.state == ServerState.RUNNING
    assert [(d.role.value, d.shared) for d in server.disks] == [
        ("system", False),
        ("data", False),
        ("data", True),
    ]
    path = drv._disk_path(server.id, server.disks[1].id)
    assert path.stat().st_size == 128 * MIB and path.stat().st_blocks == 0
    assert drv.list_servers() == [server]
    empty = hashlib.sha256(bytes(64 * MIB)).hexdigest()
    assert drv.checksum(server.id)[server.disks[0].id] == empty


def test_states_and_guest_writes(drv: LocalDriver) -> None:
    server = drv.create_server("web", [4 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 100, b"abc")
    assert drv.stop(server.id).state == ServerState.STOPPED
    with pytest.raises(InvalidState, match="guest writes need a running server"):
        drv.write(server.id, disk, 0, b"x")
    assert drv.start(server.id).state == ServerState.RUNNING
    with pytest.raises(InvalidInput, match="outside the disk"):
        drv.write(server.id, disk, 4 * MIB - 1, b"xy")
    drv.set_state(server.id, ServerState.FAULT)
    with pytest.raises(InvalidState):
        drv.start(server.id)
    with pytest.raises(NotFound):
        drv.get_server("srv-missing")
    with pytest.raises(ValueError):
        drv.get_server("../escape")


def test_group_snapshot_is_one_instant_across_disks(drv: LocalDriver) -> None:
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
    drv.release_snapshot(server.id, "snap1", committed=True)
    assert drv.snapshots(server.id) == []
    drv.release_snapshot(server.id, "snap1", committed=True)  # idempotent


def test_changed_block_tracking_between_checkpoints(drv: LocalDriver) -> None:
    server = drv.create_server("db", [8 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 0, os.urandom(MIB))
    first = drv.group_snapshot(server.id, "c1")
    assert first.disks[0].changed_since is None  # nothing to compare with yet
    drv.release_snapshot(server.id, "c1", committed=True)
    drv.write(server.id, disk, 3 * MIB + 10, b"q" * 100)
    second = drv.group_snapshot(server.id, "c2")
    assert second.disks[0].changed_since == "c1"
    reader = drv.open_snapshot(server.id, "c2", disk)
    assert reader.changed_ranges() == [(3 * MIB, BLOCK_SIZE)]
    reader.close()
    # A failed backup folds its changes back so the next snapshot still sees them.
    drv.release_snapshot(server.id, "c2", committed=False)
    drv.write(server.id, disk, 0, b"w")
    third = drv.group_snapshot(server.id, "c3")
    assert third.disks[0].changed_since == "c1"
    reader = drv.open_snapshot(server.id, "c3", disk)
    assert reader.changed_ranges() == [(0, BLOCK_SIZE), (3 * MIB, BLOCK_SIZE)]
    reader.close()


def test_allocated_ranges_skip_holes(drv: LocalDriver) -> None:
    server = drv.create_server("db", [64 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 32 * MIB, b"d" * MIB)
    drv.group_snapshot(server.id, "s")
    reader = drv.open_snapshot(server.id, "s", disk)
    ranges = reader.allocated_ranges()
    reader.close()
    assert sum(length for _, length in ranges) <= 2 * MIB
    assert any(start <= 32 * MIB < start + length for start, length in ranges)


def test_restore_writer_needs_a_stopped_server_and_restores_size(drv: LocalDriver) -> None:
    server = drv.create_server("db", [4 * MIB])
    disk = server.disks[0].id
    with pytest.raises(InvalidState, match="stop it"):
        drv.open_disk_writer(server.id, disk, 4 * MIB)
    drv.stop(server.id)
    writer = drv.open_disk_writer(server.id, disk, 2 * MIB)
    writer.write(0, b"r" * MIB)
    writer.zero(MIB, MIB)
    writer.close()
    assert drv.get_server(server.id).disks[0].size_bytes == 2 * MIB
    expected = hashlib.sha256(b"r" * MIB + bytes(MIB)).hexdigest()
    assert drv.checksum(server.id)[disk] == expected


def test_disks_are_added_grown_and_removed(drv: LocalDriver) -> None:
    server = drv.create_server("db", [4 * MIB, 4 * MIB])
    system, data = server.disks
    added = drv.add_disk(server.id, 2 * MIB)
    assert added.role.value == "data" and len(drv.get_server(server.id).disks) == 3
    with pytest.raises(InvalidInput, match="not smaller"):
        drv.resize_disk(server.id, data.id, MIB)
    assert drv.resize_disk(server.id, data.id, 8 * MIB).size_bytes == 8 * MIB
    with pytest.raises(InvalidInput, match="system disk"):
        drv.remove_disk(server.id, system.id)
    drv.remove_disk(server.id, data.id)
    assert not drv._disk_path(server.id, data.id).exists()
    again = drv.add_disk(server.id, 4 * MIB, like=data)
    assert again.id == data.id and again.size_bytes == 4 * MIB
    with pytest.raises(InvalidInput, match="already"):
        drv.add_disk(server.id, 4 * MIB, like=data)


def test_restore_writes_wait_for_snapshots_and_released_snapshots_cannot_be_read(
    drv: LocalDriver,
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
