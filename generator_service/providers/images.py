"""Checks on image bytes a provider sent, before anything is stored or charged.

Callers run them through `blocking.run_sized`: in a worker thread for real images (base64-decoding and
parsing a 2K PNG take milliseconds of CPU that would otherwise stall every other stream on the event loop),
inline for small ones, where the thread hop would cost more than the work.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

FORMAT_MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
PIL_FORMATS = {mime: fmt for fmt, mime in FORMAT_MIME_TYPES.items()}


class BadImage(ValueError):
    """The bytes are not the image they claim to be; the message says how."""


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


def check_image(data: bytes, declared_mime: str | None, expected_size: tuple[int, int] | None = None) -> CheckedImage:
    """Confirms `data` is a well-formed image of the declared type (and size, when one is expected)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            actual_mime = FORMAT_MIME_TYPES.get(image.format or "")
            width, height = image.size
            # verify() walks the file (chunks, CRCs) without decoding pixels: catches truncation cheaply.
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"the bytes are not a readable image ({exc})") from None
    if actual_mime is None:
        raise BadImage("the image is in an unsupported format")
    if declared_mime and declared_mime != actual_mime:
        raise BadImage(f"declared {declared_mime} but the bytes are {actual_mime}")
    if expected_size is not None and (width, height) != expected_size:
        raise BadImage(f"expected {expected_size[0]}x{expected_size[1]} pixels, got {width}x{height}")
    return CheckedImage(data, actual_mime, width, height)


def decode_and_check(
    encoded: object, declared_mime: str | None, expected_size: tuple[int, int] | None = None
) -> CheckedImage:
    return check_image(decode_base64(encoded), declared_mime, expected_size)


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
