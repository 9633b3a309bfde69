"""Policy schedules on the real Temporal dev server: next action times match the guide."""

from __future__ import annotations

import itertools
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from temporalio.client import ScheduleUpdate, ScheduleUpdateInput
from temporalio.testing import WorkflowEnvironment

from csbs.policy import PolicySpec
from runtime.schedules import schedule_id, upsert_policy_schedule

pytestmark = pytest.mark.slow


async def next_times(env: WorkflowEnvironment, policy_id: str, tz: str) -> list[datetime]:
    desc = await env.client.get_schedule_handle(schedule_id(policy_id)).describe()
    return [t.astimezone(ZoneInfo(tz)) for t in desc.info.next_action_times]


async def test_weekly_and_every_n_days_schedules(temporal: WorkflowEnvironment) -> None:
    """P2: weekly on chosen days at chosen times; every 3 days on the 1st, 4th, 7th, ..."""
    tz = "Asia/Shanghai"
    weekly = PolicySpec(
        times=["08:30", "20:00"], weekdays=["mon", "thu"], timezone=tz, retention_value=3
    )
    await upsert_policy_schedule(temporal.client, "pol-weekly", weekly, "csbs-sched")
    times = await next_times(temporal, "pol-weekly", tz)
    assert len(times) >= 6
    for t in times:
        assert t.strftime("%a %H:%M") in {"Mon 08:30", "Mon 20:00", "Thu 08:30", "Thu 20:00"}

    every3 = PolicySpec(times=["02:00"], every_days=3, timezone=tz, retention_value=3)
    await upsert_policy_schedule(temporal.client, "pol-n3", every3, "csbs-sched")
    times = await next_times(temporal, "pol-n3", tz)
    assert all(t.hour == 2 and t.minute == 0 for t in times)
    # The guide's days: 1, 4, 7, ..., 28 (31), then the 1st again; none in between.
    assert all(t.day % 3 == 1 for t in times)
    for a, b in itertools.pairwise(times):
        if a.month == b.month:
            assert b.day - a.day == 3
        else:
            assert b.day == 1

    # The guide's example: a policy made on the 2nd of a month runs first on the 4th.
    handle = temporal.client.get_schedule_handle(schedule_id("pol-n3"))

    def from_the_2nd(update: ScheduleUpdateInput) -> ScheduleUpdate:
        spec = update.description.schedule.spec
        spec.start_at = datetime(2027, 3, 2, 9, 0, tzinfo=ZoneInfo(tz))
        return ScheduleUpdate(schedule=update.description.schedule)

    await handle.update(from_the_2nd)
    times = await next_times(temporal, "pol-n3", tz)
    assert [t.strftime("%m-%d %H:%M") for t in times[:3]] == [
        "03-04 02:00",
        "03-07 02:00",
        "03-10 02:00",
    ]

    # Update rewrites the schedule; a disabled policy's schedule is paused (P7).
    await upsert_policy_schedule(
        temporal.client, "pol-n3", every3.model_copy(update={"enabled": False}), "csbs-sched"
    )
    desc = await temporal.client.get_schedule_handle(schedule_id("pol-n3")).describe()
    assert desc.schedule.state.paused is True
    for pid in ("pol-weekly", "pol-n3"):
        await temporal.client.get_schedule_handle(schedule_id(pid)).delete()
