"""Retry timing (backoff, Retry-After, budget) and the per-model limits; a fake clock where timing matters."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

from generator_service.providers.limits import ModelLimits, RequestPacer
from generator_service.retry import RetryPolicy, parse_retry_after
from tests.generator.helpers import make_model


class FakeTime:
    """A clock that only moves when someone sleeps, so pacing is checked without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(
        max_retries=6,
        max_total_seconds=1000,
        backoff_initial_seconds=1,
        backoff_max_seconds=8,
        jitter=random.Random(7),
    )
    delays = [policy.next_delay(n, elapsed=0) for n in range(6)]
    ceilings = [1, 2, 4, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert delay is not None and ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered, not a fixed ladder


def test_retry_after_wins_over_backoff() -> None:
    policy = RetryPolicy(max_retries=3, max_total_seconds=60, backoff_initial_seconds=1)
    assert policy.next_delay(0, elapsed=0, retry_after=7) == 7


def test_no_retry_past_the_count_or_the_time_budget() -> None:
    policy = RetryPolicy(max_retries=2, max_total_seconds=10, backoff_initial_seconds=1)
    assert policy.next_delay(2, elapsed=0) is None
    assert policy.next_delay(0, elapsed=9.9, retry_after=1) is None
    assert policy.next_delay(0, elapsed=0, retry_after=30) is None


def test_retry_after_is_read_as_seconds_or_as_an_http_date() -> None:
    now = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after("Sat, 28 Nov 2026 12:00:30 GMT", now) == 30
    assert parse_retry_after("Sat, 28 Nov 2026 11:00:00 GMT", now) == 0  # in the past: no wait
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after((now + timedelta(seconds=5)).strftime("%a, %d %b %Y %H:%M:%S GMT"), now) == 5


async def test_the_pacer_spaces_a_burst_evenly_instead_of_refusing_it() -> None:
    time = FakeTime()
    pacer = RequestPacer(600, clock=time.clock, sleep=time.sleep)
    started: list[float] = []

    async def request() -> None:
        await pacer.wait_turn()
        started.append(time.now)

    await asyncio.gather(*(request() for _ in range(5)))
    assert [round(t, 6) for t in started] == [0.0, 0.1, 0.2, 0.3, 0.4]


async def test_a_cancelled_waiter_does_not_delay_the_ones_behind_it() -> None:
    pacer = RequestPacer(60)  # one request per second, real clock
    await pacer.wait_turn()  # takes the first slot; the next one is a second away
    waiter = asyncio.create_task(pacer.wait_turn())
    await asyncio.sleep(0.05)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    loop = asyncio.get_running_loop()
    before = loop.time()
    await pacer.wait_turn()
    # It waits out the remainder of the first second, not a second slot the cancelled waiter would have held.
    assert loop.time() - before < 1.5


async def test_the_concurrency_cap_holds_under_a_burst() -> None:
    limiter = ModelLimits().for_model(make_model("m", "gemini-image", max_concurrency=3))
    running = peak = 0

    async def request() -> None:
        nonlocal running, peak
        async with limiter.request_slot():
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.gather(*(request() for _ in range(20)))
    assert peak == 3


def test_each_model_gets_its_own_limiter() -> None:
    limits = ModelLimits()
    first, second = make_model("a", "gemini-image"), make_model("b", "gemini-image")
    assert limits.for_model(first) is limits.for_model(first)
    assert limits.for_model(first) is not limits.for_model(second)
