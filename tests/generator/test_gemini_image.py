"""gemini-image: Gemini image models via :generateContent, one call per image, against a fake Gemini API."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from generator_service.domain import FilteredImage, GeneratedImage
from generator_service.providers.gemini_image import GeminiImageProvider
from imagegen_common.errors import ErrorKind, ServiceError
from tests.generator.fake_google import FakeGeminiImage, answer_json, b64, fail, hang, image_bytes
from tests.generator.helpers import FAST_RETRIES, collect, eventually, make_model, make_request, provider_http

FLASH_IMAGE = make_model("gemini-2.5-flash-image", "gemini-image")


def provider(api: FakeGeminiImage) -> GeminiImageProvider:
    return GeminiImageProvider(provider_http("gemini-image", FAST_RETRIES), "test-api-key", base_url=api.url)


async def generate(api: FakeGeminiImage, **overrides: object) -> list[GeneratedImage | FilteredImage]:
    gemini = provider(api)
    try:
        return await collect(gemini, make_request(model=FLASH_IMAGE.id, **overrides), FLASH_IMAGE)
    finally:
        await gemini.aclose()


async def test_one_generate_content_call_per_image_with_the_documented_body(
    gemini_image_api: FakeGeminiImage,
) -> None:
    items = await generate(gemini_image_api, sample_count=3, aspect_ratio="16:9", person_generation="dont_allow")

    assert len(gemini_image_api.requests) == 3
    for sent in gemini_image_api.requests:
        assert sent.method == "POST"
        assert sent.path == "/v1beta/models/gemini-2.5-flash-image:generateContent"
        assert sent.headers["x-goog-api-key"] == "test-api-key"
        assert sent.json() == {
            "contents": [{"role": "user", "parts": [{"text": "a lighthouse at dusk"}]}],
            "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "16:9"}},
        }
    images = sorted((i for i in items if isinstance(i, GeneratedImage)), key=lambda i: i.index)
    # Gemini's own size for 16:9, reported as it is.
    assert [(i.index, i.mime_type, i.width, i.height) for i in images] == [
        (0, "image/png", 1344, 768),
        (1, "image/png", 1344, 768),
        (2, "image/png", 1344, 768),
    ]
    assert images[0].data == image_bytes(1344, 768, "image/png")


async def test_the_calls_run_concurrently(gemini_image_api: FakeGeminiImage) -> None:
    async def slow() -> None:
        await asyncio.sleep(0.2)

    gemini_image_api.delay = slow
    items = await generate(gemini_image_api, sample_count=4)
    assert len(items) == 4
    assert gemini_image_api.http.max_in_flight == 4


async def test_jpeg_is_delivered_as_jpeg_although_gemini_answers_png(
    gemini_image_api: FakeGeminiImage,
) -> None:
    items = await generate(gemini_image_api, sample_count=1, output_mime_type="image/jpeg")

    (image,) = items
    assert isinstance(image, GeneratedImage)
    assert image.mime_type == "image/jpeg"
    with Image.open(io.BytesIO(image.data)) as decoded:
        assert (decoded.format, decoded.size) == ("JPEG", (1024, 1024))


async def test_a_prompt_blocked_up_front_counts_as_filtered_with_its_reason(
    gemini_image_api: FakeGeminiImage,
) -> None:
    blocked = {
        "promptFeedback": {
            "blockReason": "PROHIBITED_CONTENT",
            "blockReasonMessage": "The prompt was blocked.",
        }
    }
    gemini_image_api.faults.append(answer_json(blocked))
    items = await generate(gemini_image_api, sample_count=2)

    filtered = [i for i in items if isinstance(i, FilteredImage)]
    assert len(filtered) == 1
    assert "PROHIBITED_CONTENT" in filtered[0].reason and "The prompt was blocked." in filtered[0].reason
    assert len([i for i in items if isinstance(i, GeneratedImage)]) == 1


@pytest.mark.parametrize("finish", ["IMAGE_SAFETY", "SAFETY", "PROHIBITED_CONTENT"])
async def test_a_safety_finish_reason_without_image_counts_as_filtered(
    gemini_image_api: FakeGeminiImage, finish: str
) -> None:
    gemini_image_api.faults.append(
        answer_json({"candidates": [{"finishReason": finish, "content": {"role": "model", "parts": []}}]})
    )
    items = await generate(gemini_image_api, sample_count=1)
    assert len(items) == 1 and isinstance(items[0], FilteredImage)
    assert finish in items[0].reason


async def test_a_text_only_answer_is_no_safety_block_and_says_what_the_model_said(
    gemini_image_api: FakeGeminiImage,
) -> None:
    text = {"content": {"parts": [{"text": "Which lighthouse do you mean?"}]}, "finishReason": "STOP"}
    gemini_image_api.faults.append(answer_json({"candidates": [text]}))
    with pytest.raises(ServiceError) as caught:
        await generate(gemini_image_api, sample_count=1)
    assert (caught.value.reason, caught.value.metadata["retryable"]) == ("MODEL_ANSWERED_TEXT", "false")
    assert "Which lighthouse do you mean?" in caught.value.message


async def test_a_transient_failure_of_one_call_is_retried(gemini_image_api: FakeGeminiImage) -> None:
    gemini_image_api.faults.append(fail(503, "UNAVAILABLE", "The model is overloaded. Please try again later."))
    items = await generate(gemini_image_api, sample_count=2)
    assert sorted(i.index for i in items if isinstance(i, GeneratedImage)) == [0, 1]
    assert len(gemini_image_api.requests) == 3


async def test_a_permanent_failure_of_one_call_fails_the_attempt_and_stops_the_other_calls(
    gemini_image_api: FakeGeminiImage,
) -> None:
    gemini_image_api.faults.extend(
        [fail(400, "INVALID_ARGUMENT", "Unsupported aspect ratio for this model."), hang(), hang()]
    )
    with pytest.raises(ServiceError) as caught:
        await generate(gemini_image_api, sample_count=3)

    error = caught.value
    assert (error.kind, error.reason, error.metadata["retryable"]) == (
        ErrorKind.INVALID_ARGUMENT,
        "PROVIDER_REJECTED",
        "false",
    )
    assert "Unsupported aspect ratio" in error.message
    # The two calls still waiting were abandoned, not left running (and billing).
    assert await eventually(lambda: gemini_image_api.http.disconnects == 2)


@pytest.mark.parametrize(
    ("answer", "reason", "retryable", "detail"),
    [
        (
            {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": "@@"}}]}}]},
            "PROVIDER_IMAGE_INVALID",
            "false",
            "base64",
        ),
        (
            {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": b64(b"x")}}]}}]},
            "PROVIDER_IMAGE_INVALID",
            "false",
            "not a readable image",
        ),
        ({"usageMetadata": {}}, "BAD_PROVIDER_RESPONSE", "true", "no candidates"),
    ],
    ids=["non-base64", "not-an-image", "no-candidates"],
)
async def test_unusable_answers_fail_the_attempt_and_only_a_glitch_is_retryable(
    gemini_image_api: FakeGeminiImage, answer: dict[str, object], reason: str, retryable: str, detail: str
) -> None:
    # An answer without candidates is a glitch another attempt may not see; an image that does not decode is
    # not, and another attempt would be another paid call.
    gemini_image_api.faults.append(answer_json(answer))
    with pytest.raises(ServiceError) as caught:
        await generate(gemini_image_api, sample_count=1)
    assert (caught.value.reason, caught.value.metadata["retryable"]) == (reason, retryable)
    assert detail in caught.value.message
