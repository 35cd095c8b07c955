"""JobService and the model catalogue, end to end: ListModels with prices, CreateJob validating each parameter
against the model's declaration, and jobs on the Gemini image models against a fake Gemini API."""

from __future__ import annotations

import base64
import hashlib
import io
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from PIL import Image

from imagegen_client.client import ImageGenClient, inline_image, job_image
from tests.generator.fake_google import DRAFT_COLOUR, FakeGeminiImage, gemini_image_size, image_bytes, png_declaring
from tests.support.rpc_errors import failure_of
from tests.support.services import Services, running_services


@pytest.fixture(scope="module")
async def gemini_api() -> AsyncIterator[FakeGeminiImage]:
    fake = FakeGeminiImage()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def services(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, gemini_api: FakeGeminiImage
) -> AsyncIterator[Services]:
    generator = {"gemini_api_key": "test-api-key", "gemini_base_url": gemini_api.url}
    job = {"model_prices": {"gemini-3-pro-image-preview": 7}, "default_price_per_image": 2, "max_request_mb": 8}
    async with running_services(database_url, tmp_path_factory.mktemp("models"), job=job, generator=generator) as s:
        yield s


@pytest.fixture
async def client(services: Services) -> AsyncIterator[ImageGenClient]:
    async with services.client() as c:
        yield c


async def test_list_models_gives_each_model_its_capabilities_and_price_in_credits(client: ImageGenClient) -> None:
    models = {m.id: m for m in await client.list_models()}

    assert {"local", "gemini-2.5-flash-image", "gemini-3-pro-image-preview", "gemini-3.1-flash-image-preview"} <= set(
        models
    )
    pro = models["gemini-3-pro-image-preview"]
    assert (pro.price_per_image, list(pro.image_sizes), pro.max_input_images, pro.thinking) == (
        7,
        ["1K", "2K", "4K"],
        14,
        True,
    )
    assert "21:9" in pro.aspect_ratios and pro.display_name.startswith("Gemini 3 Pro Image")
    flash = models["gemini-2.5-flash-image"]
    assert (flash.price_per_image, flash.max_input_images, list(flash.person_generation_options)) == (2, 3, [])
    assert "1:8" in models["gemini-3.1-flash-image-preview"].aspect_ratios
    assert "seed" in models["local"].parameters


async def test_person_generation_on_a_model_without_it_is_refused_naming_model_and_field(
    client: ImageGenClient,
) -> None:
    failure = await failure_of(
        client.create_job("a cat", model="gemini-2.5-flash-image", person_generation="dont_allow", sample_count=1)
    )
    assert (failure.code, failure.reason) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
    assert failure.violations == {"params.person_generation": "gemini-2.5-flash-image does not take person_generation"}


@pytest.mark.parametrize(
    ("model", "params", "field"),
    [
        ("gemini-2.5-flash-image", pb.GenerationParams(seed=3, add_watermark=False), "params.seed"),
        ("gemini-3-pro-image-preview", pb.GenerationParams(safety_setting="block_only_high"), "params.safety_setting"),
        ("gemini-2.5-flash-image", pb.GenerationParams(image_size="4K"), "params.image_size"),
        ("local", pb.GenerationParams(seed=3), "params.seed"),  # the watermark rule
        ("local", pb.GenerationParams(jpeg_quality=80), "params.jpeg_quality"),  # PNG has no quality
    ],
)
async def test_what_a_model_cannot_do_is_refused_at_create_job(
    client: ImageGenClient, model: str, params: pb.GenerationParams, field: str
) -> None:
    failure = await failure_of(client.create_job("a cat", model=model, sample_count=1, params=params))
    assert failure.code == "INVALID_ARGUMENT"
    assert field in failure.violations


async def test_a_4k_21_9_job_on_a_thinking_model_delivers_the_final_image_at_4k(
    client: ImageGenClient, gemini_api: FakeGeminiImage
) -> None:
    gemini_api.thoughts = 1
    try:
        job = await client.create_job(
            "a harbour at night",
            model="gemini-3-pro-image-preview",
            sample_count=1,
            aspect_ratio="21:9",
            image_size="4K",
        )
        done = await client.wait(job.id, timeout=60)
    finally:
        gemini_api.thoughts = 0

    assert done.state == pb.JOB_STATE_COMPLETED, done.error
    (image,) = done.images
    assert (image.width, image.height) == gemini_image_size("21:9", "4K")
    sent = gemini_api.requests[-1].json()["generationConfig"]["imageConfig"]
    assert sent == {"aspectRatio": "21:9", "imageSize": "4K"}
    assert done.credits_charged == 7  # one image, the final one; the draft is not charged
    stored = image_bytes(image.width, image.height, "image/png")
    assert image.size_bytes == len(stored) != len(image_bytes(image.width, image.height, "image/png", DRAFT_COLOUR))


async def test_a_job_on_a_gemini_api_model_sends_no_person_generation(
    client: ImageGenClient, gemini_api: FakeGeminiImage
) -> None:
    job = await client.create_job("a cat", model="gemini-2.5-flash-image", sample_count=1, aspect_ratio="4:5")
    assert job.params.person_generation == ""
    done = await client.wait(job.id, timeout=30)
    assert done.state == pb.JOB_STATE_COMPLETED, done.error
    assert "personGeneration" not in gemini_api.requests[-1].json()["generationConfig"]["imageConfig"]


