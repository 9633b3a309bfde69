"""How many chunk GETs a restore keeps in flight, adapted to their latency (issue 18).

A fixed concurrency is wrong somewhere: on loopback S3 eight GETs already saturate the
CPU, and more only add latency; across a WAN to a remote S3 each GET waits tens of
milliseconds and eight leave the link idle. By Little's law the throughput of ``n`` GETs
in flight is ``n / latency``: while raising ``n`` leaves the latency flat, throughput
grows with it; once the latency grows as fast as ``n``, more in flight is only queueing.

:func:`next_limit` is the rule, a pure function of one window of observations:

- the latency doubled against the best recent window (the store is throttling or
  overloaded): multiplicative decrease, to three quarters;
- the last step raised the limit and throughput did not rise by half as much (flat
  latency would raise it as much): step back to the previous limit and hold it for a
  while (the extra requests only queued);
- otherwise, when not holding: additive increase, by a quarter (at least one).

:class:`AdaptiveLimit` applies it: a blocking slot per GET, the latency of each recorded
on release, a decision per window of ``max(16, 2 * limit)`` GETs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

#: Windows a step back holds its limit before probing upwards again.
HOLD_WINDOWS = 8
#: Recent windows whose best latency is the baseline.
BASELINE_WINDOWS = 16


@dataclass
class LimitState:
    """The controller's memory between windows."""

    limit: int
    minimum: int
    maximum: int
    previous: int | None = None  # the limit before the last increase
    previous_rate: float = 0.0  # throughput at that limit
    hold: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=BASELINE_WINDOWS))


def next_limit(state: LimitState, latency: float, rate: float) -> int:
    """The limit for the next window, given this window's mean latency (seconds) and
    throughput (GETs per second) at ``state.limit``; updates ``state``."""
    baseline = min(state.latencies, default=latency)
    state.latencies.append(latency)
    limit = state.limit
    if latency > 2 * baseline:
        new = max(state.minimum, limit * 3 // 4)
        state.previous, state.hold = None, 0
    elif state.previous is not None and rate < state.previous_rate * (
        1 + (limit - state.previous) / state.previous / 2
    ):
        new = state.previous
        state.previous, state.hold = None, HOLD_WINDOWS
    elif state.hold > 0:
        state.hold -= 1
        new = limit
    else:
        new = min(state.maximum, limit + max(1, limit // 4))
        if new != limit:
            state.previous, state.previous_rate = limit, rate
        else:
            state.previous = None
    state.limit = new
    return new


class AdaptiveLimit:
    """A concurrency limit for blocking GETs, safe to share between threads."""

    def __init__(
        self, initial: int, maximum: int, minimum: int = 2, clock: Callable[[], float] | None = None
    ) -> None:
        maximum = max(maximum, initial)
        minimum = min(minimum, initial)
        self.state = LimitState(limit=initial, minimum=minimum, maximum=maximum)
        self._clock = clock or time.monotonic
        self._cond = threading.Condition()
        self._inflight = 0
        self._samples: list[float] = []
        self._window_began = self._clock()
        self.peak = initial
        self.total_seconds = 0.0
        self.count = 0

    @property
    def limit(self) -> int:
        return self.state.limit

    @property
    def mean_latency(self) -> float:
        return self.total_seconds / self.count if self.count else 0.0

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the ``limit`` slots while the body (one GET) runs; its duration
        is that GET's latency."""
        with self._cond:
            while self._inflight >= self.state.limit:
                self._cond.wait()
            self._inflight += 1
        began = self._clock()
        ok = False
        try:
            yield
            ok = True
        finally:
            self._release(self._clock() - began if ok else None)

    def _release(self, seconds: float | None) -> None:
        with self._cond:
            self._inflight -= 1
            if seconds is not None:
                self._samples.append(seconds)
                self.total_seconds += seconds
                self.count += 1
            if len(self._samples) >= max(16, 2 * self.state.limit):
                now = self._clock()
                elapsed = max(now - self._window_began, 1e-6)
                latency = sum(self._samples) / len(self._samples)
                next_limit(self.state, latency, len(self._samples) / elapsed)
                self.peak = max(self.peak, self.state.limit)
                self._samples.clear()
                self._window_began = now
            self._cond.notify_all()
