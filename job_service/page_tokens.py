"""ListJobs page tokens: opaque to callers, signed so that only this service's own tokens are read.

A token says where the previous page ended (the last job's create time and id) and for whom and which
filter it was made. It is HMAC-signed with a key every replica derives from the same configured secret, so
a token made by one replica pages on any other, and nothing a caller makes up or changes is ever parsed:
the length is checked first, then the signature, and only then is the (our own) JSON read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from datetime import datetime

from imagegen_common.errors import FieldViolation, ServiceError, invalid_argument

# A token this service makes is about 250 characters; anything much longer is not one of them.
MAX_TOKEN_CHARS = 512
_MAC_BYTES = 16
# Keeps the key apart from any other use of the secret it is derived from (the JWT secret, by default).
_KEY_CONTEXT = b"imagegen.job.v1 ListJobs page token v1"


def derive_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), _KEY_CONTEXT, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode("ascii") + b"=" * (-len(text) % 4))


def _bad(description: str = "not a token from a previous ListJobs call") -> ServiceError:
    return invalid_argument([FieldViolation("page_token", description)], reason="INVALID_PAGE_TOKEN")


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, created_at: datetime, job_id: str, owner: str, status: str) -> str:
        payload = json.dumps(
            {"t": created_at.isoformat(), "id": job_id, "u": owner, "s": status}, separators=(",", ":")
        ).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def decode(self, token: str, owner: str, status: str) -> tuple[datetime, str]:
        """(create time, id) of the last job of the previous page; INVALID_PAGE_TOKEN for anything else."""
        if len(token) > MAX_TOKEN_CHARS:
            raise _bad()
        body_text, _, mac_text = token.partition(".")
        try:
            payload, mac = _unb64(body_text), _unb64(mac_text)
        except (ValueError, binascii.Error):  # UnicodeError is a ValueError
            raise _bad() from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise _bad()
        try:
            body = json.loads(payload)
            created_at, job_id = datetime.fromisoformat(body["t"]), str(uuid.UUID(body["id"]))
        except (ValueError, KeyError, TypeError):  # signed by a replica with a different idea of a token
            raise _bad() from None
        if body.get("u") != owner or body.get("s") != status:
            raise _bad("was made for a different filter; start without it")
        return created_at, job_id
