"""The catalogue (config._default_models) and what reaches the wire for it: sizes, thought parts, parameters a
model cannot honour, finish reasons, Vertex hosts, aspect ratios, Imagen's parameters, input images.

Each provider test talks to a fake speaking google-genai's wire shape (tests/generator/fake_google.py).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from imagegen.generator.v1 import generator_service_pb2 as pb
from PIL import Image

from generator_service.config import ModelSpec, _default_models
from generator_service.domain import FilteredImage, GeneratedImage, InputImage
from generator_service.generation import validate
from generator_service.providers.gemini_image import GeminiImageProvider, VertexGeminiImageProvider
from generator_service.providers.google_auth import StaticTokenSource
from generator_service.providers.http import ProviderHttp
from generator_service.providers.local import LocalProvider
from generator_service.providers.memory import AttemptHoldings, MemoryBudget
from generator_service.providers.vertex_imagen import VertexImagenProvider, vertex_models_url
from imagegen_common.errors import ErrorKind, ServiceError
from imagegen_common.grpc_errors import from_grpc_error
from tests.generator import helpers
from tests.generator.fake_google import (
    FakeGeminiImage,
    FakeVertexGeminiImage,
    FakeVertexImagen,
    answer_json,
    b64,
    gemini_image_size,
    image_bytes,
)
from tests.generator.helpers import (
    FAST_RETRIES,
    collect,
    make_model,
    make_request,
    provider_http,
    running,
    settings_for,
)

CATALOGUE = {m.id: m for m in _default_models()}


def ids(**overrides: Any) -> dict[str, Any]:
    """UUID job and user ids (what JobService sends; a generator may refuse anything else in a storage path)."""
    return {"job_id": str(uuid.uuid4()), "user_id": USER, **overrides}


USER = str(uuid.uuid4())

# Provider-level tests declare the models they need (the fields an older ModelSpec ignores), so they exercise
# the request builders and parsers themselves.
PRO_IMAGE = make_model(
    "gemini-3-pro-image-preview", "gemini-image", image_sizes=["1K", "2K", "4K"], thinking=True, max_input_images=14
)
FLASH_IMAGE = make_model("gemini-2.5-flash-image", "gemini-image", person_generation_options=[])
IMAGEN = make_model("imagen-4.0-generate-001", "vertex-imagen", image_sizes=["1K", "2K"])


async def run_gemini(api: FakeGeminiImage, model: ModelSpec, **overrides: Any) -> list[GeneratedImage | FilteredImage]:
    provider = GeminiImageProvider(provider_http("gemini-image"), "test-api-key", base_url=api.url)
    try:
        return await collect(provider, make_request(model=model.id, **overrides), model)
    finally:
        await provider.aclose()


def violations_of(model_id: str, **overrides: Any) -> dict[str, str]:
    """The fields generation.validate refuses for this request on the catalogue's model, with their descriptions."""
    try:
        validate(make_request(model=model_id, **overrides), CATALOGUE[model_id])
    except ServiceError as error:
        assert error.kind is ErrorKind.INVALID_ARGUMENT
        return {v.field: v.description for v in error.violations}
    return {}


# -- 1. sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["1K", "2K", "4K"])
async def test_every_size_is_sent_as_image_size_and_the_image_comes_back_at_it(
    gemini_image_api: FakeGeminiImage, size: str
) -> None:
    items = await run_gemini(gemini_image_api, PRO_IMAGE, sample_count=1, aspect_ratio="16:9", image_size=size)

    sent = gemini_image_api.requests[0].json()["generationConfig"]["imageConfig"]
    assert sent == {"aspectRatio": "16:9", "imageSize": size}
    (image,) = items
    assert isinstance(image, GeneratedImage)
    assert (image.width, image.height) == gemini_image_size("16:9", size)


