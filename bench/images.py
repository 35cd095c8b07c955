"""The PNGs the bench provider returns: made once, cached on disk (.data/bench-cache), then served from memory.

Images come in the sizes of the table for the requested aspect ratio and size
(generator_service.domain.image_dimensions), as Imagen's do: a "small" image is a 1K picture that compresses
to a few kB (a smooth gradient; the generator still decodes its every pixel, so its check costs what a real
1K image's does, about 30 ms of CPU in a worker thread). A "large" image is a 2K picture with noise
in it, about as many bytes as a real 2K PNG from Imagen (about 5 MB).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".data" / "bench-cache"


def _small(width: int, height: int, variant: int) -> Image.Image:
    gradient = Image.linear_gradient("L").resize((width, height))
    flat = Image.new("L", (width, height), 40 + 50 * variant)
    return Image.merge("RGB", (gradient, gradient.rotate(90, expand=False).resize((width, height)), flat))


def _large(width: int, height: int, variant: int) -> Image.Image:
    noise = Image.effect_noise((width, height), 8 + variant)
    gradient = Image.linear_gradient("L").resize((width, height))
    return Image.merge("RGB", (noise, gradient, Image.blend(noise, gradient, 0.5)))


def image_bytes(width: int, height: int, variant: int, mime_type: str = "image/png") -> bytes:
    """A PNG (or JPEG) of exactly width x height; small below 2K, large (noisy) from 2K up."""
    large = max(width, height) >= 1792
    ext = "jpg" if mime_type == "image/jpeg" else "png"
    path = CACHE_DIR / f"{'large' if large else 'small'}-{width}x{height}-{variant}.{ext}"
    if path.exists():
        return path.read_bytes()
    image = (_large if large else _small)(width, height, variant)
    out = io.BytesIO()
    if ext == "jpg":
        image.save(out, format="JPEG", quality=90)
    else:
        image.save(out, format="PNG", compress_level=6)
    data = out.getvalue()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)
    return data
