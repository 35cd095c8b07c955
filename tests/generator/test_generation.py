"""generation.Generator with stand-in providers and storage: what one attempt does around the provider."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator

import pytest
from imagegen.generator.v1 import generator_service_pb2 as pb
from prometheus_client import CollectorRegistry

from generator_service.cleanup import ObjectCleaner
from generator_service.config import ModelSpec
from generator_service.domain import (
    FilteredImage,
    GeneratedImage,
    GenerationEvent,
    GenerationRequest,
    Started,
    Stored,
)
from generator_service.generation import Generator
from generator_service.providers.gemini_image import GeminiImageProvider
from generator_service.servicer import GeneratorServicer
from generator_service.storage.base import UploadedObject
from generator_service.storage.supabase import SupabaseStorage
from imagegen_common.errors import ErrorKind, ServiceError
from imagegen_common.metrics import RpcMetrics
from imagegen_common.rpc_observability import ServerObservability
from tests.generator.fake_google import FakeGeminiImage, hang
from tests.generator.fake_http import Exchange, Reply
from tests.generator.fake_supabase import FakeSupabaseStorage, storage_error, storage_fault
from tests.generator.helpers import FAST_RETRIES, JOB_ID, USER_ID, eventually, make_model, make_request, provider_http

LOCAL = make_model("local", "local")
FLASH_IMAGE = make_model("gemini-2.5-flash-image", "gemini-image")


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
    async def upload(self, path: str, data: bytes, content_type: str) -> UploadedObject:
        raise AssertionError("nothing should be stored")

    async def aclose(self) -> None:
        return None


class MemoryStorage:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def upload(self, path: str, data: bytes, content_type: str) -> UploadedObject:
        self.objects[path] = data
        return UploadedObject(f"memory://{path}", path)

    async def aclose(self) -> None:
        return None


class SlowSecondImageProvider:
    """Yields image 0, then image 1 a little later, then waits for an image 2 that never comes."""

    name = "local"

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def generate(
        self, request: GenerationRequest, model: ModelSpec
    ) -> AsyncGenerator[GeneratedImage | FilteredImage, None]:
        try:
            yield GeneratedImage(0, b"image-0", "image/png", 1024, 1024)
            await asyncio.sleep(0.2)
            yield GeneratedImage(1, b"image-1", "image/png", 1024, 1024)
            await asyncio.Event().wait()
        finally:
            self.closed.set()

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


async def test_a_failed_upload_stops_the_provider_calls_still_in_flight(
    gemini_image_api: FakeGeminiImage, supabase_storage_api: FakeSupabaseStorage
) -> None:
    # Two gemini-image calls: the first to arrive is answered, the other hangs (a slow model).
    async def answered(exchange: Exchange) -> Reply:
        return await gemini_image_api.answer(exchange)

    gemini_image_api.faults.extend([answered, hang(60)])
    # Storing the first image fails for good (the service key is refused).
    supabase_storage_api.upload_faults.append(
        storage_fault(storage_error("403", "Unauthorized", "signature verification failed", "AccessDenied"))
    )
    provider = GeminiImageProvider(provider_http("gemini-image"), "test-api-key", base_url=gemini_image_api.url)
    storage = SupabaseStorage.create(
        supabase_storage_api.url, "test-service-key", "images", policy=FAST_RETRIES, timeout_seconds=5.0
    )
    generator = Generator({FLASH_IMAGE.id: FLASH_IMAGE}, {"gemini-image": provider}, storage)
    attempt = asyncio.create_task(events(generator, make_request(model=FLASH_IMAGE.id, sample_count=2)))
    try:
        # The hanging call is abandoned as soon as the upload fails, not when it would have answered.
        assert await eventually(lambda: gemini_image_api.http.disconnects == 1, within=10.0)
        with pytest.raises(ServiceError) as caught:
            await asyncio.wait_for(attempt, timeout=10.0)
        assert (caught.value.reason, caught.value.metadata["retryable"]) == ("STORAGE_PERMISSION_DENIED", "false")
        assert len(gemini_image_api.requests) == 2  # and nothing was retried after the failure
    finally:
        attempt.cancel()
        await asyncio.gather(attempt, return_exceptions=True)
        await provider.aclose()
        await storage.aclose()


async def test_closing_the_event_stream_closes_the_providers_generator_before_aclose_returns() -> None:
    provider = SlowSecondImageProvider()
    generator = Generator({"local": LOCAL}, {"local": provider}, MemoryStorage())
    stream = generator.run(make_request(model="local", sample_count=3))
    assert isinstance(await anext(stream), Started)
    assert isinstance(await anext(stream), Stored)

    await stream.aclose()

    # Closed by then, not later by the garbage collector's scheduled aclose.
    assert provider.closed.is_set()


async def test_closing_the_servicers_stream_closes_the_attempt_and_the_providers_generator() -> None:
    provider = SlowSecondImageProvider()
    generator = Generator({"local": LOCAL}, {"local": provider}, MemoryStorage())
    servicer = GeneratorServicer(
        generator, ServerObservability(RpcMetrics.create(CollectorRegistry())), ObjectCleaner(MemoryStorage())
    )
    request = pb.GenerateRequest(job_id=JOB_ID, attempt=1, user_id=USER_ID, prompt="p", model="local", sample_count=3)
    # The method itself, without imagegen_common's error-mapping decorator around it.
    stream: AsyncGenerator[pb.GenerateResponse, None] = inspect.unwrap(GeneratorServicer.Generate)(
        servicer, request, None
    )
    assert (await anext(stream)).HasField("started")
    assert (await anext(stream)).HasField("image_stored")

    await stream.aclose()

    assert provider.closed.is_set()
