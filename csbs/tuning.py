"""Timing knobs the workflows read when the sandbox imports them (never during a run, so
replays stay deterministic). They come from ``Settings`` only: the worker calls ``apply``
before it starts, so that every workflow it runs schedules its steps with them.

``heartbeat_timeout`` (``CSBS_HEARTBEAT_TIMEOUT``, seconds, default 30): how long a data
transfer may stay silent before Temporal gives it up and retries it, resuming from its
last checkpoint, on any worker.
"""

from __future__ import annotations

from datetime import timedelta

from csbs.config import Settings

HEARTBEAT_TIMEOUT = timedelta(seconds=Settings.model_fields["heartbeat_timeout"].default)


def apply(settings: Settings) -> None:
    """Use these settings' timings in every workflow this process runs from now on."""
    global HEARTBEAT_TIMEOUT
    HEARTBEAT_TIMEOUT = timedelta(seconds=settings.heartbeat_timeout)
