"""The one-reader queue behind every running job and every WatchJob stream."""

from __future__ import annotations

import asyncio

from job_service.mailbox import Mailbox


async def test_items_come_out_in_order_and_get_waits_for_one() -> None:
    box: Mailbox[int] = Mailbox()
    box.put(1)
    box.put(2)
    assert await box.get() == 1
    reader = asyncio.create_task(box.get())
    assert await box.get() == 2
    await asyncio.sleep(0)
    assert not reader.done(), "an empty mailbox makes its reader wait"
    box.put(3)
    assert await asyncio.wait_for(reader, timeout=1) == 3
    assert box.empty()


async def test_get_all_takes_everything_there_is_at_once() -> None:
    box: Mailbox[str] = Mailbox()
    reader = asyncio.create_task(box.get_all())
    await asyncio.sleep(0)
    box.put("a")
    box.put("b")  # both arrive before the reader runs: one batch
    assert await asyncio.wait_for(reader, timeout=1) == ["a", "b"]
    box.put("c")
    assert await box.get_all() == ["c"]
    assert box.empty()


async def test_a_reader_cancelled_while_waiting_loses_nothing() -> None:
    box: Mailbox[int] = Mailbox()
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.put(7)  # wakes the reader, which is cancelled before it runs
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert reader.cancelled()
    assert await asyncio.wait_for(box.get(), timeout=1) == 7, "the item is still there for the next get"


async def test_a_cancelled_reader_does_not_swallow_the_next_wake_up() -> None:
    box: Mailbox[int] = Mailbox()
    first = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    second = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.put(1)
    assert await asyncio.wait_for(second, timeout=1) == 1
