"""The guide, word for word (issue 15), as a user meets it: through ``csbs``, the real
Temporal Schedules, and workflows started by other services.

Retention scope (P4, P5, P9), refusal records (B10, R6, T1), quotas per tenant (B15),
console defaults (guide 3.2.1), binding while creating a backup (guide 2.2), a one-disk
server restored onto its replaced disk (R4), disk backups (guide 1.6, R7) and batch names
that fit (B7).
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, ScheduleActionExecutionStartWorkflow, WorkflowFailureError
from temporalio.testing import WorkflowEnvironment

from csbs.catalog import utcnow
from csbs.model import BackupServerInput, RestoreServerInput, ServerState
from runtime.schedules import RETENTION_SCHEDULE_ID, schedule_id
from starter.client import CsbsClient
from starter.stack import SeaweedS3
from tests.conftest import MIB, Stack, make_settings, running_stack

pytestmark = pytest.mark.slow


async def trigger(client: Client, sid: str) -> Any:
    """Trigger a schedule and wait for the run it started; that run's result."""
    handle = client.get_schedule_handle(sid)
    before = len((await handle.describe()).info.recent_actions)
    await handle.trigger()
    for _ in range(600):
        actions = (await handle.describe()).info.recent_actions
        if len(actions) > before:
            run = actions[-1].action
            assert isinstance(run, ScheduleActionExecutionStartWorkflow)
            return await client.get_workflow_handle(
                run.workflow_id, run_id=run.first_execution_run_id
            ).result()
        await asyncio.sleep(0.1)
    raise AssertionError(f"schedule {sid} started nothing")


def small_server(st: Stack, name: str, disks: int = 1) -> Any:
    server = st.driver.create_server(name, [4 * MIB] * disks)
    for disk in server.disks:
        st.driver.write(server.id, disk.id, 0, os.urandom(MIB))
    return server


def age(st: Stack, backup_ids: list[str], days: int) -> None:
    for backup_id in backup_ids:
        st.catalog.update_backup(backup_id, created_at=utcnow() - timedelta(days=days))


async def test_retention_deletes_only_for_enabled_policies_and_bound_servers(
    stack: Stack,
) -> None:
    """P4, P5, P9 (guide 3.2.1, 3.2.5, 3.2.6), through the real schedules: a server's
    backups stay once it is unbound; a disabled policy deletes nothing, its cleanup
    included; enabled again, its retention applies."""
    st = stack
    policy = (await st.cli("policy", "create", "--keep-count", "1", "--json")).json()
    pid = policy["id"]
    kept, unbound = small_server(st, "kept"), small_server(st, "unbound")
    await st.cli("policy", "bind", pid, kept.id, unbound.id)
    await st.cli("policy", "reconcile")  # the daily cleanup's schedule

    first = await trigger(st.client, schedule_id(pid))
    first_ids = {s: v["backup_id"] for s, v in first["backups"].items()}
    await st.cli("policy", "unbind", pid, unbound.id)
    second = await trigger(st.client, schedule_id(pid))
    assert set(second["backups"]) == {kept.id}
    # The bound server's older autobk_ is expired; the unbound one's stays (P9).
    assert second["retention"]["expired"] == [first_ids[kept.id]]
    assert st.catalog.find_backup(first_ids[kept.id]) is None
    assert st.catalog.get_backup(first_ids[unbound.id]).status == "available"

    # Disabled: nothing is deleted, not even by the daily cleanup (guide 3.2.5).
    await st.cli("policy", "update", pid, "--keep-count", "2")
    third = await st.client.execute_workflow(
        "RunPolicy",
        {"policy_id": pid, "trigger": "scheduled"},
        id=f"third-{pid}",
        task_queue=st.settings.task_queue,
    )
    await st.cli("policy", "update", pid, "--keep-count", "1")
    await st.cli("policy", "disable", pid)
    report = await trigger(st.client, RETENTION_SCHEDULE_ID)
    assert report[pid]["expired"] == []
    autos = [b.id for b in st.catalog.list_backups() if b.server_id == kept.id]
    assert len(autos) == 2
    await st.cli("policy", "enable", pid)
    report = await trigger(st.client, RETENTION_SCHEDULE_ID)
    assert report[pid]["expired"] == [second["backups"][kept.id]["backup_id"]]
    left = {b.id for b in st.catalog.list_backups()}
    assert left == {first_ids[unbound.id], third["backups"][kept.id]["backup_id"]}
    for sid in (schedule_id(pid), RETENTION_SCHEDULE_ID):
        await st.client.get_schedule_handle(sid).delete()


