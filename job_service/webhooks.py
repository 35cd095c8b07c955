"""Webhooks' rules: event names, URL and address checks (SSRF), Standard Webhooks signing, retry schedule.

No gRPC, no SQL, no I/O: the sender (webhook_sender) and CreateJob (jobs) apply these.
See docs/webhooks.md for what a receiver sees.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import random
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from imagegen_common.errors import FieldViolation

MAX_URL_CHARS = 2048
# Standard Webhooks: a symmetric secret is at least 24 bytes and at most 64 (512 bits).
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
SECRET_PREFIX = "whsec_"


class WebhookEvent(StrEnum):
    """The `type` of a delivery (Standard Webhooks: full-stop delimited, [a-z_])."""

    STARTED = "job.started"  # each attempt_started (a retried job starts again; data.attempt says which)
    IMAGE_STORED = "job.image_stored"
    COMPLETED = "job.completed"
    FAILED = "job.failed"
    CANCELLED = "job.cancelled"
    EXPIRED = "job.expired"


# Sent when CreateJob names a webhook but no events: the job's end, whatever it is. A caller that wants
# progress asks for job.started / job.image_stored too.
DEFAULT_EVENTS = (WebhookEvent.COMPLETED, WebhookEvent.FAILED, WebhookEvent.CANCELLED, WebhookEvent.EXPIRED)

_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")

# Cloud metadata endpoints: never a webhook receiver, even where private addresses are allowed.
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class WebhookPolicy:
    """What a webhook URL may be, from settings."""

    allow_http: bool = False
    # Loopback, private, link-local, CGNAT and other non-global addresses (tests, a private deployment).
    allow_private: bool = False


def address_refusal(address: Address, policy: WebhookPolicy) -> str | None:
    """Why a webhook may not connect to `address`, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address in IPv6 clothing is judged as the IPv4 address it reaches.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return address_refusal(embedded, policy)
    if address in METADATA_ADDRESSES:
        return f"{address} is a cloud metadata address"
    if address.is_multicast:
        return f"{address} is a multicast address"
    if address.is_unspecified:
        return f"{address} is the unspecified address"
    if not address.is_global and not policy.allow_private:
        # is_global is False for loopback, RFC 1918/4193 private, link-local, CGNAT (100.64/10), documentation
        # and reserved ranges alike.
        return f"{address} is not a public address (loopback, private, link-local or reserved)"
    return None


_LEGACY_IPV4 = re.compile(r"^[0-9a-fA-FxX.]+$")


def literal_address(host: str) -> Address | None:
    """The address `host` spells, if it is one: also the legacy IPv4 forms (127.1, 0x7f.0.0.1, 2130706433) that
    resolvers accept and ipaddress does not."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def url_violations(url: str, policy: WebhookPolicy, field: str = "webhook_url") -> list[FieldViolation]:
    """What is wrong with a webhook URL as written (syntax, scheme, literal addresses); names are resolved, and
    checked again, when each delivery is sent."""
    if len(url) > MAX_URL_CHARS:
        return [FieldViolation(field, f"at most {MAX_URL_CHARS} characters")]
    if _CONTROL_OR_SPACE.search(url):
        return [FieldViolation(field, "must not contain spaces or control characters")]
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return [FieldViolation(field, f"not a valid URL: {exc}")]
    schemes = ("https", "http") if policy.allow_http else ("https",)
    if parts.scheme not in schemes:
        allowed = " or ".join(f"{s}://" for s in schemes)
        return [FieldViolation(field, f"must start with {allowed}")]
    if not parts.hostname:
        return [FieldViolation(field, "must name a host")]
    if parts.username is not None or parts.password is not None:
        return [FieldViolation(field, "must not carry credentials (user:password@); put a token in the path")]
    if parts.fragment:
        return [FieldViolation(field, "must not have a #fragment")]
    if port == 0:
        return [FieldViolation(field, "port 0 is not a valid port")]
    address = literal_address(parts.hostname)
    if address is not None and (problem := address_refusal(address, policy)):
        return [FieldViolation(field, problem)]
    return []


def event_violations(events: Sequence[str], field: str = "webhook_events") -> list[FieldViolation]:
    known = {e.value for e in WebhookEvent}
    return [FieldViolation(field, f"unknown event {e!r}") for e in events if e not in known]


# -- signing ------------------------------------------------------------------------------------------


def parse_secret(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (the prefix is optional)."""
    body = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(body, validate=True)
    except ValueError:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(f"a webhook secret decodes to {MIN_SECRET_BYTES}-{MAX_SECRET_BYTES} bytes, not {len(key)}")
    return key


class Signer:
    """Standard Webhooks v1 signatures: base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), one per key.

    Every configured key signs, current first: during a rotation receivers holding either the new or the old
    secret accept the delivery.
    """

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("at least one webhook secret is needed")
        self._keys = [parse_secret(s) for s in secrets]

    def signature_header(self, message_id: str, timestamp: int, body: bytes) -> str:
        content = f"{message_id}.{timestamp}.".encode() + body
        return " ".join(
            "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode() for key in self._keys
        )


def message_id(delivery_id: str) -> str:
    """The `webhook-id` of a delivery: no '.', which would make the signed content ambiguous."""
    return "msg_" + delivery_id.replace("-", "")


# -- retries ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrySchedule:
    base_seconds: float
    max_seconds: float
    # A delivery still undelivered this long after its event is given up (recorded as failed).
    give_up_after_seconds: float

    def delay(self, attempts: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds before the next send after `attempts` failed ones: exponential, jittered into [1/2, 1] of the
        step (so receivers coming back are not hit by every sender at once), at least the receiver's Retry-After,
        at most max_seconds."""
        step = min(self.max_seconds, self.base_seconds * 2 ** max(0, attempts - 1))
        delay = step * (rng or random).uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return float(min(delay, self.max_seconds))
