"""End to end with ``CSBS_COMPUTE_DRIVER=qemu``: real QEMU processes, QMP group snapshots,
NBD reads and dirty-bitmap incrementals, through Temporal, SeaweedFS and the CLI.

Covers B1 (one instant across disks while writes go on), B2/B3 (incremental reads only
what the bitmap says changed), B12 (offline), R1/R3 (restore bit-identical), and the
driver's promise never to make a wrong incremental after QEMU dies (kill -9)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any, cast

import pytest

from csbs.drivers.qemu import QemuDriver
from csbs.model import BackupServerInput, ServerState
from starter.client import CsbsClient
from tests.conftest import MIB, Stack, backup, restore

pytestmark = pytest.mark.slow


def qemu_of(stack: Stack) -> QemuDriver:
    drv = stack.compute
    assert isinstance(drv, QemuDriver)
    return drv


async def test_readme_story_on_qemu(qemu_stack: Stack) -> None:
    """The README's story with the qemu driver, through the CLI: create, write, back up,
    write, back up (reads only the changed bytes), restore both, checksums identical."""
    st = qemu_stack
    server = (
        await st.cli("dev", "server", "create", "--name", "vm-1", "--disk", "32MiB",
                     "--disk", "64MiB", "--json")
    ).json()  # fmt: skip
    sid, (d0, d1) = server["id"], (d["id"] for d in server["disks"])
    assert (await st.cli("server", "list", "--json")).json()[0]["type"] == "qemu"
    assert qemu_of(st).pid(sid) is not None  # a real QEMU process runs the server
    await st.cli("dev", "server", "write", sid, "--disk", d0, "--offset", "0",
                 "--length", "5MiB")  # fmt: skip
    await st.cli("dev", "server", "write", sid, "--disk", d1, "--offset", "10MiB",
                 "--length", "20MiB", "--pattern", "text")  # fmt: skip
    first_sums = (await st.cli("dev", "server", "checksum", sid)).json()
    first = (await st.cli("backup", "create", sid, "--wait", "--json")).json()
    assert first["status"] == "available" and first["server_type"] == "qemu"
    full_read = sum(d["bytes_read"] for d in first["disks"])
    assert full_read == 25 * MIB  # only the allocated ranges (1 MiB chunks)
    assert {d["read_mode"] for d in first["disks"]} == {"full"}
    assert all("first backup" in d["read_note"] for d in first["disks"])

    await st.cli("dev", "server", "write", sid, "--disk", d1, "--offset", "40MiB",
                 "--length", "1MiB")  # fmt: skip
    await st.cli("dev", "server", "write", sid, "--disk", d0, "--offset", "2MiB",
                 "--length", "100")  # fmt: skip
    second = (await st.cli("backup", "create", sid, "--wait", "--json")).json()
    assert second["parent_id"] == first["id"]
    assert {d["read_mode"] for d in second["disks"]} == {"cbt"}
    assert {d["read_note"] for d in second["disks"]} == {""}
    # The bitmap said 1 MiB + 64 KiB changed; chunk alignment makes that two 1 MiB chunks.
    assert sum(d["bytes_read"] for d in second["disks"]) == 2 * MIB
    second_sums = (await st.cli("dev", "server", "checksum", sid)).json()
    assert second_sums != first_sums

    await st.cli("backup", "restore", first["id"], "--yes", "--wait", "--json")
    assert (await st.cli("dev", "server", "checksum", sid)).json() == first_sums
    await st.cli("backup", "restore", second["id"], "--yes", "--wait", "--json")
    assert (await st.cli("dev", "server", "checksum", sid)).json() == second_sums
    assert st.compute.get_server(sid).state == ServerState.RUNNING

    # After a restore the bitmap has recorded the restored blocks: the next incremental
    # against the second backup reads them, and the data is still exact.
    third = await backup(st, sid)
    assert third["parent_id"] == second["id"]
    assert {d["read_mode"] for d in third["disks"]} == {"cbt"}
    await restore(st, third["id"])
    assert st.compute.checksum(sid) == second_sums


async def test_backup_is_one_instant_across_disks_while_qemu_writes(qemu_stack: Stack) -> None:
    """B1 on QEMU: writes during the upload are not in the backup, on any disk."""
    st = qemu_stack
    drv = qemu_of(st)
    server = drv.create_server("db-1", [32 * MIB, 48 * MIB])
    for disk in server.disks:
        drv.write(server.id, disk.id, 0, os.urandom(disk.size_bytes))
    at_snapshot = drv.checksum(server.id)
    client = CsbsClient(st.client, st.settings)
    backup_id, handle = await client.start_backup(BackupServerInput(server_id=server.id))
    for _ in range(200):
        if drv.snapshots(server.id):
            break
        await asyncio.sleep(0.02)
    assert drv.snapshots(server.id), "the snapshot was never taken"
    stop, writes = threading.Event(), 0

    def writer() -> None:
        nonlocal writes
        while not stop.is_set():
            for disk in server.disks:
                offset = (writes * 3 * MIB) % (disk.size_bytes - MIB)
                drv.write(server.id, disk.id, offset, os.urandom(MIB))
            writes += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = cast(dict[str, Any], await handle.result())
    finally:
        stop.set()
        thread.join()
    assert writes > 0 and result["status"] == "available"
    assert drv.snapshots(server.id) == []
    assert drv.checksum(server.id) != at_snapshot
    await restore(st, backup_id)
    assert drv.checksum(server.id) == at_snapshot


async def test_kill_9_of_qemu_makes_the_next_backup_full_and_says_why(qemu_stack: Stack) -> None:
    """Never a wrong incremental: after QEMU dies the bitmap is not trusted; the backup
    reads every allocated range, records why, and restores bit-identical."""
    st = qemu_stack
    drv = qemu_of(st)
    server = drv.create_server("app-1", [16 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 0, os.urandom(6 * MIB))
    first = await backup(st, server.id)
    drv.stop(server.id)
    drv.start(server.id)  # the bitmap now lives in the image, loaded "in use"
    drv.write(server.id, disk, 8 * MIB, os.urandom(MIB))
    pid = drv.pid(server.id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    listed = (await st.cli("server", "list", "--json")).json()
    assert [s["state"] for s in listed] == ["stopped"]  # the driver noticed
    drv.start(server.id)
    drv.write(server.id, disk, 12 * MIB, os.urandom(MIB))
    sums = drv.checksum(server.id)
    second = await backup(st, server.id)
    assert second["parent_id"] == first["id"]
    (record,) = second["disks"]
    assert record["read_mode"] == "full"
    assert "uncleanly" in record["read_note"]
    assert record["bytes_read"] == 8 * MIB  # every allocated MiB, not just the bitmap's
    drv.write(server.id, disk, 0, os.urandom(MIB))
    await restore(st, second["id"])
    assert drv.checksum(server.id) == sums


async def test_offline_backup_on_qemu_stops_only_for_the_snapshot(qemu_stack: Stack) -> None:
    """B12 on QEMU: the process quits for the snapshot's instant (a paused one serves the
    export), the server runs again, and the backup restores exactly."""
    st = qemu_stack
    drv = qemu_of(st)
    server = drv.create_server("web-2", [16 * MIB])
    drv.write(server.id, server.disks[0].id, MIB, os.urandom(3 * MIB))
    sums = drv.checksum(server.id)
    result = await backup(st, server.id, offline=True)
    assert result["status"] == "available"
    assert drv.get_server(server.id).state == ServerState.RUNNING
    drv.write(server.id, server.disks[0].id, 0, os.urandom(MIB))
    await restore(st, result["id"], power_on=False)
    assert drv.get_server(server.id).state == ServerState.STOPPED
    assert drv.pid(server.id) is None  # a stopped server keeps no process
    assert drv.checksum(server.id) == sums
