"""The memory budget for provider answers: a burst waits its turn, an attempt never waits on itself."""

from __future__ import annotations

import asyncio

from generator_service.providers.memory import ANSWER_FACTOR, AttemptHoldings, MemoryBudget

MB = 1024 * 1024


async def _in_attempt(holdings: AttemptHoldings, budget: MemoryBudget, size: int) -> int:
    async def call() -> int:
        holdings.bind()
        return await budget.reserve_answer(size)

    return await asyncio.create_task(call())


async def test_answers_past_the_budget_wait_until_earlier_attempts_release() -> None:
    budget = MemoryBudget(100 * MB)
    first, second = AttemptHoldings(), AttemptHoldings()
    assert await _in_attempt(first, budget, 30 * MB) == 30 * MB * ANSWER_FACTOR
    waiting = asyncio.create_task(_in_attempt(second, budget, 30 * MB))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    first.release()
    assert await asyncio.wait_for(waiting, 1.0) == 60 * MB
    second.release()
    assert budget.used == 0


async def test_an_answer_larger_than_the_budget_goes_alone() -> None:
    budget = MemoryBudget(10 * MB)
    holdings = AttemptHoldings()
    assert await _in_attempt(holdings, budget, 50 * MB) == 10 * MB
    holdings.release()
    assert budget.used == 0


async def test_an_attempt_holding_memory_is_never_made_to_wait_for_more() -> None:
    budget = MemoryBudget(10 * MB)
    holdings, other = AttemptHoldings(), AttemptHoldings()
    await _in_attempt(holdings, budget, 5 * MB)
    blocked = asyncio.create_task(_in_attempt(other, budget, 5 * MB))
    await asyncio.sleep(0.01)
    # gemini-image: the same attempt's next call must not queue behind `other`, which waits for it.
    assert await asyncio.wait_for(_in_attempt(holdings, budget, 5 * MB), 1.0) == 10 * MB
    holdings.release()
    await asyncio.wait_for(blocked, 1.0)
    other.release()
    assert budget.used == 0


async def test_a_cancelled_wait_leaves_nothing_reserved_and_calls_outside_attempts_reserve_nothing() -> None:
    budget = MemoryBudget(10 * MB)
    holdings, other = AttemptHoldings(), AttemptHoldings()
    await _in_attempt(holdings, budget, 5 * MB)
    waiting = asyncio.create_task(_in_attempt(other, budget, 5 * MB))
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    holdings.release()
    assert budget.used == 0 and other.held == []
    assert await budget.reserve_answer(5 * MB) == 0  # no attempt bound in this task
