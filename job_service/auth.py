"""Verifies Supabase JWTs locally: asymmetric keys from the project's JWKS, or the legacy HS256 secret.

Never `alg: none`, never an algorithm the key was not made for: the header's `alg` must match the
key's own algorithm, and HS256 is only ever checked against the shared secret.
"""

from __future__ import annotations

import asyncio
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


def _unauthenticated(reason: str, message: str) -> ServiceError:
    return ServiceError(ErrorKind.UNAUTHENTICATED, reason, message)


class JwksKeys:
    """The project's public signing keys, cached; an unknown `kid` refetches, at most once per interval."""

    def __init__(
        self,
        url: str,
        http: httpx.AsyncClient,
        *,
        max_age_seconds: float = 600.0,
        min_refetch_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._http = http
        self._max_age = max_age_seconds
        self._min_refetch = min_refetch_seconds
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self, kid: str) -> jwt.PyJWK | None:
        if self._refresh_due(kid):
            async with self._lock:
                if self._refresh_due(kid):  # another caller may have refreshed while we waited
                    await self._refresh()
        return self._keys.get(kid)

    def _refresh_due(self, kid: str) -> bool:
        age = self._clock() - self._fetched_at
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
            log.info("JWKS refreshed", url=self._url, kids=sorted(keys))
        except (httpx.HTTPError, ValueError) as exc:
            # Keep the keys we had: a JWKS outage must not lock out tokens signed with known keys.
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
        cache_size: int = 10_000,
        now: Callable[[], float] = time.time,
    ) -> None:
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

    async def verify_header(self, authorization: str | None) -> Principal:
        if not authorization:
            raise _unauthenticated("TOKEN_MISSING", "send 'authorization: Bearer <access token>' metadata")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthenticated("TOKEN_MISSING", "the authorization metadata must be 'Bearer <access token>'")
        return await self.verify(token.strip())

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
