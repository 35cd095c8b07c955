"""The offline provider: real PNG/JPEG files of the requested size, drawn with Pillow, no AI involved.

It is the default so that everything runs with no credentials. Every image says in large letters that
it is a local placeholder, so it can never be mistaken for generated art. Output is deterministic for
(prompt, index, size, seed). Input images are drawn into the placeholder, in order, as a strip of
thumbnails along the bottom, so an edit round trip shows which images it was given.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import textwrap
from collections.abc import AsyncGenerator

from PIL import Image, ImageDraw, ImageFont

from generator_service.config import ModelSpec
from generator_service.domain import (
    FilteredImage,
    GeneratedImage,
    GenerationRequest,
    InputImage,
    image_dimensions,
)
from generator_service.providers.images import DEFAULT_MAX_PIXELS


def _draw_inputs(image: Image.Image, inputs: tuple[InputImage, ...], max_pixels: int) -> None:
    """Pastes each input image, scaled down, in a strip along the bottom (left to right, in order)."""
    width, height = image.size
    slot = width // max(4, len(inputs))
    top = height - slot - height // 32
    for position, source in enumerate(inputs):
        with Image.open(io.BytesIO(source.data)) as opened:
            if opened.width * opened.height > max_pixels:
                continue  # JobService bounds inputs long before; a stray one is not worth a decompression bomb
            thumbnail = opened.convert("RGB")
        thumbnail.thumbnail((slot - 8, slot - 8))
        image.paste(thumbnail, (position * slot + 4, top))


def render_placeholder(
    prompt: str,
    index: int,
    width: int,
    height: int,
    mime_type: str,
    *,
    seed: int | None = None,
    inputs: tuple[InputImage, ...] = (),
    jpeg_quality: int = 85,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> bytes:
    salt = "" if seed is None else f"\x00{seed}"
    digest = hashlib.sha256(f"{prompt}\x00{index}{salt}".encode()).digest()
    top, bottom = tuple(digest[0:3]), tuple(digest[3:6])
    image = Image.new("RGB", (width, height), top)
    draw = ImageDraw.Draw(image)
    # A vertical gradient from `top` to `bottom` in 64 bands: cheap to draw, easy to tell apart.
    bands = 64
    for band in range(bands):
        t = band / (bands - 1)
        colour = tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        draw.rectangle([0, band * height // bands, width, (band + 1) * height // bands], fill=colour)
    if inputs:
        _draw_inputs(image, inputs, max_pixels)
    font = ImageFont.load_default(size=max(16, width // 24))
    small = ImageFont.load_default(size=max(12, width // 48))
    margin = width // 16
    draw.text(
        (margin, margin),
        "LOCAL PLACEHOLDER - NOT AI OUTPUT",
        font=font,
        fill="white",
        stroke_width=2,
        stroke_fill="black",
    )
    body = "\n".join(textwrap.wrap(prompt, width=48)[:8])
    draw.multiline_text(
        (margin, margin + height // 6),
        f"#{index + 1}  {width}x{height}" + (f"  from {len(inputs)} input image(s)" if inputs else "") + f"\n\n{body}",
        font=small,
        fill="white",
        stroke_width=1,
        stroke_fill="black",
    )
    out = io.BytesIO()
    if mime_type == "image/jpeg":
        image.save(out, format="JPEG", quality=jpeg_quality)
    else:
        image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


class LocalProvider:
    name = "local"

    def __init__(self, latency_min: float = 0.0, latency_max: float = 0.0) -> None:
        self._latency = (latency_min, max(latency_min, latency_max))

    async def generate(
        self, request: GenerationRequest, model: ModelSpec
    ) -> AsyncGenerator[GeneratedImage | FilteredImage, None]:
        low, high = self._latency
        if high > 0:
            await asyncio.sleep(random.uniform(low, high))
        width, height = image_dimensions(request.aspect_ratio, request.image_size)
        for index in range(request.sample_count):
            # Pillow holds the GIL for part of the work, but off the event loop it cannot stall other streams.
            data = await asyncio.to_thread(
                render_placeholder,
                request.prompt,
                index,
                width,
                height,
                request.output_mime_type,
                seed=request.seed,
                inputs=request.input_images,
                jpeg_quality=request.jpeg_quality or 85,
            )
            yield GeneratedImage(index, data, request.output_mime_type, width, height)

    async def aclose(self) -> None:
        return None
