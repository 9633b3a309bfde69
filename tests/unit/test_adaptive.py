"""Restore concurrency adapted to GET latency (issue 18, "Concurrency is adaptive to
latency"): the rule against three stores modelled by Little's law, and the limiter's
slots under real threads."""

from __future__ import annotations

import threading
import time

from csbs.adaptive import AdaptiveLimit, LimitState, next_limit


def run(state: LimitState, latency_at: object, windows: int = 200) -> list[int]:
    """Feed ``next_limit`` what a store with ``latency_at(n)`` seconds per GET at ``n`` in
    flight would show: throughput ``n / latency``. The limits it chose, in order."""
    limits = []
    for _ in range(windows):
        n = state.limit
        latency = latency_at(n)  # type: ignore[operator]
        next_limit(state, latency, n / latency)
        limits.append(state.limit)
    return limits


def test_a_far_store_with_flat_latency_gets_the_most_in_flight() -> None:
    """A remote S3 40 ms away: more GETs in flight cost no latency, so the limit climbs to
    the maximum and stays there."""
    limits = run(LimitState(limit=8, minimum=2, maximum=64), lambda n: 0.040)
    assert limits[-1] == 64
    assert limits[:6] == [10, 12, 15, 18, 22, 27]  # a quarter more each window


def test_a_saturated_store_keeps_near_its_knee() -> None:
    """Loopback S3 on a busy CPU: 6 GETs saturate it, past that latency grows with ``n``
    and throughput stays flat. The limit settles near 6, far from the maximum."""
    knee, service = 6, 0.010

    def latency(n: int) -> float:
        return service * max(1.0, n / knee)

    limits = run(LimitState(limit=2, minimum=2, maximum=64), latency)
    assert max(limits) <= 2 * knee
    assert all(knee - 1 <= n <= 2 * knee for n in limits[20:]), limits[20:]


def test_a_throttling_store_makes_it_back_off() -> None:
    """The store starts answering 3x slower (throttled): the limit falls by quarters."""
    state = LimitState(limit=32, minimum=2, maximum=64)
    for _ in range(4):  # a baseline of 10 ms
        next_limit(state, 0.010, 3200)
    state.limit, state.previous, state.hold = 32, None, 8  # holding at 32
    next_limit(state, 0.030, 1067)
    assert state.limit == 24
    next_limit(state, 0.030, 800)
    assert state.limit == 18
    assert run(state, lambda n: 0.030, windows=3)[-1] >= 2  # never below the minimum


def test_a_step_that_did_not_pay_is_taken_back_and_held() -> None:
    state = LimitState(limit=8, minimum=2, maximum=64)
    next_limit(state, 0.010, 800)  # probe up to 10
    assert state.limit == 10
    next_limit(state, 0.0125, 800)  # same throughput, more latency: back to 8
    assert state.limit == 8
    for _ in range(8):  # held for a while
        next_limit(state, 0.010, 800)
        assert state.limit == 8
    next_limit(state, 0.010, 800)
    assert state.limit == 10  # then probes again


def test_the_limiter_never_lets_more_than_its_limit_in() -> None:
    """Real threads: at most ``limit`` bodies run at once, and it adapts between windows."""
    limiter = AdaptiveLimit(initial=3, maximum=8)
    inside, most = 0, 0
    lock = threading.Lock()

    def get() -> None:
        nonlocal inside, most
        with limiter.slot():
            with lock:
                inside += 1
                most = max(most, inside)
                allowed = limiter.limit
            assert inside <= max(allowed, 8)
            time.sleep(0.002)
            with lock:
                inside -= 1

    def twenty() -> None:
        for _ in range(20):
            get()

    threads = [threading.Thread(target=twenty) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert limiter.count == 240 and 0 < limiter.mean_latency < 1
    assert 3 <= most <= 8
    assert limiter.peak > 3  # flat latency (a sleep): it opened up


def test_a_failed_get_frees_its_slot_without_a_sample() -> None:
    limiter = AdaptiveLimit(initial=1, maximum=1)
    try:
        with limiter.slot():
            raise OSError("connection reset")
    except OSError:
        pass
    with limiter.slot():  # would block forever if the slot leaked
        pass
    assert limiter.count == 1
