"""The interface every storage backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# The most keys one list_folder returns, so that a listing holds a bounded amount (a job's folder holds its
# attempts' images: tens of objects; a caller that deletes what it listed lists again for the rest).
MAX_LISTED = 10_000


@dataclass(frozen=True)
class UploadedObject:
    url: str  # where to read it from (public, or signed for a private bucket)
    key: str  # its real key in the bucket: the storage prefix, if any, then the path


class Storage(Protocol):
    async def upload(self, path: str, data: bytes, content_type: str) -> UploadedObject:
        """Stores `data` at `path` under the storage prefix (overwriting) and says where it went."""
        ...

    async def list_folder(self, folder: str) -> list[str]:
        """The keys (storage prefix included) of the objects directly in `folder`, a path under the prefix,
        by name, at most MAX_LISTED of them.

        Nothing in it, or no such folder: an empty list. Sub-folders are not objects and are not listed.
        """
        ...

    async def delete(self, keys: list[str]) -> None:
        """Deletes the objects with these keys (as `list_folder` and `UploadedObject.key` give them).

        A key with no object is not an error: deleting is idempotent.
        """
        ...

    def object_key(self, path: str) -> str:
        """The object's key for a path (the storage prefix, if any, then the path)."""
        ...

    async def read(self, key: str) -> bytes:
        """The bytes of the object at `key` (a key `upload` returned): an earlier job's image used as an input."""
        ...

    async def aclose(self) -> None: ...
