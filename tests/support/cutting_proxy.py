"""A TCP proxy between a gRPC client and server that loses answers: the request reaches the server, which handles it
(and commits), but the connection is cut when the answer starts back, before any byte of it reaches the client.

It reads the server-to-client byte stream as HTTP/2 frames (h2c, plaintext gRPC) and, while `cuts_left` > 0, aborts
both connections on the first HEADERS frame of a stream (a response's headers: gRPC sends them only once the
handler has returned). The client sees the connection drop, as after a network failure, and reports UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

FRAME_HEADER = 9
HEADERS = 0x1


class AnswerCuttingProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, cuts: int = 1) -> None:
        self._upstream = (upstream_host, upstream_port)
        self.cuts_left = cuts
        self.cut = 0  # answers lost so far
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def target(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self._upstream)
            up = asyncio.create_task(self._pipe(client_reader, server_writer))
            down = asyncio.create_task(self._frames(server_reader, client_writer, server_writer))
            try:
                await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in (up, down):
                    pump.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
                for writer in (client_writer, server_writer):
                    writer.transport.abort()
        except (OSError, asyncio.CancelledError):
            client_writer.transport.abort()
        finally:
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def _frames(
        self, reader: asyncio.StreamReader, to_client: asyncio.StreamWriter, to_server: asyncio.StreamWriter
    ) -> None:
        buffer = b""
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                buffer += data
                while len(buffer) >= FRAME_HEADER:
                    size = FRAME_HEADER + int.from_bytes(buffer[0:3], "big")
                    if len(buffer) < size:
                        break
                    kind, stream = buffer[3], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                    if kind == HEADERS and stream != 0 and self.cuts_left > 0:
                        self.cuts_left -= 1
                        self.cut += 1
                        to_client.transport.abort()
                        to_server.transport.abort()
                        return
                    to_client.write(buffer[:size])
                    buffer = buffer[size:]
                await to_client.drain()


@asynccontextmanager
async def answer_cutting_proxy(upstream_port: int, *, cuts: int = 1) -> AsyncIterator[AnswerCuttingProxy]:
    proxy = AnswerCuttingProxy("127.0.0.1", upstream_port, cuts=cuts)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
