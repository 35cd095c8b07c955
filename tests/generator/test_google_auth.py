"""The Vertex token source: ADC credentials refreshed off the event loop, cached until near expiry."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import google.auth.exceptions
import pytest

from generator_service.providers.google_auth import AdcTokenSource
from imagegen_common.errors import ErrorKind, ServiceError
from tests.generator.fake_http import Exchange, FakeHttpServer, Reply


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class FakeCredentials:
    """Acts like google.auth credentials: refresh(request) POSTs to a token endpoint through `request`."""

    def __init__(self, token_url: str, lifetime: timedelta) -> None:
        self.token_url = token_url
        self.lifetime = lifetime
        self.token: str | None = None
        self.expiry: datetime | None = None
        self.refresh_threads: list[int] = []

    def refresh(self, request: Any) -> None:
        self.refresh_threads.append(threading.get_ident())
        response = request(self.token_url, method="POST", body=b"grant_type=refresh", headers={"x-test": "1"})
        if response.status != 200:
            raise google.auth.exceptions.RefreshError("invalid_grant: Token has been expired or revoked.")  # type: ignore[no-untyped-call]
        self.token = response.data.decode()
        self.expiry = utc_now() + self.lifetime


@pytest.fixture
async def token_endpoint() -> Any:
    issued: list[str] = []

    async def handle(exchange: Exchange) -> Reply:
        issued.append(f"token-{len(issued) + 1}")
        return Reply(200, issued[-1].encode(), {"content-type": "text/plain"})

    server = FakeHttpServer(handle)
    await server.start()
    yield server
    await server.stop()


async def test_the_token_is_fetched_once_in_a_worker_thread_and_cached(
    token_endpoint: FakeHttpServer,
) -> None:
    credentials = FakeCredentials(f"{token_endpoint.url}/token", timedelta(hours=1))
    factory_calls: list[int] = []

    def factory() -> FakeCredentials:
        factory_calls.append(threading.get_ident())
        return credentials

    tokens = AdcTokenSource(credentials_factory=factory)
    assert [await tokens.token() for _ in range(3)] == ["token-1"] * 3
    await tokens.aclose()

    assert len(token_endpoint.requests) == 1
    assert token_endpoint.requests[0].body == b"grant_type=refresh"
    assert token_endpoint.requests[0].headers["x-test"] == "1"
    # Neither ADC discovery nor the refresh ran on the event loop's thread.
    loop_thread = threading.get_ident()
    assert loop_thread not in factory_calls and loop_thread not in credentials.refresh_threads


async def test_a_token_near_expiry_is_refreshed(token_endpoint: FakeHttpServer) -> None:
    credentials = FakeCredentials(f"{token_endpoint.url}/token", timedelta(minutes=2))
    tokens = AdcTokenSource(credentials_factory=lambda: credentials, refresh_margin=timedelta(minutes=5))
    assert await tokens.token() == "token-1"
    assert await tokens.token() == "token-2"  # two minutes left is inside the five-minute margin
    await tokens.aclose()


async def test_invalidate_forces_a_new_token(token_endpoint: FakeHttpServer) -> None:
    credentials = FakeCredentials(f"{token_endpoint.url}/token", timedelta(hours=1))
    tokens = AdcTokenSource(credentials_factory=lambda: credentials)
    assert await tokens.token() == "token-1"
    tokens.invalidate()
    assert await tokens.token() == "token-2"
    await tokens.aclose()


async def test_missing_credentials_are_a_permanent_configuration_error() -> None:
    def no_credentials() -> Any:
        raise google.auth.exceptions.DefaultCredentialsError("Your default credentials were not found.")  # type: ignore[no-untyped-call]

    tokens = AdcTokenSource(credentials_factory=no_credentials)
    with pytest.raises(ServiceError) as caught:
        await tokens.token()
    await tokens.aclose()
    assert (caught.value.kind, caught.value.reason, caught.value.metadata["retryable"]) == (
        ErrorKind.PERMISSION_DENIED,
        "PROVIDER_CREDENTIALS_MISSING",
        "false",
    )


async def test_an_unreachable_token_endpoint_is_retryable(token_endpoint: FakeHttpServer) -> None:
    url = f"{token_endpoint.url}/token"
    await token_endpoint.stop()
    tokens = AdcTokenSource(credentials_factory=lambda: FakeCredentials(url, timedelta(hours=1)))
    with pytest.raises(ServiceError) as caught:
        await tokens.token()
    await tokens.aclose()
    assert (caught.value.reason, caught.value.metadata["retryable"]) == ("PROVIDER_UNAVAILABLE", "true")
