"""A Storage request that runs out of time says which of httpx's four timeouts it was and which setting governs it.

Each timeout is made for real on 127.0.0.1: a listener whose accept queue is full (connect), the fake Storage
holding its answer (read), a server that never reads the upload (write), a pool of one busy connection (pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from storage3 import AsyncStorageClient

from generator_service.retry import RetryPolicy
from generator_service.storage.supabase import SupabaseStorage
from imagegen_common.errors import ErrorKind, ServiceError
from tests.generator.fake_google import hang
from tests.generator.fake_supabase import FakeSupabaseStorage

KEY = "test-service-key"
NO_RETRIES = RetryPolicy(max_retries=0, max_total_seconds=5.0, backoff_initial_seconds=0.01, backoff_max_seconds=0.01)
PATH = "user-1/job-1/1-0.png"


async def upload_error(store: SupabaseStorage, data: bytes = b"\x89PNG not really") -> ServiceError:
    try:
        with pytest.raises(ServiceError) as caught:
            await store.upload(PATH, data, "image/png")
    finally:
        await store.aclose()
    return caught.value


def assert_names_the_timeout(error: ServiceError, which: str, seconds: float) -> None:
    assert (error.kind, error.reason, error.metadata["retryable"]) == (
        ErrorKind.UNAVAILABLE,
        "STORAGE_UNAVAILABLE",
        "true",
    )
    assert f"the {which} timeout ({seconds:g} s, GEN_STORAGE_TIMEOUT_SECONDS) ran out" in error.message
    others = {"connect", "read", "write", "pool"} - {which}
    assert not any(f"the {other} timeout" in error.message for other in others)


@contextlib.contextmanager
def listener_with_a_full_accept_queue() -> Iterator[str]:
    """A port that is listened on but whose accept queue is full: the kernel drops further SYNs, so a connect
    neither succeeds nor fails until the client gives up."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(address)
            fillers.append(filler)
        yield f"http://{address[0]}:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


@contextlib.asynccontextmanager
async def server_that_never_reads() -> AsyncIterator[str]:
    """Accepts connections and reads nothing from them, so an upload stalls once the socket buffers are full."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_connect_timeout_says_so() -> None:
    with listener_with_a_full_accept_queue() as url:
        store = SupabaseStorage.create(url, KEY, "images", policy=NO_RETRIES, timeout_seconds=0.3)
        error = await upload_error(store)
    assert_names_the_timeout(error, "connect", 0.3)


async def test_a_read_timeout_says_so(supabase_storage_api: FakeSupabaseStorage) -> None:
    supabase_storage_api.upload_faults.append(hang(5.0))
    store = SupabaseStorage.create(supabase_storage_api.url, KEY, "images", policy=NO_RETRIES, timeout_seconds=0.3)
    assert_names_the_timeout(await upload_error(store), "read", 0.3)


async def test_a_write_timeout_says_so() -> None:
    async with server_that_never_reads() as url:
        store = SupabaseStorage.create(url, KEY, "images", policy=NO_RETRIES, timeout_seconds=0.3)
        # Far more than loopback's socket buffers hold, so the upload has to wait for a reader that never reads.
        error = await upload_error(store, b"\0" * (64 * 1024 * 1024))
    assert_names_the_timeout(error, "write", 0.3)


async def test_a_pool_timeout_says_so(supabase_storage_api: FakeSupabaseStorage) -> None:
    # SupabaseStorage.create sets no connection limit; a client with a pool of one shows the pool timeout.
    http = httpx.AsyncClient(timeout=httpx.Timeout(5.0, pool=0.2), limits=httpx.Limits(max_connections=1))
    client = AsyncStorageClient(
        f"{supabase_storage_api.url}/storage/v1/", {"apikey": KEY, "Authorization": f"Bearer {KEY}"}, http_client=http
    )
    store = SupabaseStorage(client, "images", policy=NO_RETRIES, http=http)
    supabase_storage_api.upload_faults.append(hang(5.0))
    first = asyncio.create_task(store.upload("user-1/job-1/1-1.png", b"first", "image/png"))
    try:
        await asyncio.sleep(0.2)  # the first upload holds the pool's only connection
        with pytest.raises(ServiceError) as caught:
            await store.upload(PATH, b"second", "image/png")
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await store.aclose()
    assert_names_the_timeout(caught.value, "pool", 0.2)
