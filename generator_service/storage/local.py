"""Local storage: files under a folder, served over HTTP with the URL shape of Supabase public objects.

URLs look like {base}/storage/v1/object/public/{bucket}/{key}, so a client that handles Supabase
public URLs handles these the same way. The key is the path under the storage prefix, if one is set,
as in Supabase storage.
"""

from __future__ import annotations

import asyncio
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from generator_service.blocking import run_sized
from generator_service.domain import generation_error
from generator_service.storage.base import UploadedObject
from imagegen_common.errors import ErrorKind

PUBLIC_PREFIX = "/storage/v1/object/public/"


def _write_atomically(target: str, data: bytes) -> None:
    directory, name = os.path.split(target)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:  # the attempt's first image: its folder does not exist yet
        os.makedirs(directory, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    # A reader never sees a half-written image, and a concurrent rerun of the same attempt just wins or loses.
    os.replace(temporary, target)


class LocalStorage:
    def __init__(self, root: Path, bucket: str, public_base_url: str, prefix: str = "") -> None:
        self._bucket_dir = os.path.realpath(root / bucket)
        self._bucket = bucket
        self._base = public_base_url.rstrip("/")
        self._prefix = prefix.strip("/")

    def object_key(self, path: str) -> str:
        return f"{self._prefix}/{path}" if self._prefix else path

    def _target(self, key: str) -> str:
        # A lexical check (no disk access): the key is built from ids, and ".." or an absolute path in it
        # must not reach outside the bucket's folder.
        target = os.path.normpath(os.path.join(self._bucket_dir, key))
        if not target.startswith(self._bucket_dir + os.sep):
            raise ValueError(f"storage path escapes the bucket: {key}")
        return target

    async def upload(self, path: str, data: bytes, content_type: str) -> UploadedObject:
        key = self.object_key(path)
        target = self._target(key)
        await run_sized(len(data), _write_atomically, target, data)
        return UploadedObject(f"{self._base}{PUBLIC_PREFIX}{self._bucket}/{key}", key)

    async def read(self, key: str) -> bytes:
        target = self._target(key)
        try:
            return await asyncio.to_thread(Path(target).read_bytes)
        except FileNotFoundError:
            raise generation_error(
                ErrorKind.FAILED_PRECONDITION, "INPUT_IMAGE_NOT_FOUND", f"no stored object {key}", retryable=False
            ) from None

    async def aclose(self) -> None:
        return None


class _PublicObjectHandler(SimpleHTTPRequestHandler):
    """Serves GET {PUBLIC_PREFIX}{bucket}/{path} from the storage folder; nothing else."""

    def translate_path(self, path: str) -> str:
        clean = path.split("?", 1)[0].split("#", 1)[0]
        if not clean.startswith(PUBLIC_PREFIX):
            return "/nonexistent"
        return super().translate_path("/" + clean[len(PUBLIC_PREFIX) :])

    def list_directory(self, path: str | os.PathLike[str]) -> Any:
        self.send_error(404, "Object not found")
        return None

    def log_message(self, format: str, *args: Any) -> None:
        return None


class LocalStorageServer:
    """A small threaded HTTP server for the storage folder (stdlib; reads are file copies)."""

    def __init__(self, root: Path, host: str, port: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        handler = partial(_PublicObjectHandler, directory=str(root))
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="storage-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
