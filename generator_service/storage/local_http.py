"""The HTTP server of local storage: GET {PUBLIC_PREFIX}{bucket}/{key} for the bucket's objects, nothing else.

It answers only paths of the exact shape of an object key (`[{prefix}/]{user uuid}/{job uuid}/{attempt}-{index}.
{ext}`, the only keys the generator writes), read from a regular file inside the bucket's folder. Anything else
(another folder of the storage root, `..`, percent-encoded tricks, a folder, a missing object) gets the same 404,
so the answers say nothing about which users or jobs exist.

It runs its own event loop in a thread of its own (named "storage-http"), off the generator's loop. Idle
connections cost no thread: a request's head must arrive within the request timeout, and once
`max_connections` are open a new connection closes the one that has waited longest for a request head
(a slow or idle client), so clients that open connections and send nothing cannot keep a download out;
only when every connection is busy answering is the new one refused with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from generator_service.domain import EXTENSION_TYPES, is_canonical_uuid
from generator_service.storage.local import PUBLIC_PREFIX

_MAX_HEAD_BYTES = 8 * 1024
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_OBJECT_TAIL = re.compile(rf"({_UUID})/({_UUID})/[1-9][0-9]{{0,8}}-(?:0|[1-9][0-9]{{0,8}})\.([a-z]{{1,8}})")


@dataclass(frozen=True)
class _Answer:
    status: int
    reason: str
    content_type: str = "text/plain; charset=utf-8"
    body: bytes = b""
    file: int | None = None  # an open descriptor of the object to send, its size in `size`
    size: int = 0
    extra: tuple[tuple[str, str], ...] = ()


_NOT_FOUND = _Answer(404, "Not Found", body=b"Object not found\n")
_BAD_REQUEST = _Answer(400, "Bad Request", body=b"Bad request\n")
_NOT_ALLOWED = _Answer(405, "Method Not Allowed", body=b"Only GET and HEAD\n", extra=(("Allow", "GET, HEAD"),))
_BUSY = _Answer(503, "Service Unavailable", body=b"Too many connections\n", extra=(("Retry-After", "1"),))


class BucketFiles:
    """Maps a request target to one of the bucket's object files, or to None."""

    def __init__(self, root: Path, bucket: str, prefix: str = "") -> None:
        self._bucket_dir = os.path.realpath(root / bucket)
        prefix = prefix.strip("/")
        # Matched literally against the raw target: nothing is percent-decoded, since no key needs it.
        self._start = f"{PUBLIC_PREFIX}{bucket}/" + (f"{prefix}/" if prefix else "")
        self._prefix = prefix

    def open(self, target: str) -> tuple[int, int, str] | None:
        """(descriptor, size, content type) of the object `target` names, or None for anything else."""
        path = target.split("?", 1)[0]
        if not path.startswith(self._start):
            return None
        tail = path[len(self._start) :]
        shape = _OBJECT_TAIL.fullmatch(tail)
        if shape is None or not (is_canonical_uuid(shape[1]) and is_canonical_uuid(shape[2])):
            return None
        content_type = EXTENSION_TYPES.get(shape[3])
        if content_type is None:
            return None
        key = f"{self._prefix}/{tail}" if self._prefix else tail
        candidate = os.path.join(self._bucket_dir, key)
        # The key's shape allows no "..", but a symlinked folder could still lead out of the bucket.
        if not os.path.realpath(candidate).startswith(self._bucket_dir + os.sep):
            return None
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return None
        return fd, info.st_size, content_type


