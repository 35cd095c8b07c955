"""Real service processes for the durability tests, driven from async tests without blocking the loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterable

from imagegen.job.v1 import job_service_pb2 as pb

from imagegen_client import ImageGenClient, RetryPolicy
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from tests.support.processes import ServiceProcess, health_status

SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING


async def start(*processes: ServiceProcess, within: float = 90.0) -> None:
    """Starts processes side by side and waits until each reports SERVING."""
    await asyncio.gather(*(asyncio.to_thread(p.start, within) for p in processes))


async def stop(processes: Iterable[ServiceProcess]) -> None:
    """Best-effort teardown: SIGTERM, then SIGKILL whatever is still there after a few seconds."""

    def one(process: ServiceProcess) -> None:
        if not process.alive():
            return
        try:
            process.terminate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()

    await asyncio.gather(*(asyncio.to_thread(one, p) for p in processes))


async def kill(process: ServiceProcess) -> None:
    await asyncio.to_thread(process.kill)


def pid(process: ServiceProcess) -> int:
    assert process.process is not None
    return process.process.pid


def pause(process: ServiceProcess) -> None:
    os.kill(pid(process), signal.SIGSTOP)


def resume(process: ServiceProcess) -> None:
    os.kill(pid(process), signal.SIGCONT)


def sigterm(process: ServiceProcess) -> None:
    os.kill(pid(process), signal.SIGTERM)


async def wait_exit(process: ServiceProcess, within: float) -> int:
    assert process.process is not None
    return await asyncio.to_thread(process.process.wait, within)


async def health(process: ServiceProcess) -> int | None:
    return await asyncio.to_thread(health_status, process.target, 2.0)


def service_client(process: ServiceProcess, *, attempts: int = 1) -> ImageGenClient:
    """A service-role client (acts for any user) that fails fast, so the caller can try another replica."""
    return ImageGenClient(
        process.target,
        mint_token(DEV_JWT_SECRET, service_role=True),
        retry=RetryPolicy(attempts=attempts, initial_backoff=0.1, max_backoff=0.5),
        timeout=10.0,
    )


async def create_on_any(
    clients: list[tuple[ServiceProcess, ImageGenClient]],
    *,
    user_id: str,
    request_id: str,
    prompt: str,
    sample_count: int,
    model: str = "local",
    tries: int = 60,
) -> pb.Job:
    """CreateJob on whichever replica is up; request_id makes a retry after an unclear failure safe."""
    last: BaseException | None = None
    for attempt in range(tries):
        process, client = clients[attempt % len(clients)]
        if not process.alive():
            await asyncio.sleep(0.05)
            continue
        try:
            return await client.create_job(
                prompt, user_id=user_id, request_id=request_id, sample_count=sample_count, model=model
            )
        except Exception as exc:  # a replica that is going down or coming up: try the next one
            last = exc
            await asyncio.sleep(0.2)
    raise AssertionError(f"no replica accepted job {request_id}: {last}")


async def close_clients(clients: Iterable[ImageGenClient]) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await client.close()
