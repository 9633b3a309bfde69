"""``csbs policy`` end to end: schedules follow the catalog; refusals are one line (P1-P9)."""

from __future__ import annotations

import pytest
from temporalio.service import RPCError

from starter.schedules import schedule_id
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
        (("--time", "01:00", "--weekdays", "mon"), "--keep-count"),
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
