"""Webhook rules without a database: address and URL checks, signing, verification, the pinned send."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import random
import ssl
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from imagegen_client import WebhookVerificationError, verify_webhook
from job_service.webhook_sender import SenderConfig, WebhookSender
from job_service.webhook_store import Delivery, WebhookStore
from job_service.webhooks import (
    RetrySchedule,
    Signer,
    WebhookPolicy,
    address_refusal,
    literal_address,
    parse_secret,
    url_violations,
)
from tests.generator.fake_http import Exchange, Reply
from tests.support.certs import CertificateAuthority
from tests.support.jobs import a_job
from tests.support.webhooks import Receiver, new_secret

STRICT = WebhookPolicy()
LENIENT = WebhookPolicy(allow_http=True, allow_private=True)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.31.255.255",
        "192.168.0.1",
        "100.64.0.1",  # CGNAT
        "169.254.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.251",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:10.0.0.1",  # IPv4-mapped
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address), STRICT) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address), STRICT) is None


def test_allow_private_still_refuses_metadata_and_multicast() -> None:
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), LENIENT) is None
    assert address_refusal(ipaddress.ip_address("10.0.0.1"), LENIENT) is None
    for address in ("169.254.169.254", "fd00:ec2::254", "224.0.0.1", "::ffff:169.254.169.254"):
        assert address_refusal(ipaddress.ip_address(address), LENIENT) is not None, address


def test_legacy_ipv4_spellings_are_read_as_addresses() -> None:
    for spelling in ("127.1", "0x7f.0.0.1", "2130706433", "017700000001"):
        assert literal_address(spelling) == ipaddress.ip_address("127.0.0.1"), spelling
    assert literal_address("example.com") is None
    assert literal_address("deadbeef.com") is None


def test_urls_need_https_unless_http_is_allowed() -> None:
    assert url_violations("https://hooks.example.com/x?t=1", STRICT) == []
    assert url_violations("http://hooks.example.com/x", STRICT)[0].description.startswith("must start with https://")
    assert url_violations("http://hooks.example.com/x", LENIENT) == []
    assert url_violations("https://127.0.0.1/x", STRICT)
    assert url_violations("https://[::1]:8443/x", STRICT)
    assert url_violations("https://0x7f000001/x", STRICT)
    assert url_violations("https://example.com:99999/", STRICT)
    assert url_violations("https://example.com/\x00", STRICT)
    assert url_violations("https://example.com/" + "a" * 2048, STRICT)


def test_secrets_must_be_whsec_base64_of_24_to_64_bytes() -> None:
    assert len(parse_secret(new_secret())) == 32
    with pytest.raises(ValueError):
        parse_secret("whsec_" + base64.b64encode(b"short").decode())
    with pytest.raises(ValueError):
        parse_secret("whsec_not base64!")


def test_signature_header_has_one_v1_signature_per_secret_current_first() -> None:
    first, second = new_secret(), new_secret()
    header = Signer([first, second]).signature_header("msg_1", 1674087231, b'{"a":1}')
    parts = header.split(" ")
    assert [p.split(",")[0] for p in parts] == ["v1", "v1"]
    for secret, part in zip((first, second), parts, strict=True):
        key = base64.b64decode(secret.removeprefix("whsec_"))
        digest = hmac.new(key, b'msg_1.1674087231.{"a":1}', hashlib.sha256).digest()
        assert part == "v1," + base64.b64encode(digest).decode()


def _signed(secret: str, body: bytes, timestamp: int, msg_id: str = "msg_abc") -> dict[str, str]:
    return {
        "Webhook-Id": msg_id,
        "Webhook-Timestamp": str(timestamp),
        "Webhook-Signature": Signer([secret]).signature_header(msg_id, timestamp, body),
    }


def test_verify_webhook_accepts_a_genuine_request_and_returns_the_payload() -> None:
    secret = new_secret()
    body = b'{"type":"job.completed","timestamp":"2026-01-01T00:00:00Z","data":{"id":"j"}}'
    payload = verify_webhook(secret, _signed(secret, body, int(time.time())), body)
    assert payload["type"] == "job.completed"


def test_verify_webhook_refuses_forgeries_replays_and_tampering() -> None:
    secret = new_secret()
    body = b'{"type":"job.completed"}'
    now = int(time.time())
    headers = _signed(secret, body, now)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(new_secret(), headers, body)  # another secret
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, headers, body + b" ")  # a changed body
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, _signed(secret, body, now - 301), body)  # too old
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, _signed(secret, body, now + 301), body)  # too far ahead
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, {**headers, "webhook-id": "msg_other"}, body)  # the id is signed too
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, {k: v for k, v in headers.items() if k != "Webhook-Signature"}, body)
    assert verify_webhook(secret, _signed(secret, body, now - 1000), body, tolerance=2000) == {"type": "job.completed"}


def test_verify_webhook_accepts_any_matching_v1_signature_and_skips_other_schemes() -> None:
    old, new = new_secret(), new_secret()
    body = b"{}"
    now = int(time.time())
    headers = _signed(old, body, now)
    rotated = Signer([new, old]).signature_header("msg_abc", now, body)
    headers["Webhook-Signature"] = "v1a,AAAA " + rotated
    assert verify_webhook(old, headers, body) == {}
    assert verify_webhook(new, headers, body) == {}
    assert verify_webhook([new_secret(), old], headers, body) == {}


def test_backoff_is_exponential_jittered_and_honours_retry_after() -> None:
    schedule = RetrySchedule(base_seconds=1.0, max_seconds=30.0, give_up_after_seconds=100.0)
    rng = random.Random(7)
    for attempts, step in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0)):
        delays = [schedule.delay(attempts, rng=rng) for _ in range(50)]
        assert all(step / 2 <= d <= step for d in delays), (attempts, min(delays), max(delays))
        assert len(set(delays)) > 1, "jittered"
    assert schedule.delay(1, retry_after=12.0) == 12.0
    assert schedule.delay(1, retry_after=600.0) == 30.0


def _delivery(url: str) -> Delivery:
    now = datetime.now(UTC)
    return Delivery(str(uuid.uuid4()), str(uuid.uuid4()), 3, "job.completed", url, a_job(), now, 1, now)


async def test_a_send_resolves_once_and_connects_to_the_address_it_checked() -> None:
    receiver = await Receiver().start()
    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    sender = WebhookSender(
        WebhookStore(None),  # type: ignore[arg-type]  # send_once records nothing
        Signer([new_secret()]),
        lambda job: {"id": job.id},
        SenderConfig("test", 1, 2.0, 1.0, RetrySchedule(1, 2, 10), LENIENT),
        resolve=resolve,
    )
    try:
        outcome = await sender.send_once(_delivery(f"http://hooks.example.test:{receiver.http.port}/in"))
    finally:
        await sender.stop()
        await receiver.stop()
    assert outcome.delivered and outcome.http_status == 200
    assert lookups == ["hooks.example.test"], "one resolution per send"
    assert receiver.requests[0].headers["host"] == f"hooks.example.test:{receiver.http.port}"


async def test_a_name_with_any_forbidden_address_is_refused_and_not_retried() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.1"]  # a rebinding trick: one public answer, one private

    sender = WebhookSender(
        WebhookStore(None),  # type: ignore[arg-type]
        Signer([new_secret()]),
        lambda job: {},
        SenderConfig("test", 1, 2.0, 1.0, RetrySchedule(1, 2, 10), STRICT),
        resolve=resolve,
    )
    try:
        outcome = await sender.send_once(_delivery("https://hooks.example.test/in"))
    finally:
        await sender.stop()
    assert not outcome.delivered and outcome.retry_in is None
    assert "10.0.0.1" in outcome.error and outcome.http_status is None


async def test_redirects_are_not_followed() -> None:
    target = await Receiver().start()

    async def moved(exchange: Exchange) -> Reply:
        return Reply(307, headers={"location": target.url})

    redirecting = await Receiver(moved).start()

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    sender = WebhookSender(
        WebhookStore(None),  # type: ignore[arg-type]
        Signer([new_secret()]),
        lambda job: {},
        SenderConfig("test", 1, 2.0, 1.0, RetrySchedule(1, 2, 10), LENIENT),
        resolve=resolve,
    )
    try:
        outcome = await sender.send_once(_delivery(redirecting.url))
    finally:
        await sender.stop()
        await target.stop()
        await redirecting.stop()
    assert not outcome.delivered and outcome.http_status == 307 and outcome.retry_in is not None
    assert target.requests == []


def test_a_bad_secret_stops_the_service_at_start() -> None:
    from prometheus_client import CollectorRegistry

    from job_service.config import ConfigurationError, JobSettings
    from job_service.metrics import WebhookMetrics
    from job_service.server import build_webhook_sender

    settings = JobSettings(_env_file=None, webhook_secrets=["whsec_dG9vIHNob3J0"])  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="JOB_WEBHOOK_SECRETS"):
        build_webhook_sender(settings, WebhookStore(None), "test", WebhookMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    off = JobSettings(_env_file=None)  # type: ignore[call-arg]
    assert build_webhook_sender(off, WebhookStore(None), "t", WebhookMetrics(CollectorRegistry())) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(("certified", "delivered"), [("hooks.example.test", True), ("other.example.test", False)])
async def test_tls_is_checked_against_the_name_while_connecting_to_the_checked_address(
    tmp_path: Path, certified: str, delivered: bool
) -> None:
    ca = CertificateAuthority(tmp_path, "webhook-ca")
    leaf = ca.issue("receiver", server=True, dns_names=(certified,))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(leaf.cert, leaf.key)
    receiver = await Receiver().start(tls=server_tls)

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    http = httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca.pem.cert)), trust_env=False)
    sender = WebhookSender(
        WebhookStore(None),  # type: ignore[arg-type]
        Signer([new_secret()]),
        lambda job: {},
        SenderConfig("test", 1, 2.0, 1.0, RetrySchedule(1, 2, 10), LENIENT),
        http=http,
        resolve=resolve,
    )
    try:
        outcome = await sender.send_once(_delivery(f"https://hooks.example.test:{receiver.http.port}/in"))
    finally:
        await sender.stop()
        await receiver.stop()
    assert outcome.delivered is delivered, outcome
    if delivered:
        assert receiver.requests[0].headers["host"] == f"hooks.example.test:{receiver.http.port}"
    else:
        assert "CERTIFICATE_VERIFY_FAILED" in outcome.error or "certificate" in outcome.error.lower(), outcome.error
        assert receiver.requests == []
