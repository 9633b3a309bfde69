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

from csbs.config import Settings
from csbs.policy import Calendar, PolicySpec, schedule_calendars
from csbs.policy_service import PolicyService
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
            static_summary=f"scheduled run of policy {spec.name} ({policy_id})",
        ),
        spec=ScheduleSpec(
            calendars=[calendar_spec(c) for c in schedule_calendars(spec)],
            time_zone_name=spec.timezone,
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=CATCHUP_WINDOW),
        state=ScheduleState(paused=not spec.enabled, note=f"policy {spec.name}"),
    )


RETENTION_SCHEDULE_ID = "csbs-retention-cleanup"
VERIFY_SCHEDULE_ID = "csbs-verify"
GC_SCHEDULE_ID = "csbs-gc"


def project_schedule_id(base: str, settings: Settings) -> str:
    """A per-project schedule's id: ``base`` for the default project, ``base.<project>``."""
    return base if settings.project == "default" else f"{base}.{settings.project}"


def daily_schedule(
    workflow: str,
    arg: dict[str, object],
    workflow_id: str,
    settings: Settings,
    time_of_day: str,
    timezone: str,
    operation: str,
    summary: str,
) -> Schedule:
    """A schedule that starts ``workflow`` once a day on the project's task queue. The
    workflow id carries the project (``project_schedule_id``): Temporal appends the start
    time, so two projects' runs at the same minute would otherwise share an id, and only
    one of them would start."""
    from csbs.policy import parse_time_of_day

    minutes = parse_time_of_day(time_of_day)
    return Schedule(
        action=ScheduleActionStartWorkflow(
            workflow,
            arg,
            id=project_schedule_id(workflow_id, settings),
            task_queue=settings.queue,
            typed_search_attributes=TypedSearchAttributes(
                [SearchAttributePair(SA_OPERATION, operation)]
            ),
            static_summary=summary,
        ),
        spec=ScheduleSpec(
            calendars=[
                ScheduleCalendarSpec(
                    hour=[ScheduleRange(minutes // 60)], minute=[ScheduleRange(minutes % 60)]
                )
            ],
            time_zone_name=timezone,
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=CATCHUP_WINDOW),
    )


def retention_schedule(settings: Settings) -> Schedule:
    """The daily ``RetentionCleanup`` schedule (P5), default 00:00."""
    return daily_schedule(
        "RetentionCleanup",
        {},
        "retention-cleanup",
        settings,
        settings.retention_time,
        settings.retention_timezone,
        "retention",
        "daily retention cleanup of every policy",
    )


def verify_schedule(settings: Settings) -> Schedule:
    """The daily ``VerifyBackups`` schedule: backups not verified within
    ``CSBS_VERIFY_MAX_AGE_DAYS`` are read back and checked at ``CSBS_VERIFY_TIME``."""
    return daily_schedule(
        "VerifyBackups",
        {"max_age_days": settings.verify_max_age_days},
        "verify-backups",
        settings,
        settings.verify_time,
        settings.verify_timezone,
        "verify",
        f"verify backups not verified in {settings.verify_max_age_days} day(s)",
    )


def gc_schedule(settings: Settings) -> Schedule:
    """The daily ``CollectGarbage`` schedule (``CSBS_GC_TIME``, default 01:00): it
    reconciles operations whose runs closed without finishing, then sweeps, so a sweep
    deferred by running backups is never forgotten."""
    return daily_schedule(
        "CollectGarbage",
        {},
        "collect-garbage",
        settings,
        settings.gc_time,
        settings.gc_timezone,
        "gc",
        "daily reconciliation and sweep of unreferenced chunks",
    )


async def _upsert(client: Client, sid: str, schedule: Schedule) -> None:
    from temporalio.client import ScheduleAlreadyRunningError, ScheduleUpdate

    try:
        await client.create_schedule(sid, schedule)
    except ScheduleAlreadyRunningError:
        handle = client.get_schedule_handle(sid)
        await handle.update(lambda _input: ScheduleUpdate(schedule=schedule))


async def reconcile_schedules(
    client: Client, svc: PolicyService, settings: Settings
) -> dict[str, list[str]]:
    """Make Temporal's schedules match the catalog: every policy has its schedule (rewritten
    from the policy), a schedule whose policy is gone is deleted, and the daily retention
    cleanup exists. Run at worker start and by ``csbs policy reconcile``."""
    created, removed = [], []
    existing = {s.id async for s in await client.list_schedules()}
    for row in svc.policies.all():
        sid = schedule_id(row.id)
        if sid not in existing:
            created.append(row.id)
        await _upsert(client, sid, policy_schedule(row.id, svc.spec(row.id), settings.queue))
    for sid in existing:
        if sid.startswith("policy-"):
            policy_id = sid.removeprefix("policy-")
            if not svc.policies.exists_in_any_project(policy_id):
                await client.get_schedule_handle(sid).delete()
                removed.append(policy_id)
    await _upsert(
        client, project_schedule_id(RETENTION_SCHEDULE_ID, settings), retention_schedule(settings)
    )
    for base, time_of_day, make in (
        (VERIFY_SCHEDULE_ID, settings.verify_time, verify_schedule),
        (GC_SCHEDULE_ID, settings.gc_time, gc_schedule),
    ):
        sid = project_schedule_id(base, settings)
        if time_of_day.strip().lower() == "off":
            if sid in existing:
                await client.get_schedule_handle(sid).delete()
        else:
            await _upsert(client, sid, make(settings))
    return {"created": created, "removed": removed}


async def upsert_policy_schedule(
    client: Client, policy_id: str, spec: PolicySpec, task_queue: str
) -> None:
    """Create the policy's schedule, or rewrite it to match the policy (P7)."""
    await _upsert(client, schedule_id(policy_id), policy_schedule(policy_id, spec, task_queue))
