"""One Temporal Schedule per policy, derived from the policy by a pure mapping (P1, P2, P7).

Temporal Schedules are csbs's only scheduler: weekly policies become calendars on days of
the week, every-N-days policies calendars on days of month ``1-31/N`` (the guide's 1st,
1+N, ... restarting each month), one calendar per time of day, in the policy's time zone.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleCalendarSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
    ScheduleSpec,
    ScheduleState,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from csbs.policy import Calendar, PolicySpec, schedule_calendars
from workflows.common import SA_OPERATION, SA_POLICY_ID

#: A run missed by more than this (worker or server down) is skipped, not made up later.
CATCHUP_WINDOW = timedelta(minutes=30)


def schedule_id(policy_id: str) -> str:
    return f"policy-{policy_id}"


def calendar_spec(cal: Calendar) -> ScheduleCalendarSpec:
    """One :class:`Calendar` as a Temporal calendar spec."""
    if cal.days_of_week is not None:
        days = {"day_of_week": [ScheduleRange(d) for d in cal.days_of_week]}
    else:
        days = {"day_of_month": [ScheduleRange(1, 31, cal.day_of_month_step or 1)]}
    return ScheduleCalendarSpec(
        hour=[ScheduleRange(cal.hour)],
        minute=[ScheduleRange(cal.minute)],
        **days,  # type: ignore[arg-type]
    )


def policy_schedule(policy_id: str, spec: PolicySpec, task_queue: str) -> Schedule:
    """The Temporal Schedule of a policy: starts ``RunPolicy`` with trigger ``scheduled``."""
    return Schedule(
        action=ScheduleActionStartWorkflow(
            "RunPolicy",
            {"policy_id": policy_id, "trigger": "scheduled"},
            id=f"runpolicy-{policy_id}",
            task_queue=task_queue,
            typed_search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(SA_POLICY_ID, policy_id),
                    SearchAttributePair(SA_OPERATION, "policy"),
                ]
            ),
        ),
        spec=ScheduleSpec(
            calendars=[calendar_spec(c) for c in schedule_calendars(spec)],
            time_zone_name=spec.timezone,
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=CATCHUP_WINDOW),
        state=ScheduleState(paused=not spec.enabled, note=f"policy {spec.name}"),
    )


async def upsert_policy_schedule(
    client: Client, policy_id: str, spec: PolicySpec, task_queue: str
) -> None:
    """Create the policy's schedule, or rewrite it to match the policy (P7)."""
    from temporalio.client import ScheduleAlreadyRunningError, ScheduleUpdate

    schedule = policy_schedule(policy_id, spec, task_queue)
    try:
        await client.create_schedule(schedule_id(policy_id), schedule)
    except ScheduleAlreadyRunningError:
        handle = client.get_schedule_handle(schedule_id(policy_id))
        await handle.update(lambda _input: ScheduleUpdate(schedule=schedule))
