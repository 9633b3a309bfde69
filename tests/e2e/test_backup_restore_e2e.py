"""End to end on the real stack: Temporal dev server, SeaweedFS, SQLite catalog, local driver.

Covers B1 (all disks, one instant), B2 (full then incremental), B3 (allocated / changed
only), B4 (every backup restores; deleting one breaks none), B5 (restore from S3 only),
R1 and R3 (restore all disks of the original server, power on or not).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.testing import WorkflowEnvironment

from csbs.model import BackupServerInput, DeleteBackupsInput, ServerState
from starter.client import CsbsClient
from starter.stack import SeaweedS3
from tests.conftest import (
    MIB,
    Stack,
    activity_steps,
    backup,
    make_settings,
    restore,
    running_stack,
)

pytestmark = pytest.mark.slow


def make_server(stack: Stack, system: int = 16 * MIB, data: int = 32 * MIB) -> Any:
    """A running server with a system and a data disk, sparse and partly written."""
    drv = stack.driver
    server = drv.create_server("web-1", [system, data])
    sys_disk, data_disk = server.disks
    drv.write(server.id, sys_disk.id, 0, os.urandom(3 * MIB))  # "boot" area
    drv.write(server.id, sys_disk.id, 9 * MIB + 123, b"config" * 1000)
    drv.write(server.id, data_disk.id, 5 * MIB, os.urandom(4 * MIB + 77))
    drv.write(server.id, data_disk.id, 30 * MIB, b"tail" * 4096)
    return server


async def test_full_backup_then_restore_onto_changed_disks_is_bit_identical(stack: Stack) -> None:
    """B1, B3, B5, R1, R3: full backup of both disks; restore after changes gives them back."""
    server = make_server(stack)
    before = stack.driver.checksum(server.id)
    result = await backup(stack, server.id)
    assert result["status"] == "available"
    assert result["parent_id"] is None
    assert {d["disk_id"] for d in result["disks"]} == {d.id for d in server.disks}
    # B3: a full backup stores about the allocated data, not the 48 MiB of disk.
    allocated = 3 * MIB + 6000 + 4 * MIB + 77 + 4 * 4096
    assert result["data_bytes"] <= allocated + 4 * MIB  # chunk rounding, 1 MiB chunks
    assert result["stored_bytes"] < 10 * MIB

    sys_disk, data_disk = server.disks
    stack.driver.write(server.id, sys_disk.id, 1 * MIB, os.urandom(2 * MIB))
    stack.driver.write(server.id, data_disk.id, 20 * MIB, os.urandom(MIB))
    assert stack.driver.checksum(server.id) != before

    out = await restore(stack, result["id"])
    assert out["powered_on"] is True
    assert stack.driver.checksum(server.id) == before
    assert stack.driver.get_server(server.id).state == ServerState.RUNNING
    assert stack.catalog.get_backup(result["id"]).status == "available"
    tasks = stack.catalog.list_tasks()
    assert {(t.kind, t.status) for t in tasks} == {
        ("backup", "succeeded"),
        ("restore", "succeeded"),
    }


async def test_restore_can_leave_the_server_stopped(stack: Stack) -> None:
    """R3: power_on=false leaves the server stopped after the restore."""
    server = make_server(stack)
    result = await backup(stack, server.id)
    await restore(stack, result["id"], power_on=False)
    assert stack.driver.get_server(server.id).state == ServerState.STOPPED


async def test_backup_is_the_instant_of_the_snapshot_while_writes_go_on(stack: Stack) -> None:
    """B1: writes made while the backup runs are not in it, on any disk."""
    server = make_server(stack, system=32 * MIB, data=64 * MIB)
    for disk in server.disks:  # fill so that the upload takes a while
        stack.driver.write(server.id, disk.id, 0, os.urandom(disk.size_bytes))
    at_snapshot = stack.driver.checksum(server.id)
    client = CsbsClient(stack.client, stack.settings)
    backup_id, handle = await client.start_backup(BackupServerInput(server_id=server.id))

    # Wait for the snapshot, then keep writing over every disk while the upload runs.
    for _ in range(200):
        if stack.driver.snapshots(server.id):
            break
        await asyncio.sleep(0.05)
    assert stack.driver.snapshots(server.id), "the snapshot was never taken"
    stop = threading.Event()
    writes = 0

    def writer() -> None:
        nonlocal writes
        while not stop.is_set():
            for disk in server.disks:
                offset = (writes * 3 * MIB) % (disk.size_bytes - MIB)
                stack.driver.write(server.id, disk.id, offset, os.urandom(MIB))
            writes += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = cast(dict[str, Any], await handle.result())
    finally:
        stop.set()
        thread.join()
    assert writes > 0
    assert result["status"] == "available"
    assert stack.driver.snapshots(server.id) == []  # released
    assert stack.driver.checksum(server.id) != at_snapshot
    await restore(stack, backup_id)
    assert stack.driver.checksum(server.id) == at_snapshot


async def test_incremental_uploads_only_changed_chunks(stack: Stack) -> None:
    """B2, B3: the second backup is incremental and uploads exactly the k changed chunks."""
    server = make_server(stack)
    first = await backup(stack, server.id)
    chunks_after_full = stack.count_chunks()
    assert chunks_after_full == sum(d["chunks_uploaded"] for d in first["disks"])

    sys_disk, data_disk = server.disks
    k_changes = [(sys_disk.id, 12 * MIB), (data_disk.id, 1 * MIB), (data_disk.id, 25 * MIB)]
    for disk_id, offset in k_changes:  # one new chunk each (1 MiB chunks, aligned)
        stack.driver.write(server.id, disk_id, offset, os.urandom(MIB))
    second = await backup(stack, server.id)
    assert second["parent_id"] == first["id"]
    assert stack.count_chunks() - chunks_after_full == len(k_changes)
    assert sum(d["chunks_uploaded"] for d in second["disks"]) == len(k_changes)
    # Changed-block tracking: the incremental read only the changed chunks.
    assert {d["read_mode"] for d in second["disks"]} == {"cbt"}
    assert sum(d["bytes_read"] for d in second["disks"]) == len(k_changes) * MIB

    # An unchanged server backs up with nothing read and nothing uploaded.
    third = await backup(stack, server.id)
    assert sum(d["bytes_read"] for d in third["disks"]) == 0
    assert stack.count_chunks() - chunks_after_full == len(k_changes)


async def test_every_backup_restores_after_deleting_the_middle_one(stack: Stack) -> None:
    """B4, D1: backups A, B, C; delete B; A and C still restore bit-identical."""
    server = make_server(stack)
    sums, ids = [], []
    for i in range(3):
        sums.append(stack.driver.checksum(server.id))
        ids.append((await backup(stack, server.id))["id"])
        stack.driver.write(server.id, server.disks[i % 2].id, (2 + 5 * i) * MIB, os.urandom(MIB))
    a, b, c = ids
    client = CsbsClient(stack.client, stack.settings)
    handle = await client.start_delete(DeleteBackupsInput(backup_ids=[b]))
    assert cast(dict[str, Any], await handle.result())["deleted"] == [b]
    assert stack.catalog.find_backup(b) is None
    assert not list(stack.store.list_keys(f"manifests/{b}/"))
    for backup_id, expected in ((a, sums[0]), (c, sums[2])):
        await restore(stack, backup_id)
        assert stack.driver.checksum(server.id) == expected


async def test_failed_backup_is_error_with_a_reason_and_releases_the_snapshot(
    stack: Stack,
) -> None:
    """B10, T1: a disk that cannot be read leaves an error backup, a failed task with the
    step and disk in its reason, and no snapshot behind."""
    server = make_server(stack)
    data_disk = server.disks[1]
    disk_file = stack.driver._disk_path(server.id, data_disk.id)
    disk_file.rename(disk_file.with_suffix(".gone"))
    with pytest.raises(WorkflowFailureError) as info:
        await backup(stack, server.id)
    message = str(info.value.cause)
    assert data_disk.id in message
    rows = stack.catalog.list_backups()
    assert [r.status for r in rows] == ["error"]
    assert data_disk.id in (rows[0].error or "")
    task = stack.catalog.list_tasks(kind="backup")[0]
    assert task.status == "failed" and data_disk.id in (task.reason or "")
    assert stack.driver.snapshots(server.id) == []


async def test_bad_input_fails_the_workflow_at_once(stack: Stack) -> None:
    """Contract: invalid input fails the workflow immediately with the validation message."""
    handle = await stack.client.start_workflow(
        "BackupServer",
        {"server_id": "../etc"},
        id="bad-input-1",
        task_queue=stack.settings.task_queue,
    )
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), timeout=30)
    assert "server_id" in str(info.value.cause)


async def test_offline_backup_stops_for_the_snapshot_and_starts_again(stack: Stack) -> None:
    """B12: --offline stops a running server for the snapshot and starts it afterwards."""
    server = make_server(stack)
    result = await backup(stack, server.id, offline=True)
    assert result["status"] == "available"
    assert stack.driver.get_server(server.id).state == ServerState.RUNNING
    history = [
        e
        async for e in stack.client.get_workflow_handle(
            f"backup-{result['id']}"
        ).fetch_history_events()
    ]
    scheduled = activity_steps(history)
    assert scheduled.index("stop_server") < scheduled.index("take_snapshot")
    assert scheduled.index("take_snapshot") < scheduled.index("start_server")
    assert scheduled.index("start_server") < scheduled.index("backup_disk")
    # A stopped server stays stopped.
    stack.driver.stop(server.id)
    await backup(stack, server.id, offline=True)
    assert stack.driver.get_server(server.id).state == ServerState.STOPPED


async def test_one_backup_per_server_at_a_time(stack: Stack) -> None:
    """B14: a second backup of a server while one runs is refused, whichever way it was
    started; it leaves an error backup with the reason (B10) and no half-made one; the
    next one after it works and builds on the first."""
    server = make_server(stack, data=96 * MIB)
    stack.driver.write(server.id, server.disks[1].id, 0, os.urandom(96 * MIB))
    client = CsbsClient(stack.client, stack.settings)
    first_id, first = await client.start_backup(BackupServerInput(server_id=server.id))
    for _ in range(400):
        if stack.catalog.find_backup(first_id) is not None:
            break
        await asyncio.sleep(0.01)
    # Started the way another service or the Temporal CLI would, with its own workflow id.
    second = await stack.client.start_workflow(
        "BackupServer",
        {"server_id": server.id},
        id=f"other-{first_id}",
        task_queue=stack.settings.task_queue,
    )
    with pytest.raises(WorkflowFailureError) as info:
        await second.result()
    assert "already has a backup running" in str(info.value.cause)
    (refused,) = [b for b in stack.catalog.list_backups() if b.id != first_id]
    assert refused.status == "error" and "already has a backup running" in (refused.error or "")
    assert refused.workflow_id == f"other-{first_id}"
    assert cast(dict[str, Any], await first.result())["status"] == "available"
    third = await backup(stack, server.id)
    assert third["parent_id"] == first_id


async def test_delete_reclaims_chunks_no_other_backup_uses(stack: Stack) -> None:
    """D1, B4: deleting a backup frees exactly the chunks only it used; others restore."""
    server = make_server(stack)
    data_disk = server.disks[1].id
    a = await backup(stack, server.id)
    a_sums = stack.driver.checksum(server.id)
    stack.driver.write(server.id, data_disk, 12 * MIB, os.urandom(MIB))  # chunk only in B
    b = await backup(stack, server.id)
    stack.driver.write(server.id, data_disk, 12 * MIB, os.urandom(MIB))  # replaced in C
    c = await backup(stack, server.id)
    c_sums = stack.driver.checksum(server.id)
    before = stack.count_chunks()
    client = CsbsClient(stack.client, stack.settings)
    result = cast(
        dict[str, Any],
        await (await client.start_delete(DeleteBackupsInput(backup_ids=[b["id"]]))).result(),
    )
    assert result["reclaimed"]["chunks_deleted"] == 1
    assert stack.count_chunks() == before - 1
    for backup_id, sums in ((a["id"], a_sums), (c["id"], c_sums)):
        await restore(stack, backup_id)
        assert stack.driver.checksum(server.id) == sums
    # Deleting the rest leaves no chunk behind.
    await (await client.start_delete(DeleteBackupsInput(backup_ids=[a["id"], c["id"]]))).result()
    assert stack.count_chunks() == 0


async def test_backup_waits_for_a_running_sweep(stack: Stack) -> None:
    """D1: a backup started while GC sweeps retries its start and then runs."""
    server = make_server(stack)
    token = stack.catalog.claim_gc()
    client = CsbsClient(stack.client, stack.settings)
    backup_id, handle = await client.start_backup(BackupServerInput(server_id=server.id))
    await asyncio.sleep(2.5)
    assert stack.catalog.find_backup(backup_id) is None  # nothing made while it waits
    stack.catalog.release_gc(token)
    result = cast(dict[str, Any], await asyncio.wait_for(handle.result(), timeout=60))
    assert result["status"] == "available"


def _remove_bucket(store: Any) -> None:
    s3, bucket = store.s3, store.bucket
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    s3.delete_bucket(Bucket=bucket)


async def test_bucket_removed_failures_leave_records_a_person_can_act_on(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment
) -> None:
    """B10, R6, T1, D1: with the bucket gone, a backup ends in `error`, a restore leaves a
    failed task, a delete leaves `delete_failed`; each reason names step, disk and cause.
    The delete is retried once the bucket is back."""
    settings = make_settings(tmp_path, s3, s3_bucket=f"csbs-gone-{uuid.uuid4().hex[:8]}")
    async with running_stack(temporal, settings) as st:
        st.store.ensure_bucket()
        server = make_server(st)
        good = await backup(st, server.id)
        _remove_bucket(st.store)

        with pytest.raises(WorkflowFailureError):
            await backup(st, server.id)
        failed = next(b for b in st.catalog.list_backups() if b.id != good["id"])
        assert failed.status == "error"
        assert "upload of disk" in (failed.error or "") and "NoSuchBucket" in (failed.error or "")
        assert st.driver.snapshots(server.id) == []

        refused = await st.cli("backup", "restore", good["id"], "--yes", "--wait", check=False)
        assert refused.code != 0 and "NoSuchBucket" in refused.stderr
        (task,) = st.catalog.list_tasks(kind="restore")
        assert task.status == "failed" and "check backup" in (task.reason or "")
        assert "NoSuchBucket" in (task.reason or "")
        assert st.driver.get_server(server.id).state == ServerState.RUNNING  # never stopped
        assert st.catalog.get_backup(good["id"]).status == "available"

        refused = await st.cli("backup", "delete", good["id"], "--yes", "--wait", check=False)
        assert refused.code != 0 and "NoSuchBucket" in refused.stderr
        assert st.catalog.get_backup(good["id"]).status == "delete_failed"
        st.store.ensure_bucket()
        await st.cli("backup", "delete", good["id"], failed.id, "--yes", "--wait")
        assert st.catalog.list_backups() == []


async def test_failed_offline_backup_still_starts_the_server_again(stack: Stack) -> None:
    """B12 on the failure path: the server is running again after a failed offline backup."""
    server = make_server(stack)
    disk_file = stack.driver._disk_path(server.id, server.disks[1].id)
    disk_file.rename(disk_file.with_suffix(".gone"))
    with pytest.raises(WorkflowFailureError):
        await backup(stack, server.id, offline=True)
    assert stack.driver.get_server(server.id).state == ServerState.RUNNING
    assert stack.catalog.list_backups()[0].status == "error"
    assert stack.driver.snapshots(server.id) == []
