"""Gemini's native image models through `:generateContent`, on the Gemini API or on Vertex AI.

One call makes one image, so `sample_count` N runs N calls concurrently and yields each image as its
call completes (not `candidateCount`: Gemini 3 image models take only 1, and one call per image gives
each image its own finish reason; see docs/generator.md). Input images (edit sources, references) go as
`inlineData` parts after the prompt, in order. `imageConfig.imageSize` goes with every request to a model
that offers more than one size; `personGeneration` only on Vertex AI (the Gemini API refuses it, so the
catalogue does not offer it there). An answer in another format than the one requested is re-encoded here.
The image keeps the size the model chose, and the event reports that real size.

Thinking models (ModelSpec.thinking) may send interim images as parts marked `"thought": true` before the
final one: those are skipped, and only the last non-thought image is delivered (and charged).

A call that produces no image:
- blocked for safety (`promptFeedback.blockReason`, or a safety/policy finishReason): a filtered image with the
  reason, neither stored nor charged;
- anything else (NO_IMAGE, OTHER, IMAGE_OTHER, MAX_TOKENS, an answer in words only): the attempt fails with its own
  reason once the other calls are done, retryable where another call may well make the image (see FINISH_ERRORS).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncGenerator
from typing import Any

from generator_service.blocking import run_sized
from generator_service.config import ModelSpec
from generator_service.domain import FilteredImage, GeneratedImage, GenerationRequest, generation_error
from generator_service.providers.errors import bad_image, bad_response, error_for_failure
from generator_service.providers.google_auth import BearerTokenAuth, TokenSource
from generator_service.providers.http import ApiKeyAuth, HttpFailure, ProviderHttp, RequestAuth
from generator_service.providers.images import (
    DEFAULT_MAX_PIXELS,
    BadImage,
    CheckedImage,
    check_image,
    convert,
    decode_base64,
    run_decoding,
)
from imagegen_common.errors import ErrorKind, ServiceError

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
# Safety and policy blocks only: an image withheld for these is "filtered" (not stored, not charged).
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
# Every other way a call ends without an image: (reason, retryable). NO_IMAGE ("expected an image, none was
# generated"), OTHER and IMAGE_OTHER are unexplained misses that another call usually does not repeat; MAX_TOKENS
# (the output budget ran out, e.g. while thinking) and an answer in words only would come back the same.
FINISH_ERRORS: dict[str, tuple[str, bool]] = {
    "NO_IMAGE": ("PROVIDER_NO_IMAGE", True),
    "OTHER": ("PROVIDER_NO_IMAGE", True),
    "IMAGE_OTHER": ("PROVIDER_NO_IMAGE", True),
    "FINISH_REASON_UNSPECIFIED": ("PROVIDER_NO_IMAGE", True),
    "MAX_TOKENS": ("PROVIDER_OUTPUT_LIMIT", False),
    "STOP": ("MODEL_ANSWERED_TEXT", False),
}
_UNKNOWN_FINISH = ("PROVIDER_NO_IMAGE", False)  # a reason Google adds later: say it, do not pay for a guess
_MAX_TEXT_CHARS = 300
# imageConfig.personGeneration (Vertex AI only) takes the SDK's upper-case names.
_PERSON_GENERATION = {"dont_allow": "ALLOW_NONE", "allow_adult": "ALLOW_ADULT", "allow_all": "ALLOW_ALL"}


def request_body(request: GenerationRequest, model: ModelSpec) -> dict[str, Any]:
    """The `:generateContent` body google-genai sends for the same request: the prompt, then each input image."""
    image_config: dict[str, Any] = {"aspectRatio": request.aspect_ratio}
    if model.sends_size:  # every size of a model that has several, the default included (generation.validate)
        image_config["imageSize"] = request.image_size
    # Only models that honour it (Vertex AI) get it; generation.validate refuses it for the others.
    if request.person_generation and model.honours("person_generation"):
        image_config["personGeneration"] = _PERSON_GENERATION[request.person_generation]
    parts: list[dict[str, Any]] = [{"text": request.prompt}]
    parts += [
        {"inlineData": {"mimeType": image.mime_type, "data": base64.b64encode(image.data).decode()}}
        for image in request.input_images
    ]
    return {
        "contents": [{"role": "user", "parts": parts}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": image_config},
    }


def _no_image(document: dict[str, Any], index: int, provider: str) -> FilteredImage | ServiceError | None:
    """Why an answer has no image: a FilteredImage for safety blocks, an error for everything else."""
    feedback = document.get("promptFeedback") or {}
    if isinstance(feedback, dict) and feedback.get("blockReason"):
        said = feedback.get("blockReasonMessage")
        return FilteredImage(index, f"prompt blocked ({feedback['blockReason']})" + (f": {said}" if said else ""))
    candidates = document.get("candidates")
    if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
        return None
    first = candidates[0]
    finish = str(first.get("finishReason") or "FINISH_REASON_UNSPECIFIED")[:64]
    said = str(first.get("finishMessage") or "")
    if finish in SAFETY_FINISH_REASONS:
        return FilteredImage(index, f"blocked by safety filters ({finish})" + (f": {said}" if said else ""))
    content = first.get("content") or {}
    parts = content.get("parts") if isinstance(content, dict) else None
    text = " ".join(
        str(p["text"]) for p in parts or [] if isinstance(p, dict) and p.get("text") and not p.get("thought")
    ).strip()
    detail = (said or text)[:_MAX_TEXT_CHARS]
    reason, retryable = FINISH_ERRORS.get(finish, _UNKNOWN_FINISH)
    return generation_error(
        ErrorKind.UNAVAILABLE if retryable else ErrorKind.FAILED_PRECONDITION,
        reason,
        f"{provider} made no image {index} (finishReason {finish})" + (f": {detail}" if detail else ""),
        retryable=retryable,
    )


def _inline_image(document: dict[str, Any]) -> dict[str, Any] | None:
    """The answer's image: the last `inlineData` part that is not a thought (thinking models send drafts first)."""
    found = None
    for candidate in document.get("candidates") or []:
        content = candidate.get("content") if isinstance(candidate, dict) else None
        for part in (content or {}).get("parts") or []:
            if not isinstance(part, dict) or part.get("thought"):
                continue
            inline = part.get("inlineData")
            if isinstance(inline, dict) and inline.get("data"):
                found = inline
        if found is not None:
            return found
    return None


