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

    def object_key(self, path: str) -> str:
        """The object's key for a path (the storage prefix, if any, then the path)."""
        ...

    async def read(self, key: str) -> bytes:
        """The bytes of the object at `key` (a key `upload` returned): an earlier job's image used as an input."""
        ...

    async def aclose(self) -> None: ...
