"""One budget for the inline input image bytes of every CreateJob in progress (JOB_INPUT_IMAGE_BUDGET_MB).

Each CreateJob may carry up to JOB_MAX_REQUEST_MB of inline images, and while it runs they are copied (the pixel
check, the INSERT into job_input_blobs); a burst of large edits would grow the process by as many copies as calls.
A call whose inline bytes would take the total past the budget is refused at once with RESOURCE_EXHAUSTED
(INPUT_IMAGE_BUDGET_EXHAUSTED) and RetryInfo, before any copy is made: the bytes are given back as soon as the
calls holding them end (within a second or two), so a retry soon succeeds. A call with no inline image (a
job_image reference) holds nothing. A single call larger than the whole budget runs when nothing else is held, so
a budget below JOB_MAX_REQUEST_MB slows such calls down but never refuses them for ever.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from imagegen_common.errors import ErrorKind, ServiceError

REASON = "INPUT_IMAGE_BUDGET_EXHAUSTED"
# What RetryInfo asks for: about as long as the calls holding the budget take to store their images.
RETRY_AFTER_SECONDS = 1.0

T = TypeVar("T")


class InputImageBudget:
    """Inline input bytes held by CreateJob calls in progress; a limit of 0 is no limit."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self.held_bytes = 0

    async def run(self, inline_bytes: int, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` while holding `inline_bytes`; ServiceError(RESOURCE_EXHAUSTED) instead when they do not fit."""
        if inline_bytes <= 0 or not self._limit:
            return await call()
        if self.held_bytes and self.held_bytes + inline_bytes > self._limit:
            raise ServiceError(
                ErrorKind.RESOURCE_EXHAUSTED,
                REASON,
                f"the service is busy storing other input images ({self.held_bytes} of its {self._limit} bytes for "
                f"them in use; this request brings {inline_bytes}); retry in {RETRY_AFTER_SECONDS:g} s",
                metadata={"held_bytes": str(self.held_bytes), "budget_bytes": str(self._limit)},
                retry_after=RETRY_AFTER_SECONDS,
            )
        self.held_bytes += inline_bytes
        try:
            return await call()
        finally:
            self.held_bytes -= inline_bytes
