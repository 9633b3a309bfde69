"""Verification (issue 7): ``VerifyBackup`` and ``csbs backup verify`` read every chunk and
check its digest; damage in S3 is reported by disk and chunk, and a restore of such a
backup fails before touching the disks."""

from __future__ import annotations

import os
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError

from csbs.model import ServerState, VerifyBackupsInput
from runtime.schedules import VERIFY_SCHEDULE_ID, reconcile_schedules
from tests.conftest import Stack, backup, restore

pytestmark = pytest.mark.slow
MIB = 1024 * 1024


def make_server(stack: Stack) -> Any:
    drv = stack.driver
    server = drv.create_server("web-1", [8 * MIB, 8 * MIB])
    drv.write(server.id, server.disks[0].id, 0, os.urandom(3 * MIB))
    drv.write(server.id, server.disks[1].id, 2 * MIB, os.urandom(2 * MIB))
    return server


def chunk_key(stack: Stack, backup_id: str, disk_id: str, index: int) -> str:
    chunk_id = stack.store.get_manifest(backup_id, disk_id).entry(index)
    assert chunk_id is not None
    return stack.store.chunk_key(chunk_id)


def flip_a_byte(stack: Stack, key: str) -> None:
    s3, bucket = stack.store.s3, stack.store.bucket
    blob = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    blob[len(blob) // 2] ^= 0x01
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(blob))


def remove(stack: Stack, key: str) -> None:
    stack.store.s3.delete_object(Bucket=stack.store.bucket, Key=key)


async def test_a_sound_backup_verifies_with_every_chunk_read(stack: Stack) -> None:
    server = make_server(stack)
    bk = await backup(stack, server.id)
    out = (await stack.cli("backup", "verify", bk["id"], "--wait", "--json")).json()
    distinct = sum(len(stack.store.get_manifest(bk["id"], d.id).chunk_ids()) for d in server.disks)
    assert (out["ok"], out["chunks_checked"], out["problems"]) == (True, distinct, [])
    assert out["bytes_checked"] == bk["data_bytes"] == 5 * MIB
    shown = (await stack.cli("backup", "show", bk["id"], "--json")).json()
    assert shown["verify_status"] == "ok" and shown["verified_at"]
    assert [(t["kind"], t["status"]) for t in shown["tasks"]] == [
        ("verify", "succeeded"),
        ("backup", "succeeded"),
    ]


async def test_damage_is_reported_by_disk_and_chunk_and_the_backup_is_never_restored(
    stack: Stack,
) -> None:
    server = make_server(stack)
    system, data = server.disks
    bk = await backup(stack, server.id)
    flip_a_byte(stack, chunk_key(stack, bk["id"], system.id, 1))
    remove(stack, chunk_key(stack, bk["id"], data.id, 3))

    result = await stack.cli("backup", "verify", bk["id"], "--wait", "--json", check=False)
    assert result.code == 1
    out = result.json()
    assert out["ok"] is False
    found = {(p["disk_id"], p["index"], p["problem"]) for p in out["problems"]}
    assert found == {(system.id, 1, "corrupt"), (data.id, 3, "missing")}
    reason = out["reason"]
    assert f"disk {system.id} chunk 1" in reason and "digest mismatch" in reason
    assert f"disk {data.id} chunk 3" in reason and "missing" in reason
    assert result.stderr.strip().splitlines()[-1] == f"error: {reason}"
    task = stack.catalog.list_tasks(kind="verify")[0]
    assert (task.status, task.reason) == ("failed", reason)
    assert stack.catalog.get_backup(bk["id"]).verify_status == "failed"

    # The restore is refused before the server is stopped or a disk written.
    stack.driver.write(server.id, data.id, 0, os.urandom(MIB))
    before = stack.driver.checksum(server.id)
    refused = await stack.cli("backup", "restore", bk["id"], "--yes", "--wait", check=False)
    assert refused.code == 1
    assert "failed verification" in refused.stderr
    assert "restore refused before any disk was touched" in refused.stderr
    assert stack.driver.checksum(server.id) == before
    assert stack.driver.get_server(server.id).state == ServerState.RUNNING
    assert stack.catalog.get_backup(bk["id"]).status == "available"