async def test_gemini_31_flash_image_sends_512_and_no_other_model_takes_it(gemini_image_api: FakeGeminiImage) -> None:
    flash = CATALOGUE["gemini-3.1-flash-image"]
    (image,) = await run_gemini(gemini_image_api, flash, sample_count=1, aspect_ratio="1:1", image_size="512")

    assert gemini_image_api.requests[0].json()["generationConfig"]["imageConfig"]["imageSize"] == "512"
    assert isinstance(image, GeneratedImage) and (image.width, image.height) == (512, 512)
    assert "image_size" in violations_of("gemini-3-pro-image", image_size="512")


def test_the_catalogue_offers_4k_only_where_google_documents_it() -> None:
    assert CATALOGUE["gemini-3-pro-image-preview"].image_sizes == ["1K", "2K", "4K"]
    assert CATALOGUE["gemini-3-pro-image"].image_sizes == ["1K", "2K", "4K"]
    assert CATALOGUE["vertex/gemini-3.1-flash-image"].image_sizes == ["512", "1K", "2K", "4K"]
    assert CATALOGUE["vertex/gemini-3.1-flash-image-preview"].image_sizes == ["512", "1K", "2K", "4K"]
    assert violations_of("gemini-2.5-flash-image", image_size="4K") == {
        "image_size": "must be one of 1K for gemini-2.5-flash-image"
    }
    assert "image_size" in violations_of("imagen-4.0-generate-001", image_size="4K")


async def test_imagen_gets_sample_image_size_for_every_size_but_fast_gets_none(vertex_api: FakeVertexImagen) -> None:
    fast = CATALOGUE["imagen-4.0-fast-generate-001"]
    for model, size in ((CATALOGUE["imagen-4.0-ultra-generate-001"], "1K"), (fast, "1K")):
        provider = VertexImagenProvider(
            provider_http("vertex-imagen"),
            StaticTokenSource("test-access-token"),
            project="proj-1",
            location="us-central1",
            base_url=vertex_api.url,
        )
        await collect(provider, make_request(model=model.id, sample_count=1, image_size=size), model)
        await provider.aclose()
    ultra, fast_sent = (r.json()["parameters"] for r in vertex_api.requests)
    assert ultra["sampleImageSize"] == "1K"
    assert "sampleImageSize" not in fast_sent


# -- 2. thought images -----------------------------------------------------------------------------


async def test_thought_images_are_skipped_and_only_the_final_image_is_delivered(
    gemini_image_api: FakeGeminiImage,
) -> None:
    gemini_image_api.thoughts = 2
    items = await run_gemini(gemini_image_api, PRO_IMAGE, sample_count=2)

    assert len(items) == 2
    for image in items:
        assert isinstance(image, GeneratedImage)
        assert image.data == image_bytes(1024, 1024, "image/png")  # the final image, not a red draft


# -- 3. parameters a model cannot honour ----------------------------------------------------------------


