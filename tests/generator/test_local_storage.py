"""Local storage: what lands on disk, the URL a caller gets, and keys that try to leave the bucket."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from generator_service.storage.local import LocalStorage
from generator_service.storage.local_http import LocalStorageServer
from tests.generator.helpers import JOB_ID, USER_ID


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


async def test_images_small_and_large_are_stored_whole_and_served(tmp_path: Path) -> None:
    server = LocalStorageServer(tmp_path, "127.0.0.1", 0, bucket="images", prefix="gen")
    server.start()
    try:
        storage = LocalStorage(tmp_path, "images", f"http://127.0.0.1:{server.port}", prefix="gen")
        small, large = os.urandom(5_000), os.urandom(3 * 1024 * 1024)  # written inline / through a thread
        folder = f"{USER_ID}/{JOB_ID}"
        stored_small = await storage.upload(f"{folder}/1-0.png", small, "image/png")
        stored_large = await storage.upload(f"{folder}/1-1.png", large, "image/png")

        assert stored_small.key == f"gen/{folder}/1-0.png"
        assert (tmp_path / "images" / f"gen/{folder}/1-0.png").read_bytes() == small
        assert (tmp_path / "images" / f"gen/{folder}/1-1.png").read_bytes() == large
        assert (
            stored_large.url == f"http://127.0.0.1:{server.port}/storage/v1/object/public/images/gen/{folder}/1-1.png"
        )
        # No temporary files are left next to the images.
        assert sorted(p.name for p in (tmp_path / "images" / "gen" / folder).iterdir()) == ["1-0.png", "1-1.png"]
        async with httpx.AsyncClient() as client:
            answer = await client.get(stored_large.url)
        assert answer.status_code == 200 and answer.content == large
        assert answer.headers["content-type"] == "image/png"

        # A rerun of the same attempt replaces the object.
        await storage.upload(f"{folder}/1-0.png", b"again", "image/png")
        assert (tmp_path / "images" / f"gen/{folder}/1-0.png").read_bytes() == b"again"
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["../outside.png", "user/../../outside.png", "/etc/outside.png"])
async def test_a_key_outside_the_bucket_is_refused(tmp_path: Path, path: str) -> None:
    storage = LocalStorage(tmp_path, "images", "http://127.0.0.1:1")
    with pytest.raises(ValueError, match="escapes the bucket"):
        await storage.upload(path, b"x", "image/png")
    assert not files_under(tmp_path)
