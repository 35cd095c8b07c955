"""The two commands the deployments run besides the services: `job_service migrate` and `serve-images`.

`migrate` is a one-shot step that compose and Kubernetes start together with PostgreSQL, so it must wait for a
database that is not up yet (bounded, so a wrong address still ends the deploy). `serve-images` is the one image
server over the generators' shared storage folder, so image URLs survive any one generator replica.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import pytest

from tests.support.database import create_database, drop_database
from tests.support.processes import ROOT, free_port


class LateDatabase:
    """A TCP port that refuses connections until `open()`, then forwards each one to the real PostgreSQL."""

    def __init__(self, database_url: str) -> None:
        self._target = urlsplit(database_url)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None

    def url(self) -> str:
        """The database's URL with this port as its address (same user, password and database)."""
        credentials = self._target.netloc.rsplit("@", 1)[0] if "@" in self._target.netloc else "postgres"
        return urlunsplit(self._target._replace(netloc=f"{credentials}@127.0.0.1:{self.port}", query=""))

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        socket_dir = parse_qs(self._target.query).get("host", [""])[0]
        if socket_dir.startswith("/"):  # the embedded server: a unix socket
            port = self._target.port or 5432
            return await asyncio.open_unix_connection(os.path.join(socket_dir, f".s.PGSQL.{port}"))
        return await asyncio.open_connection(self._target.hostname, self._target.port or 5432)

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await self._connect()

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    def open(self) -> None:
        async def start() -> None:
            self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

        asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=10)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture
def unmigrated_database(pg_server: str) -> Iterator[str]:
    url = asyncio.run(create_database(pg_server))
    yield url
    asyncio.run(drop_database(pg_server, url))


def run_migrate(database_url: str, wait_seconds: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOB_", "GEN_")) and k != "DATABASE_URL"}
    env |= {"DATABASE_URL": database_url, "JOB_MIGRATE_WAIT_SECONDS": wait_seconds, "JOB_LOG_FORMAT": "console"}
    return subprocess.Popen(
        [sys.executable, "-m", "job_service", "migrate"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_migrate_waits_for_a_database_that_comes_up_after_it(unmigrated_database: str) -> None:
    late = LateDatabase(unmigrated_database)
    try:
        migrate = run_migrate(late.url(), "60")
        time.sleep(3)  # several refused connections: the step started before its database, as compose starts it
        assert migrate.poll() is None, f"migrate gave up before its wait was over:\n{migrate.communicate()[0]}"
        late.open()
        output, _ = migrate.communicate(timeout=60)
    finally:
        late.close()
    assert migrate.returncode == 0, output
    assert "database unreachable; waiting for it" in output
    assert "applied" in output

    async def tables() -> set[str]:
        conn = await asyncpg.connect(unmigrated_database)
        try:
            return {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables")}
        finally:
            await conn.close()

    assert {"schema_migrations", "generation_jobs"} <= asyncio.run(tables())


def test_migrate_gives_up_after_its_wait_and_says_why(unmigrated_database: str) -> None:
    late = LateDatabase(unmigrated_database)  # never opened
    try:
        started = time.monotonic()
        migrate = run_migrate(late.url(), "3")
        output, _ = migrate.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        late.close()
    assert migrate.returncode == 1, output
    assert "job_service migrate: database not reachable within 3 s" in output
    assert 3 <= took < 20, f"took {took:.1f} s for a 3 s wait"


def test_serve_images_serves_the_storage_folder_without_a_generator(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    # Only paths of the object-key shape are served: {user uuid}/{job uuid}/{attempt}-{index}.{ext}.
    key = "7b0c6c3e-5d1f-4c2a-9a0e-2f4b8f1d6a11/0c9a4f7e-3b2d-4e1f-8a6b-5d7c9e2f1a33/1-0.png"
    image = storage / "images" / key
    image.parent.mkdir(parents=True)
    image.write_bytes(b"\x89PNG not really")
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOB_", "GEN_"))}
    env |= {
        "GEN_STORAGE_DIR": str(storage),
        "GEN_STORAGE_HTTP_HOST": "127.0.0.1",
        "GEN_STORAGE_HTTP_PORT": str(http_port),
        "GEN_PORT": str(grpc_port),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "generator_service", "serve-images"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{http_port}/storage/v1/object/public/images/{key}"
        deadline = time.monotonic() + 30
        body = b""
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = response.read()
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        assert body == b"\x89PNG not really", server.stdout.read() if server.poll() is not None else "no answer"
        # Only the image server: no gRPC listener (no generator, no providers, nothing to drain).
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", grpc_port)) != 0, "serve-images started a gRPC server"
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=20)
        assert server.returncode == 0, output
        assert "images serving" in output
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_the_entry_points_refuse_an_unknown_command() -> None:
    for module in ("job_service", "generator_service"):
        done = subprocess.run(
            [sys.executable, "-m", module, "serve-everything"], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0
        assert f"usage: python -m {module}" in done.stderr
