"""``csbs policy`` end to end: schedules follow the catalog; refusals are one line (P1-P9)."""

from __future__ import annotations

import pytest
from temporalio.service import RPCError

from runtime.schedules import schedule_id
from tests.conftest import MIB, Stack

pytestmark = pytest.mark.slow


async def test_policy_lifecycle_through_the_cli(stack: Stack) -> None:
    for args, needle in [
        (
            ("--time", "01:00", "--time", "01:30", "--weekdays", "mon", "--keep-count", "3"),
            "1 hour apart",
        ),
        (("--time", "01:00", "--every-days", "0", "--keep-count", "3"), "every_days"),
        (("--time", "01:00", "--every-days", "31", "--keep-count", "3"), "every_days"),
        (("--time", "01:00", "--weekdays", "mon", "--keep-count", "0"), "1-99999"),
        (("--time", "01:00", "--weekdays", "mon", "--keep-days", "100000"), "1-99999"),
        (("--time", "01:00", "--keep-count", "2", "--keep-forever"), "give one of"),
    ]:
        refused = await stack.cli("policy", "create", *args, check=False)
        assert refused.code != 0 and needle in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr
    assert (await stack.cli("policy", "list", "--json")).json() == []

    created = (
        await stack.cli(
            "policy",
            "create",
            "--name",
            "nightly",
            "--time",
            "02:00",
            "--every-days",
            "3",
            "--keep-days",
            "1m",
            "--timezone",
            "Asia/Shanghai",
            "--json",
        )
    ).json()
    pid = created["id"]
    assert (created["enabled"], created["retention"], created["retention_value"]) == (
        True,
        "days",
        30,
    )
    shown = (await stack.cli("policy", "show", pid, "--json")).json()
    assert len(shown["next_runs"]) >= 3
    desc = await stack.client.get_schedule_handle(schedule_id(pid)).describe()
    assert desc.schedule.state.paused is False

    # P7: back up now needs a bound server; refused in one line, nothing started.
    refused = await stack.cli("policy", "run", pid, check=False)
    assert refused.code != 0 and "no servers bound" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    server = stack.driver.create_server("p1", [4 * MIB])
    stack.driver.write(server.id, server.disks[0].id, 0, b"p" * 10000)
    bound = (await stack.cli("policy", "bind", pid, server.id, "--json")).json()
    assert bound["server_ids"] == [server.id]
    run = (await stack.cli("policy", "run", pid, "--wait", "--json")).json()
    (outcome,) = run["backups"].values()
    assert outcome["outcome"] == "available"
    assert stack.catalog.get_backup(outcome["backup_id"]).name.startswith("backup_")

    await stack.cli("policy", "disable", pid)
    desc = await stack.client.get_schedule_handle(schedule_id(pid)).describe()
    assert desc.schedule.state.paused is True
    await stack.cli("policy", "update", pid, "--weekdays", "mon,fri", "--time", "03:15")
    shown = (await stack.cli("policy", "show", pid, "--json")).json()
    assert shown["weekdays"] == ["mon", "fri"] and shown["every_days"] is None

    await stack.cli("policy", "unbind", pid, server.id)
    await stack.cli("policy", "delete", pid, "--yes")
    with pytest.raises(RPCError):
        await stack.client.get_schedule_handle(schedule_id(pid)).describe()
    assert stack.catalog.find_backup(outcome["backup_id"]) is not None  # backups stay


