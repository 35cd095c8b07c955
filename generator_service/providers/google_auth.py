"""OAuth access tokens for Vertex AI from Application Default Credentials, without blocking the event loop.

google-auth is synchronous and ships transports only for `requests`/`urllib3` (not installed here), so
token refreshes run in a worker thread through a small adapter over a synchronous httpx client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import google.auth
import google.auth.exceptions
import google.auth.transport
import httpx

from generator_service.domain import generation_error
from imagegen_common.errors import ErrorKind

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


class TokenSource(Protocol):
    async def token(self) -> str: ...

    def invalidate(self) -> None:
        """Drops the cached token (after the API answered 401), so the next call fetches a new one."""
        ...

    async def aclose(self) -> None: ...


class BearerTokenAuth:
    """`Authorization: Bearer <token>` from a TokenSource (the RequestAuth of providers.http)."""

    def __init__(self, source: TokenSource) -> None:
        self._source = source

    async def headers(self) -> Mapping[str, str]:
        return {"authorization": f"Bearer {await self._source.token()}"}

    def invalidate(self) -> bool:
        self._source.invalidate()
        return True


class _AuthResponse(google.auth.transport.Response):
    def __init__(self, status: int, headers: Mapping[str, str], data: bytes) -> None:
        self._status, self._headers, self._data = status, headers, data

    @property
    def status(self) -> int:
        return self._status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def data(self) -> bytes:
        return self._data


class HttpxAuthRequest(google.auth.transport.Request):
    """google-auth's transport interface over a synchronous httpx client (used from worker threads only)."""

    def __init__(self, client: httpx.Client) -> None:
        self._client = client

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _AuthResponse:
        try:
            response = self._client.request(
                method,
                url,
                content=body,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            raise google.auth.exceptions.TransportError(str(exc)) from exc  # type: ignore[no-untyped-call]
        return _AuthResponse(response.status_code, dict(response.headers), response.content)


def _application_default_credentials() -> Any:
    credentials, _project = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
    return credentials


class AdcTokenSource:
    """Caches the access token until `refresh_margin` before it expires (tokens live about an hour)."""

    def __init__(
        self,
        *,
        refresh_margin: timedelta = timedelta(minutes=5),
        credentials_factory: Callable[[], Any] = _application_default_credentials,
        http_timeout: float = 30.0,
    ) -> None:
        self._factory = credentials_factory
        self._margin = refresh_margin
        self._credentials: Any = None
        self._lock = asyncio.Lock()
        self._http = httpx.Client(timeout=http_timeout)

    def _fresh(self) -> bool:
        credentials = self._credentials
        if credentials is None or not credentials.token:
            return False
        expiry: datetime | None = credentials.expiry  # naive UTC, google-auth's convention
        if expiry is None:
            return True
        return datetime.now(UTC).replace(tzinfo=None) < expiry - self._margin

    async def token(self) -> str:
        # One refresh at a time: a burst of requests at expiry must not start a burst of refreshes.
        async with self._lock:
            if not self._fresh():
                try:
                    if self._credentials is None:
                        # Reads files, maybe asks the metadata server: blocking, so off the loop too.
                        self._credentials = await asyncio.to_thread(self._factory)
                    await asyncio.to_thread(self._credentials.refresh, HttpxAuthRequest(self._http))
                except google.auth.exceptions.DefaultCredentialsError as exc:
                    raise generation_error(
                        ErrorKind.PERMISSION_DENIED,
                        "PROVIDER_CREDENTIALS_MISSING",
                        f"no Application Default Credentials for Vertex AI: {exc}",
                        retryable=False,
                    ) from exc
                except google.auth.exceptions.TransportError as exc:
                    raise generation_error(
                        ErrorKind.UNAVAILABLE,
                        "PROVIDER_UNAVAILABLE",
                        f"could not reach the token endpoint: {exc}",
                        retryable=True,
                    ) from exc
                except google.auth.exceptions.RefreshError as exc:
                    if exc.retryable:
                        raise generation_error(
                            ErrorKind.UNAVAILABLE,
                            "PROVIDER_UNAVAILABLE",
                            f"token refresh failed: {exc}",
                            retryable=True,
                        ) from exc
                    raise generation_error(
                        ErrorKind.PERMISSION_DENIED,
                        "PROVIDER_UNAUTHENTICATED",
                        f"the Application Default Credentials were refused: {exc}",
                        retryable=False,
                    ) from exc
            return str(self._credentials.token)

    def invalidate(self) -> None:
        if self._credentials is not None:
            self._credentials.token = None

    async def aclose(self) -> None:
        self._http.close()


class StaticTokenSource:
    """A fixed token (tests, or a token minted elsewhere); `invalidate` cannot make it any fresher."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token

    def invalidate(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
