"""Fake Google image APIs speaking the documented wire formats (external-apis.md §2 and DESIGN.md §5).

Each fake answers correctly by default (real PNG/JPEG bytes of the size the real model returns) and
takes a queue of `faults`: each request first pops one fault, if any, and answers with it instead.
"""

from __future__ import annotations

import base64
import functools
import io
import re
import struct
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from PIL import Image

from generator_service.domain import image_dimensions
from tests.generator.fake_http import Exchange, FakeService, RecordedRequest, Reply

Fault = Callable[[Exchange], Awaitable[Reply]]

# What gemini-2.5-flash-image returns per aspect ratio (differs from Imagen's sizes).
GEMINI_IMAGE_SIZES = {
    "1:1": (1024, 1024),
    "3:4": (864, 1184),
    "4:3": (1184, 864),
    "9:16": (768, 1344),
    "16:9": (1344, 768),
}
BLOCKED_PROMPT_MESSAGE = (
    "Image generation failed with the following error: The prompt could not be submitted. "
    "This prompt contains sensitive words that violate Google's Responsible AI practices. "
    "Try rephrasing the prompt."
)
ALL_FILTERED_REASON = (
    "Unable to show generated images. All images were filtered out because they violated Vertex AI's usage "
    "guidelines. You will not be charged for blocked images. Support codes: 56562880"
)


@functools.lru_cache(maxsize=32)
def image_bytes(width: int, height: int, mime_type: str, colour: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="JPEG" if mime_type == "image/jpeg" else "PNG")
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    )


def png_declaring(width: int, height: int) -> bytes:
    """A decompression bomb: a PNG of a few hundred bytes whose header declares width x height (8-bit RGB)."""
    pixels = zlib.compress(b"\0" * 3073)  # one row of a 1024-wide image: nowhere near what is declared
    return _png_header(width, height, 8, 2) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


@functools.lru_cache(maxsize=8)
def flat_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A PNG of one colour (1-bit greyscale), built row by row so that no width x height image is ever held
    here: 90 MP compress to about 30 kB. With `rows` below `height`, only that many rows are encoded and the
    zlib stream stops there, yet every chunk's CRC is right and IEND closes the file: a truncated image
    that Pillow's verify() accepts and only decoding catches."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows))
    data += compressor.flush(zlib.Z_FINISH if rows is None else zlib.Z_SYNC_FLUSH)
    idat = b"".join(_png_chunk(b"IDAT", data[i : i + 65536]) for i in range(0, len(data), 65536))
    return _png_header(width, height, 1, 0) + idat + _png_chunk(b"IEND", b"")


def imagen_answer(data: bytes, mime_type: str = "image/png") -> Fault:
    """A :predict answer with one prediction carrying `data` as its image."""
    return answer_json({"predictions": [{"mimeType": mime_type, "bytesBase64Encoded": b64(data)}]})


