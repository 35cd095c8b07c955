"""The generator's provider requests go through httpcore, which asks which event loop runs (via sniffio) on every
lock and event it sets up. Without sniffio installed each of those asks is a failed import that searches sys.path
(Python does not remember a failed import): 115 us here, several times per provider request."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

from httpcore._synchronization import AsyncEvent, AsyncLock


class _ImportSearches:
    """A finder placed first on sys.meta_path: it records every module Python searches for, and finds none."""

    def __init__(self) -> None:
        self.searched: list[str] = []

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        self.searched.append(name)
        return None


async def _set_up_events_and_locks(count: int) -> None:
    for _ in range(count):
        AsyncEvent().set()
        async with AsyncLock():
            pass


def test_httpcore_sets_up_its_events_and_locks_without_an_import_search() -> None:
    asyncio.run(_set_up_events_and_locks(1))  # whatever is imported once, on first use, is imported now
    searches = _ImportSearches()
    sys.meta_path.insert(0, searches)
    try:
        asyncio.run(_set_up_events_and_locks(20))
    finally:
        sys.meta_path.remove(searches)
    assert "sniffio" not in searches.searched, f"import searches on httpcore's path: {searches.searched}"
