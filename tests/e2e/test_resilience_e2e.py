"""Durability on the real stack: a worker killed mid-upload resumes from its checkpoint;
a cancelled backup releases its snapshot and records why."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from typing import Any, cast

import pytest
from temporalio.client import WorkflowFailureError

from csbs.errors import NotFound
from csbs.model import BackupServerInput, RestoreServerInput
from starter.client import CsbsClient
from tests.conftest import MIB, Stack, start_worker

pytestmark = pytest.mark.slow


async def test_worker_killed_mid_upload_resumes_from_its_checkpoint(any_stack: Stack) -> None:
    """Activities heartbeat their progress; a retry after kill -9 resumes, not restarts.
    With the qemu driver the snapshot lives on in QEMU while the worker is down."""
    stack = any_stack
    queue = f"csbs-kill-{uuid.uuid4().hex[:6]}"
    env = dict(
        stack.env,
        CSBS_TASK_QUEUE=queue,
        CSBS_CHECKPOINT_SECONDS="0.05",
        CSBS_TRANSFER_CONCURRENCY="1",
    )
    settings = stack.settings.model_copy(update={"task_queue": queue})
    server = stack.compute.create_server("big", [160 * MIB])
    disk = server.disks[0]
    stack.compute.write(server.id, disk.id, 0, os.urandom(160 * MIB))
    expected = stack.compute.checksum(server.id)
    client = CsbsClient(stack.client, settings)

    worker = start_worker(env)
    try:
        backup_id, handle = await client.start_backup(BackupServerInput(server_id=server.id))
        complete = 0
        for _ in range(1000):  # kill once a resume point past a third of the disk is saved
            with contextlib.suppress(NotFound):
                manifest = stack.store.get_manifest(backup_id, disk.id, staging=True)
                complete = manifest.complete or 0
            if complete >= 50:
                break
            await asyncio.sleep(0.01)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        assert complete >= 50, "killed too late or the checkpoint never came"
        worker = start_worker(env)
        result = cast(dict[str, Any], await asyncio.wait_for(handle.result(), timeout=120))
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert result["status"] == "available"
    # The retried attempt read only what was not yet checkpointed.
    reread = result["disks"][0]["bytes_read"]
    print(f"killed after {complete} MiB checkpointed: the retry read {reread / MIB:.0f} of 160 MiB")
    assert 0 < reread <= (160 - complete) * MIB
    attempts = [
        e.activity_task_started_event_attributes.attempt
        async for e in handle.fetch_history_events()
        if e.HasField("activity_task_started_event_attributes")
    ]
    assert max(attempts) >= 2
    assert stack.compute.snapshots(server.id) == []
    assert not list(stack.store.list_keys(f"staging/{backup_id}/"))

    stack.compute.write(server.id, disk.id, 0, b"changed" * 1000)
    # Restore through the stack's own worker (on its default queue).
    restore = await CsbsClient(stack.client, stack.settings).start_restore(
        RestoreServerInput(backup_id=backup_id)
    )
    await restore.result()
    assert stack.compute.checksum(server.id) == expected


async def test_cancelled_backup_releases_its_snapshot_and_records_why(any_stack: Stack) -> None:
    """The snapshot is released on every path, cancellation included (T1 reason)."""
    stack = any_stack
    server = stack.compute.create_server("cancel-me", [128 * MIB])
    stack.compute.write(server.id, server.disks[0].id, 0, os.urandom(128 * MIB))
    client = CsbsClient(stack.client, stack.settings)
    backup_id, handle = await client.start_backup(BackupServerInput(server_id=server.id))
    for _ in range(400):
        if stack.compute.snapshots(server.id):
            break
        await asyncio.sleep(0.01)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), timeout=60)
    assert stack.compute.snapshots(server.id) == []
    backup = stack.catalog.get_backup(backup_id)
    assert backup.status == "error" and "cancelled" in (backup.error or "")
    task = stack.catalog.list_tasks(kind="backup")[0]
    assert task.status == "failed" and "cancelled" in (task.reason or "")


async def test_a_leaked_snapshot_never_blocks_later_backups_or_restores(any_stack: Stack) -> None:
    """A snapshot that a crash left behind (no running backup owns it) is released by the
    next backup or restore of the server, which then succeed."""
    stack = any_stack
    drv = stack.compute
    server = drv.create_server("leaky", [8 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 0, os.urandom(2 * MIB))
    client = CsbsClient(stack.client, stack.settings)
    _, handle = await client.start_backup(BackupServerInput(server_id=server.id))
    first = cast(dict[str, Any], await handle.result())
    drv.group_snapshot(server.id, "bk-leaked0000001")  # as if its workflow had died
    drv.write(server.id, disk, 4 * MIB, os.urandom(MIB))
    expected = drv.checksum(server.id)
    _, handle = await client.start_backup(BackupServerInput(server_id=server.id))
    second = cast(dict[str, Any], await handle.result())
    assert second["status"] == "available" and second["parent_id"] == first["id"]
    assert drv.snapshots(server.id) == []
    drv.group_snapshot(server.id, "bk-leaked0000002")
    drv.write(server.id, disk, 0, b"overwritten")
    restore = await client.start_restore(RestoreServerInput(backup_id=second["id"]))
    await restore.result()
    assert drv.snapshots(server.id) == []
    assert drv.checksum(server.id) == expected
