"""The interface every storage backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class UploadedObject:
    url: str  # where to read it from (public, or signed for a private bucket)
    key: str  # its real key in the bucket: the storage prefix, if any, then the path


class Storage(Protocol):
    async def upload(self, path: str, data: bytes, content_type: str) -> UploadedObject:
        """Stores `data` at `path` under the storage prefix (overwriting) and says where it went."""
        ...

    async def aclose(self) -> None: ...
