"""Blocking work on bytes: inline when the bytes are few, in a worker thread when they are many."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# Below this, parsing, decoding or writing takes less CPU than handing the work to a thread and back
# (measured: a 5.5 kB PNG stored in 14 us inline vs 140 us through asyncio.to_thread; a thread hop also
# contends for the GIL with the event loop). Above it (a 1K Imagen PNG is 1-2 MB), the loop must not wait.
INLINE_MAX_BYTES = 256 * 1024


async def run_sized(size: int, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`function(*args)` on the event loop when `size` bytes are at most INLINE_MAX_BYTES, else in a thread."""
    if size <= INLINE_MAX_BYTES:
        return function(*args, **kwargs)
    return await asyncio.to_thread(function, *args, **kwargs)
