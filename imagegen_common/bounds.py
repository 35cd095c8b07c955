"""Caller-supplied text made short enough to log or echo, with a marker saying how much was cut.

Every value a caller sends can be as long as a gRPC message allows (4 MiB): logged or echoed whole, it
grows the log by that much per call, or makes an error status larger than a client accepts in its
metadata (8 KiB by default), which then sees RESOURCE_EXHAUSTED instead of the error.
"""

from __future__ import annotations

from typing import Any

# Log fields from a request (job ids, user ids): a real one is a 36-character UUID.
LOG_FIELD_CHARS = 128


def clip(text: str, max_bytes: int) -> str:
    """`text`, or as much of it as fits in `max_bytes` of UTF-8 with a marker of how many characters were cut.

    Bytes rather than characters: what a status or a log line costs is its encoded size, and a character can
    take four bytes (and nine characters once percent-encoded in grpc-message).
    """
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= max_bytes:
        return text
    marker_room = 32  # "...[+4194304 characters cut]" fits
    kept = encoded[: max(0, max_bytes - marker_room)].decode("utf-8", "ignore")
    return f"{kept}...[+{len(text) - len(kept)} characters cut]"


def bounded(value: Any, max_chars: int = LOG_FIELD_CHARS) -> Any:
    """A log field: numbers and short strings as they are; anything else as a repr clipped to `max_chars`."""
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, str) and len(value) <= max_chars:
        return value
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]!r}...[+{len(text) - max_chars} characters cut]"
