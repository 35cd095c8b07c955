"""What a provider's image bytes must be before they are stored: decodable for real, within the pixel bound.

Through the whole GeneratorService (gRPC server, provider, local storage) against the fake Google APIs: an image
that cannot be used ends the attempt as a non-retryable error (another attempt is another paid call that would
get the same), after exactly one provider call and with nothing stored; an image of a size other than the
table's is a good image, stored with its real size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc

from imagegen_common.errors import ErrorKind, ServiceError
from imagegen_common.grpc_errors import from_grpc_error
from tests.generator import helpers
from tests.generator.fake_google import (
    FakeGeminiImage,
    FakeGeminiImagen,
    Fault,
    flat_png,
    gemini_answer,
    image_bytes,
    imagen_answer,
    png_declaring,
)
from tests.generator.helpers import gemini_settings, running

IMAGEN = "gemini-api/imagen-4.0-fast-generate-001"  # `:predict`, shared with vertex-imagen
GEMINI = "gemini-2.5-flash-image"  # `:generateContent`

GOOD_PNG = image_bytes(1024, 1024, "image/png")
BAD_IMAGES = {
    # (bytes, the reason the attempt ends with)
    "decompression-bomb": (png_declaring(20_000, 20_000), "PROVIDER_IMAGE_TOO_LARGE"),
    "90-megapixels": (flat_png(9_500, 9_500), "PROVIDER_IMAGE_TOO_LARGE"),
    # Above GEN_MAX_IMAGE_PIXELS (40 MP) but below Pillow's own bomb limit: only our bound refuses it.
    "50-megapixels": (flat_png(7_100, 7_100), "PROVIDER_IMAGE_TOO_LARGE"),
    "truncated-png": (flat_png(1024, 1024, rows=500), "PROVIDER_IMAGE_INVALID"),
    "png-cut-in-transfer": (GOOD_PNG[: len(GOOD_PNG) * 2 // 3], "PROVIDER_IMAGE_INVALID"),
    "png-with-one-byte-changed": (
        GOOD_PNG[:300] + bytes([GOOD_PNG[300] ^ 1]) + GOOD_PNG[301:],
        "PROVIDER_IMAGE_INVALID",
    ),
    "not-an-image": (b"<html><body>Service temporarily unavailable</body></html>", "PROVIDER_IMAGE_INVALID"),
}


def generate_request(**overrides: Any) -> pb.GenerateRequest:
    return helpers.generate_request(**{"sample_count": 1, "aspect_ratio": "1:1", **overrides})


async def generate(stub: pb_grpc.GeneratorServiceAsyncStub, **overrides: Any) -> list[pb.GenerateResponse]:
    return [event async for event in stub.Generate(generate_request(**overrides))]


def stored_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "storage").rglob("*") if p.is_file())


async def attempt_error(
    tmp_path: Path, api: FakeGeminiImagen | FakeGeminiImage, model: str, fault: Fault
) -> ServiceError:
    api.faults.append(fault)
    async with running(gemini_settings(tmp_path, api)) as (_app, stub):  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(stub, model=model)
    return from_grpc_error(caught.value)


@pytest.mark.parametrize("case", list(BAD_IMAGES))
async def test_an_unusable_imagen_image_ends_the_attempt_for_good_after_one_call(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen, case: str
) -> None:
    data, reason = BAD_IMAGES[case]
    error = await attempt_error(tmp_path, gemini_imagen_api, IMAGEN, imagen_answer(data))

    assert (error.kind, error.reason, error.metadata.get("retryable")) == (
        ErrorKind.FAILED_PRECONDITION,
        reason,
        "false",
    )
    assert len(gemini_imagen_api.requests) == 1
    assert stored_files(tmp_path) == []


@pytest.mark.parametrize("case", list(BAD_IMAGES))
async def test_an_unusable_gemini_image_ends_the_attempt_for_good_after_one_call(
    tmp_path: Path, gemini_image_api: FakeGeminiImage, case: str
) -> None:
    data, reason = BAD_IMAGES[case]
    error = await attempt_error(tmp_path, gemini_image_api, GEMINI, gemini_answer(data))

    assert (error.kind, error.reason, error.metadata.get("retryable")) == (
        ErrorKind.FAILED_PRECONDITION,
        reason,
        "false",
    )
    assert len(gemini_image_api.requests) == 1
    assert stored_files(tmp_path) == []


async def test_a_smaller_pixel_bound_refuses_what_the_default_accepts(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen
) -> None:
    gemini_imagen_api.faults.append(imagen_answer(image_bytes(1024, 1024, "image/png")))
    settings = gemini_settings(tmp_path, gemini_imagen_api, max_image_pixels=1000 * 1000)
    async with running(settings) as (_app, stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(stub, model=IMAGEN)
    error = from_grpc_error(caught.value)
    assert (error.reason, error.metadata.get("retryable")) == ("PROVIDER_IMAGE_TOO_LARGE", "false")
    assert "1024x1024" in error.message and "GEN_MAX_IMAGE_PIXELS" in error.message


@pytest.mark.parametrize(
    ("model", "answer"), [(IMAGEN, imagen_answer), (GEMINI, gemini_answer)], ids=["imagen", "gemini"]
)
async def test_an_image_of_an_unexpected_size_is_stored_with_its_real_size(
    tmp_path: Path,
    gemini_imagen_api: FakeGeminiImagen,
    gemini_image_api: FakeGeminiImage,
    model: str,
    answer: Any,
) -> None:
    api = gemini_imagen_api if model == IMAGEN else gemini_image_api
    png = image_bytes(1000, 700, "image/png")  # asked for 1:1 (1024x1024)
    api.faults.append(answer(png))
    async with running(gemini_settings(tmp_path, api)) as (_app, stub):  # type: ignore[arg-type]
        events = await generate(stub, model=model)

    (stored,) = [e.image_stored for e in events if e.HasField("image_stored")]
    assert (stored.width, stored.height, stored.size_bytes) == (1000, 700, len(png))
    assert events[-1].completed.delivered_count == 1
    assert [p.read_bytes() for p in stored_files(tmp_path)] == [png]
    assert len(api.requests) == 1
