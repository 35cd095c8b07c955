"""Group commit: concurrent requests for the same kind of write share one database call.

A request that arrives while fewer than `max_calls` calls are under way goes at once, alone, so a quiet
service adds no latency. Requests that arrive while all of them are busy wait for the first to answer and
then go together, up to `max_batch` in one call: under load the per-call costs (a round trip, a transaction,
a commit with its fsync, the driver's work) are paid once per batch instead of once per request.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class GroupCommit(Generic[ItemT, ResultT]):
    """`run_one(item)` writes one item; `run_batch(items)` writes several in one call and answers, for each
    item in order, its result or the exception that item's caller gets (the call itself raising fails them all).
    """

    def __init__(
        self,
        run_one: Callable[[ItemT], Awaitable[ResultT]],
        run_batch: Callable[[list[ItemT]], Awaitable[Sequence[ResultT | BaseException]]],
        *,
        max_batch: int,
        max_calls: int,
    ) -> None:
        self._run_one = run_one
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_calls = max_calls
        self._calls = 0
        self._waiting: collections.deque[tuple[ItemT, asyncio.Future[ResultT]]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: ItemT) -> ResultT:
        if self._calls < self._max_calls and not self._waiting:
            self._calls += 1
            try:
                return await self._run_one(item)
            finally:
                self._calls -= 1
                self._start_waiting()
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        # A caller cancelled while waiting leaves its future cancelled: the batch skips it. Once its batch
        # is sent, the write goes on without it, as a single write would once its query was sent.
        return await future

    def _start_waiting(self) -> None:
        while self._waiting and self._calls < self._max_calls:
            batch: list[tuple[ItemT, asyncio.Future[ResultT]]] = []
            while self._waiting and len(batch) < self._max_batch:
                item, future = self._waiting.popleft()
                if not future.done():
                    batch.append((item, future))
            if not batch:
                return
            self._calls += 1
            task = asyncio.get_running_loop().create_task(self._call(batch), name="group-commit")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: list[tuple[ItemT, asyncio.Future[ResultT]]]) -> None:
        futures = [future for _, future in batch]
        try:
            outcomes = await self._outcomes([item for item, _ in batch])
        except asyncio.CancelledError:  # only the loop's own shutdown cancels this task
            for future in futures:
                future.cancel()
            raise
        finally:
            self._calls -= 1
            self._start_waiting()
        for future, outcome in zip(futures, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def _outcomes(self, items: list[ItemT]) -> Sequence[ResultT | BaseException]:
        try:
            if len(items) == 1:
                return [await self._run_one(items[0])]
            outcomes = await self._run_batch(items)
        except Exception as exc:  # the whole call failed: every item in it fails the same way
            return [exc] * len(items)
        if len(outcomes) != len(items):
            return [RuntimeError(f"a batch of {len(items)} answered {len(outcomes)} outcomes")] * len(items)
        return outcomes
