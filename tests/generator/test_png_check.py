"""The PNG check, which inflates but never unfilters: what it must refuse, and that it accepts every kind of PNG.

Refused (PROVIDER_IMAGE_INVALID): a PNG a transfer cut anywhere, one with a byte changed, anything after IEND, no
IEND, a wrong CRC, and (every chunk intact) a pixel stream that stops early, is corrupt, holds more rows than the
size or a row of unknown filter type. Refused as too large: a header declaring too many pixels. Accepted with its
real size: PNGs of every colour type, bit depth and interlacing Pillow writes.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import pytest
from PIL import Image

from generator_service.providers.images import BadImage, check_image
from tests.generator.fake_google import png_declaring

Chunk = tuple[bytes, bytes]
IDAT_SIZE = 4096


def chunks_of(png: bytes) -> list[Chunk]:
    chunks, position = [], 8
    while position < len(png):
        (length,) = struct.unpack_from(">I", png, position)
        chunks.append((png[position + 4 : position + 8], png[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def png_of(chunks: list[Chunk]) -> bytes:
    """The chunks as a PNG, every CRC right."""
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks
    )


def with_stream(stream: bytes, header: bytes | None = None) -> bytes:
    """GOOD's other chunks around `stream` as its pixel data, in IDAT chunks of 4 kB, every CRC right."""
    idat = [(b"IDAT", stream[i : i + IDAT_SIZE]) for i in range(0, len(stream), IDAT_SIZE)]
    return png_of([(b"IHDR", header or IHDR), (b"tEXt", b"Comment\0made for a test"), *idat, (b"IEND", b"")])


def encoded(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


# A real 160x120 RGB PNG from Pillow (noisy: its stream is about 50 kB), re-cut into IDAT chunks of 4 kB.
_PILLOW_PNG = encoded(Image.merge("RGB", [Image.effect_noise((160, 120), 40 + 20 * band) for band in range(3)]))
IHDR = dict(chunks_of(_PILLOW_PNG))[b"IHDR"]
STREAM = b"".join(body for kind, body in chunks_of(_PILLOW_PNG) if kind == b"IDAT")
ROWS = zlib.decompress(STREAM)  # 120 rows of 1 filter byte + 480 bytes
ROW = 1 + 160 * 3
GOOD = with_stream(STREAM)
IDAT_OFFSETS = [i for i in range(len(GOOD)) if GOOD[i : i + 4] == b"IDAT"]


def flipped(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x10]) + data[position + 1 :]


def unknown_filter(rows: bytes) -> bytes:
    return rows[: 5 * ROW] + b"\x07" + rows[5 * ROW + 1 :]


