"""GroupCommit: alone when the way is free, together when it is not, and every caller gets its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from job_service.group_commit import GroupCommit


class Writes:
    """A fake database call: records what went in each call and holds every call until released."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_call = False

    async def one(self, item: int) -> str:
        self.calls.append([item])
        await self.release.wait()
        if item < 0:
            raise ValueError(f"bad {item}")
        return f"made {item}"

    async def many(self, items: list[int]) -> Sequence[str | BaseException]:
        self.calls.append(list(items))
        await self.release.wait()
        if self.fail_call:
            raise ConnectionError("the database went away")
        return [ValueError(f"bad {i}") if i < 0 else f"made {i}" for i in items]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_first_calls_go_alone_and_the_rest_share_the_next() -> None:
    writes = Writes()
    group = GroupCommit(writes.one, writes.many, max_batch=3, max_calls=2)
    tasks = [asyncio.create_task(group.submit(i)) for i in range(7)]
    await settle()
    assert writes.calls == [[0], [1]]  # two calls at most: the others wait
    writes.release.set()
    results = await asyncio.gather(*tasks)
    assert results == [f"made {i}" for i in range(7)]
    # Waiting ones went together, in the order they came, at most three to a call.
    assert writes.calls[2:] == [[2, 3, 4], [5, 6]]


async def test_each_caller_gets_its_own_error_and_a_failed_call_fails_its_whole_batch() -> None:
    writes = Writes()
    group = GroupCommit(writes.one, writes.many, max_batch=10, max_calls=1)
    first = asyncio.create_task(group.submit(1))
    await settle()
    batch = [asyncio.create_task(group.submit(i)) for i in (2, -3, 4)]
    await settle()
    writes.release.set()
    assert await first == "made 1"
    outcomes = await asyncio.gather(*batch, return_exceptions=True)
    assert outcomes[0] == "made 2" and outcomes[2] == "made 4"
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "bad -3"

    writes.release.clear()
    writes.fail_call = True
    blocker = asyncio.create_task(group.submit(5))
    await settle()
    failing = [asyncio.create_task(group.submit(i)) for i in (6, 7)]
    await settle()
    writes.release.set()
    assert await blocker == "made 5"
    for task in failing:
        with pytest.raises(ConnectionError):
            await task


async def test_a_caller_that_gave_up_while_waiting_is_left_out_of_the_batch() -> None:
    writes = Writes()
    group = GroupCommit(writes.one, writes.many, max_batch=10, max_calls=1)
    first = asyncio.create_task(group.submit(1))
    await settle()
    gone = asyncio.create_task(group.submit(2))
    kept = asyncio.create_task(group.submit(3))
    await settle()
    gone.cancel()
    writes.release.set()
    assert await first == "made 1" and await kept == "made 3"
    assert gone.cancelled()
    assert writes.calls == [[1], [3]]  # the lone one left goes through the single path


async def test_a_batch_that_answers_the_wrong_count_fails_its_callers_instead_of_leaving_them_waiting() -> None:
    async def one(item: int) -> int:
        await asyncio.sleep(0.01)
        return item

    async def many(items: list[int]) -> Sequence[int | BaseException]:
        return items[:-1]

    group = GroupCommit(one, many, max_batch=10, max_calls=1)
    first = asyncio.create_task(group.submit(1))
    await settle()
    rest = [asyncio.create_task(group.submit(i)) for i in (2, 3)]
    assert await first == 1
    outcomes = await asyncio.wait_for(asyncio.gather(*rest, return_exceptions=True), 5)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
