"""The local storage HTTP server over real sockets: only the bucket's objects, one 404 for everything else, and
clients that connect and send nothing (or half a request) neither keep a download out nor stay forever."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from generator_service.storage.local import LocalStorage
from generator_service.storage.local_http import LocalStorageServer
from tests.generator.fake_google import image_bytes
from tests.generator.helpers import JOB_ID, USER_ID, job_uuid

OTHER_USER = "3f2e1d0c-9b8a-4765-8432-10fedcba9876"
PUBLIC = "/storage/v1/object/public"
PNG = image_bytes(64, 64, "image/png")
JPEG = image_bytes(64, 64, "image/jpeg")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw_get(port: int, target: str, method: str = "GET") -> Answer:
    """Sends the request target exactly as given (no client-side normalising of `..` or percent-escapes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"))
        await writer.drain()
        async with asyncio.timeout(30):
            data = await reader.read()  # to EOF: the server closes after answering
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Answer(int(lines[0].split(" ")[1]), headers, body)


@contextmanager
def serving(root: Path, **options: Any) -> Iterator[LocalStorageServer]:
    server = LocalStorageServer(root, "127.0.0.1", 0, bucket="images", **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def stored(tmp_path: Path) -> AsyncIterator[Path]:
    """A storage root with two objects of one job in the bucket, and files outside the bucket."""
    storage = LocalStorage(tmp_path, "images", "http://unused")
    await storage.upload(f"{USER_ID}/{JOB_ID}/1-0.png", PNG, "image/png")
    await storage.upload(f"{USER_ID}/{JOB_ID}/1-1.jpg", JPEG, "image/jpeg")
    (tmp_path / "outside.txt").write_text("not an object")
    (tmp_path / "other" / USER_ID / JOB_ID).mkdir(parents=True)
    (tmp_path / "other" / USER_ID / JOB_ID / "1-0.png").write_bytes(PNG)  # another bucket's folder
    (tmp_path / "images" / "notes.txt").write_text("in the bucket, but not an object key")
    yield tmp_path


async def test_objects_download_with_their_content_type(stored: Path) -> None:
    with serving(stored) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            png = await client.get(f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/1-0.png")
            jpeg = await client.get(f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/1-1.jpg")
            head = await client.head(f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/1-0.png")
            again = await client.get(f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/1-0.png?download=1")  # same connection
    assert (png.status_code, png.headers["content-type"], png.content) == (200, "image/png", PNG)
    assert (jpeg.status_code, jpeg.headers["content-type"], jpeg.content) == (200, "image/jpeg", JPEG)
    assert (head.status_code, head.headers["content-length"], head.content) == (200, str(len(PNG)), b"")
    assert (again.status_code, again.content) == (200, PNG)


TRAVERSALS = [
    f"{PUBLIC}/images/../outside.txt",
    f"{PUBLIC}/images/%2e%2e/outside.txt",
    f"{PUBLIC}/images/%2E%2E/outside.txt",
    f"{PUBLIC}/images/..%2foutside.txt",
    f"{PUBLIC}/images%2f..%2foutside.txt",
    f"{PUBLIC}/../../../outside.txt",
    f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/../../../outside.txt",
    f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/..%2f..%2f..%2foutside.txt",
    f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/%2e%2e/%2e%2e/%2e%2e/outside.txt",
    f"{PUBLIC}/images/{USER_ID}/%2e%2e/{USER_ID}/{JOB_ID}/1-0.png",
    f"{PUBLIC}/other/{USER_ID}/{JOB_ID}/1-0.png",  # another folder of the storage root
    f"{PUBLIC}/images/../other/{USER_ID}/{JOB_ID}/1-0.png",
    f"{PUBLIC}/images/notes.txt",
    "/outside.txt",
    "/images/notes.txt",
    f"{PUBLIC}/images/{USER_ID.upper()}/{JOB_ID}/1-0.png",
    f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/1-0.png/",
    f"{PUBLIC}/images/{USER_ID}/{JOB_ID}//1-0.png",
    f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/./1-0.png",
    f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/1-0%2epng",
]


async def test_anything_but_an_object_of_the_bucket_is_the_same_404(stored: Path) -> None:
    with serving(stored) as server:
        missing = await raw_get(server.port, f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/1-7.png")
        answers = {target: await raw_get(server.port, target) for target in TRAVERSALS}
    assert missing.status == 404
    for target, answer in answers.items():
        assert (answer.status, answer.body, answer.headers.get("content-type")) == (
            missing.status,
            missing.body,
            missing.headers.get("content-type"),
        ), target
        assert b"not an object" not in answer.body


async def test_a_folder_answers_exactly_like_a_missing_one(stored: Path) -> None:
    """No redirect, no listing: the answers do not tell which users or jobs exist."""
    pairs = [
        (f"{PUBLIC}/images/{USER_ID}", f"{PUBLIC}/images/{OTHER_USER}"),
        (f"{PUBLIC}/images/{USER_ID}/", f"{PUBLIC}/images/{OTHER_USER}/"),
        (f"{PUBLIC}/images/{USER_ID}/{JOB_ID}", f"{PUBLIC}/images/{USER_ID}/{job_uuid('none')}"),
        (f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/", f"{PUBLIC}/images/{USER_ID}/{job_uuid('none')}/"),
        (f"{PUBLIC}/images/", f"{PUBLIC}/nothing/"),
        (f"{PUBLIC}/images", f"{PUBLIC}/nothing"),
    ]
    with serving(stored) as server:
        for existing, missing in pairs:
            there, absent = await raw_get(server.port, existing), await raw_get(server.port, missing)
            assert there.status == 404, existing
            assert (there.status, there.headers, there.body) == (absent.status, absent.headers, absent.body)
            assert "location" not in there.headers


async def half_sent(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` connections that each send the start of a request and then nothing more."""
    connections = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {PUBLIC}/images/{USER_ID}/{JOB_ID}/1-0.png HTTP/1.1\r\nHost: x\r\n".encode())
        await writer.drain()
        connections.append((reader, writer))
    return connections


async def still_open(reader: asyncio.StreamReader) -> bool:
    """True if the server has neither answered nor closed this connection yet."""
    try:
        await asyncio.wait_for(reader.read(1), timeout=0.01)
    except TimeoutError:
        return True
    except ConnectionError:  # closed with a reset
        return False
    return False


async def closed_without_an_answer(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        async with asyncio.timeout(within):
            return await reader.read() == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def download(port: int) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{port}{PUBLIC}/images/{USER_ID}/{JOB_ID}/1-0.png")


async def test_idle_half_sent_connections_neither_keep_a_download_out_nor_stay(stored: Path) -> None:
    # The timeout is long next to a download, so "promptly" is judged by order, not by a stopwatch: the
    # download is served while every idle connection is still being held.
    with serving(stored, request_timeout_seconds=30.0, max_connections=512) as server:
        idle = await half_sent(server.port, 200)
        try:
            answer = await download(server.port)
            assert (answer.status_code, answer.content) == (200, PNG)
            assert all([await still_open(reader) for reader, _ in idle])
        finally:
            for _, writer in idle:
                writer.close()


async def test_idle_half_sent_connections_are_dropped_after_the_request_timeout(stored: Path) -> None:
    with serving(stored, request_timeout_seconds=1.0) as server:
        idle = await half_sent(server.port, 50)
        try:
            # Dropped, without an answer, once they have had the timeout (generous slack for a loaded machine).
            dropped = await asyncio.gather(*(closed_without_an_answer(reader, within=60.0) for reader, _ in idle))
            assert all(dropped)
            answer = await download(server.port)
            assert (answer.status_code, answer.content) == (200, PNG)
        finally:
            for _, writer in idle:
                writer.close()


async def count_closed(idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], expected: int) -> int:
    """How many of these connections the server has closed, polled until it is `expected` (or 30 s passed)."""
    closed: set[int] = set()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            while len(closed) < expected:
                for n, (reader, _) in enumerate(idle):
                    if n not in closed and not await still_open(reader):
                        closed.add(n)
    return len(closed)


async def test_past_the_connection_cap_the_longest_idle_connections_make_room(stored: Path) -> None:
    with serving(stored, request_timeout_seconds=60.0, max_connections=8) as server:
        idle = await half_sent(server.port, 40)
        try:
            # Never more than the cap held: the 32 that waited longest were closed, without an answer, to let
            # the newest 8 in ...
            assert await count_closed(idle, 32) == 32
            # ... and a download gets in the same way, served at once although 8 idle connections fill the cap.
            answer = await download(server.port)
            assert (answer.status_code, answer.content) == (200, PNG)
            assert await count_closed(idle, 33) == 33
            assert sum([await still_open(reader) for reader, _ in idle]) == 7
        finally:
            for _, writer in idle:
                writer.close()


async def test_only_get_and_head(stored: Path) -> None:
    with serving(stored) as server:
        answer = await raw_get(server.port, f"{PUBLIC}/images/{USER_ID}/{JOB_ID}/1-0.png", method="DELETE")
    assert answer.status == 405 and answer.headers["allow"] == "GET, HEAD"
    assert (stored / "images" / USER_ID / JOB_ID / "1-0.png").exists()


async def test_a_huge_request_head_is_dropped(stored: Path) -> None:
    with serving(stored) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\n" + b"X-Padding: " + b"a" * 20_000 + b"\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            assert await closed_without_an_answer(reader, 30.0)
        finally:
            writer.close()