async def test_console_defaults(stack: Stack) -> None:
    """Guide 3.2.1 (P1-P3): a policy given nothing runs at 00:00 every 3 days and keeps
    its backups 6 months; its schedule says so."""
    made = (await stack.cli("policy", "create", "--json")).json()
    assert (made["name"], made["times"], made["every_days"], made["weekdays"]) == (
        "backup_policy",
        ["00:00"],
        3,
        None,
    )
    assert (made["retention"], made["retention_value"]) == ("days", 180)
    shown = (await stack.cli("policy", "show", made["id"], "--json")).json()
    assert shown["next_runs"] and all("T00:00:00" in t for t in shown["next_runs"])
    await stack.client.get_schedule_handle(schedule_id(made["id"])).delete()


async def test_refused_backups_and_restores_leave_records_whoever_started_them(
    stack: Stack,
) -> None:
    """B10, R6, T1 (guide 3.3): a backup refused by its workflow is an ``error`` backup
    and a failed backup task with the reason, whether another service, a schedule or a
    race started it; a refused restore is a failed restore task. A ``csbs`` command
    refused before it starts anything is one line and records nothing."""
    st = stack
    client = CsbsClient(st.client, st.settings)
    faulty = small_server(st, "faulty")
    st.driver.set_state(faulty.id, ServerState.FAULT)

    # The CLI refuses before starting anything: one line, no record.
    refused = await st.cli("backup", "create", faulty.id, check=False)
    assert refused.code != 0 and "fault" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert st.catalog.list_backups() == [] and st.catalog.list_tasks() == []

    # Another service starts the workflow itself.
    backup_id, handle = await client.start_backup(BackupServerInput(server_id=faulty.id))
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    row = st.catalog.get_backup(backup_id)
    assert row.status == "error" and row.name.startswith("manualbk_")
    assert (
        row.error == f"validate: server {faulty.id} is fault; only running or stopped "
        "servers can be backed up"
    )
    failed = (await st.cli("task", "list", "--status", "failed", "--json")).json()
    assert [(t["kind"], t["backup_id"], t["reason"]) for t in failed] == [
        ("backup", backup_id, row.error)
    ]
    shown = (await st.cli("backup", "list", "--status", "error", "--json")).json()
    assert [b["id"] for b in shown] == [backup_id]

    # A scheduled run: the faulty server's autobk_ is an error backup with the reason.
    policy = (await st.cli("policy", "create", "--keep-count", "3", "--json")).json()
    healthy = small_server(st, "healthy")
    await st.cli("policy", "bind", policy["id"], healthy.id)
    st.driver.set_state(healthy.id, ServerState.FAULT)  # it broke after it was bound
    run = await trigger(st.client, schedule_id(policy["id"]))
    auto = st.catalog.get_backup(run["backups"][healthy.id]["backup_id"])
    assert auto.status == "error" and auto.name.startswith("autobk_")
    assert auto.kind == "scheduled" and "is fault" in (auto.error or "")
    (auto_task,) = st.catalog.list_tasks(backup_id=auto.id)
    assert auto_task.status == "failed" and auto_task.reason == auto.error
    await st.client.get_schedule_handle(schedule_id(policy["id"])).delete()

    # A race: a backup runs when another service starts a second one of the server.
    st.driver.set_state(healthy.id, ServerState.RUNNING)
    big = st.driver.create_server("big", [256 * MIB])
    for off in range(0, 256 * MIB, 64 * MIB):
        st.driver.write(big.id, big.disks[0].id, off, os.urandom(64 * MIB))
    first_id, first = await client.start_backup(BackupServerInput(server_id=big.id))
    while st.catalog.find_backup(first_id) is None:
        await asyncio.sleep(0.02)
    second_id, second = await client.start_backup(BackupServerInput(server_id=big.id))
    with pytest.raises(WorkflowFailureError):
        await second.result()
    assert (await first.result())["status"] == "available"  # type: ignore[index]
    raced = st.catalog.get_backup(second_id)
    assert raced.status == "error" and "already has a backup running" in (raced.error or "")

    # A restore refused by its workflow (the backup is in error) leaves a failed task.
    restore = await client.start_restore(RestoreServerInput(backup_id=backup_id))
    with pytest.raises(WorkflowFailureError):
        await restore.result()
    (task,) = st.catalog.list_tasks(kind="restore")
    assert task.status == "failed" and task.backup_id == backup_id
    assert task.reason == (
        f"validate: backup {backup_id} is error; only available backups can be restored"
    )
    failed = (await st.cli("task", "list", "--status", "failed", "--json")).json()
    assert {t["kind"] for t in failed} == {"backup", "restore"} and len(failed) == 4
    assert st.catalog.get_backup(backup_id).status == "error"  # the backup is untouched


