"""Imagen's `:predict` wire format, shared by Vertex AI and the Gemini API (they speak the same body).

Request:  {"instances": [{"prompt"}], "parameters": {"sampleCount", "aspectRatio", "sampleImageSize" (models
           with several sizes), "personGeneration", "includeRaiReason": true, "outputOptions": {"mimeType",
           "compressionQuality" (JPEG only)}, and when set: "seed", "addWatermark", "enhancePrompt",
           "negativePrompt", "safetySetting", "language"}}
Response: {"predictions": [{"bytesBase64Encoded", "mimeType"} | {"raiFilteredReason"}, ...]}
See /work/shared/reference/external-apis.md §2 for the sources.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any

from generator_service.blocking import run_sized
from generator_service.config import ModelSpec
from generator_service.domain import FilteredImage, GeneratedImage, GenerationRequest, generation_error
from generator_service.providers.errors import bad_image, bad_response, error_for_failure
from generator_service.providers.http import HttpFailure, ProviderHttp, RequestAuth
from generator_service.providers.images import (
    DEFAULT_MAX_PIXELS,
    BadImage,
    CheckedImage,
    check_image,
    decode_base64,
    run_decoding,
)
from imagegen_common.errors import ErrorKind, ServiceError

# How Imagen words a prompt refused before generation (HTTP 400), e.g. "The prompt could not be submitted.
# This prompt contains sensitive words that violate Google's Responsible AI practices."
_BLOCKED_PROMPT_MARKERS = ("could not be submitted", "sensitive words", "responsible ai")
# Images of one answer checked at once, each in a worker thread: zlib and Pillow release the GIL, so on 2 cores
# a 4-image answer of 1K PNGs is parsed and checked in 19 ms instead of 33 (one at a time); 4 at once was no faster
# there, and would hold more images in memory.
CHECKS_AT_ONCE = 2


def request_body(request: GenerationRequest, jpeg_quality: int, model: ModelSpec) -> dict[str, Any]:
    """The `:predict` body; optional parameters only when set (generation.validate let through only those the
    model honours)."""
    output_options: dict[str, Any] = {"mimeType": request.output_mime_type}
    if request.output_mime_type == "image/jpeg":
        output_options["compressionQuality"] = request.jpeg_quality or jpeg_quality
    parameters: dict[str, Any] = {
        "sampleCount": request.sample_count,
        "aspectRatio": request.aspect_ratio,
        # Imagen's own default, sent as before for a request that does not choose.
        "personGeneration": request.person_generation or "allow_adult",
        # Without it a filtered image silently vanishes (or `predictions` is absent); with it we learn why.
        "includeRaiReason": True,
        "outputOptions": output_options,
    }
    # Every size of a model that has several (1K included: it asked for it); never to a model with one size
    # (Imagen 4 Fast refuses the field).
    if model.sends_size:
        parameters["sampleImageSize"] = request.image_size
    if request.seed is not None:
        parameters["seed"] = request.seed
    if request.add_watermark is not None:
        parameters["addWatermark"] = request.add_watermark
    if request.enhance_prompt is not None:
        parameters["enhancePrompt"] = request.enhance_prompt
    if request.negative_prompt:
        parameters["negativePrompt"] = request.negative_prompt
    if request.safety_setting:
        parameters["safetySetting"] = request.safety_setting
    if request.language:
        parameters["language"] = request.language
    return {"instances": [{"prompt": request.prompt}], "parameters": parameters}


def error_for(failure: HttpFailure, provider: str, model: str) -> ServiceError:
    if failure.status == 400 and any(m in failure.message.lower() for m in _BLOCKED_PROMPT_MARKERS):
        return generation_error(
            ErrorKind.INVALID_ARGUMENT,
            "PROMPT_BLOCKED",
            f"the prompt was blocked by {provider}: {failure.message}",
            retryable=False,
        )
    return error_for_failure(failure, provider, model)


def _parse(content: bytes) -> Any:
    return json.loads(content)


async def images_from_response(
    content: bytes, provider: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> AsyncGenerator[GeneratedImage | FilteredImage, None]:
    """Yields each prediction in the provider's order, as soon as it and those before it are checked
    (CHECKS_AT_ONCE images at a time).

    An image keeps the size it has: one that differs from the size table (domain.image_dimensions) is still a
    good image the provider charged for, and the event reports its real size.

    The caller passes the body straight in and keeps no reference: a 4 x 2K answer is tens of MB of
    base64, so each prediction is popped off the parsed list and dropped once its image is yielded.
    """
    try:
        document = await run_sized(len(content), _parse, content)
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise bad_response(provider, f"the body is not JSON ({exc})") from None
    del content
    if not isinstance(document, dict):
        raise bad_response(provider, "the body is not a JSON object")
    predictions = document.pop("predictions", None)
    if not predictions:
        # FAILED_PRECONDITION, not UNAVAILABLE: generic gRPC clients retry UNAVAILABLE, and this is not transient.
        raise generation_error(
            ErrorKind.FAILED_PRECONDITION,
            "NO_IMAGES",
            f"{provider} returned no predictions (no images and no filter reason)",
            retryable=False,
        )
    if not isinstance(predictions, list):
        raise bad_response(provider, "`predictions` is not a list")

    # In the provider's order: each image's check starts as soon as fewer than CHECKS_AT_ONCE are running, and
    # each item (or the answer's fault) is yielded (raised) once every item before it has been.
    ahead: deque[tuple[int, FilteredImage | ServiceError | asyncio.Task[CheckedImage]]] = deque()
    try:
        index = 0
        while predictions or ahead:
            while predictions and sum(isinstance(item, asyncio.Task) for _, item in ahead) < CHECKS_AT_ONCE:
                prediction = predictions.pop(0)
                if _is_prompt_scores(prediction):
                    continue  # the prompt's own safety scores (includeSafetyAttributes), not an image
                ahead.append((index, _start(prediction, index, provider, max_pixels)))
                if isinstance(ahead[-1][1], ServiceError):
                    predictions.clear()  # the answer is broken: nothing after it is read
                del prediction
                index += 1
            if not ahead:
                continue
            position, item = ahead.popleft()
            if isinstance(item, FilteredImage):
                yield item
                continue
            if isinstance(item, ServiceError):
                raise item
            try:
                checked = await item
            except BadImage as exc:
                raise bad_image(provider, f"prediction {position}", exc) from None
            del item
            yield GeneratedImage(position, checked.data, checked.mime_type, checked.width, checked.height)
            del checked
    finally:
        # An answer that fails or a stream that closes leaves no check running behind it.
        checks = [item for _, item in ahead if isinstance(item, asyncio.Task)]
        for check in checks:
            check.cancel()
        await asyncio.gather(*checks, return_exceptions=True)


def _is_prompt_scores(prediction: object) -> bool:
    return isinstance(prediction, dict) and prediction.get("contentType") == "Positive Prompt"


def _start(
    prediction: object, index: int, provider: str, max_pixels: int
) -> FilteredImage | ServiceError | asyncio.Task[CheckedImage]:
    """The filtered image, the fault of a malformed prediction, or its image's check, started."""
    if not isinstance(prediction, dict):
        return bad_response(provider, f"prediction {index} is not an object")
    encoded = prediction.pop("bytesBase64Encoded", None)
    if encoded is None:
        reason = prediction.get("raiFilteredReason")
        if not reason:
            return bad_response(provider, f"prediction {index} has neither image bytes nor a filter reason")
        return FilteredImage(index, str(reason))
    return asyncio.create_task(_checked(encoded, prediction.get("mimeType"), max_pixels))