async def test_a_restore_checks_every_chunk_is_there_before_touching_a_disk(stack: Stack) -> None:
    """No verify has run: a missing chunk is still found before anything is written."""
    server = make_server(stack)
    bk = await backup(stack, server.id)
    remove(stack, chunk_key(stack, bk["id"], server.disks[1].id, 2))
    stack.driver.write(server.id, server.disks[0].id, 0, os.urandom(MIB))
    before = stack.driver.checksum(server.id)
    with pytest.raises(WorkflowFailureError) as info:
        await restore(stack, bk["id"])
    message = str(info.value.cause)
    assert f"disk {server.disks[1].id} chunk 2" in message and "missing" in message
    assert "before any disk was touched" in message
    assert stack.driver.checksum(server.id) == before
    assert stack.driver.get_server(server.id).state == ServerState.RUNNING


async def test_restore_with_verify_finds_a_flipped_byte_before_touching_a_disk(
    stack: Stack,
) -> None:
    server = make_server(stack)
    bk = await backup(stack, server.id)
    flip_a_byte(stack, chunk_key(stack, bk["id"], server.disks[0].id, 0))
    stack.driver.write(server.id, server.disks[0].id, 0, os.urandom(MIB))
    before = stack.driver.checksum(server.id)
    refused = await stack.cli(
        "backup", "restore", bk["id"], "--verify", "--yes", "--wait", check=False
    )
    assert refused.code == 1
    assert f"disk {server.disks[0].id} chunk 0" in refused.stderr
    assert "no disk was touched" in refused.stderr
    assert stack.driver.checksum(server.id) == before
    assert stack.driver.get_server(server.id).state == ServerState.RUNNING
    task = stack.catalog.list_tasks(kind="restore")[0]
    assert task.status == "failed" and "digest mismatch" in (task.reason or "")


async def test_the_verify_schedule_checks_backups_not_verified_lately(stack: Stack) -> None:
    server = make_server(stack)
    good = await backup(stack, server.id)
    stack.driver.write(server.id, server.disks[0].id, 5 * MIB, os.urandom(MIB))
    bad = await backup(stack, server.id)
    # The incremental's own new chunk is damaged; the chunks it shares stay sound.
    manifest = stack.store.get_manifest(bad["id"], server.disks[0].id)
    flip_a_byte(stack, stack.store.chunk_key(manifest.entry(5)))  # type: ignore[arg-type]

    handle = await stack.client.start_workflow(
        "VerifyBackups",
        VerifyBackupsInput(max_age_days=7),
        id=f"verify-all-{good['id']}",
        task_queue=stack.settings.task_queue,
    )
    report = await handle.result()
    assert (report["verified"], report["ok"]) == (2, 1)
    assert list(report["failed"]) == [bad["id"]]
    assert stack.catalog.get_backup(good["id"]).verify_status == "ok"
    assert stack.catalog.get_backup(bad["id"]).verify_status == "failed"
    # Verified just now: the next run has nothing to do.
    again = await stack.client.start_workflow(
        "VerifyBackups",
        VerifyBackupsInput(max_age_days=7),
        id=f"verify-again-{good['id']}",
        task_queue=stack.settings.task_queue,
    )
    assert (await again.result())["verified"] == 0

    # The schedule follows the settings: 04:30 Asia/Shanghai, then off.
    from csbs.policy_service import PolicyService

    svc = PolicyService(stack.catalog, stack.compute)
    settings = stack.settings.model_copy(
        update={"verify_time": "04:30", "verify_timezone": "Asia/Shanghai"}
    )
    await reconcile_schedules(stack.client, svc, settings)
    desc = await stack.client.get_schedule_handle(VERIFY_SCHEDULE_ID).describe()
    cal = desc.schedule.spec.calendars[0]
    assert (cal.hour[0].start, cal.minute[0].start) == (4, 30)
    assert desc.schedule.spec.time_zone_name == "Asia/Shanghai"
    off = stack.settings.model_copy(update={"verify_time": "off"})
    await reconcile_schedules(stack.client, svc, off)
    assert VERIFY_SCHEDULE_ID not in {s.id async for s in await stack.client.list_schedules()}
