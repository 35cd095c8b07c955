"""Small builders shared by the generator tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc
from pydantic import SecretStr

from generator_service.config import GeneratorSettings, ModelSpec
from generator_service.domain import FilteredImage, GeneratedImage, GenerationRequest
from generator_service.providers.base import Provider
from generator_service.providers.http import ProviderHttp
from generator_service.retry import RetryPolicy
from generator_service.server import GeneratorApp, start
from tests.generator.fake_google import FakeGeminiImagen

# The generator takes UUIDs only for the ids that name storage folders (user, job).
USER_ID = "0b6c3f4e-2d5a-4c1b-9e8f-7a6d5c4b3a21"


def job_uuid(name: str) -> str:
    """A job id for a readable name: the same UUID for the same name, so a test can refer back to it."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"imagegen-test-job:{name}"))


JOB_ID = job_uuid("job-1")

FAST_RETRIES = RetryPolicy(
    max_retries=3, max_total_seconds=10.0, backoff_initial_seconds=0.01, backoff_max_seconds=0.05
)


def make_request(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "job_id": JOB_ID,
        "attempt": 1,
        "user_id": USER_ID,
        "prompt": "a lighthouse at dusk",
        "model": "imagen-4.0-generate-001",
        "sample_count": 2,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def make_model(model_id: str, provider: str, **overrides: Any) -> ModelSpec:
    return ModelSpec(id=model_id, provider=provider, display_name=model_id, **overrides)  # type: ignore[arg-type]


def provider_http(
    name: str, policy: RetryPolicy = FAST_RETRIES, *, read_timeout: float = 10.0, connect_timeout: float = 2.0
) -> ProviderHttp:
    return ProviderHttp.create(name, connect_timeout=connect_timeout, read_timeout=read_timeout, policy=policy)


async def collect(
    provider: Provider, request: GenerationRequest, model: ModelSpec
) -> list[GeneratedImage | FilteredImage]:
    return [item async for item in provider.generate(request, model)]


def settings_for(tmp_path: Path, **overrides: Any) -> GeneratorSettings:
    """Settings for a server on free ports, isolated from any GEN_* in the developer's .env."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "storage_backend": "local",
        "storage_dir": tmp_path / "storage",
        "storage_http_host": "127.0.0.1",
        "storage_http_port": 0,
        "vertex_project": None,
        "gemini_api_key": None,
        "supabase_url": None,
        "supabase_service_key": None,
        "auth_token": None,
        "tls_cert": None,
        "tls_key": None,
        "metrics_port": 0,
        "shutdown_grace_seconds": 1.0,
        "provider_max_retries": 3,
        "provider_retry_max_total_seconds": 10.0,
        "retry_backoff_initial_seconds": 0.01,
        "retry_backoff_max_seconds": 0.05,
    }
    values.update(overrides)
    for secret in ("gemini_api_key", "supabase_service_key"):
        if isinstance(values[secret], str):
            values[secret] = SecretStr(values[secret])
    return GeneratorSettings(_env_file=None, **values)  # type: ignore[call-arg]


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Polls `condition` until it holds or `within` seconds pass; the caller asserts on the result."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@asynccontextmanager
async def running(
    settings: GeneratorSettings,
) -> AsyncIterator[tuple[GeneratorApp, pb_grpc.GeneratorServiceAsyncStub]]:
    """A generator started on free ports, and a stub on a channel to it; both closed on the way out."""
    app = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield app, pb_grpc.GeneratorServiceStub(channel)
    finally:
        await app.stop()


def gemini_settings(tmp_path: Path, api: FakeGeminiImagen, **overrides: Any) -> GeneratorSettings:
    """Settings with the Gemini API providers pointed at a fake one."""
    return settings_for(tmp_path, gemini_api_key="test-api-key", gemini_base_url=api.url, **overrides)


def generate_request(**overrides: Any) -> pb.GenerateRequest:
    """A valid GenerateRequest for the local model (two images), with the fields given replaced."""
    fields: dict[str, Any] = {
        "job_id": JOB_ID,
        "attempt": 1,
        "user_id": USER_ID,
        "prompt": "a lighthouse at dusk",
        "model": "local",
        "sample_count": 2,
    }
    fields.update(overrides)
    return pb.GenerateRequest(**fields)
