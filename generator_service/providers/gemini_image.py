"""Gemini's native image models through `:generateContent` (e.g. gemini-2.5-flash-image).

One call makes one image, so `sample_count` N runs N calls concurrently and yields each image as its
call completes. These models have no sampleCount, personGeneration or output-type parameters: the
person-generation option is not sent, and an answer in another format than the one requested is
re-encoded here. The image keeps the size the model chose for the aspect ratio (Gemini's sizes differ
from Imagen's, e.g. 1344x768 for 16:9), and the event reports that real size.

A call that produces no image counts as a filtered image with the reason, so it is neither stored nor
charged: a prompt blocked up front (`promptFeedback.blockReason`), an answer stopped by a safety
finishReason, or an answer with text only (the model declined, in words).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

from generator_service.blocking import run_sized
from generator_service.config import ModelSpec
from generator_service.domain import FilteredImage, GeneratedImage, GenerationRequest
from generator_service.providers.errors import bad_image, bad_response, error_for_failure
from generator_service.providers.http import ApiKeyAuth, HttpFailure, ProviderHttp
from generator_service.providers.images import (
    DEFAULT_MAX_PIXELS,
    BadImage,
    CheckedImage,
    check_image,
    convert,
    decode_base64,
    run_decoding,
)

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
SAFETY_FINISH_REASONS = frozenset(
    {
        "SAFETY",
        "IMAGE_SAFETY",
        "PROHIBITED_CONTENT",
        "IMAGE_PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
        "RECITATION",
        "IMAGE_RECITATION",
    }
)
_MAX_TEXT_CHARS = 300


def request_body(request: GenerationRequest) -> dict[str, Any]:
    image_config: dict[str, Any] = {"aspectRatio": request.aspect_ratio}
    if request.image_size == "2K":  # only models whose spec lists 2K get here (generation.validate)
        image_config["imageSize"] = "2K"
    return {
        "contents": [{"parts": [{"text": request.prompt}]}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": image_config},
    }


def _refusal(document: dict[str, Any], index: int) -> FilteredImage | None:
    feedback = document.get("promptFeedback") or {}
    if isinstance(feedback, dict) and feedback.get("blockReason"):
        said = feedback.get("blockReasonMessage")
        return FilteredImage(index, f"prompt blocked ({feedback['blockReason']})" + (f": {said}" if said else ""))
    candidates = document.get("candidates")
    if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
        return None
    first = candidates[0]
    finish = str(first.get("finishReason") or "unknown")
    said = str(first.get("finishMessage") or "")
    if finish in SAFETY_FINISH_REASONS:
        return FilteredImage(index, f"blocked by safety filters ({finish})" + (f": {said}" if said else ""))
    content = first.get("content") or {}
    parts = content.get("parts") if isinstance(content, dict) else None
    text = " ".join(str(p["text"]) for p in parts or [] if isinstance(p, dict) and p.get("text")).strip()
    detail = said or text
    return FilteredImage(
        index, f"no image in the answer ({finish})" + (f": {detail[:_MAX_TEXT_CHARS]}" if detail else "")
    )


def _inline_image(document: dict[str, Any]) -> dict[str, Any] | None:
    for candidate in document.get("candidates") or []:
        content = candidate.get("content") if isinstance(candidate, dict) else None
        for part in (content or {}).get("parts") or []:
            inline = part.get("inlineData") if isinstance(part, dict) else None
            if isinstance(inline, dict) and inline.get("data"):
                return inline
    return None


def read_answer(content: bytes, index: int, provider: str) -> dict[str, Any] | FilteredImage:
    """Parses one :generateContent answer into its image part (`inlineData`) or the refusal.

    Blocking (JSON of a few MB): call it through blocking.run_sized.
    """
    try:
        document = json.loads(content)
    except ValueError as exc:
        raise bad_response(provider, f"the body is not JSON ({exc})") from None
    del content
    if not isinstance(document, dict):
        raise bad_response(provider, "the body is not a JSON object")
    inline = _inline_image(document)
    if inline is None:
        refusal = _refusal(document, index)
        if refusal is None:
            raise bad_response(provider, "the answer has no candidates and no prompt feedback")
        return refusal
    return inline


def check_and_convert(
    data: bytes, declared_mime: str | None, max_pixels: int, mime_type: str, jpeg_quality: int
) -> CheckedImage:
    """The image checked (decoded in full, within `max_pixels`), then in `mime_type`. Blocking: see run_decoding."""
    return convert(check_image(data, declared_mime, max_pixels), mime_type, jpeg_quality)


class GeminiImageProvider:
    name = "gemini-image"

    def __init__(
        self,
        http: ProviderHttp,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        jpeg_quality: int = 90,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self._http = http
        self._auth = ApiKeyAuth(api_key)
        self._base = base_url.rstrip("/")
        self._jpeg_quality = jpeg_quality
        self._max_image_pixels = max_image_pixels

    def generate_url(self, model: ModelSpec) -> str:
        return f"{self._base}/v1beta/models/{model.api_model}:generateContent"

    async def _one(self, request: GenerationRequest, model: ModelSpec, index: int) -> GeneratedImage | FilteredImage:
        try:
            content = await self._http.post_json(model, self.generate_url(model), request_body(request), self._auth)
        except HttpFailure as failure:
            raise error_for_failure(failure, self.name, model.id) from None
        answer = await run_sized(len(content), read_answer, content, index, self.name)
        del content
        if isinstance(answer, FilteredImage):
            return answer
        try:
            encoded = answer.pop("data")
            data = await run_sized(len(encoded) if isinstance(encoded, str) else 0, decode_base64, encoded)
            del encoded
            checked = await run_decoding(
                data,
                check_and_convert,
                data,
                answer.get("mimeType"),
                self._max_image_pixels,
                request.output_mime_type,
                self._jpeg_quality,
            )
        except BadImage as exc:
            raise bad_image(self.name, f"image {index}", exc) from None
        return GeneratedImage(index, checked.data, checked.mime_type, checked.width, checked.height)

    async def generate(
        self, request: GenerationRequest, model: ModelSpec
    ) -> AsyncGenerator[GeneratedImage | FilteredImage, None]:
        calls = [asyncio.create_task(self._one(request, model, i)) for i in range(request.sample_count)]
        try:
            for next_done in asyncio.as_completed(calls):
                yield await next_done
        finally:
            # One failed call fails the attempt, and a cancelled stream must not leave calls running
            # (and billing): stop the rest and wait until their connections are closed.
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)

    async def aclose(self) -> None:
        await self._http.aclose()
