"""The inline input images one CreateJob stored, released when it ends (issue 19).

CreateJob stores an image's bytes (job_input_blobs) before it creates the job that names it, each in its own
transaction, so the job's first attempt finds them. When the create is then refused (rate limit, credits, the
active-job limit...) the bytes would stay until the orphan sweep, an hour later. Instead each create holds what it
stored (a count on the row) and gives it back when it ends, whatever the outcome; an image no job names and no other
create still holds is deleted then. Another create of the same user with the same image keeps it: it holds it from
the moment it stored it until its own job is committed, and one that stores it after the delete brings the bytes
again. Only a create whose outcome is known releases: one that returned a job, or one refused (ServiceError). One
cancelled or failed otherwise may still have its job committed, so it keeps its holds; the orphan sweep (which
ignores holds once no create has stored the image for an hour) remains the backstop, also when a release fails.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

import structlog

from imagegen_common.errors import ServiceError

log = structlog.get_logger(__name__)


class InputBlobStore(Protocol):
    async def put_input_blobs(self, user_id: str, blobs: list[tuple[str, str, bytes]]) -> None: ...

    async def release_input_blobs(self, user_id: str, digests: list[str]) -> int: ...


class HeldInputs:
    """`async with HeldInputs(store) as held:` around one create; `held.put(...)` stores its images."""

    def __init__(self, store: InputBlobStore) -> None:
        self._store = store
        self._user_id = ""
        self._digests: list[str] = []

    async def put(self, user_id: str, blobs: list[tuple[str, str, bytes]]) -> None:
        """Stores (sha256, media type, bytes) and holds them until the create ends."""
        # In sha256 order, as release locks them: two creates sharing images never wait on each other in a cycle.
        ordered = sorted(blobs)
        await self._store.put_input_blobs(user_id, ordered)
        self._user_id, self._digests = user_id, [digest for digest, _, _ in ordered]

    async def __aenter__(self) -> HeldInputs:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if not self._digests:
            return
        if kind is not None and not issubclass(kind, ServiceError):
            # Cancelled, or the database failed mid-create: the job may still be committed (a group commit runs on
            # for a caller that went away), so nothing is released; the orphan sweep deletes what no job names.
            return
        try:
            deleted = await self._store.release_input_blobs(self._user_id, self._digests)
        except Exception:
            # Not the create's own outcome: it is not replaced by this; the orphan sweep deletes them later.
            log.warning("could not release a create's input images; the orphan sweep will", exc_info=True)
            return
        if deleted:
            log.info("deleted the input images of a refused create", user_id=self._user_id, images=deleted)
