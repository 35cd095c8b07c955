"""Verifies Supabase JWTs locally: asymmetric keys from the project's JWKS, or the legacy HS256 secret.

Never `alg: none`, never an algorithm the key was not made for: the header's `alg` must match the
key's own algorithm, and HS256 is only ever checked against the shared secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import structlog

from imagegen_common.errors import ErrorKind, ServiceError
from job_service.domain import Principal

log = structlog.get_logger(__name__)

ASYMMETRIC_ALGORITHMS = ("ES256", "RS256")
# Supabase's secret keys are ~40 characters; anything much longer is not one, and is not hashed or compared.
MAX_API_KEY_CHARS = 256


def _unauthenticated(reason: str, message: str) -> ServiceError:
    return ServiceError(ErrorKind.UNAUTHENTICATED, reason, message)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class ServiceApiKeys:
    """Supabase's new secret API keys (`sb_secret_...`), each accepted as the service role.

    The keys are kept only as SHA-256 digests and a presented key is compared with every one of them by
    hmac.compare_digest, without stopping at a match: neither the time taken nor the answer tells a caller
    which keys exist, how many, or how long they are.
    """

    def __init__(self, keys: list[str]) -> None:
        for key in keys:
            if not key.strip():
                raise ValueError("a service API key is empty")
            if key.startswith("sb_publishable_"):
                raise ValueError("a publishable key (sb_publishable_...) is public: it cannot be a service key")
            if len(key) > MAX_API_KEY_CHARS:
                raise ValueError(f"a service API key is longer than {MAX_API_KEY_CHARS} characters")
        self._digests = [_digest(key) for key in keys]

    def matches(self, presented: str) -> bool:
        if not presented or len(presented) > MAX_API_KEY_CHARS:
            return False
        given = _digest(presented)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(digest, given)
        return matched


def looks_like_api_key(value: str) -> bool:
    """A Supabase API key rather than a JWT (which always has two dots): `sb_secret_...`, `sb_publishable_...`."""
    return value.startswith("sb_") and "." not in value


class JwksKeys:
    """The project's public signing keys, cached; an unknown `kid` refetches, at most once per interval."""

    def __init__(
        self,
        url: str,
        http: httpx.AsyncClient,
        *,
        max_age_seconds: float = 600.0,
        min_refetch_seconds: float = 30.0,
        max_stale_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_stale_seconds < max_age_seconds:
            # The key set is only refetched after max_age: a smaller bound would refuse tokens between refreshes.
            raise ValueError("the JWKS max stale time must be at least its max age")
        self._url = url
        self._http = http
        self._max_age = max_age_seconds
        self._min_refetch = min_refetch_seconds
        self._max_stale = max_stale_seconds
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")  # the last attempt, successful or not
        self._fetched_ok_at = float("-inf")  # the last successful fetch: how old the keys in hand are
        self._last_failed = False
        self._lock = asyncio.Lock()

    async def get(self, kid: str) -> jwt.PyJWK | None:
        """The key named `kid`, None if the project does not publish it.

        Raises UNAVAILABLE (JWKS_UNAVAILABLE) while the keys in hand are older than max_stale (no fetch has
        succeeded for that long, or ever): a key the project revoked meanwhile must not stay trusted for ever.
        """
        if self._refresh_due(kid):
            async with self._lock:
                if self._refresh_due(kid):  # another caller may have refreshed while we waited
                    await self._refresh()
        if self._clock() - self._fetched_ok_at > self._max_stale:
            # UNAVAILABLE, not UNAUTHENTICATED: the token may be perfectly good, it cannot be checked now. A client
            # retries UNAVAILABLE later; UNAUTHENTICATED would have apps sign their users out for our outage.
            raise ServiceError(
                ErrorKind.UNAVAILABLE,
                "JWKS_UNAVAILABLE",
                "the project's signing keys could not be fetched for too long; try again later",
            )
        return self._keys.get(kid)

    def _refresh_due(self, kid: str) -> bool:
        age = self._clock() - self._fetched_at
        if self._last_failed:
            # While fetches fail, try again every min_refetch rather than every max_age, so the service recovers
            # soon after the JWKS does (and still cannot flood it).
            return age > self._min_refetch
        return age > self._max_age or (kid not in self._keys and age > self._min_refetch)

    async def _refresh(self) -> None:
        try:
            response = await self._http.get(self._url, timeout=5.0)
            response.raise_for_status()
            document = response.json()
            if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
                raise ValueError("not a JWKS document (no 'keys' list)")
            keys: dict[str, jwt.PyJWK] = {}
            for data in document["keys"]:
                kid = data.get("kid") if isinstance(data, dict) else None
                if not isinstance(kid, str) or not kid:
                    continue  # Supabase always names its keys; a token can only ask for a key by kid
                try:
                    keys[kid] = jwt.PyJWK(data)
                except jwt.PyJWTError as exc:  # e.g. a key type we do not support: skip it, keep the rest
                    log.warning("skipping JWKS key", kid=kid, error=str(exc))
            self._keys = keys
            self._fetched_ok_at = self._clock()
            self._last_failed = False
            log.info("JWKS refreshed", url=self._url, kids=sorted(keys))
        except (httpx.HTTPError, ValueError) as exc:
            # Keep the keys we had: a short JWKS outage must not lock out tokens signed with known keys (up to
            # max_stale after the last successful fetch, see get()).
            self._last_failed = True
            log.warning("JWKS fetch failed", url=self._url, error=str(exc))
        finally:
            self._fetched_at = self._clock()


class TokenVerifier:
    def __init__(
        self,
        *,
        hs256_secret: str | None,
        jwks: JwksKeys | None,
        audience: str,
        issuer: str | None,
        leeway_seconds: int,
        allow_anonymous: bool,
        api_keys: ServiceApiKeys | None = None,
        cache_size: int = 10_000,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._api_keys = api_keys
        self._secret = hs256_secret
        self._jwks = jwks
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway_seconds
        self._allow_anonymous = allow_anonymous
        # token -> (principal, when the cache entry ends, the JWKS key it was verified with or None for HS256).
        self._cache: OrderedDict[str, tuple[Principal, float, jwt.PyJWK | None]] = OrderedDict()
        self._cache_size = cache_size
        self._now = now

    async def verify_header(self, authorization: str | None, apikey: str | None = None) -> Principal:
        """The caller, from its `authorization: Bearer ...` metadata, or else its `apikey` metadata.

        As on Supabase's own APIs, `authorization` says who the caller is and wins when both are sent (supabase-js
        sends its project key as `apikey` on every request, next to the user's token); a secret API key is
        accepted in either place (Supabase's clients send `apikey: sb_secret_...`).
        """
        if not authorization:
            if apikey:
                return self.verify_api_key(apikey.strip())
            raise _unauthenticated("TOKEN_MISSING", "send 'authorization: Bearer <access token>' metadata")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthenticated("TOKEN_MISSING", "the authorization metadata must be 'Bearer <access token>'")
        if looks_like_api_key(token.strip()):
            return self.verify_api_key(token.strip())
        return await self.verify(token.strip())

    def verify_api_key(self, key: str) -> Principal:
        """A configured secret API key is the service role; any other key (publishable, unknown, empty) is not."""
        if self._api_keys is None or not self._api_keys.matches(key):
            # Says nothing about which keys exist, or whether any do.
            raise _unauthenticated("API_KEY_INVALID", "the API key is not a secret key of this service")
        return Principal(subject="service_role", is_service=True)

    async def verify(self, token: str) -> Principal:
        cached = self._cache.get(token)
        if cached is not None:
            principal, until, jwk = cached
            # A token stays verified until it expires, and only while its key is still published: once a
            # JWKS refresh drops (revokes) or replaces the key, the token is checked again from scratch.
            if until > self._now() and (jwk is None or await self._current_key(principal) is jwk):
                return principal
            self._cache.pop(token, None)
        principal, expires_at, jwk = await self._verify_uncached(token)
        self._cache[token] = (principal, expires_at + self._leeway, jwk)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal

    async def _current_key(self, principal: Principal) -> jwt.PyJWK | None:
        kid = principal.key_id
        return await self._jwks.get(kid) if self._jwks is not None and kid else None

    async def _verify_uncached(self, token: str) -> tuple[Principal, float, jwt.PyJWK | None]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _unauthenticated("TOKEN_INVALID", f"malformed token: {exc}") from exc
        algorithm = header.get("alg")
        key: Any
        jwk: jwt.PyJWK | None = None
        kid = header.get("kid")
        if algorithm == "HS256":
            if not self._secret:
                raise _unauthenticated("TOKEN_INVALID", "HS256 tokens are not accepted here")
            key = self._secret
        elif algorithm in ASYMMETRIC_ALGORITHMS:
            jwk = await self._jwks.get(kid) if self._jwks and isinstance(kid, str) and kid else None
            if jwk is None:
                raise _unauthenticated("TOKEN_INVALID", f"unknown signing key {kid!r}")
            if jwk.algorithm_name != algorithm:
                raise _unauthenticated("TOKEN_INVALID", f"key {kid!r} is not a {algorithm} key")
            key = jwk.key
        else:
            raise _unauthenticated("TOKEN_INVALID", f"algorithm {algorithm!r} is not accepted")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                leeway=self._leeway,
                options={"require": ["exp"], "verify_aud": False, "verify_iss": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _unauthenticated("TOKEN_EXPIRED", "the token has expired; refresh the session") from exc
        except jwt.ImmatureSignatureError as exc:
            raise _unauthenticated("TOKEN_INVALID", "the token is not valid yet (nbf/iat in the future)") from exc
        except jwt.PyJWTError as exc:
            raise _unauthenticated("TOKEN_INVALID", f"token rejected: {exc}") from exc
        return self._principal(claims, kid if jwk is not None else None), float(claims["exp"]), jwk

    def _principal(self, claims: dict[str, Any], key_id: str | None) -> Principal:
        if claims.get("role") == "service_role":
            # Supabase's service keys carry no sub/aud (and iss "supabase"): the signature is the proof.
            return Principal(subject="service_role", is_service=True, key_id=key_id, claims=claims)
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self._audience not in audiences:
            raise _unauthenticated("TOKEN_INVALID", f"the token's audience is not {self._audience!r}")
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise _unauthenticated("TOKEN_INVALID", "the token was issued by another project")
        subject = claims.get("sub")
        try:
            user_id = str(uuid.UUID(str(subject)))
        except ValueError as exc:
            raise _unauthenticated("TOKEN_INVALID", "the token has no user id (sub)") from exc
        anonymous = bool(claims.get("is_anonymous", False))
        if anonymous and not self._allow_anonymous:
            raise ServiceError(
                ErrorKind.PERMISSION_DENIED,
                "ANONYMOUS_NOT_ALLOWED",
                "anonymous users may not use this service",
            )
        return Principal(subject=user_id, is_anonymous=anonymous, key_id=key_id, claims=claims)