def gemini_answer(data: bytes, mime_type: str = "image/png") -> Fault:
    """A :generateContent answer whose one candidate carries `data` as its image."""
    inline = {"inlineData": {"mimeType": mime_type, "data": b64(data)}}
    return answer_json({"candidates": [{"content": {"role": "model", "parts": [inline]}, "finishReason": "STOP"}]})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def google_error(code: int, status: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    """Google's JSON error body: {"error": {"code", "message", "status"}}."""
    return Reply.json({"error": {"code": code, "message": message, "status": status}}, code, headers)


def gemini_key_refusal(request: RecordedRequest, api_key: str) -> Reply | None:
    """How the Gemini API answers a missing key (403) or a wrong one (400 "API key not valid")."""
    sent = request.headers.get("x-goog-api-key")
    if sent is None:
        return google_error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.")
    if sent != api_key:
        return google_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
    return None


# Faults, for the `faults` queues below.
def fail(code: int, status: str, message: str, retry_after: str | None = None) -> Fault:
    async def answer(exchange: Exchange) -> Reply:
        return google_error(code, status, message, {"retry-after": retry_after} if retry_after else None)

    return answer


def raw(body: bytes, status: int = 200, content_type: str = "application/json") -> Fault:
    async def answer(exchange: Exchange) -> Reply:
        return Reply(status, body, {"content-type": content_type})

    return answer


def answer_json(payload: Any) -> Fault:
    async def answer(exchange: Exchange) -> Reply:
        return Reply.json(payload)

    return answer


def hang(seconds: float = 10.0) -> Fault:
    """Never answers: waits (up to `seconds`) for the client to give up and close the connection."""

    async def answer(exchange: Exchange) -> Reply:
        await exchange.client_disconnected(seconds)
        return google_error(500, "INTERNAL", "answered too late")

    return answer


class _FakeService(FakeService):
    def __init__(self) -> None:
        self.faults: deque[Fault] = deque()
        super().__init__()

    async def _handle(self, exchange: Exchange) -> Reply:
        if self.faults:
            return await self.faults.popleft()(exchange)
        return await self.answer(exchange)

    async def answer(self, exchange: Exchange) -> Reply:
        raise NotImplementedError


class _FakeImagenPredict(_FakeService):
    """Imagen :predict: one prediction per requested image, `filtered` indexes replaced by a reason."""

    path: re.Pattern[str]

    def __init__(self) -> None:
        super().__init__()
        self.filtered: set[int] = set()
        self.filter_reason = "This image was filtered because it may violate the usage guidelines."
        self.known_models = {
            "imagen-4.0-generate-001",
            "imagen-4.0-ultra-generate-001",
            "imagen-4.0-fast-generate-001",
        }
        # Optional hold-up of every successful answer (to keep requests in flight), e.g. asyncio.sleep.
        self.delay: Callable[[], Awaitable[None]] | None = None
        # Quotas like the real service's: 429 when more requests than this are in flight at once, or
        # when more than `per_second_quota` requests arrived within the last second.
        self.concurrency_quota: int | None = None
        self.per_second_quota: int | None = None
        self.rate_limited = 0  # 429s answered because of the quotas above

    def refuse(self, request: RecordedRequest) -> Reply | None:
        """The answer to missing or wrong credentials, or None when they are right."""
        raise NotImplementedError

    def _over_quota(self, request: RecordedRequest) -> bool:
        if self.concurrency_quota is not None and self.http.in_flight > self.concurrency_quota:
            return True
        if self.per_second_quota is not None:
            window_start = request.received_at - 1.0
            recent = [r for r in self.http.requests if window_start < r.received_at <= request.received_at]
            return len(recent) > self.per_second_quota
        return False

    async def answer(self, exchange: Exchange) -> Reply:
        request = exchange.request
        match = self.path.fullmatch(request.path)
        if request.method != "POST" or match is None:
            return google_error(404, "NOT_FOUND", f"no route {request.method} {request.path}")
        refusal = self.refuse(request)
        if refusal is not None:
            return refusal
        if self._over_quota(request):
            self.rate_limited += 1
            return google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded for online prediction requests.")
        if match["model"] not in self.known_models:
            return google_error(404, "NOT_FOUND", f"models/{match['model']} is not found")
        body = request.json()
        parameters = body["parameters"]
        if "seed" in parameters and parameters.get("addWatermark", True) is not False:
            return google_error(400, "INVALID_ARGUMENT", "Seed is not supported when watermark is enabled.")
        mime = parameters.get("outputOptions", {}).get("mimeType", "image/png")
        size = image_dimensions(parameters.get("aspectRatio", "1:1"), parameters.get("sampleImageSize", "1K"))
        if self.delay is not None:
            await self.delay()
        predictions: list[dict[str, Any]] = []
        for index in range(parameters.get("sampleCount", 4)):
            if index in self.filtered:
                predictions.append({"raiFilteredReason": self.filter_reason})
            else:
                predictions.append({"mimeType": mime, "bytesBase64Encoded": b64(image_bytes(*size, mime))})
        return Reply.json({"predictions": predictions})


class FakeVertexImagen(_FakeImagenPredict):
    """Stands in for Imagen on Vertex AI: POST /v1/projects/{project}/locations/{location}/publishers/google/
    models/{model}:predict on {location}-aiplatform.googleapis.com, `Authorization: Bearer <OAuth token>`."""

    path = re.compile(
        r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/publishers/google/models/(?P<model>[^/:]+):predict"
    )

    def __init__(self, token: str = "test-access-token") -> None:
        super().__init__()
        self.valid_tokens = {token}

    def refuse(self, request: RecordedRequest) -> Reply | None:
        sent = request.headers.get("authorization", "")
        if sent.startswith("Bearer ") and sent.removeprefix("Bearer ") in self.valid_tokens:
            return None
        # Vertex answers a missing, expired or unknown token with 401 UNAUTHENTICATED.
        return google_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")


class FakeGeminiImagen(_FakeImagenPredict):
    """Stands in for Imagen on the Gemini API, as it was before the 2026 shutdown: POST /v1beta/models/
    {model}:predict on generativelanguage.googleapis.com with `x-goog-api-key`. Set `known_models` to an
    empty set to get today's behaviour (404 for every Imagen model)."""

    path = re.compile(r"/v1beta/models/(?P<model>[^/:]+):predict")

    def __init__(self, api_key: str = "test-api-key") -> None:
        super().__init__()
        self.api_key = api_key

    def refuse(self, request: RecordedRequest) -> Reply | None:
        return gemini_key_refusal(request, self.api_key)


def gemini_image_size(aspect_ratio: str, image_size: str | None) -> tuple[int, int]:
    """What a Gemini image model returns for a ratio and `imageSize` (none: 1K)."""
    if image_size in (None, "1K") and aspect_ratio in GEMINI_IMAGE_SIZES:
        return GEMINI_IMAGE_SIZES[aspect_ratio]
    return image_dimensions(aspect_ratio, image_size or "1K")


DRAFT_COLOUR = (200, 30, 30)  # the interim ("thought") images of a thinking model


class FakeGeminiImage(_FakeService):
    """Stands in for Gemini's image models on the Gemini API: POST /v1beta/models/{model}:generateContent
    with `x-goog-api-key`, answering one image per call in candidates[0].content.parts[].inlineData.

    Speaks google-genai's shapes: `imageConfig {aspectRatio, imageSize}` picks the size; a thinking model
    (`thinking_models`) first sends `thoughts` interim images as parts marked `"thought": true` (in a colour of
    their own, DRAFT_COLOUR), then a thought summary, then the final image. The Gemini API refuses
    `personGeneration` (400, as google-genai does before sending).
    """

    path = re.compile(r"/v1beta/models/(?P<model>[^/:]+):generateContent")

    def __init__(self, api_key: str = "test-api-key") -> None:
        super().__init__()
        self.api_key = api_key
        self.delay: Callable[[], Awaitable[None]] | None = None
        self.thinking_models = {
            "gemini-3-pro-image",
            "gemini-3.1-flash-image",
            "gemini-3.1-flash-lite-image",
            "gemini-3-pro-image-preview",
            "gemini-3.1-flash-image-preview",
        }
        self.thoughts = 0

    def refuse(self, request: RecordedRequest) -> Reply | None:
        return gemini_key_refusal(request, self.api_key)

    def refuse_config(self, image_config: dict[str, Any]) -> Reply | None:
        if "personGeneration" in image_config:
            return google_error(
                400, "INVALID_ARGUMENT", 'Invalid JSON payload received. Unknown name "personGeneration"'
            )
        return None

    async def answer(self, exchange: Exchange) -> Reply:
        request = exchange.request
        match = self.path.fullmatch(request.path)
        if request.method != "POST" or match is None:
            return google_error(404, "NOT_FOUND", f"no route {request.method} {request.path}")
        refusal = self.refuse(request)
        if refusal is not None:
            return refusal
        if self.delay is not None:
            await self.delay()
        body = request.json()
        image_config = body["generationConfig"]["imageConfig"]
        refusal = self.refuse_config(image_config)
        if refusal is not None:
            return refusal
        size = gemini_image_size(image_config.get("aspectRatio", "1:1"), image_config.get("imageSize"))
        parts: list[dict[str, Any]] = []
        if match["model"] in self.thinking_models:
            for _ in range(self.thoughts):
                draft = image_bytes(*size, "image/png", DRAFT_COLOUR)
                parts.append({"inlineData": {"mimeType": "image/png", "data": b64(draft)}, "thought": True})
            if self.thoughts:
                parts.append({"text": "Refining the composition.", "thought": True})
        parts += [
            {"text": "Here is your image."},
            {"inlineData": {"mimeType": "image/png", "data": b64(image_bytes(*size, "image/png"))}},
        ]
        return Reply.json(
            {
                "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 1290},
            }
        )


class FakeVertexGeminiImage(FakeGeminiImage):
    """The same models on Vertex AI: POST /v1/projects/{p}/locations/{l}/publishers/google/models/{model}:
    generateContent with `Authorization: Bearer <OAuth token>`; `personGeneration` is accepted here."""

    path = re.compile(
        r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/publishers/google/models/"
        r"(?P<model>[^/:]+):generateContent"
    )

    def __init__(self, token: str = "test-access-token") -> None:
        super().__init__()
        self.valid_tokens = {token}

    def refuse(self, request: RecordedRequest) -> Reply | None:
        sent = request.headers.get("authorization", "")
        if sent.startswith("Bearer ") and sent.removeprefix("Bearer ") in self.valid_tokens:
            return None
        return google_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")

    def refuse_config(self, image_config: dict[str, Any]) -> Reply | None:
        if image_config.get("personGeneration", "ALLOW_ADULT") not in ("ALLOW_ALL", "ALLOW_ADULT", "ALLOW_NONE"):
            return google_error(400, "INVALID_ARGUMENT", "Invalid value at 'image_config.person_generation'")
        return None