def _head(answer: _Answer, keep_alive: bool) -> bytes:
    length = answer.size if answer.file is not None else len(answer.body)
    lines = [
        f"HTTP/1.1 {answer.status} {answer.reason}",
        f"Content-Type: {answer.content_type}",
        f"Content-Length: {length}",
        "X-Content-Type-Options: nosniff",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        *(f"{name}: {value}" for name, value in answer.extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class _Request:
    method: str
    target: str
    keep_alive: bool


def _parse(head: bytes) -> _Request | None:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        return None
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            return None
        headers[name.strip().lower()] = value.strip().lower()
    # A request with a body is answered and the connection closed: its body is never read.
    has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
    keep_alive = version == "HTTP/1.1" and headers.get("connection") != "close" and not has_body
    return _Request(method, target, keep_alive)


class LocalStorageServer:
    """Serves the bucket's objects over HTTP from a thread of its own (see the module's docstring)."""

    def __init__(
        self,
        root: Path,
        host: str,
        port: int,
        *,
        bucket: str = "images",
        prefix: str = "",
        request_timeout_seconds: float = 10.0,
        send_timeout_seconds: float = 120.0,
        max_connections: int = 256,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._files = BucketFiles(root, bucket, prefix)
        self._request_timeout = request_timeout_seconds
        self._send_timeout = send_timeout_seconds
        self._max_connections = max_connections
        # Bound here, so a port in use fails the construction and `port` is known before start().
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._socket = socket.socket(family, kind, proto)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind(address)
            self._socket.listen(128)
            self._socket.setblocking(False)
        except BaseException:
            self._socket.close()
            raise
        self.port = int(self._socket.getsockname()[1])
        self._thread = threading.Thread(target=self._run, name="storage-http", daemon=True)
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        # Connections waiting for a request head, oldest first: the ones to close when the cap is reached.
        self._waiting: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()
        self._open: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise RuntimeError("the storage HTTP server could not start") from self._failed

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout=10)
        self._socket.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # start() reports it; nothing else would see it in this thread
            self._failed = exc
        finally:
            self._ready.set()  # also when it failed before it was ready, so start() does not wait forever

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=self._socket, limit=_MAX_HEAD_BYTES)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for writer in list(self._open):
                writer.transport.abort()
            # Each handler ends by itself once its connection is gone; waited for, so none is left to be
            # cancelled when this loop closes.
            if self._handlers:
                await asyncio.wait(self._handlers, timeout=5.0)
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        if len(self._open) >= self._max_connections and not self._make_room():
            with contextlib.suppress(ConnectionError):
                writer.write(_head(_BUSY, keep_alive=False) + _BUSY.body)
            writer.close()
            return
        self._open.add(writer)
        try:
            while True:
                self._waiting[writer] = None
                try:
                    async with asyncio.timeout(self._request_timeout):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return  # too slow, too large, or gone: dropped without an answer
                finally:
                    self._waiting.pop(writer, None)
                request = _parse(head)
                if request is None:
                    await self._send(writer, _BAD_REQUEST, keep_alive=False, body=True)
                    return
                if request.method not in ("GET", "HEAD"):
                    await self._send(writer, _NOT_ALLOWED, keep_alive=False, body=True)
                    return
                found = self._files.open(request.target)
                answer = _NOT_FOUND if found is None else _Answer(200, "OK", found[2], file=found[0], size=found[1])
                if not await self._send(writer, answer, request.keep_alive, body=request.method == "GET"):
                    return
                if not request.keep_alive:
                    return
        finally:
            self._open.discard(writer)
            self._waiting.pop(writer, None)
            writer.close()

    def _make_room(self) -> bool:
        """Closes the connection that has waited longest for a request head; False if none is waiting."""
        if not self._waiting:
            return False
        oldest, _ = self._waiting.popitem(last=False)
        oldest.transport.abort()
        self._open.discard(oldest)
        return True

    async def _send(self, writer: asyncio.StreamWriter, answer: _Answer, keep_alive: bool, *, body: bool) -> bool:
        """Writes the answer within the send timeout; False if the connection is done for."""
        try:
            async with asyncio.timeout(self._send_timeout):
                writer.write(_head(answer, keep_alive))
                if body and answer.file is None:
                    writer.write(answer.body)
                await writer.drain()
                if body and answer.file is not None and answer.size:
                    # Wraps the descriptor already open (no file is opened here); sendfile wants a file object.
                    with open(answer.file, "rb", closefd=False) as file:  # noqa: ASYNC230
                        await asyncio.get_running_loop().sendfile(writer.transport, file)
            return True
        except (TimeoutError, ConnectionError):
            writer.transport.abort()
            return False
        finally:
            if answer.file is not None:
                os.close(answer.file)
