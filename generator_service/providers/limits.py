"""Per-model limits on provider HTTP requests: a concurrency cap and a smooth requests-per-minute pace.

Both make a burst wait its turn here rather than earn 429s at the provider. They are applied to each
HTTP request (every retry included), not to whole Generate calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from generator_service.config import ModelSpec


class RequestPacer:
    """Spaces requests at least 60/rpm seconds apart, first come first served.

    A burst queues and drains at the configured rate (no up-front burst allowance), which is what
    per-minute provider quotas reward. A waiter that is cancelled gives its turn back untouched.
    """

    def __init__(
        self,
        requests_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._interval = 60.0 / requests_per_minute
        self._clock = clock
        self._sleep = sleep
        self._next_free = float("-inf")
        # asyncio.Lock wakes waiters in FIFO order, so the queue is fair.
        self._turn = asyncio.Lock()

    async def wait_turn(self) -> None:
        async with self._turn:
            wait = self._next_free - self._clock()
            if wait > 0:
                await self._sleep(wait)
            # Reserved only once the wait is over, so a cancelled waiter leaves no hole in the schedule.
            self._next_free = max(self._next_free, self._clock()) + self._interval


class ModelLimiter:
    def __init__(self, max_concurrency: int, requests_per_minute: int) -> None:
        self._slots = asyncio.Semaphore(max(1, max_concurrency))
        self._pacer = RequestPacer(requests_per_minute) if requests_per_minute > 0 else None

    @asynccontextmanager
    async def request_slot(self) -> AsyncIterator[None]:
        # Concurrency first, then pace: pacing before holding a slot would let queued requests fire
        # together the moment slots free up, which is the burst the pacer exists to prevent.
        async with self._slots:
            if self._pacer is not None:
                await self._pacer.wait_turn()
            yield


class ModelLimits:
    """One limiter per model id, made on first use from the model's spec."""

    def __init__(self) -> None:
        self._by_model: dict[str, ModelLimiter] = {}

    def for_model(self, model: ModelSpec) -> ModelLimiter:
        limiter = self._by_model.get(model.id)
        if limiter is None:
            limiter = ModelLimiter(model.max_concurrency, model.requests_per_minute)
            self._by_model[model.id] = limiter
        return limiter
