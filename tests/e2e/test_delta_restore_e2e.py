"""Delta restore (issue 18): restoring a backup onto its own disk writes only the chunks
that differ, known from the manifests and the changed-block tracking alone; any doubt is
a full restore. The task records which path was taken and why; the whole disk is
compared afterwards."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from csbs.model import Server
from tests.conftest import MIB, Stack
from tests.libvirt_support import Lab, LabServers

pytestmark = pytest.mark.slow


async def restore(st: Stack, backup_id: str, *args: str) -> str:
    """Restore through the CLI; the restore task's detail."""
    done = (await st.cli("backup", "restore", backup_id, "--yes", "--wait", "--json", *args)).json()
    return st.catalog.get_task(done["task_id"]).detail or ""


async def test_delta_restore_writes_only_what_differs(any_stack: Stack) -> None:
    """On the local driver (its block bitmaps) and on QEMU (its persistent dirty bitmaps,
    read over NBD block status)."""
    await delta_restores(any_stack, any_stack.compute)


@pytest.mark.libvirt
async def test_delta_restore_on_libvirt(libvirt_stack: Stack, lab: Lab) -> None:
    """On libvirt: the checkpoint's bitmap in the shut-off domain's qcow2 image, which the
    restore's own writes (through qemu-storage-daemon) keep recording, so the chain goes
    on: the next backup after a restore is incremental, and restores bit-identical."""
    st = libvirt_stack
    g = LabServers(Path(st.settings.var_dir) / "lab", lab)
    server = await delta_restores(st, g)
    # After the last (delta) restore the checkpoint still holds: the next backup reads
    # only what the restore and the guest wrote since, and restores bit-identical.
    disk = server.disks[0].id
    g.write(server.id, disk, 40 * MIB, os.urandom(MIB))
    dom = lab.conn.lookupByUUIDString(server.id)
    dom.destroy()
    expected = g.checksum(server.id)
    dom.create()
    after = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    (row,) = after["disks"]
    assert (row["read_mode"], row["bytes_read"]) == ("cbt", 2 * MIB), row
    g.write(server.id, disk, 0, os.urandom(8 * MIB))
    await restore(st, after["id"], "--full")
    dom.destroy()
    assert g.checksum(server.id) == expected


async def delta_restores(st: Stack, drv: Any) -> Server:
    """X, then Y one chunk later, then a guest write: restores of X and Y write only what
    differs; ``--full`` and a resized disk write everything; a backup brings it back."""
    server = drv.create_server("delta", [64 * MIB])  # 64 chunks of 1 MiB
    disk = server.disks[0].id
    drv.write(server.id, disk, 0, os.urandom(48 * MIB))
    x = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    at_x = drv.checksum(server.id)
    drv.write(server.id, disk, 10 * MIB, os.urandom(MIB))  # chunk 10
    y = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    at_y = drv.checksum(server.id)
    drv.write(server.id, disk, 20 * MIB + 7, b"after y")  # chunk 20

    detail = await restore(st, x["id"])
    assert drv.checksum(server.id) == at_x
    assert (
        f"disk {disk}: delta restore from backup {y['id']}: 2 of 64 chunks written "
        f"(1 differ between the backups, 1 written since {y['id']})"
    ) in detail

    # Back to the newest backup: what the guest and the last restore wrote since it.
    detail = await restore(st, y["id"])
    assert drv.checksum(server.id) == at_y
    assert f"delta restore from backup {y['id']}: 2 of 64 chunks written" in detail

    # --full writes every chunk.
    drv.write(server.id, disk, 30 * MIB, os.urandom(MIB))
    detail = await restore(st, x["id"], "--full")
    assert drv.checksum(server.id) == at_x
    assert f"disk {disk}: full restore asked (--full)" in detail

    # A disk grown since is not the backups' disk: a full restore says why (R5 shrinks it).
    drv.resize_disk(server.id, disk, 80 * MIB)
    detail = await restore(st, x["id"])
    assert drv.checksum(server.id) == at_x
    assert f"disk {disk}: full restore: " in detail and "delta restore" not in detail

    # With the tracking back after a backup, a restore is a delta again.
    z = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    drv.write(server.id, disk, 0, os.urandom(MIB))
    detail = await restore(st, z["id"])
    assert drv.checksum(server.id) == at_x
    assert f"delta restore from backup {z['id']}: 1 of 64 chunks written" in detail
    return drv.get_server(server.id)  # type: ignore[no-any-return]
