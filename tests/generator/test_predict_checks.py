"""How the images of one `:predict` answer are checked: two at a time, yielded in the provider's order.

Checking a 1K PNG costs milliseconds of CPU in a worker thread; an answer carries up to 4 images, and zlib and
Pillow release the GIL, so two checks run at once on the 2 cores. What a user sees must not change: images and
filtered items in the provider's order, and a broken prediction fails the answer only after every item before it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from generator_service.domain import FilteredImage, GeneratedImage
from generator_service.providers import predict
from generator_service.providers.images import CheckedImage, check_image
from imagegen_common.errors import ServiceError
from tests.generator.fake_google import b64, image_bytes

LARGE = image_bytes(1024, 1024, "image/png")  # checked in a worker thread
TINY = image_bytes(8, 8, "image/png")  # checked inline, at once


def body(*predictions: object) -> bytes:
    return json.dumps({"predictions": list(predictions)}).encode()


def image(data: bytes) -> dict[str, str]:
    return {"mimeType": "image/png", "bytesBase64Encoded": b64(data)}


async def test_two_images_of_one_answer_are_checked_at_the_same_time(monkeypatch: pytest.MonkeyPatch) -> None:
    both_checking = threading.Barrier(2, timeout=5)

    def check_together(data: bytes, declared_mime: str | None, max_pixels: int) -> CheckedImage:
        both_checking.wait()  # one at a time, the first check would wait here alone and fail
        return check_image(data, declared_mime, max_pixels)

    monkeypatch.setattr(predict, "check_image", check_together)
    items = [item async for item in predict.images_from_response(body(image(LARGE), image(LARGE)), "test")]
    assert [(type(item), item.index) for item in items] == [(GeneratedImage, 0), (GeneratedImage, 1)]


async def test_items_come_in_the_providers_order_and_a_broken_prediction_after_them() -> None:
    answer = body(image(LARGE), image(TINY), {"raiFilteredReason": "filtered"}, image(TINY), "not an object")
    stream = predict.images_from_response(answer, "test")
    items: list[Any] = []
    with pytest.raises(ServiceError, match="prediction 4 is not an object"):
        async for item in stream:
            items.append(item)
    assert [(type(item), item.index) for item in items] == [
        (GeneratedImage, 0),
        (GeneratedImage, 1),
        (FilteredImage, 2),
        (GeneratedImage, 3),
    ]
    assert [item.width for item in items if isinstance(item, GeneratedImage)] == [1024, 8, 8]


async def test_closing_the_stream_early_starts_no_further_check(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []

    def counted(data: bytes, declared_mime: str | None, max_pixels: int) -> CheckedImage:
        started.append(len(data))
        return check_image(data, declared_mime, max_pixels)

    monkeypatch.setattr(predict, "check_image", counted)
    stream = predict.images_from_response(body(*[image(LARGE)] * 4), "test")
    first = await anext(stream)
    await stream.aclose()
    assert isinstance(first, GeneratedImage) and first.index == 0
    assert len(started) <= predict.CHECKS_AT_ONCE  # the first, and the one started beside it: no more
