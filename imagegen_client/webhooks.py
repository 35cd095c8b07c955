"""Verifying imagegen's webhooks on the receiving side (Standard Webhooks, symmetric `v1` signatures).

    from imagegen_client import verify_webhook, WebhookVerificationError

    payload = verify_webhook("whsec_...", request.headers, raw_body)  # the raw bytes, before any JSON parsing
    if payload["type"] == "job.completed": ...

See docs/webhooks.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any


class WebhookVerificationError(Exception):
    """The request is not a genuine, fresh imagegen webhook: answer it 400 (or 401), never process it."""


def _key(secret: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ followed by base64") from None


def verify_webhook(
    secret: str | Sequence[str],
    headers: Mapping[str, str],
    body: bytes | str,
    tolerance: float = 300,
    *,
    now: float | None = None,
) -> Any:
    """The webhook's JSON payload, once its signature and timestamp are checked; raises WebhookVerificationError.

    `secret`: the `whsec_...` secret (or several, while you rotate yours). `headers`: the request's headers (any
    case). `body`: the raw body exactly as received. `tolerance`: how far `webhook-timestamp` may be from now,
    in seconds, either way (replays of an old request are refused). Use `webhook-id` to drop duplicates: a
    delivery can arrive more than once.
    """
    lower = {name.lower(): value for name, value in headers.items()}
    msg_id = lower.get("webhook-id")
    stamp = lower.get("webhook-timestamp")
    signatures = lower.get("webhook-signature")
    if not msg_id or not stamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance (a replay, or a clock off)")
    raw = body.encode() if isinstance(body, str) else body
    content = f"{msg_id}.{timestamp}.".encode() + raw
    keys = [_key(secret)] if isinstance(secret, str) else [_key(s) for s in secret]
    expected = [base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()) for key in keys]
    matched = False
    for entry in signatures.split(" "):
        version, _, signature = entry.partition(",")
        if version != "v1":
            continue  # another scheme (v1a) this helper does not check
        for candidate in expected:
            # Every comparison runs (no early exit): constant time in what matches.
            matched |= hmac.compare_digest(candidate, signature.encode())
    if not matched:
        raise WebhookVerificationError("no valid v1 signature")
    try:
        return json.loads(raw)
    except ValueError:
        raise WebhookVerificationError("the body is not JSON") from None
