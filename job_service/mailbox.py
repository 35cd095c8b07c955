"""A queue for one reader, sized for thousands of jobs in flight.

Every running job has one (its Generate stream read ahead of its writes) and so has every WatchJob stream.
asyncio.Queue carries three deques and an Event, about 3 kB before the first item, for what one reader
never uses (a size bound, task_done/join, several waiting getters); with 2,000 jobs in flight and a watcher
each, that was 12 MB of JobService's peak. A Mailbox is a list and, only while its reader waits, a future.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    """Unbounded, first in first out; `put` never blocks; one task at a time awaits `get` or `get_all`."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[T] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> T:
        """The oldest item, waiting for one if there is none."""
        await self._wait()
        return self._items.pop(0)

    async def get_all(self) -> list[T]:
        """Every item there is, oldest first, waiting for at least one."""
        await self._wait()
        items, self._items = self._items, []
        return items

    async def get_all_within(self, seconds: float) -> list[T]:
        """Every item there is, oldest first, waiting at most `seconds` for one; [] if none came."""
        try:
            async with asyncio.timeout(seconds):
                await self._wait()
        except TimeoutError:
            return []
        items, self._items = self._items, []
        return items

    async def _wait(self) -> None:
        while not self._items:
            # The item is in the list before the waiter is woken, so a reader cancelled while waiting loses
            # nothing: the next get finds it.
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
