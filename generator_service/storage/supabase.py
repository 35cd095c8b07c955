"""Supabase Storage through storage3's AsyncStorageClient (the storage part of supabase-py).

storage3 alone is enough here: `acreate_client` would also build auth, PostgREST, realtime and
functions clients the generator never uses. Headers and URL are what `acreate_client` would set
(`apikey` + `Authorization: Bearer <service key>`, base `{SUPABASE_URL}/storage/v1/`).

Uploads are upserts (`file_options` keys are header-style: "content-type", and "upsert" as the
*string* "true"), so rerunning an attempt overwrites its own objects. Storage reports errors with
HTTP 400 and the real status as a string in the body's `statusCode` (external-apis.md §6); storage3
surfaces it as `StorageApiError.status`, which is what decides here whether to retry.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import structlog
from storage3 import AsyncStorageClient
from storage3.exceptions import StorageApiError
from storage3.types import ListBucketFilesOptions

from generator_service import timeouts
from generator_service.config import ConfigurationError
from generator_service.domain import generation_error
from generator_service.retry import RetryPolicy
from generator_service.storage.base import MAX_LISTED, UploadedObject
from imagegen_common.errors import ErrorKind, ServiceError

log = structlog.get_logger(__name__)
T = TypeVar("T")

_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# A folder listing reads pages of this many entries (storage3's default page), up to MAX_LISTED keys in all;
# a deletion sends at most _DELETE_CHUNK keys a request.
_LIST_PAGE = 100
_DELETE_CHUNK = 1_000


def _status(error: StorageApiError) -> int | None:
    try:
        return int(error.status)
    except (TypeError, ValueError):
        return None


def _is_conflict(error: StorageApiError) -> bool:
    return _status(error) == 409 or error.code == "Duplicate" or "already exists" in error.message.lower()


def _is_retryable(exc: Exception) -> bool:
    if isinstance(exc, StorageApiError):
        status = _status(exc)
        return not _is_conflict(exc) and (status is None or status in _RETRYABLE_STATUSES or status >= 500)
    return isinstance(exc, httpx.TransportError)


# What running out of each of httpx's timeouts means here; all four are GEN_STORAGE_TIMEOUT_SECONDS (see create).
_TIMEOUT_MEANINGS = {
    "connect": "no connection to Storage could be opened",
    "read": "Storage sent nothing (more) of its answer",
    "write": "Storage took nothing (more) of the request",
    "pool": "no connection of the client's pool came free",
}


def _transport_detail(exc: Exception) -> str:
    """What went wrong on the way; a timeout names itself and its setting (a bare ReadTimeout('') says neither)."""
    if isinstance(exc, httpx.TimeoutException):
        which, _seconds = timeouts.which_timeout(exc)
        meaning = _TIMEOUT_MEANINGS.get(which, "Storage did not answer in time")
        return f"{timeouts.describe(exc, 'GEN_STORAGE_TIMEOUT_SECONDS')}: {meaning}"
    return repr(exc)


def _service_error(exc: Exception, action: str, key: str) -> ServiceError:
    what = f"storage {action} of {key} failed"
    if not isinstance(exc, StorageApiError):
        return generation_error(
            ErrorKind.UNAVAILABLE, "STORAGE_UNAVAILABLE", f"{what}: {_transport_detail(exc)}", retryable=True
        )
    said = f"{exc.message} (statusCode {exc.status}, {exc.code})"
    status = _status(exc)
    if _is_conflict(exc):
        # We always upsert, so this means something between us and Storage dropped x-upsert.
        return generation_error(
            ErrorKind.ALREADY_EXISTS,
            "STORAGE_CONFLICT",
            f"{what}: the object exists and was not overwritten although the upload asked to upsert; "
            f"check that nothing strips the x-upsert header: {said}",
            retryable=False,
        )
    if _is_retryable(exc):
        return generation_error(ErrorKind.UNAVAILABLE, "STORAGE_UNAVAILABLE", f"{what}: {said}", retryable=True)
    if status in (401, 403):
        return generation_error(
            ErrorKind.PERMISSION_DENIED,
            "STORAGE_PERMISSION_DENIED",
            f"{what}: the service key was refused (check GEN_SUPABASE_SERVICE_KEY): {said}",
            retryable=False,
        )
    if status == 404:
        return generation_error(
            ErrorKind.NOT_FOUND,
            "STORAGE_BUCKET_NOT_FOUND",
            f"{what}: check GEN_STORAGE_BUCKET: {said}",
            retryable=False,
        )
    return generation_error(ErrorKind.FAILED_PRECONDITION, "STORAGE_REJECTED", f"{what}: {said}", retryable=False)


async def _refuse_redirects(response: httpx.Response) -> None:
    """Storage's API never redirects; a redirect (a proxy, a wrong GEN_SUPABASE_URL) is not followed, because
    following it would carry the service key (`apikey`, `Authorization`) to wherever it points."""
    if response.is_redirect:
        target = response.headers.get("location", "")[:200]
        raise generation_error(
            ErrorKind.FAILED_PRECONDITION,
            "STORAGE_REDIRECTED",
            f"storage answered {response.request.method} {response.request.url.path[:200]} with a redirect "
            f"(HTTP {response.status_code}) to {target!r}; redirects are not followed so the service key stays "
            "with GEN_SUPABASE_URL: set GEN_SUPABASE_URL to the Storage origin itself",
            retryable=False,
        )


class SupabaseStorage:
    def __init__(
        self,
        client: AsyncStorageClient,
        bucket: str,
        *,
        policy: RetryPolicy,
        prefix: str = "",
        public: bool = True,
        signed_url_ttl_seconds: int = 3600,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._policy = policy
        self._prefix = prefix.strip("/")
        self._public = public
        self._ttl = signed_url_ttl_seconds
        self._http = http
        self._clock = clock
        self._sleep = sleep

    @classmethod
    def create(
        cls,
        supabase_url: str,
        service_key: str,
        bucket: str,
        *,
        policy: RetryPolicy,
        timeout_seconds: float = 30.0,
        prefix: str = "",
        public: bool = True,
        signed_url_ttl_seconds: int = 3600,
    ) -> SupabaseStorage:
        # Our own httpx client, so the timeout is ours and closing it is ours (storage3 deprecates `timeout`).
        # Redirects are refused, not followed: the client sends the service key with every request.
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_seconds),
            follow_redirects=False,
            event_hooks={"response": [_refuse_redirects]},
        )
        client = AsyncStorageClient(
            f"{supabase_url.rstrip('/')}/storage/v1/",
            {"apikey": service_key, "Authorization": f"Bearer {service_key}"},
            http_client=http,
        )
        return cls(
            client,
            bucket,
            policy=policy,
            prefix=prefix,
            public=public,
            signed_url_ttl_seconds=signed_url_ttl_seconds,
            http=http,
        )

    async def check_bucket(self) -> None:
        """At start: the bucket exists and is as public as GEN_STORAGE_PUBLIC says.

        Otherwise the first job would find out: a missing bucket fails every upload, and public URLs of a
        private bucket answer 400 to whoever opens them while the jobs complete (and are charged).
        """
        setting = f"GEN_STORAGE_BUCKET={self._bucket!r}"
        try:
            bucket = await self._retrying("check", self._bucket, lambda: self._client.get_bucket(self._bucket))
        except ServiceError as error:
            if error.reason == "STORAGE_BUCKET_NOT_FOUND":
                raise ConfigurationError(
                    f"{setting}: bucket not found in the project at GEN_SUPABASE_URL; create it (public or "
                    "private, matching GEN_STORAGE_PUBLIC) or set GEN_STORAGE_BUCKET to one that exists"
                ) from error
            if error.reason == "STORAGE_PERMISSION_DENIED":
                raise ConfigurationError(
                    f"{setting}: Storage refused GEN_SUPABASE_SERVICE_KEY (it needs the service-role or secret "
                    f"key): {error.message}"
                ) from error
            raise ConfigurationError(f"{setting}: the bucket could not be checked: {error.message}") from error
        if bucket.public != self._public:
            actual = "public" if bucket.public else "private"
            result = (
                "public URLs, which a private bucket answers with 400"
                if self._public
                else "signed URLs, although anyone can read the public bucket's objects"
            )
            raise ConfigurationError(
                f"{setting} is {actual} but GEN_STORAGE_PUBLIC={str(self._public).lower()} would hand out "
                f"{result}; set GEN_STORAGE_PUBLIC={str(bucket.public).lower()} or change the bucket"
            )

    def object_key(self, path: str) -> str:
        return f"{self._prefix}/{path}" if self._prefix else path

    async def upload(self, path: str, data: bytes, content_type: str) -> UploadedObject:
        key = self.object_key(path)
        bucket = self._client.from_(self._bucket)
        await self._retrying(
            "upload", key, lambda: bucket.upload(key, data, {"content-type": content_type, "upsert": "true"})
        )
        if self._public:
            # Built locally, but async in the async client.
            return UploadedObject(await bucket.get_public_url(key), key)
        signed = await self._retrying("signing", key, lambda: bucket.create_signed_url(key, self._ttl))
        url = signed.get("signedURL")
        if not url:
            raise generation_error(
                ErrorKind.UNAVAILABLE,
                "STORAGE_UNAVAILABLE",
                f"storage returned no signed URL for {key}",
                retryable=True,
            )
        return UploadedObject(url, key)

    async def list_folder(self, folder: str) -> list[str]:
        # POST /object/list/{bucket} {"prefix", "limit", "offset", "sortBy"}: the entries directly in the folder
        # named by `prefix` (Storage appends the "/"), by name, each named relative to it; a sub-folder comes as
        # an entry whose id is null (it is no object). Storage matches the prefix with ILIKE, so an entry may come
        # from a folder that differs in case or in a `_`; the keys built here are in our folder all the same, and
        # deleting a key with no object is a no-op, so such an entry can never take anything outside the folder.
        key = self.object_key(folder.strip("/"))
        bucket = self._client.from_(self._bucket)
        keys: list[str] = []
        while len(keys) < MAX_LISTED:
            options: ListBucketFilesOptions = {
                "limit": _LIST_PAGE,
                "offset": len(keys),
                "sortBy": {"column": "name", "order": "asc"},
            }
            page = await self._retrying("listing", key, functools.partial(bucket.list, key, options))
            keys += [f"{key}/{entry['name']}" for entry in page if entry.get("id") is not None and entry.get("name")]
            if len(page) < _LIST_PAGE:
                break
        return keys[:MAX_LISTED]

    async def delete(self, keys: list[str]) -> None:
        # DELETE /object/{bucket} {"prefixes": [keys]}; keys without an object are skipped by Storage, not refused.
        bucket = self._client.from_(self._bucket)
        for start in range(0, len(keys), _DELETE_CHUNK):
            chunk = keys[start : start + _DELETE_CHUNK]
            await self._retrying("delete", chunk[0], functools.partial(bucket.remove, chunk))

    async def read(self, key: str) -> bytes:
        bucket = self._client.from_(self._bucket)
        try:
            data: bytes = await self._retrying("download", key, lambda: bucket.download(key))
        except ServiceError as error:
            if error.reason != "STORAGE_BUCKET_NOT_FOUND":
                raise
            # Storage answers 404 alike for a missing object and a missing bucket; uploads would fail on the latter,
            # so here it is the object: an earlier job's image deleted since.
            raise generation_error(
                ErrorKind.FAILED_PRECONDITION, "INPUT_IMAGE_NOT_FOUND", error.message, retryable=False
            ) from None
        return data

    async def _retrying(self, action: str, key: str, call: Callable[[], Awaitable[T]]) -> T:
        started = self._clock()
        retries = 0
        while True:
            try:
                return await call()
            except (StorageApiError, httpx.TransportError) as exc:
                delay = self._policy.next_delay(retries, self._clock() - started) if _is_retryable(exc) else None
                if delay is None:
                    raise _service_error(exc, action, key) from exc
                retries += 1
                log.warning(
                    "storage request failed; retrying",
                    action=action,
                    key=key,
                    error=str(exc) if isinstance(exc, StorageApiError) else _transport_detail(exc),
                    retry=retries,
                    delay_seconds=round(delay, 3),
                )
                await self._sleep(delay)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