def read_answer(content: bytes, index: int, provider: str) -> dict[str, Any] | FilteredImage | ServiceError:
    """Parses one :generateContent answer into its image part (`inlineData`), the refusal, or the miss.

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
        missing = _no_image(document, index, provider)
        if missing is None:
            raise bad_response(provider, "the answer has no candidates and no prompt feedback")
        return missing
    return inline


def check_and_convert(
    data: bytes, declared_mime: str | None, max_pixels: int, mime_type: str, jpeg_quality: int
) -> CheckedImage:
    """The image checked (complete, within `max_pixels`), then in `mime_type`. Blocking: see run_decoding."""
    return convert(check_image(data, declared_mime, max_pixels), mime_type, jpeg_quality)


class GeminiImageProvider:
    """The Gemini API: `v1beta/models/{model}:generateContent` with `x-goog-api-key`."""

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
        self._auth: RequestAuth = ApiKeyAuth(api_key)
        self._base = base_url.rstrip("/")
        self._jpeg_quality = jpeg_quality
        self._max_image_pixels = max_image_pixels

    def generate_url(self, model: ModelSpec) -> str:
        return f"{self._base}/v1beta/models/{model.api_model}:generateContent"

    async def _one(
        self, request: GenerationRequest, model: ModelSpec, index: int
    ) -> GeneratedImage | FilteredImage | ServiceError:
        try:
            content = await self._http.post_json(
                model, self.generate_url(model), request_body(request, model), self._auth
            )
        except HttpFailure as failure:
            raise error_for_failure(failure, self.name, model.id) from None
        answer = await run_sized(len(content), read_answer, content, index, self.name)
        del content
        if isinstance(answer, FilteredImage | ServiceError):
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
                request.jpeg_quality or self._jpeg_quality,
            )
        except BadImage as exc:
            raise bad_image(self.name, f"image {index}", exc) from None
        return GeneratedImage(index, checked.data, checked.mime_type, checked.width, checked.height)

    async def generate(
        self, request: GenerationRequest, model: ModelSpec
    ) -> AsyncGenerator[GeneratedImage | FilteredImage, None]:
        calls = [asyncio.create_task(self._one(request, model, i)) for i in range(request.sample_count)]
        missed: ServiceError | None = None
        try:
            for next_done in asyncio.as_completed(calls):
                item = await next_done
                if isinstance(item, ServiceError):
                    # A call that ended without an image: the others are already paid for, so they finish and
                    # their images are delivered before the attempt fails with the first miss.
                    missed = missed or item
                    continue
                yield item
        finally:
            # One failed call fails the attempt, and a cancelled stream must not leave calls running
            # (and billing): stop the rest and wait until their connections are closed.
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        if missed is not None:
            raise missed

    async def aclose(self) -> None:
        await self._http.aclose()


class VertexGeminiImageProvider(GeminiImageProvider):
    """Vertex AI: `.../projects/{p}/locations/{l}/publishers/google/models/{model}:generateContent`, with an OAuth
    token from Application Default Credentials (for users whose quota and contracts are on Vertex)."""

    name = "vertex-gemini-image"

    def __init__(
        self,
        http: ProviderHttp,
        tokens: TokenSource,
        *,
        models_url: str,
        jpeg_quality: int = 90,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(http, "", jpeg_quality=jpeg_quality, max_image_pixels=max_image_pixels)
        self._tokens = tokens
        self._auth = BearerTokenAuth(tokens)
        self._models_url = models_url.rstrip("/")

    def generate_url(self, model: ModelSpec) -> str:
        return f"{self._models_url}/{model.api_model}:generateContent"

    async def aclose(self) -> None:
        await super().aclose()
        await self._tokens.aclose()
