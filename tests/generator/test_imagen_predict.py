"""The two Imagen providers (Vertex AI, Gemini API :predict) against fake servers speaking the wire format."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from generator_service.domain import FilteredImage, GeneratedImage
from generator_service.providers.gemini_imagen import GeminiImagenProvider
from generator_service.providers.google_auth import StaticTokenSource
from generator_service.providers.vertex_imagen import VertexImagenProvider
from generator_service.retry import RetryPolicy
from imagegen_common.errors import ErrorKind, ServiceError
from tests.generator.fake_google import (
    ALL_FILTERED_REASON,
    BLOCKED_PROMPT_MESSAGE,
    FakeGeminiImagen,
    FakeVertexImagen,
    answer_json,
    b64,
    fail,
    hang,
    image_bytes,
    raw,
)
from tests.generator.helpers import FAST_RETRIES, collect, eventually, make_model, make_request, provider_http

STANDARD = make_model("imagen-4.0-generate-001", "vertex-imagen", image_sizes=["1K", "2K"])
GEMINI_FAST = make_model(
    "gemini-api/imagen-4.0-fast-generate-001", "gemini-imagen", provider_model="imagen-4.0-fast-generate-001"
)


def vertex(api: FakeVertexImagen, policy: RetryPolicy = FAST_RETRIES, **http_options: float) -> VertexImagenProvider:
    return VertexImagenProvider(
        provider_http("vertex-imagen", policy, **http_options),
        StaticTokenSource("test-access-token"),
        project="proj-1",
        location="europe-west4",
        base_url=api.url,
    )


def gemini(api: FakeGeminiImagen, policy: RetryPolicy = FAST_RETRIES) -> GeminiImagenProvider:
    return GeminiImagenProvider(provider_http("gemini-imagen", policy), "test-api-key", base_url=api.url)


async def failure_of(provider: VertexImagenProvider | GeminiImagenProvider, **request: object) -> ServiceError:
    model = GEMINI_FAST if isinstance(provider, GeminiImagenProvider) else STANDARD
    with pytest.raises(ServiceError) as caught:
        await collect(provider, make_request(**request), model)
    await provider.aclose()
    return caught.value


def retryable(error: ServiceError) -> bool:
    return error.metadata["retryable"] == "true"


async def test_vertex_sends_the_documented_predict_request(vertex_api: FakeVertexImagen) -> None:
    provider = vertex(vertex_api)
    request = make_request(
        sample_count=2,
        aspect_ratio="16:9",
        image_size="2K",
        person_generation="dont_allow",
        output_mime_type="image/jpeg",
    )
    items = await collect(provider, request, STANDARD)
    await provider.aclose()

    sent = vertex_api.requests[0]
    assert sent.method == "POST"
    assert sent.path == (
        "/v1/projects/proj-1/locations/europe-west4/publishers/google/models/imagen-4.0-generate-001:predict"
    )
    assert sent.headers["authorization"] == "Bearer test-access-token"
    assert sent.headers["content-type"] == "application/json"
    assert sent.json() == {
        "instances": [{"prompt": "a lighthouse at dusk"}],
        "parameters": {
            "sampleCount": 2,
            "aspectRatio": "16:9",
            "sampleImageSize": "2K",
            "personGeneration": "dont_allow",
            "includeRaiReason": True,
            "outputOptions": {"mimeType": "image/jpeg", "compressionQuality": 90},
        },
    }
    expected = image_bytes(2816, 1536, "image/jpeg")
    assert [(i.index, i.mime_type, i.width, i.height) for i in items if isinstance(i, GeneratedImage)] == [
        (0, "image/jpeg", 2816, 1536),
        (1, "image/jpeg", 2816, 1536),
    ]
    assert all(isinstance(i, GeneratedImage) and i.data == expected for i in items)


async def test_1k_png_request_sends_its_size_and_no_quality(vertex_api: FakeVertexImagen) -> None:
    # A model with several sizes gets the one asked for, the default included (google-genai sends what it is given).
    provider = vertex(vertex_api)
    items = await collect(provider, make_request(sample_count=1), STANDARD)
    await provider.aclose()

    parameters = vertex_api.requests[0].json()["parameters"]
    assert parameters["sampleImageSize"] == "1K"
    assert parameters["outputOptions"] == {"mimeType": "image/png"}
    assert [(i.width, i.height, i.mime_type) for i in items if isinstance(i, GeneratedImage)] == [
        (1024, 1024, "image/png")
    ]


async def test_gemini_api_uses_its_path_key_header_and_the_wire_model_name(
    gemini_imagen_api: FakeGeminiImagen,
) -> None:
    provider = gemini(gemini_imagen_api)
    items = await collect(provider, make_request(model=GEMINI_FAST.id, sample_count=3, aspect_ratio="3:4"), GEMINI_FAST)
    await provider.aclose()

    sent = gemini_imagen_api.requests[0]
    assert sent.path == "/v1beta/models/imagen-4.0-fast-generate-001:predict"
    assert sent.headers["x-goog-api-key"] == "test-api-key"
    assert "authorization" not in sent.headers
    assert sent.json()["parameters"]["sampleCount"] == 3
    assert [(i.index, i.width, i.height) for i in items if isinstance(i, GeneratedImage)] == [
        (0, 896, 1280),
        (1, 896, 1280),
        (2, 896, 1280),
    ]


async def test_429_with_retry_after_is_waited_out_then_succeeds(vertex_api: FakeVertexImagen) -> None:
    vertex_api.faults.append(fail(429, "RESOURCE_EXHAUSTED", "Quota exceeded for aiplatform.googleapis.com", "1"))
    provider = vertex(vertex_api)
    items = await collect(provider, make_request(), STANDARD)
    await provider.aclose()

    assert len(items) == 2
    first, second = vertex_api.requests
    # The server asked for one second; the retry came no sooner (generous bound for slow machines).
    assert second.received_at - first.received_at >= 0.9


async def test_429_asking_for_longer_than_the_retry_budget_fails_at_once_with_retry_after(
    vertex_api: FakeVertexImagen,
) -> None:
    vertex_api.faults.append(fail(429, "RESOURCE_EXHAUSTED", "Quota exceeded: requests per minute", "45"))
    error = await failure_of(vertex(vertex_api))

    assert (error.kind, error.reason, retryable(error)) == (
        ErrorKind.RESOURCE_EXHAUSTED,
        "PROVIDER_RATE_LIMITED",
        True,
    )
    assert error.retry_after == 45
    assert "Quota exceeded: requests per minute" in error.message
    assert len(vertex_api.requests) == 1


@pytest.mark.parametrize(("code", "status"), [(500, "INTERNAL"), (503, "UNAVAILABLE"), (504, "DEADLINE_EXCEEDED")])
async def test_server_errors_are_retried_then_succeed(vertex_api: FakeVertexImagen, code: int, status: str) -> None:
    vertex_api.faults.append(fail(code, status, "transient"))
    provider = vertex(vertex_api)
    items = await collect(provider, make_request(), STANDARD)
    await provider.aclose()

    assert [i.index for i in items] == [0, 1]
    assert len(vertex_api.requests) == 2


async def test_503_that_persists_fails_retryable_after_the_configured_retries(
    vertex_api: FakeVertexImagen,
) -> None:
    vertex_api.faults.extend(fail(503, "UNAVAILABLE", "The service is currently unavailable.") for _ in range(10))
    error = await failure_of(vertex(vertex_api, RetryPolicy(2, 10.0, 0.01, 0.05)))

    assert (error.kind, error.reason, retryable(error)) == (
        ErrorKind.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
        True,
    )
    assert "The service is currently unavailable." in error.message
    assert len(vertex_api.requests) == 3  # the first try and two retries


async def test_an_answer_slower_than_the_read_timeout_is_abandoned_and_retried(
    vertex_api: FakeVertexImagen,
) -> None:
    vertex_api.faults.extend([hang(), hang()])
    error = await failure_of(vertex(vertex_api, RetryPolicy(1, 10.0, 0.01, 0.05), read_timeout=0.3))

    assert (error.kind, error.reason, retryable(error)) == (ErrorKind.UNAVAILABLE, "PROVIDER_TIMEOUT", True)
    assert "the read timeout (0.3 s, GEN_PROVIDER_READ_TIMEOUT_SECONDS) ran out" in error.message
    assert len(vertex_api.requests) == 2
    # We hung up both times rather than waiting on.
    assert await eventually(lambda: vertex_api.http.disconnects == 2)


async def test_a_slow_first_answer_then_a_quick_one_succeeds(vertex_api: FakeVertexImagen) -> None:
    vertex_api.faults.append(hang())
    provider = vertex(vertex_api, read_timeout=0.3)
    items = await collect(provider, make_request(), STANDARD)
    await provider.aclose()
    assert len(items) == 2


async def test_an_unreachable_provider_is_retryable(vertex_api: FakeVertexImagen) -> None:
    url = vertex_api.url
    await vertex_api.stop()  # nothing listens on the port any more
    provider = VertexImagenProvider(
        provider_http("vertex-imagen", RetryPolicy(1, 5.0, 0.01, 0.02)),
        StaticTokenSource("t"),
        project="p",
        location="us-central1",
        base_url=url,
    )
    error = await failure_of(provider)
    assert (error.kind, error.reason, retryable(error)) == (
        ErrorKind.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
        True,
    )


@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        (raw(b'{"predictions": [{"mimeType": "image/png", "bytesBase64Encoded": '), "not JSON"),
        (raw(b"<html>upstream error</html>", content_type="text/html"), "not JSON"),
    ],
    ids=["truncated-json", "html"],
)
async def test_unusable_answers_are_retryable_bad_provider_responses(
    vertex_api: FakeVertexImagen, fault: object, detail: str
) -> None:
    vertex_api.faults.append(fault)  # type: ignore[arg-type]
    error = await failure_of(vertex(vertex_api), sample_count=1)

    assert (error.kind, error.reason, retryable(error)) == (
        ErrorKind.UNAVAILABLE,
        "BAD_PROVIDER_RESPONSE",
        True,
    )
    assert detail in error.message
    # A 200 with a bad body is not retried inside the call: the job's next attempt is the retry.
    assert len(vertex_api.requests) == 1


@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        (
            answer_json({"predictions": [{"mimeType": "image/png", "bytesBase64Encoded": "not base64!!"}]}),
            "base64",
        ),
        (
            answer_json({"predictions": [{"mimeType": "image/png", "bytesBase64Encoded": b64(b"GIF? no, text")}]}),
            "not a readable image",
        ),
        (
            answer_json(
                {
                    "predictions": [
                        {
                            "mimeType": "image/jpeg",
                            "bytesBase64Encoded": b64(image_bytes(1024, 1024, "image/png")),
                        }
                    ]
                }
            ),
            "declared image/jpeg but the bytes are image/png",
        ),
        (
            answer_json(
                {
                    "predictions": [
                        {
                            "mimeType": "image/png",
                            "bytesBase64Encoded": b64(image_bytes(1024, 1024, "image/png")[:300]),
                        }
                    ]
                }
            ),
            "not a readable image",
        ),
    ],
    ids=["non-base64", "not-an-image", "wrong-type", "truncated-png"],
)
async def test_unusable_images_end_the_attempt_for_good(
    vertex_api: FakeVertexImagen, fault: object, detail: str
) -> None:
    # Another attempt would be another paid call, likely answered the same way.
    vertex_api.faults.append(fault)  # type: ignore[arg-type]
    error = await failure_of(vertex(vertex_api), sample_count=1)

    assert (error.kind, error.reason, retryable(error)) == (
        ErrorKind.FAILED_PRECONDITION,
        "PROVIDER_IMAGE_INVALID",
        False,
    )
    assert detail in error.message
    assert len(vertex_api.requests) == 1


async def test_images_are_yielded_in_order_before_a_later_bad_one_fails(
    vertex_api: FakeVertexImagen,
) -> None:
    good = b64(image_bytes(1024, 1024, "image/png"))
    vertex_api.faults.append(
        answer_json(
            {
                "predictions": [
                    {"mimeType": "image/png", "bytesBase64Encoded": good},
                    {"mimeType": "image/png", "bytesBase64Encoded": "%%%"},
                ]
            }
        )
    )
    provider = vertex(vertex_api)
    stream = provider.generate(make_request(), STANDARD)
    first = await anext(stream)
    assert isinstance(first, GeneratedImage) and first.index == 0
    with pytest.raises(ServiceError, match="prediction 1"):
        await anext(stream)
    await provider.aclose()


@pytest.mark.parametrize("body", [{}, {"predictions": []}], ids=["absent", "empty"])
async def test_no_predictions_is_a_permanent_no_images(vertex_api: FakeVertexImagen, body: dict[str, object]) -> None:
    vertex_api.faults.append(answer_json(body))
    error = await failure_of(vertex(vertex_api))
    assert (error.kind, error.reason, retryable(error)) == (ErrorKind.FAILED_PRECONDITION, "NO_IMAGES", False)


async def test_some_filtered_images_come_back_as_filtered_items_with_the_reason(
    vertex_api: FakeVertexImagen,
) -> None:
    vertex_api.filtered = {1, 3}
    provider = vertex(vertex_api)
    items = await collect(provider, make_request(sample_count=4), STANDARD)
    await provider.aclose()

    assert [type(i).__name__ for i in items] == [
        "GeneratedImage",
        "FilteredImage",
        "GeneratedImage",
        "FilteredImage",
    ]
    filtered = [i for i in items if isinstance(i, FilteredImage)]
    assert [(f.index, f.reason) for f in filtered] == [
        (1, vertex_api.filter_reason),
        (3, vertex_api.filter_reason),
    ]


async def test_all_filtered_output_is_reported_as_filtered_items(vertex_api: FakeVertexImagen) -> None:
    vertex_api.faults.append(answer_json({"predictions": [{"raiFilteredReason": ALL_FILTERED_REASON}]}))
    provider = vertex(vertex_api)
    items = await collect(provider, make_request(sample_count=4), STANDARD)
    await provider.aclose()
    assert items == [FilteredImage(0, ALL_FILTERED_REASON)]


async def test_a_blocked_prompt_is_permanent_and_carries_the_providers_message(
    vertex_api: FakeVertexImagen,
) -> None:
    vertex_api.faults.append(fail(400, "INVALID_ARGUMENT", BLOCKED_PROMPT_MESSAGE))
    error = await failure_of(vertex(vertex_api))

    assert (error.kind, error.reason, retryable(error)) == (
        ErrorKind.INVALID_ARGUMENT,
        "PROMPT_BLOCKED",
        False,
    )
    assert BLOCKED_PROMPT_MESSAGE in error.message
    assert len(vertex_api.requests) == 1


async def test_any_other_400_is_a_permanent_rejection(vertex_api: FakeVertexImagen) -> None:
    vertex_api.faults.append(fail(400, "INVALID_ARGUMENT", "Image size 2K is not supported for this model."))
    error = await failure_of(vertex(vertex_api))
    assert (error.kind, error.reason, retryable(error)) == (
        ErrorKind.INVALID_ARGUMENT,
        "PROVIDER_REJECTED",
        False,
    )
    assert "Image size 2K is not supported" in error.message


async def test_403_is_a_permanent_configuration_error(vertex_api: FakeVertexImagen) -> None:
    vertex_api.faults.append(fail(403, "PERMISSION_DENIED", "Vertex AI API has not been used in project proj-1"))
    error = await failure_of(vertex(vertex_api))
    assert (error.kind, error.reason, retryable(error)) == (
        ErrorKind.PERMISSION_DENIED,
        "PROVIDER_PERMISSION_DENIED",
        False,
    )
    assert "has not been used in project proj-1" in error.message
    assert len(vertex_api.requests) == 1


async def test_a_wrong_gemini_api_key_is_a_configuration_error(gemini_imagen_api: FakeGeminiImagen) -> None:
    gemini_imagen_api.api_key = "another-key"
    error = await failure_of(gemini(gemini_imagen_api), model=GEMINI_FAST.id)
    assert (error.kind, retryable(error)) == (ErrorKind.PERMISSION_DENIED, False)
    assert "API key not valid" in error.message


async def test_vertex_404_means_the_model_is_unknown(vertex_api: FakeVertexImagen) -> None:
    vertex_api.known_models = set()
    error = await failure_of(vertex(vertex_api))
    assert (error.kind, error.reason, retryable(error)) == (ErrorKind.NOT_FOUND, "MODEL_NOT_FOUND", False)


async def test_gemini_api_404_says_imagen_is_gone_and_names_the_alternatives(
    gemini_imagen_api: FakeGeminiImagen,
) -> None:
    gemini_imagen_api.known_models = set()  # today's Gemini API
    error = await failure_of(gemini(gemini_imagen_api), model=GEMINI_FAST.id)

    assert (error.kind, error.reason, retryable(error)) == (ErrorKind.NOT_FOUND, "MODEL_NOT_SERVED", False)
    assert "no longer served" in error.message
    assert "vertex-imagen" in error.message and "gemini-image" in error.message
    assert len(gemini_imagen_api.requests) == 1


async def test_a_401_gets_one_fresh_token_and_the_request_is_repeated(vertex_api: FakeVertexImagen) -> None:
    class RotatingTokens:
        def __init__(self) -> None:
            self.current = "expired-token"
            self.invalidations = 0

        async def token(self) -> str:
            return self.current

        def invalidate(self) -> None:
            self.invalidations += 1
            self.current = "test-access-token"

        async def aclose(self) -> None:
            return None

    tokens = RotatingTokens()
    provider = VertexImagenProvider(
        provider_http("vertex-imagen"),
        tokens,
        project="proj-1",
        location="us-central1",
        base_url=vertex_api.url,
    )
    items = await collect(provider, make_request(), STANDARD)
    await provider.aclose()

    assert len(items) == 2
    assert [r.headers["authorization"] for r in vertex_api.requests] == [
        "Bearer expired-token",
        "Bearer test-access-token",
    ]
    assert tokens.invalidations == 1


async def test_cancelling_generate_closes_the_request_in_flight(vertex_api: FakeVertexImagen) -> None:
    vertex_api.faults.append(hang())
    provider = vertex(vertex_api)
    task = asyncio.create_task(collect(provider, make_request(), STANDARD))
    assert await eventually(lambda: bool(vertex_api.requests))
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0  # propagated at once, not after a timeout
    assert await eventually(lambda: vertex_api.http.disconnects == 1)
    await provider.aclose()


def test_request_body_round_trips_through_json() -> None:
    # The wire body is plain JSON types only (no tuples, enums or dataclasses slipping through).
    from generator_service.providers.predict import request_body

    body = request_body(make_request(image_size="2K", output_mime_type="image/jpeg", seed=7), 75, STANDARD)
    assert json.loads(json.dumps(body)) == body
