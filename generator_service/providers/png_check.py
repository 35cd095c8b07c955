"""The check of a PNG from a provider: its structure and its compressed pixel stream, without unfiltering a pixel.

Pillow's full decode costs 15 ms of CPU for the bench's 1024x1024 PNG here; this check 7.6 ms, nearly all of it
zlib's inflate (walking the chunks with their CRC-32: 0.01 ms). The rule, and why each part:
- Every chunk whole with its CRC-32 right, IHDR first, IEND last with nothing after it: a transfer cut anywhere
  loses IEND (or leaves a chunk shorter than its length), and a changed byte fails its chunk's CRC. Alone, this
  refuses every cut and changed byte of tests/generator/test_png_check.py, and none of its bad streams.
- The IDAT stream inflates completely (zlib's end, its Adler-32 right) to exactly the bytes IHDR's size needs,
  each row starting with a known filter type: a file can be whole, every CRC right, and still hold a stream that
  stops early (an encoder that gave up mid-image, then closed the file), which only inflating shows. Pillow's decode
  refused it; this keeps refusing it. The inflated rows are dropped unfiltered: their filters cannot fail.
- The size comes from IHDR and is bounded before anything is inflated (a one-colour PNG holds 16 MP in 2 kB).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Bit depths the PNG spec allows for each colour type, and its samples per pixel.
_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7's passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_MAX_FILTER_TYPE = 4  # None, Sub, Up, Average, Paeth
_MAX_CHUNK_LENGTH = 2**31 - 1
# Inflating in pieces keeps the memory of a check small (a 4K RGB image is 50 MB inflated), at no cost in time
# (measured: 1 MB pieces inflate as fast as one call); input goes in 64 kB pieces so that the input zlib keeps
# back between pieces (copied on every call) stays small.
_INPUT_PIECE = 64 * 1024
_OUTPUT_PIECE = 1024 * 1024


class BadPng(ValueError):
    """The bytes are not a complete, intact PNG; the message says how."""


@dataclass(frozen=True)
class PngLayout:
    width: int
    height: int
    bits_per_pixel: int
    interlaced: bool
    idat: tuple[memoryview, ...]


def is_png(data: bytes) -> bool:
    return data.startswith(PNG_SIGNATURE)


def read_layout(data: bytes) -> PngLayout:
    """Walks every chunk: whole, its CRC-32 right (zlib.crc32: GB/s, without the GIL), IHDR first and valid,
    IDAT present and in one run, IEND last and the end of the bytes. Nothing is inflated."""
    view = memoryview(data)
    position = len(PNG_SIGNATURE)
    header: tuple[int, ...] | None = None
    idat: list[memoryview] = []
    idat_ended = False
    while True:
        if position + 12 > len(data):
            raise BadPng(f"the PNG is cut short at byte {len(data)}: no IEND chunk")
        (length,) = struct.unpack_from(">I", data, position)
        kind = bytes(view[position + 4 : position + 8])
        end = position + 12 + length
        if length > _MAX_CHUNK_LENGTH or end > len(data):
            raise BadPng(f"the PNG is cut short: chunk {kind!r} at byte {position} needs {length} bytes")
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(view[position + 4 : end - 4]) != crc:
            raise BadPng(f"chunk {kind!r} at byte {position} is corrupt (its CRC-32 does not match)")
        body = view[position + 8 : end - 4]
        if header is None:
            if kind != b"IHDR" or length != 13:
                raise BadPng("the PNG does not start with its IHDR chunk")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            if idat_ended:
                raise BadPng("the PNG's IDAT chunks are not consecutive")
            idat.append(body)
        elif kind == b"IEND":
            if end != len(data):
                raise BadPng(f"{len(data) - end} bytes follow the PNG's IEND chunk")
            break
        elif kind == b"IHDR":
            raise BadPng("the PNG has a second IHDR chunk")
        elif idat:
            idat_ended = True
        position = end
    if not idat:
        raise BadPng("the PNG has no IDAT chunk (no pixel data)")
    width, height, bit_depth, colour_type, compression, filter_method, interlace = header
    if not (0 < width <= _MAX_CHUNK_LENGTH and 0 < height <= _MAX_CHUNK_LENGTH):
        raise BadPng(f"the PNG declares an impossible size {width}x{height}")
    if bit_depth not in _BIT_DEPTHS.get(colour_type, ()):
        raise BadPng(f"the PNG declares colour type {colour_type} with bit depth {bit_depth}")
    if compression != 0 or filter_method != 0 or interlace not in (0, 1):
        raise BadPng("the PNG declares an unknown compression, filter or interlace method")
    return PngLayout(width, height, bit_depth * _SAMPLES[colour_type], interlace == 1, tuple(idat))


def _row_runs(layout: PngLayout) -> list[tuple[int, int, int]]:
    """(start, end, row length) in the inflated stream of each run of equal rows: the image, or each Adam7 pass.
    A row is its filter-type byte, then its pixels packed to whole bytes."""
    passes = _ADAM7 if layout.interlaced else ((0, 0, 1, 1),)
    runs = []
    start = 0
    for first_column, first_row, column_step, row_step in passes:
        columns = max(0, -(-(layout.width - first_column) // column_step))
        rows = max(0, -(-(layout.height - first_row) // row_step))
        if columns and rows:
            row_length = 1 + -(-(columns * layout.bits_per_pixel) // 8)
            runs.append((start, start + rows * row_length, row_length))
            start += rows * row_length
    return runs


def _check_filter_types(piece: bytes, offset: int, runs: list[tuple[int, int, int]]) -> None:
    """Every row in `piece` (at `offset` in the inflated stream) starts with a known filter type, checked by a
    strided slice per run, not row by row in Python (a 1 x 40,000,000 image has 40 M rows)."""
    piece_end = offset + len(piece)
    for start, end, row_length in runs:
        low, high = max(start, offset), min(end, piece_end)
        if low >= high:
            continue
        first_row = start + -(-(low - start) // row_length) * row_length
        if first_row < high and max(piece[first_row - offset : high - offset : row_length]) > _MAX_FILTER_TYPE:
            raise BadPng("a row of the PNG has an unknown filter type")


def _input_pieces(layout: PngLayout) -> Iterator[memoryview]:
    for chunk in layout.idat:
        for start in range(0, len(chunk), _INPUT_PIECE):
            yield chunk[start : start + _INPUT_PIECE]


def check_pixel_stream(layout: PngLayout) -> None:
    """Inflates the IDAT stream to its end (Adler-32 checked by zlib) and confirms it holds exactly the rows the
    size needs, each with a known filter type. The rows are not unfiltered: no filter can fail."""
    runs = _row_runs(layout)
    expected = runs[-1][1]
    inflater = zlib.decompressobj()
    produced = 0

    def take(piece: bytes) -> None:
        nonlocal produced
        _check_filter_types(piece, produced, runs)
        produced += len(piece)
        if produced > expected:
            raise BadPng(f"the PNG holds more pixel data than {layout.width}x{layout.height} needs")

    try:
        for piece in _input_pieces(layout):
            if inflater.eof:
                raise BadPng("bytes follow the end of the PNG's pixel data")
            pending: bytes | memoryview = piece
            while pending:
                take(inflater.decompress(pending, min(_OUTPUT_PIECE, expected - produced + 1)))
                pending = inflater.unconsumed_tail
        take(inflater.flush())  # what zlib still holds once every byte is in (at most a few hundred bytes)
    except zlib.error as exc:
        raise BadPng(f"the PNG's pixel data is corrupt ({exc})") from None
    if inflater.unused_data:
        raise BadPng("bytes follow the end of the PNG's pixel data")
    if not inflater.eof or produced != expected:
        raise BadPng(
            f"the PNG's pixel data stops early ({produced:,} of {expected:,} bytes for {layout.width}x{layout.height})"
        )
