"""Backup policies as pure rules (P1-P4): validation, schedule calendars, retention selection.

Nothing here talks to Temporal or the catalog: ``starter`` turns :func:`schedule_calendars`
into a Temporal ``ScheduleSpec``, and retention cleanup feeds :func:`select_expired` the
backups it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from csbs.naming import check_name

WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]  # index = Temporal day_of_week
#: Retention presets of the guide, in days.
RETENTION_PRESETS = {"1m": 30, "3m": 90, "6m": 180, "1y": 365}
FAILED_KEEP_COUNT = 10
FAILED_KEEP_DAYS = 30
MAX_POLICIES_PER_PROJECT = 32
MAX_SERVERS_PER_POLICY = 64
#: The console's defaults (guide 3.2.1): backups at 00:00, every 3 days, kept 6 months.
DEFAULT_TIME = "00:00"
DEFAULT_EVERY_DAYS = 3
DEFAULT_KEEP_DAYS = RETENTION_PRESETS["6m"]


class RetentionKind(StrEnum):
    COUNT = "count"
    DAYS = "days"
    FOREVER = "forever"


def parse_time_of_day(text: str) -> int:
    """Minutes after midnight of ``HH:MM``; ValueError naming the rule otherwise."""
    hh, sep, mm = text.partition(":")
    digits = (hh + mm).isascii() and hh.isdigit() and mm.isdigit()
    if not (sep and digits and len(mm) == 2 and len(hh) in (1, 2)):
        raise ValueError(f"time must be HH:MM (got {text!r})")
    hour, minute = int(hh), int(mm)
    if hour > 23 or minute > 59:
        raise ValueError(f"time must be between 00:00 and 23:59 (got {text!r})")
    return hour * 60 + minute


class PolicySpec(BaseModel):
    """What a person sets on a policy (P1-P3)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "backup_policy"
    enabled: bool = True
    times: list[str] = Field(default_factory=lambda: [DEFAULT_TIME], min_length=1)
    weekdays: list[str] | None = None
    every_days: int | None = Field(default=None, ge=1, le=30)
    timezone: str = "UTC"
    retention: RetentionKind = RetentionKind.COUNT
    retention_value: int | None = None
    #: S3 Object Lock (issue 17): its backups are locked this many days after their
    #: creation (or ``CSBS_OBJECT_LOCK_DAYS``, when longer); None is that setting alone.
    lock_days: int | None = Field(default=None, ge=1, le=36500)
    #: Replicate every backup it makes to the second site (issue 17, ``ReplicateBackup``).
    replicate: bool = False

    @model_validator(mode="before")
    @classmethod
    def _console_defaults(cls, data: Any) -> Any:
        """Guide 3.2.1: what the console fills in. A policy without a period runs every
        3 days; one without any retention option keeps its backups 6 months."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("weekdays") is None and data.get("every_days") is None:
            data["every_days"] = DEFAULT_EVERY_DAYS
        if data.get("retention") is None and data.get("retention_value") is None:
            data["retention"], data["retention_value"] = RetentionKind.DAYS, DEFAULT_KEEP_DAYS
        elif data.get("retention") is None:
            data["retention"] = RetentionKind.COUNT
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("times")
    @classmethod
    def _times(cls, v: list[str]) -> list[str]:
        minutes = sorted(parse_time_of_day(t) for t in v)
        for a, b in zip(minutes, [*minutes[1:], minutes[0] + 24 * 60], strict=True):
            if len(minutes) > 1 and b - a < 60:
                raise ValueError("times must be at least 1 hour apart from each other")
        return [f"{m // 60:02d}:{m % 60:02d}" for m in minutes]

    @field_validator("weekdays")
    @classmethod
    def _weekdays(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        days = [d.strip().lower()[:3] for d in v if d.strip()]
        bad = [d for d in days if d not in WEEKDAYS]
        if bad or not days:
            raise ValueError(f"weekdays must be names like mon,wed,sun (got {v!r})")
        return sorted(set(days), key=WEEKDAYS.index)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"timezone must be an IANA name like Asia/Shanghai (got {v!r})"
            ) from None
        return v

    @model_validator(mode="after")
    def _period_and_retention(self) -> PolicySpec:
        if (self.weekdays is None) == (self.every_days is None):
            raise ValueError("period: give either weekdays or every_days (1-30), not both")
        if self.retention == RetentionKind.FOREVER:
            if self.retention_value is not None:
                raise ValueError("retention_value: forever takes no value")
        elif self.retention_value is None or not 1 <= self.retention_value <= 99999:
            raise ValueError(
                f"retention_value: keep {self.retention.value} must be 1-99999 "
                f"(got {self.retention_value})"
            )
        return self


@dataclass(frozen=True)
class Calendar:
    """One calendar entry of a schedule, in the policy's time zone.

    ``days_of_week`` uses 0 = Sunday; ``day_of_month_step`` N means days 1, 1+N, 1+2N, ...
    of every month (the guide's "every N days", restarting on the 1st).
    """

    hour: int
    minute: int
    days_of_week: tuple[int, ...] | None = None
    day_of_month_step: int | None = None


def schedule_calendars(spec: PolicySpec) -> list[Calendar]:
    """The calendar entries of a policy: one per time of day (P1, P2)."""
    calendars = []
    for text in spec.times:
        minutes = parse_time_of_day(text)
        if spec.weekdays is not None:
            dow = tuple(WEEKDAYS.index(d) for d in spec.weekdays)
            calendars.append(Calendar(minutes // 60, minutes % 60, days_of_week=dow))
        else:
            calendars.append(
                Calendar(minutes // 60, minutes % 60, day_of_month_step=spec.every_days)
            )
    return calendars


@dataclass(frozen=True)
class RetainedBackup:
    """What retention needs to know of one backup."""

    id: str
    server_id: str
    kind: Literal["manual", "scheduled", "policy_manual"]
    status: str
    created_at: datetime


def select_expired(
    backups: list[RetainedBackup],
    retention: RetentionKind,
    value: int | None,
    now: datetime,
    covered: frozenset[str] = frozenset(),
) -> set[str]:
    """Ids of backups that retention deletes now (P4).

    Only scheduled (``autobk_``) backups ever expire. Available ones: beyond the newest
    ``value`` per server (count), or older than ``value`` days (days), or never (forever);
    but age never takes a server's last available backup (see ``retention_notes``).
    ``covered`` are the servers that keep another good available backup outside
    ``backups`` (a manual one, say). Failed scheduled ones: beyond the newest 10 per
    server, or older than one month.
    """
    return _retention(backups, retention, value, now, covered)[0]


def retention_notes(
    backups: list[RetainedBackup],
    retention: RetentionKind,
    value: int | None,
    now: datetime,
    covered: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """Why retention kept a backup it would otherwise have deleted, by backup id."""
    return _retention(backups, retention, value, now, covered)[1]


def _retention(
    backups: list[RetainedBackup],
    retention: RetentionKind,
    value: int | None,
    now: datetime,
    covered: frozenset[str],
) -> tuple[set[str], dict[str, str]]:
    expired: set[str] = set()
    kept: dict[str, str] = {}
    by_server: dict[str, list[RetainedBackup]] = {}
    failed: dict[str, list[RetainedBackup]] = {}
    for b in backups:
        if b.kind != "scheduled":
            continue
        if b.status == "available":
            by_server.setdefault(b.server_id, []).append(b)
        elif b.status == "error":
            failed.setdefault(b.server_id, []).append(b)
    for group in by_server.values():
        group.sort(key=lambda b: (b.created_at, b.id), reverse=True)
        if retention == RetentionKind.COUNT and value is not None:
            expired.update(b.id for b in group[value:])
        elif retention == RetentionKind.DAYS and value is not None:
            cutoff = now - timedelta(days=value)
            old = [b for b in group if b.created_at < cutoff]
            if old and old[0] is group[0] and group[0].server_id not in covered:
                # Every backup of the server is past the age limit (its newer scheduled
                # backups failed, or none ran): the newest stays, or it would have none.
                newest = old.pop(0)
                kept[newest.id] = (
                    f"kept past {value} days: it is the last available backup of server "
                    f"{newest.server_id} (newer scheduled backups failed or none ran)"
                )
            expired.update(b.id for b in old)
    failed_cutoff = now - timedelta(days=FAILED_KEEP_DAYS)
    for group in failed.values():
        group.sort(key=lambda b: (b.created_at, b.id), reverse=True)
        expired.update(b.id for b in group[FAILED_KEEP_COUNT:])
        expired.update(b.id for b in group if b.created_at < failed_cutoff)
    return expired, kept
