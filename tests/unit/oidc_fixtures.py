"""Test helpers for OIDC: a local JWKS/discovery server, signing keys, token factory.

The server is a real HTTP server on 127.0.0.1 (werkzeug, in a thread) serving JSON
the test controls; it can be switched to fail (500), hang past the client timeout,
serve malformed JSON or rotate keys, and it counts requests per path. Tokens are real
JWTs signed with real RSA/EC keys, plus hand-built forgeries pyjwt refuses to make.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from werkzeug.wrappers import Request, Response

from broker.devstack.processes import ManagedProcess, serve_in_thread
from broker.devstack.redis_server import start_redis
from broker.settings import OIDCProviderSettings
from broker.store import Sealer, Store

ISSUER = "https://idp.example.test"
CLIENT_ID = "broker-web"
OTHER_CLIENT_ID = "broker-android"

Mode = Literal["ok", "error", "hang", "malformed", "not_found", "no_keys"]

# --------------------------------------------------------------------------- keys


@functools.cache
def _rsa_private(label: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    # Cached by label: RSA key generation is the slowest thing in these tests.
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def _ec_private(label: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class KeyPair:
    """A signing key pair and how its public half is published."""

    kid: str | None
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    alg: str = "RS256"
    publish_alg: bool = True
    use: str | None = "sig"
    extra: dict[str, Any] = field(default_factory=dict)

    def public_jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
        else:
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
        if self.kid is not None:
            jwk["kid"] = self.kid
        if self.publish_alg:
            jwk["alg"] = self.alg
        if self.use is not None:
            jwk["use"] = self.use
        jwk.update(self.extra)
        return dict(jwk)

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def rsa_key(kid: str | None, label: str | None = None, **kwargs: Any) -> KeyPair:
    """An RSA key; the same ``label`` (default: the kid) gives the same key pair."""
    return KeyPair(kid=kid, private=_rsa_private(label or str(kid)), **kwargs)


def ec_key(kid: str, label: str | None = None, **kwargs: Any) -> KeyPair:
    return KeyPair(kid=kid, private=_ec_private(label or kid), alg="ES256", **kwargs)


# --------------------------------------------------------------------------- tokens


def claims(*, issuer: Any = ISSUER, audience: Any = CLIENT_ID, **overrides: Any) -> dict[str, Any]:
    """Standard ID token claims valid now; an override of None drops the claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": "user-123",
        "iat": now,
        "exp": now + 600,
        "email": "user@example.test",
        "email_verified": True,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    key: KeyPair,
    payload: dict[str, Any],
    *,
    alg: str | None = None,
    headers: dict[str, Any] | None = None,
    include_kid: bool = True,
) -> str:
    extra: dict[str, Any] = {"kid": key.kid} if include_kid and key.kid is not None else {}
    extra.update(headers or {})
    return jwt.encode(payload, key.private, algorithm=alg or key.alg, headers=extra)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return (
        _b64(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64(json.dumps(payload, separators=(",", ":")).encode())
    )


def sign_raw(key: KeyPair, header: str | bytes, payload: str | bytes) -> str:
    """A JWS over exactly these header and payload bytes, signed with ``key``.

    pyjwt serializes the JSON itself, so it cannot make a token whose JSON has a
    duplicate member, odd escapes or another encoding: those are built here, with the
    real key, so the signature is valid and only the strict parser can refuse them.
    """
    raw_header = header.encode() if isinstance(header, str) else header
    raw_payload = payload.encode() if isinstance(payload, str) else payload
    signing_input = _b64(raw_header) + "." + _b64(raw_payload)
    algorithm = jwt.get_algorithm_by_name(key.alg)
    signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key.private))
    return signing_input + "." + _b64(signature)


