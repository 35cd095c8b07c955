"""The interface every provider implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from generator_service.config import ModelSpec
from generator_service.domain import FilteredImage, GeneratedImage, GenerationRequest


class Provider(Protocol):
    name: str

    def generate(self, request: GenerationRequest, model: ModelSpec) -> AsyncIterator[GeneratedImage | FilteredImage]:
        """Yields each image (or its filtered placeholder) as soon as it is decoded.

        Yielding one at a time lets storage upload early and keeps at most a few decoded images in
        memory. Raises ServiceError (see domain.generation_error) when the attempt fails.
        """
        ...

    async def aclose(self) -> None: ...
