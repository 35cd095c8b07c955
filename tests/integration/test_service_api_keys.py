"""Supabase's new secret API keys as JobService's service role: a project on asymmetric JWT keys with `sb_secret_...`
keys (and its legacy keys off) has no service_role JWT to give its backend; JOB_SERVICE_API_KEYS lists the keys that
are accepted instead. Callers send them the way Supabase's clients do: as `apikey` metadata."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc

from imagegen_client import ImageGenClient
from job_service.config import ConfigurationError
from job_service.server import build_verifier
from tests.support.rpc_errors import failure_of
from tests.support.services import job_settings, new_user, running_services

SECRET_KEY = "sb_secret_N7UND0UgjKTVK-Uodkm0Hg_xSvEMPvz"
ROTATED_IN = "sb_secret_2f4Kq9ZrT1yWm3Xv8LbP0cJd_5HnE7aQ"
PUBLISHABLE = "sb_publishable_ZaZ2XvE9HqM3rT1yWm3Xv8LbP0cJd"


async def grant_with_apikey(target: str, key: str, user: str, amount: int) -> pb.GrantCreditsResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        response: pb.GrantCreditsResponse = await stub.GrantCredits(
            pb.GrantCreditsRequest(user_id=user, amount=amount, reason="api key"),
            metadata=(("apikey", key),),
            timeout=10,
        )
        return response


async def test_a_configured_secret_key_is_the_service_role_and_others_are_refused(
    database_url: str, tmp_path: Path
) -> None:
    user = new_user()
    settings = {"service_api_keys": [SECRET_KEY, ROTATED_IN], "new_user_credits": 0}
    async with running_services(database_url, tmp_path, job=settings) as services:
        granted = await grant_with_apikey(services.target, SECRET_KEY, user, 10)
        rotated = await grant_with_apikey(services.target, ROTATED_IN, user, 1)
        async with ImageGenClient(services.target, SECRET_KEY) as as_bearer:  # authorization: Bearer sb_secret_...
            job = await as_bearer.create_job("for the user", sample_count=2, user_id=user)
            balance = await as_bearer.credit_balance(user)
        refusals = {
            "wrong": await failure_of(grant_with_apikey(services.target, SECRET_KEY[:-1] + "X", user, 1000)),
            "publishable": await failure_of(grant_with_apikey(services.target, PUBLISHABLE, user, 1000)),
            "empty": await failure_of(grant_with_apikey(services.target, "", user, 1000)),
        }
        async with ImageGenClient(services.target, PUBLISHABLE) as publishable_bearer:
            refusals["publishable as bearer"] = await failure_of(publishable_bearer.grant_credits(user, 1000))
        async with services.client(user) as owner:
            final = await owner.credit_balance()

    assert (granted.balance, rotated.balance) == (10, 11)
    assert job.user_id == user and balance.balance == 11 - 2
    assert final.balance == 9, "none of the refused grants added anything"
    for name, refused in refusals.items():
        assert refused.code == "UNAUTHENTICATED", name
        assert SECRET_KEY not in refused.message and ROTATED_IN not in refused.message, name
        assert "sb_secret" not in refused.message, f"{name}: the answer says nothing about the configured keys"
    assert refusals["wrong"].reason == refusals["publishable"].reason == "API_KEY_INVALID"


async def test_without_configured_keys_a_secret_key_is_refused(database_url: str, tmp_path: Path) -> None:
    async with running_services(database_url, tmp_path) as services:
        refused = await failure_of(grant_with_apikey(services.target, SECRET_KEY, new_user(), 1))
    assert (refused.code, refused.reason) == ("UNAUTHENTICATED", "API_KEY_INVALID")


@pytest.mark.parametrize("bad", [PUBLISHABLE, "", "   "])
async def test_a_publishable_or_empty_key_cannot_be_configured(bad: str) -> None:
    settings = job_settings("postgresql://unused", "127.0.0.1:1", service_api_keys=[SECRET_KEY, bad])
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigurationError) as refused:
            build_verifier(settings, http)
    assert "JOB_SERVICE_API_KEYS" in str(refused.value)
    assert SECRET_KEY not in str(refused.value) and (not bad.strip() or bad not in str(refused.value))
