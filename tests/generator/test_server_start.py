"""generator_service.server.start when a step fails: what it already built is closed before the error propagates."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from generator_service.config import ConfigurationError
from generator_service.server import start
from tests.generator.fake_supabase import FakeSupabaseStorage
from tests.generator.helpers import eventually, settings_for


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def occupied_port() -> Iterator[int]:
    """A port held by a plain listening socket (no SO_REUSEPORT, so gRPC cannot share it)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def can_bind(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def tasks_started_since(before: set[asyncio.Task[Any]]) -> list[str]:
    current = asyncio.current_task()
    return sorted(t.get_name() for t in asyncio.all_tasks() - before if not t.done() and t is not current)


def storage_http_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "storage-http" and t.is_alive()]


async def test_a_grpc_port_in_use_leaves_no_storage_server_behind(tmp_path: Path) -> None:
    assert await eventually(lambda: not storage_http_threads())  # none left over from other tests
    storage_port = free_port()
    with occupied_port() as grpc_port:
        settings = settings_for(tmp_path, port=grpc_port, storage_http_port=storage_port, gemini_api_key="k")
        with pytest.raises((OSError, RuntimeError)):
            await start(settings)

    # The storage HTTP server that was already up is closed: its thread ended and its port is free.
    assert await eventually(lambda: not storage_http_threads())
    assert can_bind(storage_port)


async def test_a_metrics_port_in_use_stops_the_grpc_server_and_the_storage_server(tmp_path: Path) -> None:
    assert await eventually(lambda: not storage_http_threads())
    grpc_port, storage_port = free_port(), free_port()
    with occupied_port() as metrics_port:
        settings = settings_for(
            tmp_path,
            port=grpc_port,
            storage_http_port=storage_port,
            metrics_port=metrics_port,
            metrics_host="127.0.0.1",
        )
        with pytest.raises(OSError):
            await start(settings)

    # The gRPC server that had started is stopped (its port can be bound again), and storage is closed.
    assert await eventually(lambda: can_bind(grpc_port))
    assert await eventually(lambda: not storage_http_threads())
    assert can_bind(storage_port)


async def test_a_bucket_that_does_not_match_leaves_no_listener_and_no_storage_connection(
    tmp_path: Path, supabase_storage_api: FakeSupabaseStorage
) -> None:
    supabase_storage_api.buckets = {"images": False}  # private, while public URLs are configured
    before = asyncio.all_tasks()
    metrics_port = free_port()
    settings = settings_for(
        tmp_path,
        storage_backend="supabase",
        supabase_url=supabase_storage_api.url,
        supabase_service_key="test-service-key",
        storage_bucket="images",
        metrics_port=metrics_port,
        metrics_host="127.0.0.1",
    )
    with pytest.raises(ConfigurationError, match="GEN_STORAGE_PUBLIC"):
        await start(settings)

    # The storage client that checked the bucket hung up, and the metrics listener (up first) is closed.
    assert await eventually(lambda: supabase_storage_api.http.open_connections == 0)
    assert can_bind(metrics_port)
    assert await eventually(lambda: not tasks_started_since(before))


async def test_unreadable_tls_files_leave_no_storage_server_and_no_listener(tmp_path: Path) -> None:
    assert await eventually(lambda: not storage_http_threads())
    grpc_port, storage_port, metrics_port = free_port(), free_port(), free_port()
    settings = settings_for(
        tmp_path,
        port=grpc_port,
        storage_http_port=storage_port,
        metrics_port=metrics_port,
        metrics_host="127.0.0.1",
        gemini_api_key="k",
        tls_cert=tmp_path / "missing.crt",
        tls_key=tmp_path / "missing.key",
    )
    with pytest.raises(FileNotFoundError):
        await start(settings)

    assert await eventually(lambda: not storage_http_threads())
    assert can_bind(storage_port) and can_bind(metrics_port) and can_bind(grpc_port)


async def test_the_image_formats_are_loaded_before_the_first_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if no image had been opened in this process yet: Pillow imports its format plugins on the first
    # Image.open, which a fresh generator's first job would wait for.
    monkeypatch.setattr(Image, "_initialized", 0)
    app = await start(settings_for(tmp_path))
    try:
        assert Image._initialized >= 1
    finally:
        await app.stop()
