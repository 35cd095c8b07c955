"""A webhook receiver for the tests (a real HTTP server on 127.0.0.1), and the Standard Webhooks verification
written from the specification, apart from imagegen_client's, so that a bug in one is not hidden by the other."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tests.generator.fake_http import Exchange, FakeHttpServer, RecordedRequest, Reply


def new_secret() -> str:
    """A Standard Webhooks symmetric secret: whsec_ + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def spec_signature_valid(secret: str, request: RecordedRequest) -> bool:
    """The spec's check: some `v1,<sig>` in webhook-signature equals base64(HMAC-SHA256(base64-decoded secret,
    "{webhook-id}.{webhook-timestamp}.{body}"))."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = (
        request.headers["webhook-id"].encode()
        + b"."
        + request.headers["webhook-timestamp"].encode()
        + b"."
        + request.body
    )
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for entry in request.headers["webhook-signature"].split(" "):
        version, _, signature = entry.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return True
    return False


class Receiver:
    """Answers every webhook with `status` (or whatever `answer` returns) and keeps what it received."""

    def __init__(self, answer: Callable[[Exchange], Awaitable[Reply]] | None = None) -> None:
        self.status = 200
        self._answer = answer
        self.http = FakeHttpServer(self._handle)
        self.arrived = asyncio.Event()

    async def _handle(self, exchange: Exchange) -> Reply:
        self.arrived.set()
        if self._answer is not None:
            return await self._answer(exchange)
        return Reply(self.status)

    async def start(self, port: int = 0, tls: ssl.SSLContext | None = None) -> Receiver:
        await self.http.start(port, tls)
        return self

    async def stop(self) -> None:
        await self.http.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}/hooks/imagegen?token=abc"

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.http.requests

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in self.requests]

    def first_of_each(self) -> list[RecordedRequest]:
        """One request per webhook-id, the first that arrived (a redelivery is allowed: at least once)."""
        seen: set[str] = set()
        firsts = []
        for request in self.requests:
            if request.headers["webhook-id"] not in seen:
                seen.add(request.headers["webhook-id"])
                firsts.append(request)
        return firsts


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.1)
