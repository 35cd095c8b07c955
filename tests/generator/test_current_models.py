"""The models Google's official model list names today (docs/generator.md has the sources, checked 2026-12-07):
Gemini 3.1 Flash-Lite Image ("Nano Banana 2 Lite") on both APIs, the Vertex Imagen entries marked as discontinued,
and the local provider offering every size the catalogue knows, so an app can try a 512 request offline."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from imagegen.generator.v1 import generator_service_pb2 as pb
from PIL import Image

from generator_service.config import _default_models
from generator_service.domain import GeneratedImage
from generator_service.generation import validate
from generator_service.providers.gemini_image import GeminiImageProvider, VertexGeminiImageProvider
from generator_service.providers.google_auth import StaticTokenSource
from generator_service.providers.local import LocalProvider
from generator_service.providers.vertex_imagen import vertex_models_url
from generator_service.served_models import served_models
from imagegen_common.errors import ServiceError
from tests.generator.fake_google import FakeGeminiImage, FakeVertexGeminiImage, gemini_image_size
from tests.generator.helpers import collect, make_request, provider_http, running, settings_for

CATALOGUE = {m.id: m for m in _default_models()}
LITE = "gemini-3.1-flash-lite-image"


def refused_fields(model_id: str, **overrides: object) -> set[str]:
    try:
        validate(make_request(model=model_id, **overrides), CATALOGUE[model_id])
    except ServiceError as error:
        return {v.field for v in error.violations}
    return set()


def test_nano_banana_2_lite_is_catalogued_on_both_apis_at_1k_only() -> None:
    for model_id in (LITE, f"vertex/{LITE}"):
        lite = CATALOGUE[model_id]
        assert lite.api_model == LITE
        assert (lite.image_sizes, lite.max_input_images, lite.thinking) == (["1K"], 14, True)
        assert {"1:8", "8:1", "21:9"} <= set(lite.aspect_ratios)
        assert refused_fields(model_id, sample_count=1, image_size="2K") == {"image_size"}
        assert refused_fields(model_id, sample_count=1, image_size="512") == {"image_size"}
    # Only Vertex AI takes personGeneration; and Vertex serves the model at `global` only.
    assert refused_fields(LITE, sample_count=1, person_generation="dont_allow") == {"person_generation"}
    assert refused_fields(f"vertex/{LITE}", sample_count=1, person_generation="dont_allow") == set()
    providers = {"gemini-image": object(), "vertex-gemini-image": object()}
    assert LITE in served_models(_default_models(), providers, "us-central1")
    assert f"vertex/{LITE}" not in served_models(_default_models(), providers, "us-central1")
    assert f"vertex/{LITE}" in served_models(_default_models(), providers, "global")


async def test_nano_banana_2_lite_is_called_by_its_google_id_without_an_image_size(
    gemini_image_api: FakeGeminiImage, vertex_gemini_image_api: FakeVertexGeminiImage
) -> None:
    gemini = GeminiImageProvider(provider_http("gemini-image"), "test-api-key", base_url=gemini_image_api.url)
    vertex = VertexGeminiImageProvider(
        provider_http("vertex-gemini-image"),
        StaticTokenSource("test-access-token"),
        models_url=vertex_models_url("proj-1", "global", vertex_gemini_image_api.url),
    )
    gemini_image_api.thoughts = vertex_gemini_image_api.thoughts = 1
    try:
        on_gemini = await collect(gemini, make_request(model=LITE, sample_count=1, aspect_ratio="8:1"), CATALOGUE[LITE])
        vertex_model = CATALOGUE[f"vertex/{LITE}"]
        on_vertex = await collect(vertex, make_request(model=vertex_model.id, sample_count=1), vertex_model)
    finally:
        await gemini.aclose()
        await vertex.aclose()

    (sent,) = gemini_image_api.requests
    assert sent.path == f"/v1beta/models/{LITE}:generateContent"
    # One size only: no imageSize on the wire (the model's default, 1K), as for every single-size model.
    assert sent.json()["generationConfig"]["imageConfig"] == {"aspectRatio": "8:1"}
    (vertex_sent,) = vertex_gemini_image_api.requests
    assert vertex_sent.path == f"/v1/projects/proj-1/locations/global/publishers/google/models/{LITE}:generateContent"
    # It thinks: the draft is skipped and one final image comes back from each API.
    assert [(i.width, i.height) for i in on_gemini if isinstance(i, GeneratedImage)] == [gemini_image_size("8:1", None)]
    assert [(i.width, i.height) for i in on_vertex if isinstance(i, GeneratedImage)] == [gemini_image_size("1:1", None)]


def test_the_vertex_imagen_entries_stay_and_say_google_discontinued_them() -> None:
    for model_id in ("imagen-4.0-generate-001", "imagen-4.0-ultra-generate-001", "imagen-4.0-fast-generate-001"):
        imagen = CATALOGUE[model_id]
        assert imagen.provider == "vertex-imagen"
        assert "discontinued 2026-06-30" in imagen.display_name
        assert refused_fields(model_id, sample_count=1) == set()  # stored jobs and templates still validate


def test_the_local_provider_offers_every_size_the_catalogue_knows() -> None:
    known = {size for m in CATALOGUE.values() for size in m.image_sizes}
    assert "512" in known
    assert set(CATALOGUE["local"].image_sizes) == known


@pytest.mark.parametrize(("ratio", "size"), [("1:1", (512, 512)), ("16:9", (688, 384)), ("8:1", (1456, 176))])
async def test_a_512_request_renders_offline_at_512(ratio: str, size: tuple[int, int]) -> None:
    local = CATALOGUE["local"]
    request = make_request(model="local", sample_count=1, aspect_ratio=ratio, image_size="512")
    validate(request, local)

    (image,) = await collect(LocalProvider(), request, local)

    assert isinstance(image, GeneratedImage) and (image.width, image.height) == size
    with Image.open(io.BytesIO(image.data)) as decoded:
        assert decoded.size == size


async def test_list_models_offers_512_on_local_and_lists_nano_banana_2_lite(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, gemini_api_key="test-api-key", vertex_project="proj-1", vertex_location="global")
    async with running(settings) as (_app, stub):
        reply = await stub.ListModels(pb.ListModelsRequest())
    models = {m.id: m for m in reply.models}
    assert list(models["local"].image_sizes) == ["512", "1K", "2K", "4K"]
    assert list(models[LITE].image_sizes) == list(models[f"vertex/{LITE}"].image_sizes) == ["1K"]
    assert "discontinued" in models["imagen-4.0-generate-001"].display_name
