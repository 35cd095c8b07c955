"""JobService verifying Supabase tokens end to end: SUPABASE_URL points at a real JWKS endpoint on 127.0.0.1
that publishes real EC P-256 and RSA-2048 public keys; tokens are signed with the private halves."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from imagegen.job.v1 import job_service_pb2 as pb

from imagegen_client import ImageGenClient, RetryPolicy
from tests.support.jwks import JwksServer, SigningKey, jwks_server, user_claims
from tests.support.rpc_errors import failure_of
from tests.support.services import Services, new_user, running_services

LEGACY_SECRET = "legacy-project-jwt-secret-for-the-tests-0123456789"


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return SigningKey.es256()


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey.rs256()


@pytest.fixture
def jwks(ec_key: SigningKey, rsa_key: SigningKey) -> Iterator[JwksServer]:
    with jwks_server(ec_key, rsa_key) as server:
        yield server


def supabase_auth(jwks: JwksServer, **overrides: Any) -> dict[str, Any]:
    """JobService settings for a Supabase project whose auth lives at the fake server."""
    # (The secret by its alias: JobSettings ignores a `jwt_secret=` keyword, the field has validation aliases.)
    return {"supabase_url": jwks.url, "supabase_jwt_secret": LEGACY_SECRET, **overrides}


def client(services: Services, token: str) -> ImageGenClient:
    return ImageGenClient(services.target, token)


async def test_tokens_signed_with_the_projects_ec_and_rsa_keys_are_accepted(
    database_url: str, tmp_path: Path, jwks: JwksServer, ec_key: SigningKey, rsa_key: SigningKey
) -> None:
    ec_user, rsa_user, legacy_user = new_user(), new_user(), new_user()
    async with running_services(database_url, tmp_path, job=supabase_auth(jwks)) as services:
        async with client(services, ec_key.sign(user_claims(jwks.issuer, ec_user))) as as_ec:
            ec_job = await as_ec.create_job("signed with ES256", sample_count=1)
        async with client(services, rsa_key.sign(user_claims(jwks.issuer, rsa_user))) as as_rsa:
            rsa_balance = await as_rsa.credit_balance()
        legacy = jwt.encode(user_claims(jwks.issuer, legacy_user), LEGACY_SECRET, algorithm="HS256")
        async with client(services, legacy) as as_legacy:
            legacy_balance = await as_legacy.credit_balance()

    assert ec_job.user_id == ec_user
    assert rsa_balance.user_id == rsa_user
    assert legacy_balance.user_id == legacy_user
    assert jwks.requests == 1


async def test_service_role_token_may_act_for_a_user_and_grant_credits(
    database_url: str, tmp_path: Path, jwks: JwksServer
) -> None:
    user = new_user()
    now = int(time.time())
    service_key = jwt.encode(
        {"iss": "supabase", "ref": "project", "role": "service_role", "iat": now, "exp": now + 600},
        LEGACY_SECRET,
        algorithm="HS256",
    )
    async with (
        running_services(database_url, tmp_path, job=supabase_auth(jwks, new_user_credits=0)) as services,
        client(services, service_key) as service,
    ):
        granted = await service.grant_credits(user, 10, reason="signup bonus")
        job = await service.create_job("made for the user", sample_count=2, user_id=user)
        balance = await service.credit_balance(user)

    assert granted.balance == 10
    assert job.user_id == user and job.credits_reserved == 2
    assert balance.balance == 8


async def test_rotation_a_new_kid_is_fetched_and_accepted_once_published(
    database_url: str, tmp_path: Path, jwks: JwksServer, ec_key: SigningKey
) -> None:
    rotated = SigningKey.es256()
    user = new_user()
    settings = supabase_auth(jwks, jwks_min_refetch_seconds=0.2)
    async with running_services(database_url, tmp_path, job=settings) as services:
        started = time.monotonic()
        async with client(services, ec_key.sign(user_claims(jwks.issuer))) as old:
            await old.credit_balance()
        async with client(services, rotated.sign(user_claims(jwks.issuer, user))) as new:
            before = await failure_of(new.credit_balance())
            jwks.keys.append(rotated)  # the project starts publishing the new key
            attempts = 0
            while True:
                attempts += 1
                try:
                    balance = await new.credit_balance()
                    break
                except Exception:
                    assert attempts < 200, "the new key was never picked up"
                    await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started

    assert (before.code, before.reason) == ("UNAUTHENTICATED", "TOKEN_INVALID")
    assert balance.user_id == user
    # The first fetch, then refetches for the unknown kid: at most one per 0.2 s, however often we asked.
    assert 2 <= jwks.requests <= 2 + elapsed / 0.2


async def test_tokens_with_unknown_kids_do_not_flood_the_jwks_endpoint(
    database_url: str, tmp_path: Path, jwks: JwksServer, ec_key: SigningKey
) -> None:
    settings = supabase_auth(jwks, jwks_min_refetch_seconds=60)
    async with running_services(database_url, tmp_path, job=settings) as services:
        async with client(services, ec_key.sign(user_claims(jwks.issuer))) as known:
            await known.credit_balance()
        refusals = []
        for _ in range(30):
            made_up = SigningKey.es256(kid=str(uuid.uuid4()))
            async with client(services, made_up.sign(user_claims(jwks.issuer))) as unknown:
                refusals.append(await failure_of(unknown.credit_balance()))
        async with client(services, ec_key.sign(user_claims(jwks.issuer))) as known:
            await known.credit_balance()

    assert {(f.code, f.reason) for f in refusals} == {("UNAUTHENTICATED", "TOKEN_INVALID")}
    assert jwks.requests == 1, "30 unknown kids within the refetch interval: no extra fetch"


async def test_a_revoked_keys_tokens_are_refused_after_the_cache_refreshes(
    database_url: str, tmp_path: Path, jwks: JwksServer, ec_key: SigningKey, rsa_key: SigningKey
) -> None:
    settings = supabase_auth(jwks, jwks_max_age_seconds=0.3, jwks_min_refetch_seconds=0.1)
    token = rsa_key.sign(user_claims(jwks.issuer))
    async with running_services(database_url, tmp_path, job=settings) as services:
        async with client(services, token) as revoked:
            await revoked.credit_balance()
            jwks.keys = [ec_key]  # the RSA key is revoked
            attempts = 0
            while True:
                attempts += 1
                try:
                    await revoked.credit_balance()
                except Exception:
                    break
                assert attempts < 200, "the revoked key kept working"
                await asyncio.sleep(0.05)
            refused = await failure_of(revoked.credit_balance())
        async with client(services, rsa_key.sign(user_claims(jwks.issuer))) as fresh:
            fresh_refused = await failure_of(fresh.credit_balance())
        other_user = new_user()
        async with client(services, ec_key.sign(user_claims(jwks.issuer, other_user))) as other:
            still_fine = await other.credit_balance()

    assert (refused.code, refused.reason) == ("UNAUTHENTICATED", "TOKEN_INVALID")
    assert (fresh_refused.code, fresh_refused.reason) == ("UNAUTHENTICATED", "TOKEN_INVALID")
    assert still_fine.user_id == other_user, "the key that was not revoked still works"


def _claims_cases(issuer: str) -> dict[str, tuple[dict[str, Any], str, str]]:
    now = int(time.time())
    return {
        "issuer of another project": (
            user_claims("https://other.supabase.co/auth/v1"),
            "UNAUTHENTICATED",
            "TOKEN_INVALID",
        ),
        "audience anon": (user_claims(issuer, aud="anon"), "UNAUTHENTICATED", "TOKEN_INVALID"),
        "nbf in the future": (user_claims(issuer, nbf=now + 3600), "UNAUTHENTICATED", "TOKEN_INVALID"),
        "no sub": (user_claims(issuer, sub=None), "UNAUTHENTICATED", "TOKEN_INVALID"),
        "expired": (user_claims(issuer, iat=now - 7200, exp=now - 3600), "UNAUTHENTICATED", "TOKEN_EXPIRED"),
        "anonymous sign-in": (
            user_claims(issuer, is_anonymous=True),
            "PERMISSION_DENIED",
            "ANONYMOUS_NOT_ALLOWED",
        ),
    }


async def test_claims_are_checked(
    database_url: str, tmp_path: Path, jwks: JwksServer, ec_key: SigningKey, rsa_key: SigningKey
) -> None:
    settings = supabase_auth(jwks, allow_anonymous_users=False)
    outcomes: dict[str, tuple[str, str]] = {}
    expected: dict[str, tuple[str, str]] = {}
    async with running_services(database_url, tmp_path, job=settings) as services:
        for name, (claims, code, reason) in _claims_cases(jwks.issuer).items():
            for key in (ec_key, rsa_key):
                async with client(services, key.sign(claims)) as caller:
                    failure = await failure_of(caller.create_job("hello", sample_count=1))
                outcomes[f"{name} ({key.algorithm})"] = (failure.code, failure.reason)
                expected[f"{name} ({key.algorithm})"] = (code, reason)
        async with client(services, ec_key.sign(user_claims(jwks.issuer))) as good:
            job = await good.create_job("hello", sample_count=1)

    assert outcomes == expected
    assert job.state == pb.JOB_STATE_PENDING


async def test_while_the_jwks_fails_its_keys_are_trusted_up_to_the_stale_bound(
    database_url: str, tmp_path: Path, jwks: JwksServer, ec_key: SigningKey
) -> None:
    """The key set is served, then the JWKS server fails: tokens are accepted until JOB_JWKS_MAX_STALE_SECONDS after
    the last good fetch, then refused with UNAVAILABLE / JWKS_UNAVAILABLE (the token may be fine; it cannot be
    checked), and accepted again once the JWKS answers."""
    max_stale = 1.5
    settings = supabase_auth(
        jwks, jwks_max_age_seconds=0.3, jwks_min_refetch_seconds=0.1, jwks_max_stale_seconds=max_stale
    )
    token = ec_key.sign(user_claims(jwks.issuer))
    async with (
        running_services(database_url, tmp_path, job=settings) as services,
        ImageGenClient(services.target, token, retry=RetryPolicy(attempts=1)) as user,
    ):
        await user.credit_balance()
        jwks.status = 503
        failing_since = time.monotonic()
        accepted_while_failing = 0
        while True:
            try:
                await user.credit_balance()
                accepted_while_failing += 1
            except grpc.aio.AioRpcError:
                break
            assert time.monotonic() - failing_since < max_stale + 5, "the stale keys stayed trusted"
            await asyncio.sleep(0.05)
        refused_after = time.monotonic() - failing_since
        refused = await failure_of(user.credit_balance())
        jwks.status = 200
        await asyncio.sleep(0.3)
        back = await user.credit_balance()

    assert accepted_while_failing > 0, "the keys in hand were trusted while the JWKS failed"
    # The last good fetch was at most max_age (0.3 s) before the failure began.
    assert refused_after >= max_stale - 0.3 - 0.1
    assert (refused.code, refused.reason) == ("UNAVAILABLE", "JWKS_UNAVAILABLE")
    assert back.user_id
