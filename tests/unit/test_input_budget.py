"""The byte budget for the inline input images of CreateJob calls in progress (job_service/input_budget.py)."""

from __future__ import annotations

import asyncio

import pytest

from imagegen_common.errors import ErrorKind, ServiceError
from job_service.input_budget import REASON, InputImageBudget


async def test_a_call_past_the_budget_is_refused_until_the_bytes_are_given_back() -> None:
    budget = InputImageBudget(1000)
    release = asyncio.Event()

    async def storing() -> str:
        await release.wait()
        return "stored"

    first = asyncio.create_task(budget.run(600, storing))
    await asyncio.sleep(0)
    assert budget.held_bytes == 600

    with pytest.raises(ServiceError) as refused:
        await budget.run(500, storing)
    error = refused.value
    assert (error.kind, error.reason, error.retry_after) == (ErrorKind.RESOURCE_EXHAUSTED, REASON, 1.0)
    assert "600 of its 1000 bytes" in error.message and "brings 500" in error.message
    # What still fits is let in alongside.
    assert await budget.run(400, lambda: asyncio.sleep(0, "fits")) == "fits"

    release.set()
    assert await first == "stored"
    assert budget.held_bytes == 0
    assert await budget.run(500, storing) == "stored"


async def test_bytes_are_given_back_when_the_call_fails() -> None:
    budget = InputImageBudget(1000)

    async def failing() -> None:
        raise RuntimeError("store down")

    with pytest.raises(RuntimeError):
        await budget.run(900, failing)
    assert budget.held_bytes == 0


async def test_no_inline_bytes_no_limit_and_a_lone_oversized_call_always_run() -> None:
    budget = InputImageBudget(100)
    held = asyncio.Event()

    async def holding() -> None:
        await held.wait()

    big = asyncio.create_task(budget.run(5000, holding))  # alone: let in, so it is never refused for ever
    await asyncio.sleep(0)
    assert await budget.run(0, lambda: asyncio.sleep(0, "a job_image reference")) == "a job_image reference"
    with pytest.raises(ServiceError):
        await budget.run(1, holding)
    held.set()
    await big
    assert await InputImageBudget(0).run(10**9, lambda: asyncio.sleep(0, "no limit")) == "no limit"