async def test_quotas_count_disk_backups_and_real_stored_bytes_per_tenant(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment
) -> None:
    """B15 (guide 4.2 Q4): quotas per tenant, a default from the settings; a server backup
    counts one disk backup per disk; bytes are the chunks really stored, shared ones
    once. A backup that would pass a limit is refused before it starts, with the
    numbers; deleting backups makes room again."""
    settings = make_settings(tmp_path, s3, quota_disk_backups=10)
    async with running_stack(temporal, settings) as st:
        st.env["CSBS_QUOTA_DISK_BACKUPS"] = "10"  # the CLI's settings, as the worker's
        server = st.driver.create_server("two-disks", [8 * MIB, 8 * MIB])
        for disk in server.disks:
            st.driver.write(server.id, disk.id, 0, os.urandom(2 * MIB))
        shown = (await st.cli("quota", "show", "--json")).json()
        assert shown["disk_backups"] == {"used": 0, "limit": 10, "source": "default"}
        assert shown["bytes"] == {"used": 0, "limit": None, "source": "default"}

        for args, needle in [
            ((), "give --disk-backups or --bytes"),
            (("--disk-backups", "0"), "disk_backups must be at least 1"),
            (("--bytes", "lots"), "bytes must be a size like 500GiB"),
        ]:
            bad = await st.cli("quota", "set", *args, check=False)
            assert bad.code != 0 and needle in bad.stderr, bad.stderr
            assert len(bad.stderr.strip().splitlines()) == 1
        await st.cli("quota", "set", "--project", "default", "--disk-backups", "3")
        one = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
        refused = await st.cli("backup", "create", server.id, check=False)
        assert (
            refused.code != 0
            and ("it keeps 2 disk backups, this backup adds 2 and the quota is 3 disk backups")
            in refused.stderr
        )
        assert len(st.catalog.list_backups()) == 1 and st.catalog.list_tasks(status="failed") == []
        # Another tenant has its own quota (none here: the default applies).
        other = (await st.cli("--project", "other", "quota", "show", "--json")).json()
        assert other["disk_backups"] == {"used": 0, "limit": 10, "source": "default"}

        # Bytes: the tenant's stored chunks; an unchanged incremental adds nothing.
        await st.cli("quota", "set", "--disk-backups", "unlimited")
        stored = sum(size for _, size in st.store.list_chunks())
        assert stored > 4 * MIB  # random data does not compress
        used = (await st.cli("quota", "show", "--json")).json()["bytes"]["used"]
        assert used == stored
        two = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
        assert two["stored_bytes"] == 0
        view = (await st.cli("quota", "show", "--json")).json()
        assert view["bytes"]["used"] == stored and view["disk_backups"]["used"] == 4
        assert view["disk_backups"]["limit"] is None
        await st.cli("quota", "set", "--bytes", str(stored))
        refused = await st.cli("backup", "create", server.id, check=False)
        assert refused.code != 0
        assert f"it stores {stored} bytes" in refused.stderr
        assert f"the quota is {stored} bytes" in refused.stderr
        # Deleting frees the chunks (the delete's sweep measures again): room again.
        await st.cli("backup", "delete", one["id"], two["id"], "--yes", "--wait")
        assert (await st.cli("quota", "show", "--json")).json()["bytes"]["used"] == 0
        again = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
        assert again["status"] == "available"
        view = (await st.cli("quota", "show", "--json")).json()
        assert view["bytes"]["used"] == sum(size for _, size in st.store.list_chunks())
        await st.cli("quota", "set", "--bytes", "default", "--disk-backups", "default")
        assert (await st.cli("quota", "show", "--json")).json()["bytes"]["limit"] is None


