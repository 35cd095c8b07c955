"""Local storage: files under a folder, served over HTTP with the URL shape of Supabase public objects.

URLs look like {base}/storage/v1/object/public/{bucket}/{key}, so a client that handles Supabase
public URLs handles these the same way. The key is the path under the storage prefix, if one is set,
as in Supabase storage. The HTTP server that serves them is local_http.LocalStorageServer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

from generator_service.blocking import run_sized
from generator_service.domain import generation_error
from generator_service.storage.base import MAX_LISTED, UploadedObject
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

    async def list_folder(self, folder: str) -> list[str]:
        key = self.object_key(folder.strip("/"))
        return await asyncio.to_thread(_list_files, self._target(key), key)

    async def delete(self, keys: list[str]) -> None:
        targets = [self._target(key) for key in keys]  # every key checked before anything is deleted
        await asyncio.to_thread(_delete_files, targets, self._bucket_dir)

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


def _list_files(directory: str, key: str) -> list[str]:
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    # Dot files are uploads being written (_write_atomically's temporaries): not objects yet.
    names = sorted(
        entry.name for entry in entries if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)
    )
    return [f"{key}/{name}" for name in names[:MAX_LISTED]]


def _delete_files(targets: list[str], bucket_dir: str) -> None:
    folders = set()
    for target in targets:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        folders.add(os.path.dirname(target))
    # A job folder left empty goes too (Supabase has no folders: an empty one does not exist there either).
    for folder in folders:
        if folder != bucket_dir:
            with contextlib.suppress(OSError):  # not empty (kept objects), or already gone
                os.rmdir(folder)