async def test_reconcile_and_daily_retention_cleanup(stack: Stack) -> None:
    """Catalog and schedules cannot drift; RetentionCleanup deletes expired scheduled
    backups at controlled timestamps, never manual ones (P4, P5)."""
    from datetime import timedelta

    from csbs.catalog import utcnow
    from csbs.policy import PolicySpec
    from csbs.policy_service import PolicyService
    from runtime.schedules import RETENTION_SCHEDULE_ID, policy_schedule

    svc = PolicyService(stack.catalog, stack.driver)
    spec = PolicySpec(times=["04:00"], weekdays=["sun"], retention="days", retention_value=2)
    orphan_free = svc.create(spec)  # a policy whose schedule was never made
    await stack.client.create_schedule(
        "policy-pol-ghost", policy_schedule("pol-ghost", spec, stack.settings.task_queue)
    )
    out = (await stack.cli("policy", "reconcile", "--json")).json()
    # (schedules that other tests' catalogs left in the shared namespace go too)
    assert out["created"] == [orphan_free.id] and "pol-ghost" in out["removed"]
    await stack.client.get_schedule_handle(schedule_id(orphan_free.id)).describe()
    desc = await stack.client.get_schedule_handle(RETENTION_SCHEDULE_ID).describe()
    assert desc.schedule.spec.calendars[0].hour[0].start == 0

    server = stack.driver.create_server("ret", [4 * MIB])
    stack.driver.write(server.id, server.disks[0].id, 0, b"r" * 5000)
    svc.bind(orphan_free.id, [server.id])
    run = await stack.client.execute_workflow(
        "RunPolicy",
        {"policy_id": orphan_free.id, "trigger": "scheduled"},
        id="ret-run-1",
        task_queue=stack.settings.task_queue,
    )
    old_auto = next(iter(run["backups"].values()))["backup_id"]
    manual = (await stack.cli("backup", "create", server.id, "--wait", "--json")).json()
    for backup_id in (old_auto, manual["id"]):  # both made "3 days ago"
        stack.catalog.update_backup(backup_id, created_at=utcnow() - timedelta(days=3))
    run = await stack.client.execute_workflow(
        "RunPolicy",
        {"policy_id": orphan_free.id, "trigger": "scheduled"},
        id="ret-run-2",
        task_queue=stack.settings.task_queue,
    )
    fresh_auto = next(iter(run["backups"].values()))["backup_id"]
    # The run's own cleanup already expired the old one; the daily cleanup finds nothing more.
    assert run["retention"]["expired"] == [old_auto]
    report = await stack.client.execute_workflow(
        "RetentionCleanup", {}, id="ret-daily-1", task_queue=stack.settings.task_queue
    )
    assert report[orphan_free.id]["expired"] == []
    assert {b.id for b in stack.catalog.list_backups()} == {manual["id"], fresh_auto}
    stack.catalog.update_backup(fresh_auto, created_at=utcnow() - timedelta(days=3))
    report = await stack.client.execute_workflow(
        "RetentionCleanup", {}, id="ret-daily-2", task_queue=stack.settings.task_queue
    )
    assert report[orphan_free.id]["expired"] == [fresh_auto]
    assert {b.id for b in stack.catalog.list_backups()} == {manual["id"]}
    for sid in (schedule_id(orphan_free.id), RETENTION_SCHEDULE_ID):
        await stack.client.get_schedule_handle(sid).delete()


async def test_a_triggered_schedule_runs_the_policy(stack: Stack) -> None:
    """The schedule starts RunPolicy with trigger `scheduled`: autobk_ backups appear."""
    import asyncio

    from csbs.policy import PolicySpec
    from csbs.policy_service import PolicyService
    from runtime.schedules import upsert_policy_schedule

    svc = PolicyService(stack.catalog, stack.driver)
    policy = svc.create(PolicySpec(times=["05:00"], every_days=1, retention_value=5))
    server = stack.driver.create_server("sched", [4 * MIB])
    stack.driver.write(server.id, server.disks[0].id, 0, b"s" * 5000)
    svc.bind(policy.id, [server.id])
    await upsert_policy_schedule(
        stack.client, policy.id, svc.spec(policy.id), stack.settings.task_queue
    )
    handle = stack.client.get_schedule_handle(schedule_id(policy.id))
    await handle.trigger()
    for _ in range(300):
        done = [b for b in stack.catalog.list_backups() if b.status == "available"]
        if done:
            break
        await asyncio.sleep(0.1)
    assert [b.name[:7] for b in done] == ["autobk_"]
    assert done[0].policy_id == policy.id and done[0].kind == "scheduled"
    await handle.delete()