async def test_backup_create_with_a_policy_binds_instead(stack: Stack) -> None:
    """Guide 2.2 (automatic backup): ``backup create --policy`` binds the servers, moving
    them from another policy, and backs up nothing now."""
    st = stack
    a = (await st.cli("policy", "create", "--name", "a", "--json")).json()["id"]
    b = (await st.cli("policy", "create", "--name", "b", "--json")).json()["id"]
    one, two = small_server(st, "one"), small_server(st, "two")
    await st.cli("policy", "bind", a, one.id)
    bound = (await st.cli("backup", "create", one.id, two.id, "--policy", b, "--json")).json()
    assert bound["policy_id"] == b and sorted(bound["server_ids"]) == sorted([one.id, two.id])
    assert (await st.cli("policy", "show", a, "--json")).json()["server_ids"] == []
    assert st.catalog.list_backups() == [] and st.catalog.list_tasks() == []
    for args, needle in [
        (("--policy", b, "--name", "now"), "drop --name"),
        (("--policy", "pol-nothere"), "pol-nothere"),
    ]:
        refused = await st.cli("backup", "create", one.id, *args, check=False)
        assert refused.code != 0 and needle in refused.stderr, refused.stderr
    for pid in (a, b):
        await st.client.get_schedule_handle(schedule_id(pid)).delete()


async def test_a_one_disk_server_is_restored_onto_its_replaced_disk(stack: Stack) -> None:
    """R4 (guide 3.1.2): a server with one disk is restored onto its one disk, even when
    that disk was replaced since the backup; no disk is added."""
    st = stack
    server = small_server(st, "solo")
    before = st.driver.checksum(server.id)
    made = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    new = st.driver.replace_disk(server.id, server.disks[0].id, 4 * MIB)
    done = (await st.cli("backup", "restore", made["id"], "--yes", "--wait", "--json")).json()
    assert [(d["source_disk_id"], d["target_disk_id"]) for d in done["disks"]] == [
        (server.disks[0].id, new.id)
    ]
    after = st.driver.get_server(server.id)
    assert [d.id for d in after.disks] == [new.id]
    assert st.driver.checksum(server.id) == {new.id: before[server.disks[0].id]}
    (task,) = st.catalog.list_tasks(kind="restore")
    assert "replaced since the backup" in (task.detail or "")


async def test_disk_backups_are_listed_and_restored_one_by_one(stack: Stack) -> None:
    """Guide 1.6, 4.4 Q2 (R7): every server backup is a set of disk backups, listed with
    ``backup list --disks``; one of them restores that disk alone."""
    st = stack
    server = small_server(st, "pair", disks=2)
    sums = st.driver.checksum(server.id)
    made = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    disks = (await st.cli("backup", "list", "--disks", "--json")).json()
    assert [(d["backup_id"], d["disk_id"], d["role"]) for d in disks] == [
        (made["id"], server.disks[0].id, "system"),
        (made["id"], server.disks[1].id, "data"),
    ]
    assert all(d["status"] == "available" and d["server_id"] == server.id for d in disks)
    table = (await st.cli("backup", "list", "--disks")).stdout
    assert server.disks[1].id in table and made["name"] in table
    for disk in server.disks:
        st.driver.write(server.id, disk.id, 0, os.urandom(MIB))
    data = disks[1]
    await st.cli(
        "backup", "restore", data["backup_id"], "--disk", data["disk_id"], "--yes", "--wait"
    )
    now = st.driver.checksum(server.id)
    assert now[data["disk_id"]] == sums[data["disk_id"]]
    assert now[server.disks[0].id] != sums[server.disks[0].id]  # the other disk untouched


async def test_batch_names_are_cut_to_fit(stack: Stack) -> None:
    """B7: a 255-character name for a batch of servers is cut so that ``-0001`` fits."""
    st = stack
    servers = [small_server(st, f"n{i}") for i in range(2)]
    name = "备" * 255
    made = (
        await st.cli("backup", "create", *[s.id for s in servers], "--name", name, "--json")
    ).json()
    assert sorted(b["name"] for b in made) == ["备" * 250 + "-0001", "备" * 250 + "-0002"]
    for b in made:
        while st.catalog.get_backup(b["id"]).status == "creating":
            await asyncio.sleep(0.05)