def stopped_early(rows: bytes) -> bytes:
    """What an encoder that gave up half-way leaves: a stream flushed but never finished."""
    compressor = zlib.compressobj()
    return compressor.compress(rows[: len(rows) // 2]) + compressor.flush(zlib.Z_SYNC_FLUSH)


REFUSED: dict[str, Callable[[], bytes]] = {
    # A transfer cut short, at several places.
    "cut-inside-ihdr": lambda: GOOD[:20],
    "cut-inside-the-first-idat": lambda: GOOD[: IDAT_OFFSETS[0] + 100],
    "cut-between-two-idat-chunks": lambda: GOOD[: IDAT_OFFSETS[3] - 4],
    "cut-inside-the-last-idat": lambda: GOOD[: IDAT_OFFSETS[-1] + 50],
    "cut-just-before-iend": lambda: GOOD[:-12],
    "cut-inside-iend": lambda: GOOD[:-1],
    # A byte changed on the way, or a CRC that does not match.
    "one-flipped-byte-in-idat": lambda: flipped(GOOD, IDAT_OFFSETS[2] + 1000),
    "one-flipped-byte-in-ihdr": lambda: flipped(GOOD, 8 + 8 + 2),
    "a-wrong-crc": lambda: GOOD[:-1] + bytes([GOOD[-1] ^ 1]),
    # Not a PNG as the spec ends it.
    "data-after-iend": lambda: GOOD + b"\0",
    "a-second-png-after-iend": lambda: GOOD + GOOD,
    "missing-iend": lambda: png_of(chunks_of(GOOD)[:-1]),
    "no-idat": lambda: png_of([c for c in chunks_of(GOOD) if c[0] != b"IDAT"]),
    "ihdr-not-first": lambda: png_of(chunks_of(GOOD)[1:2] + chunks_of(GOOD)[:1] + chunks_of(GOOD)[2:]),
    "impossible-bit-depth": lambda: with_stream(STREAM, IHDR[:8] + b"\x04" + IHDR[9:]),
    # Every chunk intact and every CRC right, but the pixel stream is wrong: only inflating it shows.
    "stream-stops-early": lambda: with_stream(stopped_early(ROWS)),
    "stream-cut-inside-idat": lambda: with_stream(STREAM[: len(STREAM) // 2]),
    "stream-corrupt": lambda: with_stream(flipped(STREAM, len(STREAM) // 2)),
    "stream-with-one-row-too-many": lambda: with_stream(zlib.compress(ROWS + ROWS[:ROW])),
    "stream-with-bytes-after-its-end": lambda: with_stream(STREAM + b"\0\0\0\0"),
    "a-row-of-unknown-filter-type": lambda: with_stream(zlib.compress(unknown_filter(ROWS))),
}


def test_the_test_png_is_good_and_spans_several_idat_chunks() -> None:
    assert len(IDAT_OFFSETS) > 5
    checked = check_image(GOOD, "image/png")
    assert (checked.width, checked.height, checked.mime_type, checked.data) == (160, 120, "image/png", GOOD)


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_broken_png_is_refused_as_invalid(case: str) -> None:
    data = REFUSED[case]()
    with pytest.raises(BadImage) as refused:
        check_image(data, "image/png")
    assert not refused.value.too_large
    assert "not a readable image" in str(refused.value)


def test_a_header_declaring_too_many_pixels_is_refused_as_too_large() -> None:
    with pytest.raises(BadImage) as bomb:
        check_image(png_declaring(20_000, 20_000), "image/png")
    assert bomb.value.too_large
    with pytest.raises(BadImage) as bound:
        check_image(GOOD, "image/png", max_pixels=160 * 120 - 1)
    assert bound.value.too_large and "160x120" in str(bound.value)


def noise(mode: str, size: tuple[int, int]) -> Image.Image:
    return Image.effect_noise(size, 50).convert(mode)


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def interlaced(image: Image.Image) -> bytes:
    """`image` (8-bit RGB or grey) as an Adam7-interlaced PNG (Pillow writes none): each pass's rows, filter 0."""
    channels = len(image.getbands())
    width, height = image.size
    pixels = image.tobytes()
    rows = b""
    for x0, y0, dx, dy in ADAM7:
        for y in range(y0, height, dy):
            line = b"".join(
                pixels[(y * width + x) * channels : (y * width + x + 1) * channels] for x in range(x0, width, dx)
            )
            rows += b"\0" + line if line else b""
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if channels == 3 else 0, 0, 0, 1)
    return png_of([(b"IHDR", header), (b"IDAT", zlib.compress(rows)), (b"IEND", b"")])


ACCEPTED = {
    "rgb": lambda: encoded(noise("RGB", (64, 48))),
    "rgba": lambda: encoded(noise("RGBA", (33, 17))),
    "grey": lambda: encoded(noise("L", (31, 9))),
    "grey-alpha": lambda: encoded(noise("LA", (31, 9))),
    "one-bit": lambda: encoded(noise("1", (13, 7))),
    "palette": lambda: encoded(noise("P", (50, 3))),
    "palette-4-bit": lambda: encoded(noise("P", (21, 5)), bits=4),
    "sixteen-bit": lambda: encoded(noise("I;16", (20, 30))),
    "interlaced-rgb": lambda: interlaced(noise("RGB", (67, 45))),
    "interlaced-grey-3x2": lambda: interlaced(noise("L", (3, 2))),  # passes 2, 3, 4 and 6 are empty
    "interlaced-1x1": lambda: interlaced(noise("RGB", (1, 1))),
    "one-pixel": lambda: encoded(noise("RGB", (1, 1))),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_every_kind_of_png_passes_with_its_real_size(case: str) -> None:
    data = ACCEPTED[case]()
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        image.load()  # Pillow decodes it: the file is good
    checked = check_image(data, "image/png")
    assert (checked.width, checked.height) == size


def test_an_interlaced_png_decodes_to_its_image_and_one_row_short_is_refused() -> None:
    image = noise("RGB", (67, 45))
    data = interlaced(image)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.info.get("interlace") == 1 and decoded.tobytes() == image.tobytes()
    rows = zlib.decompress(dict(chunks_of(data))[b"IDAT"])
    short = png_of([*chunks_of(data)[:1], (b"IDAT", zlib.compress(rows[:-2])), (b"IEND", b"")])
    with pytest.raises(BadImage):
        check_image(short, "image/png")
