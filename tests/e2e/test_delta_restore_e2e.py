"""Delta restore (issue 18): restoring a backup onto its own disk writes only the chunks
that differ, known from the manifests and the changed-block tracking alone; any doubt is
a full restore. The task records which path was taken and why; the whole disk is
compared afterwards."""

from __future__ import annotations

import os

import pytest

from tests.conftest import MIB, Stack

pytestmark = pytest.mark.slow


async def restore(st: Stack, backup_id: str, *args: str) -> str:
    """Restore through the CLI; the restore task's detail."""
    done = (await st.cli("backup", "restore", backup_id, "--yes", "--wait", "--json", *args)).json()
    return st.catalog.get_task(done["task_id"]).detail or ""


async def test_delta_restore_writes_only_what_differs(any_stack: Stack) -> None:
    """On the local driver (its block bitmaps) and on QEMU (its persistent dirty bitmaps,
    read over NBD block status)."""
    st = any_stack
    drv = st.compute
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
    assert f"disk {disk}: full restore: " in detail and "delta" not in detail

    # With the tracking back after a backup, a restore is a delta again.
    z = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    drv.write(server.id, disk, 0, os.urandom(MIB))
    detail = await restore(st, z["id"])
    assert drv.checksum(server.id) == at_x
    assert f"delta restore from backup {z['id']}: 1 of 64 chunks written" in detail
