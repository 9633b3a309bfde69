"""Timing knobs the workflows read when the worker imports them (never inside a workflow
run, so replays stay deterministic).

``CSBS_HEARTBEAT_TIMEOUT`` (seconds, default 30): how long a data transfer may stay
silent before Temporal gives it up and retries it, resuming from its last checkpoint, on
any worker. Lower it where workers die often and must be replaced fast; the fault suite
sets 3.
"""

from __future__ import annotations

import os
from datetime import timedelta


def _seconds(name: str, default: float) -> timedelta:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds (got {raw!r})") from None
    if not 1 <= value <= 3600:
        raise ValueError(f"{name} must be 1-3600 seconds (got {raw!r})")
    return timedelta(seconds=value)


HEARTBEAT_TIMEOUT = _seconds("CSBS_HEARTBEAT_TIMEOUT", 30.0)
