"""A tiny real HTTP/1.1 server on 127.0.0.1 for the generator tests (asyncio streams, no framework).

It exists so the code under test talks to a real socket through its real httpx client (timeouts,
keep-alive, connection closing on cancel), and so a test can see what a real server would see: the
exact request, how many requests were in flight at once, and a client that hangs up mid-request.
The fake services (fake_google, fake_supabase) are handlers on top of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case
    body: bytes
    received_at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(payload).encode(), {"content-type": "application/json", **(headers or {})})


class Exchange:
    """One request being answered; lets a handler wait for the client to hang up."""

    def __init__(self, request: RecordedRequest, reader: asyncio.StreamReader) -> None:
        self.request = request
        self._reader = reader

    async def client_disconnected(self, within: float) -> bool:
        """True once the client closes the connection (EOF), False if it is still there after `within` s."""
        try:
            async with asyncio.timeout(within):
                while True:
                    if not await self._reader.read(1024):
                        return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True


Handler = Callable[[Exchange], Awaitable[Reply]]


class FakeHttpServer:
    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.disconnects = 0  # requests whose client hung up before the answer was written
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        """Client connections still open (each ends when its client closes it)."""
        return len(self._connections)

    async def start(self, port: int = 0, tls: ssl.SSLContext | None = None) -> FakeHttpServer:
        """Listens on `port` (0: any free one; a fixed port lets a test bring a receiver back where it was), with
        TLS when `tls` is given."""
        self._server = await asyncio.start_server(self._serve_connection, "127.0.0.1", port, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing our side ends every connection loop (and every handler waiting for a disconnect).
        for writer in list(self._writers):
            writer.close()
        if self._connections:
            _done, pending = await asyncio.wait(self._connections, timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                self.requests.append(request)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    reply = await self._handler(Exchange(request, reader))
                finally:
                    # Counted out before the answer is written: once the client has the answer it may
                    # send its next request, which must not look concurrent with this one.
                    self.in_flight -= 1
                if reader.at_eof():
                    self.disconnects += 1
                    return
                try:
                    writer.write(_encode(reply))
                    await writer.drain()
                except ConnectionError:
                    self.disconnects += 1
                    return
                if request.headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._connections.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> RecordedRequest | None:
    line = await reader.readline()
    if not line:
        return None
    method, target, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        header = (await reader.readline()).decode("latin-1").rstrip("\r\n")
        if not header:
            break
        name, _, value = header.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    parts = urlsplit(target)
    return RecordedRequest(method, parts.path, parse_qs(parts.query), headers, body)


def _encode(reply: Reply) -> bytes:
    try:
        phrase = HTTPStatus(reply.status).phrase
    except ValueError:
        phrase = "Status"
    head = [f"HTTP/1.1 {reply.status} {phrase}", f"content-length: {len(reply.body)}"]
    head += [f"{name}: {value}" for name, value in reply.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body


class FakeService:
    """A fake remote service: one FakeHttpServer answering with this object's `_handle`."""

    def __init__(self) -> None:
        self.http = FakeHttpServer(self._handle)

    @property
    def url(self) -> str:
        return self.http.url

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.http.requests

    async def start(self) -> Self:
        await self.http.start()
        return self

    async def stop(self) -> None:
        await self.http.stop()

    async def _handle(self, exchange: Exchange) -> Reply:
        raise NotImplementedError
