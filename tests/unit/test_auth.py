"""TokenVerifier against a real JWKS endpoint (127.0.0.1) with real EC P-256 and RSA-2048 keys.

The JWKS cache runs on an injected clock, so rotation, the refetch rate limit and revocation are shown
without waiting for real time to pass.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest

from imagegen_common.errors import ErrorKind, ServiceError
from job_service.auth import JwksKeys, ServiceApiKeys, TokenVerifier
from tests.support.jwks import (
    JwksServer,
    SigningKey,
    b64url,
    hand_made,
    hs256_signed_with_public_key,
    jwks_server,
    user_claims,
)

SECRET = "legacy-hs256-secret-for-tests-0123456789"
MAX_AGE = 600.0
MIN_REFETCH = 30.0
MAX_STALE = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return SigningKey.es256()


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey.rs256()


@pytest.fixture
def server(ec_key: SigningKey, rsa_key: SigningKey) -> Iterator[JwksServer]:
    with jwks_server(ec_key, rsa_key) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def make_verifier(
    server: JwksServer, http: httpx.AsyncClient, clock: Clock, *, secret: str | None = SECRET, **options: Any
) -> TokenVerifier:
    jwks = JwksKeys(server.jwks_url, http, max_age_seconds=MAX_AGE, min_refetch_seconds=MIN_REFETCH, clock=clock)
    settings: dict[str, Any] = {
        "hs256_secret": secret,
        "jwks": jwks,
        "audience": "authenticated",
        "issuer": server.issuer,
        "leeway_seconds": 30,
        "allow_anonymous": True,
    }
    settings.update(options)
    return TokenVerifier(**settings)


async def refused(verifier: TokenVerifier, token: str) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await verifier.verify(token)
    return caught.value


async def test_es256_and_rs256_tokens_from_the_jwks_are_accepted(
    server: JwksServer, http: httpx.AsyncClient, ec_key: SigningKey, rsa_key: SigningKey
) -> None:
    verifier = make_verifier(server, http, Clock())
    ec_user, rsa_user = str(uuid.uuid4()), str(uuid.uuid4())

    ec_principal = await verifier.verify(ec_key.sign(user_claims(server.issuer, ec_user)))
    rsa_principal = await verifier.verify(rsa_key.sign(user_claims(server.issuer, rsa_user)))

    assert (ec_principal.subject, ec_principal.is_service) == (ec_user, False)
    assert rsa_principal.subject == rsa_user
    assert server.requests == 1, "one JWKS fetch serves every key in it"


async def test_legacy_hs256_secret_tokens_are_accepted(server: JwksServer, http: httpx.AsyncClient) -> None:
    verifier = make_verifier(server, http, Clock())
    user = str(uuid.uuid4())
    token = jwt.encode(user_claims(server.issuer, user), SECRET, algorithm="HS256")
    assert (await verifier.verify(token)).subject == user
    assert server.requests == 0, "HS256 never needs the JWKS"


async def test_service_role_token_is_an_internal_caller(server: JwksServer, http: httpx.AsyncClient) -> None:
    verifier = make_verifier(server, http, Clock())
    now = int(time.time())
    token = jwt.encode(
        {"iss": "supabase", "ref": "abc", "role": "service_role", "iat": now, "exp": now + 60}, SECRET, "HS256"
    )
    principal = await verifier.verify(token)
    assert principal.is_service


def _expired(issuer: str) -> dict[str, Any]:
    now = int(time.time())
    return user_claims(issuer, iat=now - 7200, exp=now - 3600)


def _rejection_cases(server: JwksServer, ec_key: SigningKey, rsa_key: SigningKey) -> dict[str, tuple[str, str]]:
    """name -> (token, expected reason); every one UNAUTHENTICATED."""
    iss = server.issuer
    now = int(time.time())
    good = ec_key.sign(user_claims(iss))
    head, body, signature = good.split(".")
    tampered_claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    tampered_claims["sub"] = str(uuid.uuid4())
    stranger = SigningKey.es256(kid=ec_key.kid)  # same kid, a key the project never published
    confused = hs256_signed_with_public_key(rsa_key, user_claims(iss))
    return {
        "forged signature (claims changed after signing)": (
            f"{head}.{b64url(json.dumps(tampered_claims).encode())}.{signature}",
            "TOKEN_INVALID",
        ),
        "signed by a key the project never published": (stranger.sign(user_claims(iss)), "TOKEN_INVALID"),
        "expired": (ec_key.sign(_expired(iss)), "TOKEN_EXPIRED"),
        "not valid yet (nbf)": (ec_key.sign(user_claims(iss, nbf=now + 600)), "TOKEN_INVALID"),
        "no exp": (ec_key.sign(user_claims(iss, exp=None)), "TOKEN_INVALID"),
        "issuer of another project": (ec_key.sign(user_claims("https://other.supabase.co/auth/v1")), "TOKEN_INVALID"),
        "audience not authenticated": (ec_key.sign(user_claims(iss, aud="anon")), "TOKEN_INVALID"),
        "no audience": (ec_key.sign(user_claims(iss, aud=None)), "TOKEN_INVALID"),
        "no sub": (ec_key.sign(user_claims(iss, sub=None)), "TOKEN_INVALID"),
        "sub not a user id": (ec_key.sign(user_claims(iss, sub="admin")), "TOKEN_INVALID"),
        "alg none": (hand_made({"alg": "none", "typ": "JWT"}, user_claims(iss)), "TOKEN_INVALID"),
        "alg none with a kid": (hand_made({"alg": "none", "kid": ec_key.kid}, user_claims(iss)), "TOKEN_INVALID"),
        "HS256 signed with the RSA public key PEM": (confused, "TOKEN_INVALID"),
        "ES256 header naming the RSA key": (ec_key.sign(user_claims(iss), kid=rsa_key.kid), "TOKEN_INVALID"),
        "RS256 header naming the EC key": (rsa_key.sign(user_claims(iss), kid=ec_key.kid), "TOKEN_INVALID"),
        "HS256 with a wrong secret": (jwt.encode(user_claims(iss), "not-the-secret-" * 3, "HS256"), "TOKEN_INVALID"),
        "unsupported algorithm HS512": (jwt.encode(user_claims(iss), SECRET * 2, "HS512"), "TOKEN_INVALID"),
        "no kid": (jwt.encode(user_claims(iss), ec_key.private_key, "ES256"), "TOKEN_INVALID"),
        "not a JWT": ("hello", "TOKEN_INVALID"),
        "three dots of garbage": ("a.b.c", "TOKEN_INVALID"),
        "header not JSON": (b64url(b"{oops") + ".e30.", "TOKEN_INVALID"),
        "empty signature": (f"{head}.{body}.", "TOKEN_INVALID"),
    }


async def test_bad_tokens_are_refused_with_a_reason(
    server: JwksServer, http: httpx.AsyncClient, ec_key: SigningKey, rsa_key: SigningKey
) -> None:
    verifier = make_verifier(server, http, Clock())
    cases = _rejection_cases(server, ec_key, rsa_key)
    outcomes = {}
    for name, (token, _reason) in cases.items():
        try:
            await verifier.verify(token)
            outcomes[name] = "accepted"
        except ServiceError as err:
            outcomes[name] = f"{err.kind} {err.reason}"
    assert outcomes == {name: f"UNAUTHENTICATED {reason}" for name, (_token, reason) in cases.items()}


async def test_expiry_within_the_leeway_is_accepted(
    server: JwksServer, http: httpx.AsyncClient, ec_key: SigningKey
) -> None:
    verifier = make_verifier(server, http, Clock())
    now = int(time.time())
    assert await verifier.verify(ec_key.sign(user_claims(server.issuer, iat=now - 100, exp=now - 5)))


async def test_anonymous_users_follow_the_setting(
    server: JwksServer, http: httpx.AsyncClient, ec_key: SigningKey
) -> None:
    token = ec_key.sign(user_claims(server.issuer, is_anonymous=True))
    allowed = await make_verifier(server, http, Clock(), allow_anonymous=True).verify(token)
    assert allowed.is_anonymous
    err = await refused(make_verifier(server, http, Clock(), allow_anonymous=False), token)
    assert (err.kind, err.reason) == (ErrorKind.PERMISSION_DENIED, "ANONYMOUS_NOT_ALLOWED")


async def test_hs256_is_refused_when_no_secret_is_configured(
    server: JwksServer, http: httpx.AsyncClient, ec_key: SigningKey
) -> None:
    verifier = make_verifier(server, http, Clock(), secret=None)
    err = await refused(verifier, jwt.encode(user_claims(server.issuer), SECRET, "HS256"))
    assert err.reason == "TOKEN_INVALID"
    assert await verifier.verify(ec_key.sign(user_claims(server.issuer)))


async def test_rotation_new_kid_is_fetched_and_accepted(
    server: JwksServer, http: httpx.AsyncClient, ec_key: SigningKey
) -> None:
    clock = Clock()
    verifier = make_verifier(server, http, clock)
    await verifier.verify(ec_key.sign(user_claims(server.issuer)))
    assert server.requests == 1

    rotated = SigningKey.es256()
    token = rotated.sign(user_claims(server.issuer))
    clock.now += MIN_REFETCH + 1
    # Signed with a key the project does not publish yet: one refetch, still unknown, refused.
    assert (await refused(verifier, token)).reason == "TOKEN_INVALID"
    assert server.requests == 2

    server.keys.append(rotated)  # Supabase starts publishing the new key
    clock.now += MIN_REFETCH + 1
    assert await verifier.verify(token)
    assert server.requests == 3
    assert await verifier.verify(rotated.sign(user_claims(server.issuer)))
    assert server.requests == 3, "a known kid needs no fetch"


async def test_unknown_kids_refetch_at_most_once_per_interval(
    server: JwksServer, http: httpx.AsyncClient, ec_key: SigningKey
) -> None:
    clock = Clock()
    verifier = make_verifier(server, http, clock)
    await verifier.verify(ec_key.sign(user_claims(server.issuer)))
    clock.now += MIN_REFETCH + 1

    for _ in range(50):
        made_up = SigningKey.es256()  # a fresh kid each time
        await refused(verifier, made_up.sign(user_claims(server.issuer)))
    assert server.requests == 2, "50 unknown kids within one interval: one refetch"

    clock.now += MIN_REFETCH / 2
    await refused(verifier, SigningKey.es256().sign(user_claims(server.issuer)))
    assert server.requests == 2
    clock.now += MIN_REFETCH / 2 + 1
    await refused(verifier, SigningKey.es256().sign(user_claims(server.issuer)))
    assert server.requests == 3, "the next interval allows one more"
    # Known keys keep working throughout, without fetching.
    assert await verifier.verify(ec_key.sign(user_claims(server.issuer)))
    assert server.requests == 3


async def test_revoked_key_is_refused_after_the_cache_refreshes(
    server: JwksServer, http: httpx.AsyncClient, ec_key: SigningKey, rsa_key: SigningKey
) -> None:
    clock = Clock()
    verifier = make_verifier(server, http, clock)
    earlier = rsa_key.sign(user_claims(server.issuer))
    assert await verifier.verify(earlier)

    server.keys = [ec_key]  # the RSA key is revoked
    clock.now += MAX_AGE / 2
    # Until the JWKS is refreshed this replica still trusts the key (Supabase documents the same delay).
    assert await verifier.verify(earlier)
    assert server.requests == 1

    clock.now += MAX_AGE / 2 + 1
    assert (await refused(verifier, earlier)).reason == "TOKEN_INVALID", "a cached token of a revoked key"
    fresh = rsa_key.sign(user_claims(server.issuer))
    assert (await refused(verifier, fresh)).reason == "TOKEN_INVALID"
    assert await verifier.verify(ec_key.sign(user_claims(server.issuer)))
    assert server.requests == 2


async def test_jwks_outage_keeps_the_keys_already_known(
    server: JwksServer, http: httpx.AsyncClient, ec_key: SigningKey
) -> None:
    clock = Clock()
    verifier = make_verifier(server, http, clock)
    assert await verifier.verify(ec_key.sign(user_claims(server.issuer)))
    server.status = 503
    clock.now += MAX_AGE + 1
    assert await verifier.verify(ec_key.sign(user_claims(server.issuer)))
    assert server.requests == 2


async def test_verified_tokens_are_cached_until_they_expire(
    server: JwksServer, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    wall = Clock()
    wall.now = time.time()
    verifier = make_verifier(server, http, Clock(), now=wall)
    token = jwt.encode(user_claims(server.issuer, ttl=60), SECRET, algorithm="HS256")
    decodes = 0
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        nonlocal decodes
        decodes += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    for _ in range(5):
        await verifier.verify(token)
    assert decodes == 1

    wall.now += 60 + 30 + 1  # past exp plus the leeway: the cache entry is over
    await verifier.verify(token)  # (PyJWT itself still runs on real time, so the token verifies again)
    assert decodes == 2


async def test_a_stale_key_set_is_trusted_up_to_the_bound_then_refused(
    server: JwksServer, http: httpx.AsyncClient, ec_key: SigningKey
) -> None:
    """While JWKS fetches fail, the keys in hand are trusted for max_stale after the last good fetch, then not: a key
    revoked during the outage must not stay accepted for ever."""
    clock = Clock()
    jwks = JwksKeys(
        server.jwks_url,
        http,
        max_age_seconds=MAX_AGE,
        min_refetch_seconds=MIN_REFETCH,
        max_stale_seconds=MAX_STALE,
        clock=clock,
    )
    verifier = make_verifier(server, http, clock, jwks=jwks)
    cached = ec_key.sign(user_claims(server.issuer))
    assert await verifier.verify(cached)  # the key set is served ...
    server.status = 503  # ... then the server fails
    clock.now += MAX_STALE - 1
    assert await verifier.verify(cached), "a cached token, within the bound"
    assert await verifier.verify(ec_key.sign(user_claims(server.issuer))), "a new token, within the bound"
    failed_fetches = server.requests - 1
    assert failed_fetches >= 1

    clock.now += 2  # past the bound
    for token in (cached, ec_key.sign(user_claims(server.issuer))):
        refused_now = await refused(verifier, token)
        assert (refused_now.kind, refused_now.reason) == (ErrorKind.UNAVAILABLE, "JWKS_UNAVAILABLE")
    hs256 = jwt.encode(user_claims(server.issuer), SECRET, algorithm="HS256")
    assert await verifier.verify(hs256), "HS256 tokens do not depend on the JWKS"

    server.status = 200  # the JWKS is back: the next fetch (at most min_refetch later) restores the keys
    clock.now += MIN_REFETCH + 1
    assert await verifier.verify(cached)


async def test_failed_jwks_fetches_are_retried_every_min_refetch(
    server: JwksServer, http: httpx.AsyncClient, ec_key: SigningKey
) -> None:
    clock = Clock()
    verifier = make_verifier(server, http, clock)
    token = ec_key.sign(user_claims(server.issuer))
    assert await verifier.verify(token)
    server.status = 503
    clock.now += MAX_AGE + 1
    assert await verifier.verify(token)
    assert server.requests == 2
    clock.now += MIN_REFETCH / 2
    assert await verifier.verify(token)
    assert server.requests == 2, "not more often than min_refetch"
    clock.now += MIN_REFETCH
    assert await verifier.verify(token)
    assert server.requests == 3, "but not only every max_age either"


async def test_no_successful_fetch_yet_is_unavailable_not_a_bad_token(
    server: JwksServer, http: httpx.AsyncClient, ec_key: SigningKey
) -> None:
    server.status = 503
    verifier = make_verifier(server, http, Clock())
    failure = await refused(verifier, ec_key.sign(user_claims(server.issuer)))
    assert (failure.kind, failure.reason) == (ErrorKind.UNAVAILABLE, "JWKS_UNAVAILABLE")


def test_the_stale_bound_cannot_be_below_the_max_age(server: JwksServer, http: httpx.AsyncClient) -> None:
    with pytest.raises(ValueError):
        JwksKeys(server.jwks_url, http, max_age_seconds=600, max_stale_seconds=599)


async def test_service_api_keys_match_only_the_configured_ones() -> None:
    keys = ServiceApiKeys(["sb_secret_one", "sb_secret_two"])
    assert keys.matches("sb_secret_one") and keys.matches("sb_secret_two")
    for other in ("sb_secret_on", "sb_secret_one ", "", "sb_publishable_one", "x" * 10_000, "sb_secret_\udcff"):
        assert not keys.matches(other), other
    for bad in (["sb_publishable_abc"], [""], ["  "]):
        with pytest.raises(ValueError):
            ServiceApiKeys(bad)
    verifier = TokenVerifier(
        hs256_secret=SECRET,
        jwks=None,
        audience="authenticated",
        issuer=None,
        leeway_seconds=30,
        allow_anonymous=True,
        api_keys=keys,
    )
    assert (await verifier.verify_header(None, "sb_secret_two")).is_service
    assert (await verifier.verify_header("Bearer sb_secret_one", None)).is_service
    with pytest.raises(ServiceError) as wrong:
        await verifier.verify_header(None, "sb_secret_three")
    assert (wrong.value.kind, wrong.value.reason) == (ErrorKind.UNAUTHENTICATED, "API_KEY_INVALID")
    user = str(uuid.uuid4())
    as_user = await verifier.verify_header(
        "Bearer " + jwt.encode(user_claims("x", user), SECRET, algorithm="HS256"), "sb_secret_one"
    )
    assert (as_user.subject, as_user.is_service) == (user, False), "authorization decides, as on Supabase"