def unsigned_token(payload: dict[str, Any], *, kid: str | None = None) -> str:
    """alg "none": no signature at all."""
    header: dict[str, Any] = {"alg": "none", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return _segments(header, payload) + "."


def hmac_with_public_key(key: KeyPair, payload: dict[str, Any]) -> str:
    """The classic algorithm-confusion forgery: HS256 keyed with the public key PEM.

    pyjwt refuses to make this (it rejects PEM keys as HMAC secrets), so build it by hand.
    """
    signing_input = _segments({"alg": "HS256", "typ": "JWT", "kid": key.kid}, payload)
    mac = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(mac)


# --------------------------------------------------------------------------- server


class FakeIdP:
    """A real local HTTP server for ``/jwks`` and ``/.well-known/openid-configuration``."""

    def __init__(self, *, issuer: str = ISSUER) -> None:
        self.issuer = issuer
        self.keys: list[KeyPair] = []
        self.extra_jwks: list[Any] = []  # raw entries appended to the published set
        self.mode: Mode = "ok"
        self.hang_seconds = 2.0
        self.discovery_issuer: str | None = None  # None: the configured issuer
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._served = serve_in_thread(self._app, name="fake-idp")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._served.port}"

    @property
    def jwks_url(self) -> str:
        return self.base_url + "/jwks"

    @property
    def discovery_url(self) -> str:
        return self.base_url + "/.well-known/openid-configuration"

    @property
    def jwks_hits(self) -> int:
        return self.hits["/jwks"]

    @property
    def discovery_hits(self) -> int:
        return self.hits["/.well-known/openid-configuration"]

    def reset(self, *keys: KeyPair) -> None:
        with self._lock:
            self.keys = list(keys)
            self.extra_jwks = []
            self.mode = "ok"
            self.discovery_issuer = None
            self.hits.clear()

    def jwks_document(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.keys] + list(self.extra_jwks)}

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        with self._lock:
            self.hits[request.path] += 1
            mode = self.mode
        if mode == "hang":
            # Longer than the client's timeout; released early when the server closes.
            self._release.wait(self.hang_seconds)
        if mode == "error":
            response = Response("boom", status=500)
        elif mode == "not_found":
            response = _json({"error": "not found"}, status=404)
        elif mode == "malformed":
            response = Response("{not json", mimetype="application/json")
        elif mode == "no_keys":
            response = _json({"issuer": self.issuer})
        elif request.path == "/jwks":
            response = _json(self.jwks_document())
        elif request.path == "/.well-known/openid-configuration":
            response = _json(
                {
                    "issuer": self.discovery_issuer or self.issuer,
                    "jwks_uri": self.jwks_url,
                    "id_token_signing_alg_values_supported": ["RS256"],
                }
            )
        else:
            response = _json({"error": "not found"}, status=404)
        return response(environ, start_response)

    def close(self) -> None:
        self._release.set()
        self._served.stop()


def _json(body: Any, *, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


# --------------------------------------------------------------------------- fixtures


class FakeClock:
    """Wall clock for cache expiry that tests move by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """Body of a module-scoped fixture: a real redis-server, stopped at teardown."""
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield proc
    finally:
        proc.stop()


def make_store(port: int) -> tuple[Store, redis.Redis]:
    """A store with its own key prefix, so tests never see each other's keys."""
    client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
    store = Store(client=client, prefix=f"test:{uuid.uuid4()}:", sealer=Sealer([os.urandom(32)]))
    return store, client


def oidc_settings(idp: FakeIdP, **overrides: Any) -> OIDCProviderSettings:
    base = OIDCProviderSettings(
        name="corp",
        type="oidc",
        display_name="Corp IdP",
        issuers=(ISSUER,),
        client_ids=(CLIENT_ID,),
        discovery_url=None,
        jwks_url=idp.jwks_url,
        algorithms=("RS256",),
        leeway_seconds=60,
        jwks_cache_seconds=3600,
        jwks_refresh_cooldown_seconds=30,
        timeout_seconds=0.5,
        require_nonce=False,
    )
    return replace(base, **overrides)
