"""The public development secret never guards a real Supabase project."""

from __future__ import annotations

import httpx
import pytest

from imagegen_common.dev_tokens import DEV_JWT_SECRET, DEV_USER_ID, mint_token
from imagegen_common.errors import ServiceError
from job_service.config import ConfigurationError, JobSettings
from job_service.server import build_verifier


def settings(**values: object) -> JobSettings:
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
