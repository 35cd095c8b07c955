"""The GeneratorService end to end: generator_service.server.start on free ports, a real grpc.aio client,
fake provider and storage servers behind it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc

from generator_service.config import GeneratorSettings
from generator_service.providers.gemini_imagen import GeminiImagenProvider
from generator_service.providers.http import ProviderHttp
from generator_service.retry import RetryPolicy
from generator_service.server import start
from imagegen_common.errors import ErrorKind, ServiceError
from imagegen_common.grpc_errors import from_grpc_error
from tests.generator import helpers
from tests.generator.fake_google import FakeGeminiImagen, answer_json, fail, hang, image_bytes
from tests.generator.fake_http import Reply
from tests.generator.fake_supabase import FakeSupabaseStorage, storage_fault
from tests.generator.helpers import (
    JOB_ID,
    USER_ID,
    eventually,
    gemini_settings,
    job_uuid,
    make_model,
    make_request,
    running,
    settings_for,
)

FAST_MODEL_ID = "gemini-api/imagen-4.0-fast-generate-001"


def generate_request(**overrides: Any) -> pb.GenerateRequest:
    return helpers.generate_request(**{"model": FAST_MODEL_ID, **overrides})


async def generate(stub: pb_grpc.GeneratorServiceAsyncStub, **overrides: Any) -> list[pb.GenerateResponse]:
    return [event async for event in stub.Generate(generate_request(**overrides))]


async def generate_error(stub: pb_grpc.GeneratorServiceAsyncStub, **overrides: Any) -> ServiceError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, **overrides)
    return from_grpc_error(caught.value)


async def test_list_models_lists_only_models_whose_provider_is_configured(tmp_path: Path) -> None:
    async def listed(settings: GeneratorSettings) -> dict[str, str]:
        async with running(settings) as (_app, stub):
            reply = await stub.ListModels(pb.ListModelsRequest())
        return {m.id: m.provider for m in reply.models}

    assert await listed(settings_for(tmp_path)) == {"local": "local"}
    with_gemini = await listed(settings_for(tmp_path, gemini_api_key="k"))
    assert with_gemini == {
        "local": "local",
        "gemini-api/imagen-4.0-generate-001": "gemini-imagen",
        "gemini-api/imagen-4.0-ultra-generate-001": "gemini-imagen",
        "gemini-api/imagen-4.0-fast-generate-001": "gemini-imagen",
        "gemini-2.5-flash-image": "gemini-image",
        "gemini-3-pro-image": "gemini-image",
        "gemini-3.1-flash-image": "gemini-image",
        "gemini-3.1-flash-lite-image": "gemini-image",
        "gemini-3-pro-image-preview": "gemini-image",
        "gemini-3.1-flash-image-preview": "gemini-image",
    }
    with_vertex = await listed(settings_for(tmp_path, vertex_project="proj-1"))
    assert with_vertex == {
        "local": "local",
        "imagen-4.0-generate-001": "vertex-imagen",
        "imagen-4.0-ultra-generate-001": "vertex-imagen",
        "imagen-4.0-fast-generate-001": "vertex-imagen",
        "vertex/gemini-2.5-flash-image": "vertex-gemini-image",
        "vertex/gemini-3-pro-image": "vertex-gemini-image",
        "vertex/gemini-3.1-flash-image": "vertex-gemini-image",
        # The previews and Flash-Lite Image are served at `global` only, not at the default us-central1
        # (test_model_locations.py).
    }


async def test_generate_streams_events_and_stores_the_providers_bytes(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen
) -> None:
    async with running(gemini_settings(tmp_path, gemini_imagen_api)) as (_app, stub):
        events = await generate(stub, sample_count=2, aspect_ratio="9:16")

    assert events[0].started == pb.GenerationStarted(provider="gemini-imagen", model=FAST_MODEL_ID)
    stored = sorted((e.image_stored for e in events if e.HasField("image_stored")), key=lambda s: s.index)
    assert [(s.index, s.storage_path, s.mime_type, s.width, s.height) for s in stored] == [
        (0, f"{USER_ID}/{JOB_ID}/1-0.png", "image/png", 768, 1408),
        (1, f"{USER_ID}/{JOB_ID}/1-1.png", "image/png", 768, 1408),
    ]
    assert events[-1].completed == pb.GenerationCompleted(delivered_count=2, filtered_count=0)
    expected = image_bytes(768, 1408, "image/png")
    assert (tmp_path / "storage" / "images" / USER_ID / JOB_ID / "1-0.png").read_bytes() == expected
    assert gemini_imagen_api.requests[0].json()["parameters"]["aspectRatio"] == "9:16"


async def test_generate_stores_in_supabase_and_rides_out_a_storage_500(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen, supabase_storage_api: FakeSupabaseStorage
) -> None:
    supabase_storage_api.upload_faults.append(storage_fault(Reply(500, b"Internal Server Error")))
    settings = gemini_settings(
        tmp_path,
        gemini_imagen_api,
        storage_backend="supabase",
        supabase_url=supabase_storage_api.url,
        supabase_service_key="test-service-key",
        storage_prefix="generated",
    )
    async with running(settings) as (_app, stub):
        events = await generate(stub, sample_count=2)

    assert events[-1].completed.delivered_count == 2
    # storage_path is the object's real key in the bucket, prefix included.
    paths = sorted(e.image_stored.storage_path for e in events if e.HasField("image_stored"))
    assert paths == [f"generated/{USER_ID}/{JOB_ID}/1-{i}.png" for i in (0, 1)]
    assert sorted(key for _bucket, key in supabase_storage_api.objects) == paths
    urls = sorted(e.image_stored.url for e in events if e.HasField("image_stored"))
    assert urls == [
        f"{supabase_storage_api.url}/storage/v1/object/public/images/generated/{USER_ID}/{JOB_ID}/1-{i}.png"
        for i in (0, 1)
    ]
    async with httpx.AsyncClient() as client:
        for url in urls:
            fetched = await client.get(url)
            assert (fetched.status_code, fetched.content) == (200, image_bytes(1024, 1024, "image/png"))


async def test_local_storage_honours_the_prefix_and_reports_the_real_key(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen
) -> None:
    settings = gemini_settings(tmp_path, gemini_imagen_api, storage_prefix="/generated/")
    async with running(settings) as (_app, stub):
        events = await generate(stub, sample_count=1)
        (stored,) = [e.image_stored for e in events if e.HasField("image_stored")]
        async with httpx.AsyncClient() as client:
            fetched = await client.get(stored.url)

    assert stored.storage_path == f"generated/{USER_ID}/{JOB_ID}/1-0.png"
    assert stored.url.endswith(f"/storage/v1/object/public/images/generated/{USER_ID}/{JOB_ID}/1-0.png")
    expected = image_bytes(1024, 1024, "image/png")
    assert (fetched.status_code, fetched.content) == (200, expected)
    assert (tmp_path / "storage" / "images" / "generated" / USER_ID / JOB_ID / "1-0.png").read_bytes() == expected


async def test_supabase_storage_without_its_settings_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="GEN_SUPABASE_URL"):
        await start(settings_for(tmp_path, storage_backend="supabase"))


async def test_filtered_images_are_counted_and_explained(tmp_path: Path, gemini_imagen_api: FakeGeminiImagen) -> None:
    gemini_imagen_api.filtered = {1}
    async with running(gemini_settings(tmp_path, gemini_imagen_api)) as (_app, stub):
        events = await generate(stub, sample_count=3)
    assert events[-1].completed == pb.GenerationCompleted(
        delivered_count=2, filtered_count=1, filtered_reasons=[gemini_imagen_api.filter_reason]
    )
    assert sorted(e.image_stored.index for e in events if e.HasField("image_stored")) == [0, 2]


async def test_all_images_filtered_is_a_permanent_failure(tmp_path: Path, gemini_imagen_api: FakeGeminiImagen) -> None:
    gemini_imagen_api.filtered = {0, 1}
    async with running(gemini_settings(tmp_path, gemini_imagen_api)) as (_app, stub):
        error = await generate_error(stub, sample_count=2)
    assert (error.kind, error.reason, error.metadata["retryable"]) == (
        ErrorKind.FAILED_PRECONDITION,
        "ALL_IMAGES_FILTERED",
        "false",
    )
    assert gemini_imagen_api.filter_reason in error.message
    assert not (tmp_path / "storage" / "images" / USER_ID).exists()


async def test_a_rate_limit_reaches_the_caller_with_its_retry_delay(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen
) -> None:
    gemini_imagen_api.faults.append(fail(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", retry_after="45"))
    async with running(gemini_settings(tmp_path, gemini_imagen_api)) as (_app, stub):
        error = await generate_error(stub)
    assert (error.kind, error.reason, error.metadata["retryable"]) == (
        ErrorKind.RESOURCE_EXHAUSTED,
        "PROVIDER_RATE_LIMITED",
        "true",
    )
    assert error.retry_after == 45


async def test_the_shut_down_gemini_imagen_models_answer_model_not_served(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen
) -> None:
    gemini_imagen_api.known_models = set()
    async with running(gemini_settings(tmp_path, gemini_imagen_api)) as (_app, stub):
        error = await generate_error(stub)
    assert (error.kind, error.reason, error.metadata["retryable"]) == (
        ErrorKind.NOT_FOUND,
        "MODEL_NOT_SERVED",
        "false",
    )
    assert "vertex-imagen" in error.message and "gemini-image" in error.message


async def test_cancelling_the_stream_cancels_the_provider_request_in_flight(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen
) -> None:
    gemini_imagen_api.faults.append(hang(30))
    async with running(gemini_settings(tmp_path, gemini_imagen_api)) as (_app, stub):
        call = stub.Generate(generate_request())
        first = await call.read()
        assert isinstance(first, pb.GenerateResponse) and first.HasField("started")
        assert await eventually(lambda: len(gemini_imagen_api.requests) == 1)

        call.cancel()

        # The provider sees the client hang up; nothing is retried after the cancel.
        assert await eventually(lambda: gemini_imagen_api.http.disconnects == 1)
        await asyncio.sleep(0.2)
        assert len(gemini_imagen_api.requests) == 1
    assert not (tmp_path / "storage" / "images" / USER_ID).exists()


async def test_a_burst_of_50_queues_behind_the_concurrency_cap_and_all_succeed(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen
) -> None:
    async def busy() -> None:
        await asyncio.sleep(0.05)

    gemini_imagen_api.delay = busy
    gemini_imagen_api.concurrency_quota = 5  # the provider answers 429 to a sixth concurrent request
    model = make_model(FAST_MODEL_ID, "gemini-imagen", provider_model="imagen-4.0-fast-generate-001", max_concurrency=5)
    settings = gemini_settings(tmp_path, gemini_imagen_api, models=[model])
    async with running(settings) as (_app, stub):
        results = await asyncio.gather(
            *(generate(stub, job_id=job_uuid(f"job-{n}"), sample_count=1) for n in range(50)), return_exceptions=True
        )

    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert all(isinstance(r, list) and r[-1].completed.delivered_count == 1 for r in results)
    assert len(gemini_imagen_api.requests) == 50
    assert gemini_imagen_api.rate_limited == 0  # queued here, never refused there
    assert gemini_imagen_api.http.max_in_flight == 5


async def test_a_requests_per_minute_limit_paces_a_burst_under_the_providers_quota(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen
) -> None:
    # Scaled down so the test takes seconds: the provider allows 12 requests per second (720/min),
    # the model is configured below that at 600/min, and 30 calls arrive at once.
    gemini_imagen_api.per_second_quota = 12
    model = make_model(
        FAST_MODEL_ID, "gemini-imagen", provider_model="imagen-4.0-fast-generate-001", requests_per_minute=600
    )
    settings = gemini_settings(tmp_path, gemini_imagen_api, models=[model], provider_max_retries=0)
    async with running(settings) as (_app, stub):
        results = await asyncio.gather(
            *(generate(stub, job_id=job_uuid(f"job-{n}"), sample_count=1) for n in range(30)), return_exceptions=True
        )

    assert [r for r in results if isinstance(r, BaseException)] == []
    assert gemini_imagen_api.rate_limited == 0
    arrivals = [r.received_at for r in gemini_imagen_api.requests]
    assert len(arrivals) == 30
    assert max(arrivals) - min(arrivals) >= 2.5  # 29 gaps of 0.1 s, with slack for timer granularity


async def test_the_same_burst_without_the_limit_does_trip_the_quota(
    gemini_imagen_api: FakeGeminiImagen,
) -> None:
    # The control for the test above: the fake's quota is real, so pacing is what avoided the 429s.
    gemini_imagen_api.per_second_quota = 12
    model = make_model(
        FAST_MODEL_ID, "gemini-imagen", provider_model="imagen-4.0-fast-generate-001", max_concurrency=30
    )
    provider = GeminiImagenProvider(
        ProviderHttp.create("gemini-imagen", connect_timeout=2, read_timeout=10, policy=RetryPolicy(max_retries=0)),
        "test-api-key",
        base_url=gemini_imagen_api.url,
    )

    async def one() -> object:
        return [item async for item in provider.generate(make_request(model=model.id, sample_count=1), model)]

    results = await asyncio.gather(*(one() for _ in range(30)), return_exceptions=True)
    await provider.aclose()
    assert gemini_imagen_api.rate_limited > 0
    assert any(isinstance(r, ServiceError) and r.reason == "PROVIDER_RATE_LIMITED" for r in results)


async def test_no_predictions_reaches_the_caller_as_failed_precondition_not_unavailable(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen
) -> None:
    gemini_imagen_api.faults.append(answer_json({"predictions": []}))
    async with running(gemini_settings(tmp_path, gemini_imagen_api)) as (_app, stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(stub)
    # The status code itself, which is all a generic gRPC client (or a retry policy) looks at.
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    error = from_grpc_error(caught.value)
    assert (error.reason, error.metadata["retryable"]) == ("NO_IMAGES", "false")
