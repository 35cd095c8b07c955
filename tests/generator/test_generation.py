"""generation.Generator with stand-in providers and storage: what one attempt does around the provider."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest

from generator_service.config import ModelSpec
from generator_service.domain import FilteredImage, GeneratedImage, GenerationEvent, GenerationRequest
from generator_service.generation import Generator
from imagegen_common.errors import ErrorKind, ServiceError
from tests.generator.helpers import make_model, make_request

LOCAL = make_model("local", "local")


class SilentProvider:
    """Answers without a single image or filter reason."""

    name = "local"

    async def generate(
        self, request: GenerationRequest, model: ModelSpec
    ) -> AsyncGenerator[GeneratedImage | FilteredImage, None]:
        return
        yield  # an async generator that yields nothing

    async def aclose(self) -> None:
        return None


class UnusedStorage:
    async def upload(self, path: str, data: bytes, content_type: str) -> str:
        raise AssertionError("nothing should be stored")

    async def aclose(self) -> None:
        return None


async def events(generator: Generator, request: GenerationRequest) -> list[GenerationEvent]:
    return [event async for event in generator.run(request)]


async def test_a_provider_that_returns_nothing_is_a_permanent_failed_precondition() -> None:
    generator = Generator({"local": LOCAL}, {"local": SilentProvider()}, UnusedStorage())
    with pytest.raises(ServiceError) as caught:
        await events(generator, make_request(model="local"))
    error = caught.value
    # Not UNAVAILABLE: generic gRPC clients retry that, and another try would not help.
    assert (error.kind, error.reason, error.metadata["retryable"]) == (
        ErrorKind.FAILED_PRECONDITION,
        "NO_IMAGES",
        "false",
    )
