"""Both services in this process on ephemeral ports, wired exactly as in production (server.start)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generator_service import server as generator_server
from generator_service.config import GeneratorSettings
from imagegen_client import ImageGenClient
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from job_service import server as job_server
from job_service.config import JobSettings


@dataclass
class Services:
    job: job_server.JobApp
    generator: generator_server.GeneratorApp

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.job.port}"

    def client(self, user_id: str | None = None, *, token: str | None = None) -> ImageGenClient:
        return ImageGenClient(self.target, token or mint_token(DEV_JWT_SECRET, user_id=user_id or new_user()))

    def service_client(self) -> ImageGenClient:
        return ImageGenClient(self.target, mint_token(DEV_JWT_SECRET, service_role=True))


def new_user() -> str:
    return str(uuid.uuid4())


def generator_settings(storage: Path, **overrides: Any) -> GeneratorSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "storage_dir": storage,
        "storage_http_port": 0,
        "shutdown_grace_seconds": 2.0,
    }
    values.update(overrides)
    return GeneratorSettings(_env_file=None, **values)  # type: ignore[call-arg]


def job_settings(database_url: str, generator_target: str, **overrides: Any) -> JobSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "host": "127.0.0.1",
        "port": 0,
        "generator_target": generator_target,
        "migrate_on_start": False,
        "poll_interval_seconds": 0.2,
        "retry_base_seconds": 0.2,
        "retry_max_seconds": 1.0,
        "shutdown_grace_seconds": 5.0,
        "jwt_secret": DEV_JWT_SECRET,
    }
    values.update(overrides)
    return JobSettings(_env_file=None, **values)  # type: ignore[call-arg]


@asynccontextmanager
async def running_services(
    database_url: str,
    storage: Path,
    *,
    job: dict[str, Any] | None = None,
    generator: dict[str, Any] | None = None,
) -> AsyncIterator[Services]:
    gen = await generator_server.start(generator_settings(storage, **(generator or {})))
    try:
        jobs = await job_server.start(job_settings(database_url, f"127.0.0.1:{gen.port}", **(job or {})))
        try:
            yield Services(jobs, gen)
        finally:
            await jobs.stop()
    finally:
        await gen.stop()
