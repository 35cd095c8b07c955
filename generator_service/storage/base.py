"""The interface every storage backend implements."""

from __future__ import annotations

from typing import Protocol


class Storage(Protocol):
    async def upload(self, path: str, data: bytes, content_type: str) -> str:
        """Stores `data` at `path` (overwriting) and returns the URL to read it from."""
        ...

    async def aclose(self) -> None: ...
