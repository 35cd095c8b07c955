"""A memory budget for provider answers, so that a burst of large answers waits instead of piling up.

A 4 x 2K Imagen answer is about 26 MB of JSON and, while it is parsed, decoded and stored, twice that in
memory. Fifty such answers arriving together would take the process to gigabytes. Each successful answer
therefore reserves twice its size from a process-wide budget before its body is read, and keeps the
reservation until its attempt ends (`AttemptHoldings.release`); when the budget is spent, further answers
wait (their connection open, the body unread) in arrival order.

Reservations are made on behalf of the attempt whose task is running (a context variable, set by
`AttemptHoldings.bind` in the task that drives the provider), so providers need no extra argument. Calls
made outside an attempt (tests, tools) reserve nothing. An attempt that already holds a reservation is
never made to wait for more (gemini-image makes one call per image), so an attempt cannot wait on itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
from dataclasses import dataclass, field

# Bytes reserved per byte of answer: the raw body and the decoded images and strings made from it.
ANSWER_FACTOR = 2


@dataclass
class AttemptHoldings:
    """What one attempt holds from budgets; released, all at once, when the attempt ends."""

    held: list[tuple[MemoryBudget, int]] = field(default_factory=list)

    def bind(self) -> None:
        """Makes provider calls of the current task (and tasks it starts) reserve into these holdings."""
        _holdings.set(self)

    def holds(self) -> bool:
        return any(n > 0 for _, n in self.held)

    def release(self) -> None:
        held, self.held = self.held, []
        for budget, n in held:
            budget.release(n)


_holdings: contextvars.ContextVar[AttemptHoldings | None] = contextvars.ContextVar("provider_holdings", default=None)


class MemoryBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._waiters: collections.deque[tuple[int, AttemptHoldings, asyncio.Future[None]]] = collections.deque()

    async def reserve_answer(self, size: int) -> int:
        """Reserves for an answer of `size` bytes for the current attempt; returns what was reserved."""
        holdings = _holdings.get()
        if holdings is None or self.limit <= 0 or size <= 0:
            return 0
        n = min(size * ANSWER_FACTOR, self.limit)  # a larger answer waits until it is alone
        if holdings.holds() or (not self._waiters and self._admits(n, holdings)):
            self._take(n, holdings)
            return n
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, holdings, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give_back(n, holdings)  # granted just as the wait was cancelled
            raise
        return n

    def forget(self, n: int) -> None:
        """Gives back a reservation of the current attempt whose answer was never read (a failed read)."""
        holdings = _holdings.get()
        if holdings is not None and n > 0:
            self._give_back(n, holdings)

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _admits(self, n: int, holdings: AttemptHoldings) -> bool:
        return self.used + n <= self.limit or self.used == 0 or holdings.holds()

    def _take(self, n: int, holdings: AttemptHoldings) -> None:
        self.used += n
        holdings.held.append((self, n))

    def _give_back(self, n: int, holdings: AttemptHoldings) -> None:
        for i, (budget, held) in enumerate(holdings.held):
            if budget is self and held == n:
                del holdings.held[i]
                self.release(n)
                return

    def _wake(self) -> None:
        while self._waiters:
            n, holdings, waiter = self._waiters[0]
            if waiter.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if not self._admits(n, holdings):
                return
            self._waiters.popleft()
            self._take(n, holdings)
            waiter.set_result(None)
            # Other calls of the same attempt waiting further back go now: it must not wait on itself.
            for entry in [w for w in self._waiters if w[1] is holdings and not w[2].done()]:
                self._waiters.remove(entry)
                self._take(entry[0], holdings)
                entry[2].set_result(None)
