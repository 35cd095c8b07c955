"""`python -m generator_service serve-images`: only the local storage's HTTP server, no gRPC, no providers.

With several generator replicas over one shared storage folder (compose's `images` volume), an image URL must not
name one replica, or downloads fail while that replica restarts. This process serves the shared folder under one
stable address instead; the generators keep writing to the folder and put that address in their URLs
(GEN_STORAGE_PUBLIC_BASE_URL). It reads only GEN_STORAGE_DIR, GEN_STORAGE_BUCKET, GEN_STORAGE_PREFIX and the
GEN_STORAGE_HTTP_* settings.
"""

from __future__ import annotations

import asyncio

import structlog

from generator_service.config import GeneratorSettings
from generator_service.storage.local import PUBLIC_PREFIX
from generator_service.storage.local_http import LocalStorageServer
from imagegen_common.lifecycle import run_until_signalled

log = structlog.get_logger(__name__)


def local_storage_server(settings: GeneratorSettings) -> LocalStorageServer:
    """The HTTP server of local storage as the settings describe it (bound, not started): the generator's own and
    this command's are the same server."""
    return LocalStorageServer(
        settings.storage_dir,
        settings.storage_http_host,
        settings.storage_http_port,
        bucket=settings.storage_bucket,
        prefix=settings.storage_prefix,
        request_timeout_seconds=settings.storage_http_request_timeout_seconds,
        send_timeout_seconds=settings.storage_http_send_timeout_seconds,
        max_connections=settings.storage_http_max_connections,
    )


async def serve_images(settings: GeneratorSettings) -> None:
    """Serves the storage folder over HTTP until SIGTERM or SIGINT."""
    server = local_storage_server(settings)
    server.start()
    log.info(
        "images serving",
        url=f"http://{settings.storage_http_host}:{server.port}{PUBLIC_PREFIX}{settings.storage_bucket}/",
        folder=str(settings.storage_dir),
    )

    async def stop() -> None:
        # shutdown() waits for the serving thread to leave its loop: off the event loop.
        await asyncio.to_thread(server.stop)

    await run_until_signalled(stop, None)
