"""job_service.server.start when a later step fails: everything it had opened is closed before the error propagates.

Each case makes one step fail after earlier ones opened something (the pool, the metrics listener, the generator
channel, the LISTEN connection, the background tasks), and then checks what an operator would: no connection to
the database, no channel to the generator, no task of the service, both ports free to bind again.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from job_service import server as job_server
from job_service.config import ConfigurationError
from tests.support.cluster import eventually
from tests.support.services import job_settings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def can_bind(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextmanager
def occupied_port() -> Iterator[int]:
    """A port held by a plain listening socket (no SO_REUSEPORT, so neither gRPC nor asyncio can share it)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


async def connections_to(database_url: str) -> list[str]:
    """Every other session on the test's own database, as `application_name/state: query`."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT state, query FROM pg_stat_activity
               WHERE datname = current_database() AND pid <> pg_backend_pid()"""
        )
    finally:
        await conn.close()
    return [f"{row['state']}: {row['query']}" for row in rows]


async def tasks_started_since(before: set[asyncio.Task[Any]]) -> list[str]:
    current = asyncio.current_task()
    return sorted(t.get_name() for t in asyncio.all_tasks() - before if not t.done() and t is not current)


# Each case: the step that fails, as the settings that make it fail (given a free gRPC and metrics port), and what
# start raises. In start's order: the metrics listener (after the pool), the generator channel, the webhook
# sender, the token verifier (after the LISTEN connection), the gRPC listener (after all but the serving loops).
FAILURES: dict[
    str, tuple[Callable[[Path, int], dict[str, Any]], type[BaseException] | tuple[type[BaseException], ...]]
] = {
    "metrics port taken": (lambda _tmp, taken: {"metrics_port": taken}, OSError),
    "generator CA unreadable": (lambda tmp, _taken: {"generator_tls_ca": tmp / "missing-ca.pem"}, OSError),
    "webhook secret malformed": (lambda _tmp, _taken: {"webhook_secrets": ["not-a-secret"]}, ConfigurationError),
    "service API key refused": (lambda _tmp, _taken: {"service_api_keys": ["sb_publishable_x"]}, ConfigurationError),
    "gRPC port taken": (lambda _tmp, taken: {"port": taken}, (OSError, RuntimeError)),
}


@pytest.mark.parametrize("step", FAILURES)
async def test_a_failed_start_leaves_nothing_open(
    step: str, private_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    channels: list[grpc.aio.Channel] = []
    make_channel = grpc.aio.insecure_channel

    def recorded_channel(target: str, *args: Any, **kwargs: Any) -> grpc.aio.Channel:
        channel = make_channel(target, *args, **kwargs)
        channels.append(channel)
        return channel

    monkeypatch.setattr(grpc.aio, "insecure_channel", recorded_channel)
    overrides, raised = FAILURES[step]
    grpc_port, metrics_port = free_port(), free_port()
    before = asyncio.all_tasks()
    with occupied_port() as taken:
        values = {"port": grpc_port, "metrics_port": metrics_port, "metrics_host": "127.0.0.1"}
        values.update(overrides(tmp_path, taken))
        settings = job_settings(private_database_url, f"127.0.0.1:{free_port()}", **values)
        with pytest.raises(raised):
            await job_server.start(settings)

    # Closing takes a moment (a cancelled task's last step, a backend that exits): a few seconds.
    assert await eventually(lambda: tasks_started_since(before), lambda left: not left, within=5.0) == []
    # The pool and the LISTEN connection are closed: the database sees no session of this JobService.
    sessions = await eventually(lambda: connections_to(private_database_url), lambda left: not left, within=5.0)
    assert sessions == []
    assert all(channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN for channel in channels)
    assert can_bind(grpc_port)
    assert can_bind(metrics_port)