async def test_optional_params_are_stored_and_shown(client: ImageGenClient) -> None:
    params = pb.GenerationParams(
        seed=42, add_watermark=False, output_mime_type="image/jpeg", jpeg_quality=70, language="en"
    )
    job = await client.create_job("a cat", model="local", sample_count=1, params=params)
    done = await client.wait(job.id, timeout=30)
    assert done.state == pb.JOB_STATE_COMPLETED, done.error
    shown = (await client.get_job(job.id)).params
    assert (shown.seed, shown.HasField("add_watermark"), shown.add_watermark, shown.jpeg_quality, shown.language) == (
        42,
        True,
        False,
        70,
        "en",
    )


def png(colour: tuple[int, int, int], size: tuple[int, int] = (200, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def red_pixels(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        colours: list[tuple[int, Any]] = image.convert("RGB").getcolors(1 << 24) or []
    return sum(n for n, rgb in colours if rgb[0] > 240 and rgb[1] < 15 and rgb[2] < 15)


async def download(url: str) -> bytes:
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
        response.raise_for_status()
        return response.content


async def test_an_edit_round_trip_with_the_local_provider(client: ImageGenClient) -> None:
    first = await client.wait((await client.create_job("a blue door", model="local", sample_count=2)).id, timeout=30)
    assert first.state == pb.JOB_STATE_COMPLETED, first.error

    red = png((255, 0, 0))
    edit = await client.create_job(
        "paint it red", model="local", sample_count=1, input_images=[job_image(first.id, 1), inline_image(red)]
    )
    done = await client.wait(edit.id, timeout=30)
    assert done.state == pb.JOB_STATE_COMPLETED, done.error

    shown = await client.get_job(edit.id)
    assert (shown.parent_job_id, shown.parent_image_index) == (first.id, 1)
    source, inline = shown.input_images
    assert (source.index, source.job_image.job_id, source.job_image.index) == (0, first.id, 1)
    assert (source.width, source.height, source.mime_type) == (
        first.images[1].width,
        first.images[1].height,
        "image/png",
    )
    assert (inline.index, inline.mime_type, inline.width, inline.sha256) == (
        1,
        "image/png",
        200,
        hashlib.sha256(red).hexdigest(),
    )
    # The local provider draws its inputs: the red one shows in the new image.
    assert red_pixels(await download(done.images[0].url)) > 100 * 100


async def test_inputs_reach_gemini_as_inline_parts_in_order(
    client: ImageGenClient, gemini_api: FakeGeminiImage
) -> None:
    source = await client.wait((await client.create_job("a door", model="local", sample_count=1)).id, timeout=30)
    stored = await download(source.images[0].url)
    green = png((0, 255, 0), (64, 32))
    job = await client.create_job(
        "combine them",
        model="gemini-3-pro-image-preview",
        sample_count=1,
        input_images=[inline_image(green), job_image(source.id, 0)],
    )
    done = await client.wait(job.id, timeout=30)
    assert done.state == pb.JOB_STATE_COMPLETED, done.error
    parts = gemini_api.requests[-1].json()["contents"][0]["parts"]
    assert parts[0] == {"text": "combine them"}
    assert [base64.b64decode(p["inlineData"]["data"]) for p in parts[1:]] == [green, stored]


@pytest.mark.parametrize(
    ("model", "inputs", "field", "description"),
    [
        ("local", [b"not an image at all"], "input_images[0].data", "must be a PNG, JPEG or WebP image"),
        ("local", [png_declaring(6_000, 6_000)], "input_images[0].data", "6000x6000 is more than 25000000 pixels"),
        ("local", [png_declaring(30_000, 30_000)], "input_images[0].data", "more than 25000000 pixels"),
        ("imagen-4.0-generate-001", [b"x"], "model", ""),  # not served here: the model is what is wrong
        ("gemini-2.5-flash-image", [png((1, 2, 3))] * 4, "input_images", "gemini-2.5-flash-image takes at most 3"),
    ],
)
async def test_bad_input_images_are_refused_by_field(
    client: ImageGenClient, model: str, inputs: list[bytes], field: str, description: str
) -> None:
    images = [inline_image(data) for data in inputs]
    failure = await failure_of(client.create_job("edit", model=model, sample_count=1, input_images=images))
    assert failure.code == "INVALID_ARGUMENT"
    assert field in failure.violations and description in failure.violations[field]


async def test_another_users_image_cannot_be_used(services: Services, client: ImageGenClient) -> None:
    async with services.client() as stranger:
        theirs = await stranger.wait((await stranger.create_job("mine", model="local", sample_count=1)).id, timeout=30)
    failure = await failure_of(
        client.create_job("steal", model="local", sample_count=1, input_images=[job_image(theirs.id, 0)])
    )
    assert failure.violations == {"input_images[0].job_image": f"no job {theirs.id} of yours"}


async def test_a_request_over_the_message_limit_is_refused_clearly(client: ImageGenClient) -> None:
    too_big = inline_image(os.urandom(9 * 1024 * 1024))  # the module's JobService takes 8 MB messages
    failure = await failure_of(client.create_job("big", model="local", sample_count=1, input_images=[too_big]))
    assert failure.code == "RESOURCE_EXHAUSTED"
