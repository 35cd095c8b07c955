"""The public development secret never guards a real Supabase project, nor a service reachable beyond loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from generator_service.config import GeneratorSettings
from imagegen_common.dev_tokens import DEV_JWT_SECRET, DEV_USER_ID, mint_token
from imagegen_common.errors import ServiceError
from job_service import server as job_server
from job_service.config import ConfigurationError, JobSettings
from job_service.server import build_verifier, check_jwt_secret


def settings(**values: Any) -> JobSettings:
    return JobSettings(_env_file=None, **values)  # type: ignore[call-arg]


async def test_dev_secret_with_a_supabase_project_refuses_to_start() -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigurationError, match="public development secret"):
            build_verifier(settings(supabase_url="https://ref.supabase.co"), http)


async def test_empty_secret_with_a_supabase_project_refuses_hs256_tokens() -> None:
    async with httpx.AsyncClient() as http:
        verifier = build_verifier(settings(supabase_url="https://ref.supabase.co", jwt_secret=""), http)
        with pytest.raises(ServiceError) as refused:
            await verifier.verify(mint_token(DEV_JWT_SECRET))
    assert refused.value.reason == "TOKEN_INVALID"


async def test_dev_secret_alone_is_the_local_default() -> None:
    async with httpx.AsyncClient() as http:
        verifier = build_verifier(settings(jwt_secret=DEV_JWT_SECRET), http)
        principal = await verifier.verify(mint_token(DEV_JWT_SECRET, user_id=DEV_USER_ID))
    assert principal.subject == DEV_USER_ID


OWN_SECRET = "a-secret-of-our-own-that-nobody-else-knows-0123456789"


@pytest.mark.parametrize(
    "exposure",
    [
        pytest.param({"host": "0.0.0.0"}, id="grpc-on-every-interface"),
        pytest.param({"host": "::"}, id="grpc-on-every-v6-interface"),
        pytest.param({"host": "10.1.2.3"}, id="grpc-on-a-lan-address"),
        pytest.param({"host": "api.localhost"}, id="grpc-on-a-dot-localhost-name"),
        pytest.param({"host": "job"}, id="grpc-on-a-container-name"),
        pytest.param({"metrics_port": 9101, "metrics_host": "0.0.0.0"}, id="metrics-on-every-interface"),
    ],
)
@pytest.mark.parametrize("explicit", [False, True], ids=["default-secret", "dev-secret-set-explicitly"])
async def test_dev_secret_with_any_listener_beyond_loopback_refuses_to_start(
    exposure: dict[str, Any], explicit: bool
) -> None:
    # A database nobody listens on, never the environment's: were the check missing, start() would wait for it
    # (and the timeout below fail the test) instead of migrating a real one.
    values: dict[str, Any] = {
        "allow_plaintext": True,
        "database_url": "postgresql://nobody@127.0.0.1:1/nothing",
        "migrate_on_start": False,
        **exposure,
    }
    if explicit:
        values["jwt_secret"] = DEV_JWT_SECRET
    # start() refuses before it opens a database or a port, so nobody could mint a service_role token.
    with pytest.raises(ConfigurationError, match="public development secret") as refused:
        async with asyncio.timeout(10):
            await job_server.start(settings(**values))
    assert "SUPABASE_JWT_SECRET" in str(refused.value)
    assert any(f"{name}=" in str(refused.value) for name in ("JOB_HOST", "JOB_METRICS_HOST"))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_dev_secret_on_loopback_only_is_the_local_default(host: str) -> None:
    check_jwt_secret(settings(host=host, metrics_port=9101))  # metrics on its default host: loopback


def test_dev_secret_with_metrics_host_wide_but_metrics_off_is_allowed() -> None:
    check_jwt_secret(settings(metrics_port=0, metrics_host="0.0.0.0"))


def test_an_own_secret_may_listen_anywhere() -> None:
    check_jwt_secret(settings(host="0.0.0.0", metrics_port=9101, metrics_host="0.0.0.0", jwt_secret=OWN_SECRET))


def test_metrics_listen_on_loopback_by_default() -> None:
    assert settings().metrics_host == "127.0.0.1"
    assert GeneratorSettings(_env_file=None).metrics_host == "127.0.0.1"  # type: ignore[call-arg]
