"""A stand-in for a Supabase project's auth keys: real EC P-256 / RSA-2048 keys, a real JWKS HTTP endpoint.

`JwksServer` serves `/auth/v1/.well-known/jwks.json` on 127.0.0.1 from a thread (so it answers whichever
event loop the code under test runs on) and counts the requests it gets; tests change `keys` to rotate
or revoke keys. Tokens are signed with PyJWT, shaped like Supabase's access tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

JWKS_PATH = "/auth/v1/.well-known/jwks.json"


@dataclass
class SigningKey:
    """A private key and how Supabase would publish its public half."""

    kid: str
    algorithm: str  # "ES256" or "RS256"
    private_key: Any

    @classmethod
    def es256(cls, kid: str | None = None) -> SigningKey:
        return cls(kid or f"ec-{uuid.uuid4().hex[:8]}", "ES256", ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def rs256(cls, kid: str | None = None) -> SigningKey:
        return cls(
            kid or f"rsa-{uuid.uuid4().hex[:8]}",
            "RS256",
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
        )

    def public_jwk(self) -> dict[str, Any]:
        codec = ECAlgorithm if self.algorithm == "ES256" else RSAAlgorithm
        jwk: dict[str, Any] = codec.to_jwk(self.private_key.public_key(), as_dict=True)
        # What Supabase publishes for each key: kid, alg, use, key_ops.
        jwk.update({"kid": self.kid, "alg": self.algorithm, "use": "sig", "key_ops": ["verify"]})
        return jwk

    def public_pem(self) -> bytes:
        return bytes(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def sign(self, claims: dict[str, Any], *, kid: str | None = None) -> str:
        return jwt.encode(claims, self.private_key, algorithm=self.algorithm, headers={"kid": kid or self.kid})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A token built byte by byte, for shapes PyJWT refuses to produce (e.g. `alg: none`)."""
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}.{b64url(signature)}"


def hs256_signed_with_public_key(key: SigningKey, claims: dict[str, Any]) -> str:
    """The RS/HS confusion attack: an HS256 token whose HMAC secret is the (public) RSA key PEM."""
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def user_claims(issuer: str, user_id: str | None = None, *, ttl: int = 3600, **overrides: Any) -> dict[str, Any]:
    """The claims of a Supabase user access token."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": "authenticated",
        "sub": user_id or str(uuid.uuid4()),
        "role": "authenticated",
        "aal": "aal1",
        "iat": now,
        "exp": now + ttl,
        "session_id": str(uuid.uuid4()),
        "email": "someone@example.com",
        "phone": "",
        "is_anonymous": False,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


@dataclass
class JwksServer:
    keys: list[SigningKey] = field(default_factory=list)
    requests: int = 0
    status: int = 200
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        """The project's base URL (what SUPABASE_URL would be)."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def issuer(self) -> str:
        return f"{self.url}/auth/v1"

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    def document(self) -> bytes:
        return json.dumps({"keys": [key.public_jwk() for key in self.keys]}).encode()

    def _count(self) -> None:
        with self._lock:
            self.requests += 1

    def start(self) -> JwksServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != JWKS_PATH:
                    self.send_error(404)
                    return
                outer._count()
                body = outer.document() if outer.status == 200 else b'{"error": "unavailable"}'
                self.send_response(outer.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        server = self._server
        thread = threading.Thread(target=lambda: server.serve_forever(poll_interval=0.02), name="jwks", daemon=True)
        thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@contextmanager
def jwks_server(*keys: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer(list(keys)).start()
    try:
        yield server
    finally:
        server.stop()