async def test_person_generation_on_a_gemini_api_model_is_refused_naming_model_and_field(
    tmp_path: Path, gemini_image_api: FakeGeminiImage
) -> None:
    settings = settings_for(tmp_path, gemini_api_key="test-api-key", gemini_base_url=gemini_image_api.url)
    request = helpers.generate_request(
        model="gemini-2.5-flash-image", sample_count=1, person_generation="dont_allow", **ids()
    )
    async with running(settings) as (_app, stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [event async for event in stub.Generate(request)]
    error = from_grpc_error(caught.value)
    assert error.kind is ErrorKind.INVALID_ARGUMENT
    assert {v.field: v.description for v in error.violations} == {
        "person_generation": "gemini-2.5-flash-image does not take person_generation"
    }
    assert gemini_image_api.requests == []  # refused before any paid call


async def test_person_generation_goes_to_vertex_in_the_sdk_spelling(
    vertex_gemini_image_api: FakeVertexGeminiImage,
) -> None:
    model = CATALOGUE["vertex/gemini-2.5-flash-image"]
    request = make_request(model=model.id, sample_count=1, aspect_ratio="3:2", person_generation="dont_allow")
    validate(request, model)
    provider = VertexGeminiImageProvider(
        provider_http("vertex-gemini-image"),
        StaticTokenSource("test-access-token"),
        models_url=vertex_models_url("proj-1", "global", vertex_gemini_image_api.url),
    )
    items = await collect(provider, request, model)
    await provider.aclose()

    sent = vertex_gemini_image_api.requests[0]
    assert (
        sent.path
        == "/v1/projects/proj-1/locations/global/publishers/google/models/gemini-2.5-flash-image:generateContent"
    )
    assert sent.headers["authorization"] == "Bearer test-access-token"
    assert sent.json()["generationConfig"]["imageConfig"] == {"aspectRatio": "3:2", "personGeneration": "ALLOW_NONE"}
    assert [(i.width, i.height) for i in items if isinstance(i, GeneratedImage)] == [gemini_image_size("3:2", "1K")]


@pytest.mark.parametrize(
    ("model_id", "overrides", "field"),
    [
        ("imagen-4.0-generate-001", {"negative_prompt": "blur"}, "negative_prompt"),
        ("gemini-2.5-flash-image", {"seed": 5, "add_watermark": False}, "seed"),
        ("gemini-3-pro-image-preview", {"safety_setting": "block_only_high"}, "safety_setting"),
        ("imagen-4.0-generate-001", {"input_images": (InputImage(b"x", "image/png"),)}, "input_images"),
    ],
)
def test_each_unhonoured_parameter_is_refused_by_name(model_id: str, overrides: dict[str, Any], field: str) -> None:
    problems = violations_of(model_id, **overrides)
    assert field in problems and model_id in problems[field]


# -- 4. finish reasons -------------------------------------------------------------------------------


def no_image_answer(finish: str) -> dict[str, Any]:
    return {"candidates": [{"content": {"role": "model", "parts": []}, "finishReason": finish}]}


@pytest.mark.parametrize(
    ("finish", "reason", "retryable"),
    [
        ("NO_IMAGE", "PROVIDER_NO_IMAGE", "true"),
        ("OTHER", "PROVIDER_NO_IMAGE", "true"),
        ("IMAGE_OTHER", "PROVIDER_NO_IMAGE", "true"),
        ("MAX_TOKENS", "PROVIDER_OUTPUT_LIMIT", "false"),
    ],
)
async def test_a_finish_reason_that_is_not_safety_is_its_own_error_not_a_filtered_image(
    gemini_image_api: FakeGeminiImage, finish: str, reason: str, retryable: str
) -> None:
    gemini_image_api.faults.append(answer_json(no_image_answer(finish)))
    with pytest.raises(ServiceError) as caught:
        await run_gemini(gemini_image_api, FLASH_IMAGE, sample_count=1)
    assert (caught.value.reason, caught.value.metadata["retryable"]) == (reason, retryable)
    assert finish in caught.value.message and "safety" not in caught.value.message


async def test_the_other_calls_still_deliver_when_one_comes_back_without_an_image(
    gemini_image_api: FakeGeminiImage,
) -> None:
    # They are paid for: their images reach the caller before the attempt fails for the one that missed.
    gemini_image_api.faults.append(answer_json(no_image_answer("NO_IMAGE")))
    provider = GeminiImageProvider(provider_http("gemini-image"), "test-api-key", base_url=gemini_image_api.url)
    delivered: list[GeneratedImage | FilteredImage] = []
    with pytest.raises(ServiceError) as caught:
        async for item in provider.generate(make_request(model=FLASH_IMAGE.id, sample_count=3), FLASH_IMAGE):
            delivered.append(item)
    await provider.aclose()
    assert caught.value.reason == "PROVIDER_NO_IMAGE"
    assert len([i for i in delivered if isinstance(i, GeneratedImage)]) == 2


@pytest.mark.parametrize("finish", ["IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "RECITATION"])
async def test_safety_finish_reasons_stay_filtered_images(gemini_image_api: FakeGeminiImage, finish: str) -> None:
    gemini_image_api.faults.append(answer_json(no_image_answer(finish)))
    (item,) = await run_gemini(gemini_image_api, FLASH_IMAGE, sample_count=1)
    assert isinstance(item, FilteredImage) and finish in item.reason


# -- 5. Vertex hosts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "host"),
    [
        ("us", "https://aiplatform.us.rep.googleapis.com"),
        ("eu", "https://aiplatform.eu.rep.googleapis.com"),
        ("global", "https://aiplatform.googleapis.com"),
        ("europe-west4", "https://europe-west4-aiplatform.googleapis.com"),
    ],
)
async def test_vertex_requests_go_to_the_documented_host_for_each_location(location: str, host: str) -> None:
    provider = VertexImagenProvider(
        provider_http("vertex-imagen"), StaticTokenSource("t"), project="proj-1", location=location
    )
    assert provider.predict_url(IMAGEN) == (
        f"{host}/v1/projects/proj-1/locations/{location}/publishers/google/models/imagen-4.0-generate-001:predict"
    )
    await provider.aclose()


# -- 7. aspect ratios ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "ratio"),
    [
        ("gemini-2.5-flash-image", "21:9"),
        ("gemini-2.5-flash-image", "4:5"),
        ("vertex/gemini-3-pro-image-preview", "2:3"),
        ("gemini-3.1-flash-image-preview", "1:8"),
        ("gemini-3.1-flash-image-preview", "4:1"),
    ],
)
def test_the_aspect_ratios_each_model_documents_are_accepted(model_id: str, ratio: str) -> None:
    assert violations_of(model_id, aspect_ratio=ratio) == {}


def test_an_aspect_ratio_the_model_lacks_is_refused_naming_the_model() -> None:
    assert violations_of("gemini-2.5-flash-image", aspect_ratio="1:8") == {
        "aspect_ratio": "must be one of 1:1, 2:3, 3:2, 3:4, 4:3, 4:5, 5:4, 9:16, 16:9, 21:9 for gemini-2.5-flash-image"
    }
    assert "aspect_ratio" in violations_of("imagen-4.0-generate-001", aspect_ratio="21:9")


async def test_a_21_9_image_round_trips_through_the_generator(
    tmp_path: Path, gemini_image_api: FakeGeminiImage
) -> None:
    settings = settings_for(tmp_path, gemini_api_key="test-api-key", gemini_base_url=gemini_image_api.url)
    request = helpers.generate_request(model="gemini-2.5-flash-image", sample_count=1, aspect_ratio="21:9", **ids())
    async with running(settings) as (_app, stub):
        events = [event async for event in stub.Generate(request)]
    stored = [e.image_stored for e in events if e.HasField("image_stored")]
    assert [(s.width, s.height) for s in stored] == [gemini_image_size("21:9", "1K")]


# -- Imagen's parameters ------------------------------------------------------------------------------


async def test_imagen_parameters_are_sent_as_vertex_documents_them(vertex_api: FakeVertexImagen) -> None:
    model = CATALOGUE["imagen-4.0-generate-001"]
    request = make_request(
        model=model.id,
        sample_count=1,
        seed=42,
        add_watermark=False,
        enhance_prompt=False,
        safety_setting="block_only_high",
        language="ja",
        person_generation="dont_allow",
        output_mime_type="image/jpeg",
        jpeg_quality=60,
    )
    validate(request, model)
    provider = VertexImagenProvider(
        provider_http("vertex-imagen"),
        StaticTokenSource("test-access-token"),
        project="proj-1",
        location="us-central1",
        base_url=vertex_api.url,
    )
    items = await collect(provider, request, model)
    await provider.aclose()

    parameters = vertex_api.requests[0].json()["parameters"]
    assert {k: parameters[k] for k in ("seed", "addWatermark", "enhancePrompt", "safetySetting", "language")} == {
        "seed": 42,
        "addWatermark": False,
        "enhancePrompt": False,
        "safetySetting": "block_only_high",
        "language": "ja",
    }
    assert parameters["personGeneration"] == "dont_allow"
    assert parameters["outputOptions"] == {"mimeType": "image/jpeg", "compressionQuality": 60}
    assert [i.mime_type for i in items if isinstance(i, GeneratedImage)] == ["image/jpeg"]


def test_a_seed_needs_the_watermark_off() -> None:
    assert set(violations_of("imagen-4.0-generate-001", seed=42)) == {"seed"}
    assert violations_of("imagen-4.0-generate-001", seed=42, add_watermark=False) == {}
    assert set(violations_of("imagen-4.0-generate-001", seed=0, add_watermark=False)) == {"seed"}


def test_jpeg_quality_is_only_for_jpeg_and_within_1_to_100() -> None:
    assert set(violations_of("imagen-4.0-generate-001", jpeg_quality=50)) == {"jpeg_quality"}
    assert set(violations_of("imagen-4.0-generate-001", jpeg_quality=101, output_mime_type="image/jpeg")) == {
        "jpeg_quality"
    }
    assert violations_of("gemini-2.5-flash-image", jpeg_quality=70, output_mime_type="image/jpeg") == {}


async def test_gemini_output_is_reencoded_at_the_requested_jpeg_quality(gemini_image_api: FakeGeminiImage) -> None:
    jpeg = {"sample_count": 1, "output_mime_type": "image/jpeg"}
    (low,) = await run_gemini(gemini_image_api, FLASH_IMAGE, jpeg_quality=5, **jpeg)
    (high,) = await run_gemini(gemini_image_api, FLASH_IMAGE, jpeg_quality=95, **jpeg)
    assert isinstance(low, GeneratedImage) and isinstance(high, GeneratedImage)
    # One flat colour: the quality shows in the quantisation tables, not the size.
    with Image.open(io.BytesIO(low.data)) as a, Image.open(io.BytesIO(high.data)) as b:
        assert a.quantization != b.quantization  # type: ignore[attr-defined]


# -- input images ---------------------------------------------------------------------------------------


def png(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


async def test_input_images_go_as_inline_parts_after_the_prompt_in_order(gemini_image_api: FakeGeminiImage) -> None:
    first, second = png((255, 0, 0)), png((0, 0, 255))
    inputs = (InputImage(first, "image/png"), InputImage(second, "image/png"))
    await run_gemini(gemini_image_api, PRO_IMAGE, sample_count=1, input_images=inputs)

    parts = gemini_image_api.requests[0].json()["contents"][0]["parts"]
    assert parts[0] == {"text": "a lighthouse at dusk"}
    assert [p["inlineData"]["mimeType"] for p in parts[1:]] == ["image/png", "image/png"]
    assert [base64.b64decode(p["inlineData"]["data"]) for p in parts[1:]] == [first, second]


def test_too_many_input_images_for_the_model_are_refused() -> None:
    four = tuple(InputImage(png((i, i, i)), "image/png") for i in range(4))
    assert violations_of("gemini-2.5-flash-image", input_images=four) == {
        "input_images": "gemini-2.5-flash-image takes at most 3"
    }
    assert violations_of("gemini-2.5-flash-image", input_images=four[:3]) == {}


async def test_the_local_provider_draws_its_input_images_visibly() -> None:
    red = InputImage(png((255, 0, 0), (200, 200)), "image/png")
    local = LocalProvider()
    model = CATALOGUE["local"]
    (plain,) = await collect(local, make_request(model="local", sample_count=1), model)
    (edited,) = await collect(local, make_request(model="local", sample_count=1, input_images=(red,)), model)
    assert isinstance(plain, GeneratedImage) and isinstance(edited, GeneratedImage)

    def red_pixels(data: bytes) -> int:
        with Image.open(io.BytesIO(data)) as image:
            colours: list[tuple[int, Any]] = image.convert("RGB").getcolors(1 << 24) or []
            return sum(n for n, rgb in colours if rgb[0] > 240 and rgb[1] < 15 and rgb[2] < 15)

    assert red_pixels(plain.data) == 0
    assert red_pixels(edited.data) > 100 * 100  # the 200 px input, scaled into its slot


async def test_list_models_reports_each_models_capabilities(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, gemini_api_key="test-api-key", vertex_project="proj-1")
    async with running(settings) as (_app, stub):
        reply = await stub.ListModels(pb.ListModelsRequest())
    models = {m.id: m for m in reply.models}
    pro = models["gemini-3-pro-image-preview"]
    assert (list(pro.image_sizes), pro.max_input_images, pro.thinking) == (["1K", "2K", "4K"], 14, True)
    assert list(pro.person_generation_options) == []
    assert "person_generation" in models["vertex/gemini-3-pro-image"].parameters
    imagen = models["imagen-4.0-generate-001"]
    assert {"seed", "add_watermark", "enhance_prompt", "safety_setting", "language"} <= set(imagen.parameters)
    assert "negative_prompt" not in imagen.parameters
    assert list(imagen.safety_settings) == ["block_low_and_above", "block_medium_and_above", "block_only_high"]


def noise_png(side: int) -> bytes:
    """A PNG that does not compress (random pixels): about 3 bytes a pixel."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, format="PNG")
    return out.getvalue()


async def test_a_request_with_input_images_counts_against_the_memory_budget(gemini_image_api: FakeGeminiImage) -> None:
    budget = MemoryBudget(1024 * 1024 * 1024)
    http = ProviderHttp.create(
        "gemini-image", connect_timeout=2.0, read_timeout=10.0, policy=FAST_RETRIES, memory=budget
    )
    provider = GeminiImageProvider(http, "test-api-key", base_url=gemini_image_api.url)
    holdings = AttemptHoldings()
    request = make_request(model=PRO_IMAGE.id, sample_count=1, input_images=(InputImage(noise_png(400), "image/png"),))

    async def attempt() -> list[GeneratedImage | FilteredImage]:
        holdings.bind()
        return await collect(provider, request, PRO_IMAGE)

    await asyncio.create_task(attempt())
    await provider.aclose()
    sent = len(gemini_image_api.requests[0].body)
    answer = len(json.dumps({"data": b64(image_bytes(1024, 1024, "image/png"))}))
    # The request (twice its size, as answers count) on top of the answer's own reservation.
    assert sum(n for _, n in holdings.held) >= 2 * sent + 2 * answer
    holdings.release()
    assert budget.used == 0


async def test_an_input_given_by_storage_key_is_read_from_the_users_own_folder(
    tmp_path: Path, gemini_image_api: FakeGeminiImage
) -> None:
    settings = settings_for(tmp_path, gemini_api_key="test-api-key", gemini_base_url=gemini_image_api.url)
    async with running(settings) as (_app, stub):
        first = [e async for e in stub.Generate(helpers.generate_request(sample_count=1, **ids()))]
        (stored,) = [e.image_stored for e in first if e.HasField("image_stored")]
        source = pb.InputImage(storage_path=stored.storage_path, mime_type="image/png")
        edit = helpers.generate_request(model="gemini-2.5-flash-image", sample_count=1, input_images=[source], **ids())
        [e async for e in stub.Generate(edit)]
        other_user = helpers.generate_request(
            model="gemini-2.5-flash-image", sample_count=1, input_images=[source], **ids(user_id=str(uuid.uuid4()))
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [e async for e in stub.Generate(other_user)]
    parts = gemini_image_api.requests[0].json()["contents"][0]["parts"]
    stored_bytes = (tmp_path / "storage" / "images" / stored.storage_path).read_bytes()
    assert base64.b64decode(parts[1]["inlineData"]["data"]) == stored_bytes
    error = from_grpc_error(caught.value)
    assert [v.field for v in error.violations] == ["input_images[0].storage_path"]
    assert len(gemini_image_api.requests) == 1  # the other user's attempt never reached the provider
