"""Which of httpx's four timeouts ran out, for error messages that say what to tune.

httpx raises ConnectTimeout, ReadTimeout, WriteTimeout or PoolTimeout, usually with an empty message, so
"ReadTimeout('')" is all an operator would otherwise read. Providers and storage each add the setting behind it.
"""

from __future__ import annotations

import httpx

_KINDS: tuple[tuple[type[httpx.TimeoutException], str], ...] = (
    (httpx.ConnectTimeout, "connect"),
    (httpx.ReadTimeout, "read"),
    (httpx.WriteTimeout, "write"),
    (httpx.PoolTimeout, "pool"),
)


def which_timeout(exc: httpx.TimeoutException) -> tuple[str, float | None]:
    """("connect" | "read" | "write" | "pool" | "unknown", the seconds it allowed when the request says)."""
    which = next((name for kind, name in _KINDS if isinstance(exc, kind)), "unknown")
    try:
        seconds = exc.request.extensions.get("timeout", {}).get(which)
    except RuntimeError:  # raised without a request
        seconds = None
    return which, float(seconds) if isinstance(seconds, int | float) else None


def describe(exc: httpx.TimeoutException, setting: str) -> str:
    """E.g. "the read timeout (30 s, GEN_STORAGE_TIMEOUT_SECONDS) ran out (ReadTimeout)"."""
    which, seconds = which_timeout(exc)
    limit = f"{seconds:g} s, " if seconds is not None else ""
    return f"the {which} timeout ({limit}{setting}) ran out ({type(exc).__name__})"
