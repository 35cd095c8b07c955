"""Development tokens: HS256 JWTs shaped like Supabase's, signed with the local development secret.

`make run` and the CLI use them so that everything works with no Supabase project. JobService warns
at start whenever it accepts this secret.
"""

from __future__ import annotations

import time
import uuid

import jwt

DEV_JWT_SECRET = "imagegen-local-development-secret-do-not-use-in-production"
DEV_USER_ID = "00000000-0000-4000-8000-00000000d3f0"


def mint_token(
    secret: str = DEV_JWT_SECRET,
    *,
    user_id: str = DEV_USER_ID,
    ttl_seconds: int = 3600,
    service_role: bool = False,
    issuer: str = "imagegen-dev",
    extra_claims: dict[str, object] | None = None,
) -> str:
    now = int(time.time())
    if service_role:
        claims: dict[str, object] = {
            "role": "service_role",
            "iss": "supabase",
            "iat": now,
            "exp": now + ttl_seconds,
        }
    else:
        claims = {
            "sub": str(uuid.UUID(user_id)),
            "aud": "authenticated",
            "role": "authenticated",
            "iss": issuer,
            "iat": now,
            "exp": now + ttl_seconds,
            "is_anonymous": False,
            "session_id": str(uuid.uuid4()),
        }
    claims.update(extra_claims or {})
    return jwt.encode(claims, secret, algorithm="HS256")
