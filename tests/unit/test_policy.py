"""Policy rules (P1-P4) as pure functions: validation, calendars, retention selection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from csbs.policy import (
    Calendar,
    PolicySpec,
    RetainedBackup,
    RetentionKind,
    retention_notes,
    schedule_calendars,
    select_expired,
)


def spec(**kw: object) -> PolicySpec:
    values: dict[str, object] = {"times": ["02:00"], "weekdays": ["mon"], "retention_value": 7}
    values.update(kw)
    return PolicySpec.model_validate(values)


def test_defaults_and_calendars() -> None:
    """P1: default name, enabled; P2: weekly and every-N-days calendars per time."""
    p = spec(times=["23:30", "08:05"], weekdays=["wed", "Mon", "mon"])
    assert (p.name, p.enabled, p.times) == ("backup_policy", True, ["08:05", "23:30"])
    assert schedule_calendars(p) == [
        Calendar(8, 5, days_of_week=(1, 3)),
        Calendar(23, 30, days_of_week=(1, 3)),
    ]
    q = spec(weekdays=None, every_days=3, timezone="Asia/Shanghai")
    assert schedule_calendars(q) == [Calendar(2, 0, day_of_month_step=3)]


def test_console_defaults_follow_the_guide() -> None:
    """Guide 3.2.1 (P1-P3): what is left out is what the console fills in: 00:00, every
    3 days, keep 6 months (180 days); a retention value alone counts backups."""
    p = PolicySpec()
    assert (p.name, p.times, p.weekdays, p.every_days) == ("backup_policy", ["00:00"], None, 3)
    assert (p.retention, p.retention_value) == (RetentionKind.DAYS, 180)
    assert PolicySpec(retention_value=4).retention == RetentionKind.COUNT
    assert PolicySpec(weekdays=["fri"]).every_days is None
    with pytest.raises(ValidationError, match="1-99999"):
        PolicySpec(retention="count")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"times": ["01:00", "01:30"]}, "at least 1 hour apart"),
        ({"times": ["23:30", "00:10"]}, "at least 1 hour apart"),
        ({"times": ["24:00"]}, "between 00:00 and 23:59"),
        ({"times": ["7pm"]}, "HH:MM"),
        ({"times": []}, "at least 1 item"),
        ({"weekdays": None, "every_days": 0}, "greater than or equal to 1"),
        ({"weekdays": None, "every_days": 31}, "less than or equal to 30"),
        ({"every_days": 3}, "not both"),
        ({"weekdays": ["funday"]}, "weekdays must be"),
        ({"retention_value": 0}, "1-99999"),
        ({"retention_value": 100000}, "1-99999"),
        ({"retention": "forever"}, "takes no value"),
        ({"timezone": "Mars/Olympus"}, "IANA"),
        ({"name": "bad name"}, "name must be"),
    ],
)
def test_refusals_name_the_rule(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**kw)


NOW = datetime(2026, 11, 25, tzinfo=UTC)
kinds = st.sampled_from(["manual", "scheduled", "policy_manual"])
statuses = st.sampled_from(["available", "error", "creating"])
backups_st = st.lists(
    st.tuples(st.sampled_from(["s1", "s2", "s3"]), kinds, statuses, st.integers(0, 400)),
    max_size=60,
).map(
    lambda rows: [
        RetainedBackup(f"b{i}", srv, kind, status, NOW - timedelta(days=age, minutes=i))  # type: ignore[arg-type]
        for i, (srv, kind, status, age) in enumerate(rows)
    ]
)


@settings(max_examples=300)
@given(backups_st, st.integers(1, 20))
def test_count_retention_keeps_the_newest_scheduled_per_server(
    backups: list[RetainedBackup], keep: int
) -> None:
    """P4: oldest beyond the count go; never a manual or run-now (backup_) one."""
    expired = select_expired(backups, RetentionKind.COUNT, keep, NOW)
    for b in backups:
        if b.kind != "scheduled" or b.status == "creating":
            assert b.id not in expired
    for server in ("s1", "s2", "s3"):
        ok = sorted(
            (
                b
                for b in backups
                if b.server_id == server and b.kind == "scheduled" and b.status == "available"
            ),
            key=lambda b: b.created_at,
            reverse=True,
        )
        assert {b.id for b in ok[:keep]}.isdisjoint(expired)
        assert {b.id for b in ok[keep:]} <= expired


@settings(max_examples=300)
@given(backups_st, st.integers(1, 400))
def test_days_retention_and_failed_backup_limits(backups: list[RetainedBackup], days: int) -> None:
    """P4: past the age they go, but never a server's last available backup (issue 14);
    failed scheduled ones: at most 10 per server, one month."""
    expired = select_expired(backups, RetentionKind.DAYS, days, NOW)
    notes = retention_notes(backups, RetentionKind.DAYS, days, NOW)
    newest: dict[str, RetainedBackup] = {}
    good = [b for b in backups if b.kind == "scheduled" and b.status == "available"]
    for b in sorted(good, key=lambda b: (b.created_at, b.id)):
        newest[b.server_id] = b
    for b in backups:
        if b.kind == "scheduled" and b.status == "available":
            old = b.created_at < NOW - timedelta(days=days)
            last = newest[b.server_id] is b
            assert (b.id in expired) == (old and not last)
            assert (b.id in notes) == (old and last)
        if b.kind != "scheduled" or b.status == "creating":
            assert b.id not in expired
    for server in ("s1", "s2", "s3"):
        kept_failed = [
            b
            for b in backups
            if b.server_id == server
            and b.kind == "scheduled"
            and b.status == "error"
            and b.id not in expired
        ]
        assert len(kept_failed) <= 10
        assert all(b.created_at >= NOW - timedelta(days=30) for b in kept_failed)
    assert select_expired(backups, RetentionKind.FOREVER, None, NOW) <= {
        b.id for b in backups if b.status == "error"
    }
