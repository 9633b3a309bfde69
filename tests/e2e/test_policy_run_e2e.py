"""RunPolicy on the real stack: one backup per bound server, busy servers skipped with a
recorded reason, retention applied to scheduled backups only (P4, P5, P8, B7)."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Literal, cast

import pytest
from temporalio.client import WorkflowFailureError

from csbs.model import BackupServerInput, RestoreServerInput, RunPolicyInput
from csbs.policy import PolicySpec
from csbs.policy_service import PolicyService
from starter.client import CsbsClient
from tests.conftest import MIB, Stack

pytestmark = pytest.mark.slow


async def run_policy(
    stack: Stack, policy_id: str, trigger: Literal["manual", "scheduled"], n: int
) -> dict[str, Any]:
    handle = await stack.client.start_workflow(
        "RunPolicy",
        RunPolicyInput(policy_id=policy_id, trigger=trigger),
        id=f"runpolicy-{policy_id}-{n}",
        task_queue=stack.settings.task_queue,
    )
    return cast(dict[str, Any], await handle.result())


async def test_policy_run_backs_up_skips_busy_and_applies_retention(stack: Stack) -> None:
    drv = stack.driver
    small = [drv.create_server(f"web-{i}", [4 * MIB]) for i in range(2)]
    for s in small:
        drv.write(s.id, s.disks[0].id, 0, os.urandom(MIB))
    busy = drv.create_server("busy", [384 * MIB])
    for off in range(0, 384 * MIB, 64 * MIB):
        drv.write(busy.id, busy.disks[0].id, off, os.urandom(64 * MIB))
    policies = PolicyService(stack.catalog, drv)
    policy = policies.create(PolicySpec(times=["03:00"], every_days=1, retention_value=1))
    policies.bind(policy.id, [s.id for s in [*small, busy]])

    # A manual backup of one server is running when the scheduled run fires.
    client = CsbsClient(stack.client, stack.settings)
    manual_id, manual = await client.start_backup(BackupServerInput(server_id=busy.id))
    while stack.catalog.find_backup(manual_id) is None:
        await asyncio.sleep(0.02)
    with pytest.raises(WorkflowFailureError) as info:  # P8: run now is refused meanwhile
        await run_policy(stack, policy.id, "manual", 0)
    assert "backups are running" in str(info.value.cause)
    # Started and then refused: a failed task says why (T1, guide 3.3).
    (refused,) = stack.catalog.list_tasks(status="failed")
    assert str(info.value.cause).endswith(refused.reason or "-")
    assert (refused.reason or "").startswith(f"policy run: policy {policy.id} cannot run now")
    assert refused.detail == f"policy {policy.id} (manual run)"
    first = await run_policy(stack, policy.id, "scheduled", 1)
    assert set(first["backups"]) == {s.id for s in small}
    assert {v["outcome"] for v in first["backups"].values()} == {"available"}
    assert busy.id in first["skipped"]
    (skip,) = stack.catalog.list_tasks(status="skipped")
    assert skip.server_id == busy.id and manual_id in (skip.reason or "")
    await manual.result()

    # Names: autobk_ for scheduled runs, backup_ for run now (B7).
    by_id = {b.id: b for b in stack.catalog.list_backups()}
    assert {by_id[v["backup_id"]].name[:7] for v in first["backups"].values()} == {"autobk_"}
    now_run = await run_policy(stack, policy.id, "manual", 2)
    assert {
        stack.catalog.get_backup(v["backup_id"]).name.split("_")[0]
        for v in now_run["backups"].values()
    } == {"backup"}

    # Retention keeps 1 scheduled backup per server: the second scheduled run expires the
    # first; the manual and run-now backups are never touched (P4).
    second = await run_policy(stack, policy.id, "scheduled", 3)
    first_ids = {v["backup_id"] for v in first["backups"].values()}
    assert set(second["retention"]["expired"]) == first_ids
    left = {b.id for b in stack.catalog.list_backups()}
    assert first_ids.isdisjoint(left)
    assert manual_id in left
    assert {v["backup_id"] for v in now_run["backups"].values()} <= left
    assert {v["backup_id"] for v in second["backups"].values()} <= left

    # Every backup left after retention still restores bit-identical (B4).
    expected = drv.checksum(small[0].id)
    for b in stack.catalog.list_backups():
        if b.server_id == small[0].id:
            drv.write(small[0].id, small[0].disks[0].id, 0, os.urandom(MIB))
            handle = await client.start_restore(RestoreServerInput(backup_id=b.id))
            await handle.result()
            assert drv.checksum(small[0].id) == expected