async def _checked(encoded: object, declared_mime: str | None, max_pixels: int) -> CheckedImage:
    """One prediction's image: base64 decoded, then checked (both off the event loop when large)."""
    data = await run_sized(len(encoded) if isinstance(encoded, str) else 0, decode_base64, encoded)
    del encoded
    return await run_decoding(data, check_image, data, declared_mime, max_pixels)


async def generate(
    http: ProviderHttp,
    url: str,
    auth: RequestAuth,
    request: GenerationRequest,
    model: ModelSpec,
    *,
    provider: str,
    jpeg_quality: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_failure: Callable[[HttpFailure], ServiceError] | None = None,
) -> AsyncGenerator[GeneratedImage | FilteredImage, None]:
    """One `:predict` call, yielding each image as it is decoded; `on_failure` maps HTTP failures first."""
    body = request_body(request, jpeg_quality, model)
    try:
        # The body goes straight to the parser, which drops it once parsed; no reference stays here.
        images = images_from_response(await http.post_json(model, url, body, auth), provider, max_pixels)
    except HttpFailure as failure:
        raise (on_failure(failure) if on_failure else error_for(failure, provider, model.id)) from None
    # Closing this generator closes the parser too (and frees the predictions it still holds).
    async with contextlib.aclosing(images):
        async for item in images:
            yield item
