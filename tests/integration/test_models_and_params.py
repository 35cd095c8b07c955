"""JobService and the model catalogue, end to end: ListModels with prices, CreateJob validating each parameter
against the model's declaration, and jobs on the Gemini image models against a fake Gemini API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from imagegen.job.v1 import job_service_pb2 as pb

from imagegen_client.client import ImageGenClient
from tests.generator.fake_google import DRAFT_COLOUR, FakeGeminiImage, gemini_image_size, image_bytes
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
    job = {"model_prices": {"gemini-3-pro-image-preview": 7}, "default_price_per_image": 2}
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


async def test_input_images_are_refused_until_jobservice_stores_them(client: ImageGenClient) -> None:
    request = pb.CreateJobRequest(prompt="make it night", model="local", input_images=[pb.InputImage(data=b"png")])
    failure = await failure_of(client._stub.CreateJob(request, metadata=client._metadata()))
    assert failure.code == "INVALID_ARGUMENT" and "input_images" in failure.violations
