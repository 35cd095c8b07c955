"""The interface every provider implements."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from generator_service.config import ModelSpec
from generator_service.domain import FilteredImage, GeneratedImage, GenerationRequest


class Provider(Protocol):
    name: str

    def generate(
        self, request: GenerationRequest, model: ModelSpec
    ) -> AsyncGenerator[GeneratedImage | FilteredImage, None]:
        """Yields each image (or its filtered placeholder) as soon as it is decoded.

        Yielding one at a time lets storage upload early and keeps at most a few decoded images in
        memory. Raises ServiceError (see domain.generation_error) when the attempt fails.

        An async generator (an `async def` with `yield`), so the caller can close it (`aclose`, through
        contextlib.aclosing) the moment the attempt fails or is cancelled: stop pending requests in a
        `finally` (or let the cancellation of the one being awaited do it).
        """
        ...

    async def aclose(self) -> None: ...
