"""Checks on image bytes a provider sent, before anything is stored or charged.

A PNG is checked by its structure and its inflated stream (png_check: about half the CPU of a decode, 7 ms for a
1K PNG); a JPEG or WebP is decoded in full (2-5 ms and 5-14 ms for 1K here). Callers run the check through
`run_decoding`: in a worker thread for real images, where it would otherwise stall every other stream on the event
loop, inline for tiny ones, where the thread hop would cost more than the work. Base64 follows the bytes
(`blocking.run_sized`)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from PIL import Image

from generator_service.blocking import INLINE_MAX_BYTES
from generator_service.providers.png_check import BadPng, check_pixel_stream, is_png, read_layout

P = ParamSpec("P")
T = TypeVar("T")

FORMAT_MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
PIL_FORMATS = {mime: fmt for fmt, mime in FORMAT_MIME_TYPES.items()}


# Above the largest image a supported model returns (4K: 4096x4096 = 16.8 MP) with room to spare; the setting
# GEN_MAX_IMAGE_PIXELS replaces it (see config.py for why it stays below Pillow's own limit).
DEFAULT_MAX_PIXELS = 40_000_000
# Checking costs CPU per pixel whatever the bytes (a PNG of one colour holds 16 MP in 2 kB: its stream inflates to
# every row). Measured for a decode: 64x64 in 0.15 ms, 128x128 in 0.6 ms, about a thread hop; 1024x1024 in 30 ms.
INLINE_MAX_PIXELS = 128 * 128


class BadImage(ValueError):
    """The bytes are not a usable image; the message says how. `too_large`: it declares more pixels than allowed."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    mime_type: str
    width: int
    height: int


def load_image_formats() -> None:
    """Imports Pillow's format plugins now. Image.open does it on its first call (40 ms here, several times that
    where Python has to compile them), which the first job through a fresh generator would wait for."""
    Image.preinit()


def decode_base64(encoded: object) -> bytes:
    if not isinstance(encoded, str) or not encoded:
        raise BadImage("image data is missing or not a string")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImage(f"image data is not valid base64 ({exc})") from None


def _too_large(width: int, height: int, max_pixels: int) -> BadImage:
    return BadImage(
        f"the image is {width}x{height} = {width * height:,} pixels, more than GEN_MAX_IMAGE_PIXELS ({max_pixels:,})",
        too_large=True,
    )


def check_image(data: bytes, declared_mime: str | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> CheckedImage:
    """Confirms `data` is a complete image of the declared type with at most `max_pixels` pixels, and reports its
    real size (whatever size it is: the provider chose it, and the image is no less usable for it).

    The size is read from the header and bounded before any pixel is inflated or decoded. Then a PNG must be whole
    and intact chunk by chunk and its pixel stream complete (png_check says why that is enough, and why verify()
    is not); a JPEG or WebP, whose formats carry no checksum to walk, is decoded in full. The bound is an argument,
    not Pillow's process-global Image.MAX_IMAGE_PIXELS, which every thread decoding at the same time would share.
    """
    if is_png(data):
        return _check_png(data, declared_mime, max_pixels)
    try:
        # Only the formats providers send: no other of Pillow's parsers ever sees these bytes.
        with Image.open(io.BytesIO(data), formats=list(FORMAT_MIME_TYPES)) as image:
            actual_mime = FORMAT_MIME_TYPES.get(image.format or "")
            width, height = image.size
            if width * height > max_pixels:
                raise _too_large(width, height, max_pixels)
            image.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own check in Image.open, far above ours (the warning counts where warnings are errors).
        raise BadImage(f"the image declares too many pixels ({exc})", too_large=True) from None
    except MemoryError:
        raise  # the process is short of memory: not the image's fault
    except Exception as exc:
        # Pillow's decoders fail on malformed input with many types (OSError, SyntaxError, ValueError, EOFError,
        # struct.error, zlib.error, IndexError...); whichever it is, these bytes are not a usable image.
        raise BadImage(f"the bytes are not a readable image ({type(exc).__name__}: {exc})") from None
    return _as_declared(data, actual_mime, declared_mime, width, height)


def _check_png(data: bytes, declared_mime: str | None, max_pixels: int) -> CheckedImage:
    try:
        layout = read_layout(data)
        if layout.width * layout.height > max_pixels:
            raise _too_large(layout.width, layout.height, max_pixels)
        check_pixel_stream(layout)
    except BadPng as exc:
        raise BadImage(f"the bytes are not a readable image ({exc})") from None
    return _as_declared(data, "image/png", declared_mime, layout.width, layout.height)


def _as_declared(
    data: bytes, actual_mime: str | None, declared_mime: str | None, width: int, height: int
) -> CheckedImage:
    if actual_mime is None:
        raise BadImage("the image is in an unsupported format")
    if declared_mime and declared_mime != actual_mime:
        raise BadImage(f"declared {declared_mime} but the bytes are {actual_mime}")
    return CheckedImage(data, actual_mime, width, height)


def _declared_pixels(data: bytes) -> int:
    """The pixel count the header declares (no pixel decoded); 0 when the header is unreadable, for check_image to
    refuse cheaply."""
    try:
        with Image.open(io.BytesIO(data), formats=list(FORMAT_MIME_TYPES)) as image:
            return image.width * image.height
    except Exception:
        return 0


async def run_decoding(data: bytes, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`function(*args)`, work on the pixels of the image `data`: inline when the image is tiny in bytes and in
    pixels, else in a worker thread."""
    if len(data) <= INLINE_MAX_BYTES and _declared_pixels(data) <= INLINE_MAX_PIXELS:
        return function(*args, **kwargs)
    return await asyncio.to_thread(function, *args, **kwargs)


def convert(image: CheckedImage, mime_type: str, jpeg_quality: int) -> CheckedImage:
    """Re-encodes to `mime_type` (PNG or JPEG) when the provider could not be asked for it."""
    if image.mime_type == mime_type:
        return image
    out = io.BytesIO()
    with Image.open(io.BytesIO(image.data)) as source:
        if mime_type == "image/jpeg":
            source.convert("RGB").save(out, format="JPEG", quality=jpeg_quality)
        else:
            source.save(out, format=PIL_FORMATS[mime_type])
    return CheckedImage(out.getvalue(), mime_type, image.width, image.height)
