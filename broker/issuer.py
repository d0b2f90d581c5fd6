"""The broker as an OpenID issuer for STS: its signing keys, discovery document and tokens.

For a rule with ``sts_token = "broker"`` STS receives a token the broker signs instead of
the provider's. IAM trusts the broker as an OIDC provider: it fetches
``<public_url>/.well-known/openid-configuration`` and the JWKS it names, and checks the
token's signature, ``iss``, ``aud`` and ``exp``.

What this module promises (tests/unit/test_issuer.py and tests/integration/test_issuer.py
hold each one):

* **Tokens**: ``iss`` is ``server.public_url``, ``sub`` the identity id, ``aud``
  ``issuer.audience``, ``iat``/``nbf`` now and ``exp`` at most ``ISSUER_MAX_TOKEN_SECONDS``
  (5 minutes) later; ``amr`` is carried over from the provider's verified claims; session
  tags (``https://aws.amazon.com/tags``) and the source identity
  (``https://aws.amazon.com/source_identity``) are the grant's, already checked against
  STS's limits (broker.policy). The header names the key (``kid``); RS256 or ES256.
* **Keys** come from ``issuer.key_files`` (the first signs, all are published), or are
  generated and kept in Redis, sealed with the store's encryption keys, so every broker
  process and node signs with and publishes the same keys.
* **Rotation** (``broker keys rotate``, or by itself after ``issuer.rotate_after_seconds``)
  publishes the next key ``issuer.publish_ahead_seconds`` before it signs anything, and
  keeps the old key published until no token it signed can still be valid (its last
  token's lifetime plus the verifier's leeway); then it is dropped.
* Nothing here logs a token or a private key; a Redis fault is ``StoreUnavailable`` (503).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from broker.errors import ConfigurationError, DependencyUnavailable
from broker.identity import Identity
from broker.settings import DEFAULT_LEEWAY_SECONDS, Settings
from broker.store import Store

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

TAGS_CLAIM = "https://aws.amazon.com/tags"
SOURCE_IDENTITY_CLAIM = "https://aws.amazon.com/source_identity"
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/.well-known/jwks.json"

# How long a verifier may still accept a token after its exp (IAM's clock skew
# allowance is not documented; a broker's own leeway is the same order of magnitude).
VERIFIER_LEEWAY_SECONDS = DEFAULT_LEEWAY_SECONDS
# The sealed key ring outlives its newest key's rotation period by this factor: a broker
# unused for that long starts afresh, which is safe (no token it signed is still valid).
_RING_TTL_FACTOR = 3
_LOCK_TIMEOUT_SECONDS = 10.0
_LOCK_WAIT_SECONDS = 5.0
_RSA_BITS = 2048


@dataclass(frozen=True, kw_only=True)
class SigningKey:
    kid: str
    alg: str
    private: PrivateKey = field(repr=False)
    created: float
    activates_at: float  # signs from then on (until a successor activates)
    retired_at: float | None = None  # when a successor took over; None while current
    source: str = "redis"  # "redis" (generated) or "file"

    def public_jwk(self) -> dict[str, Any]:
        return {**_public_jwk(self.private), "kid": self.kid, "alg": self.alg, "use": "sig"}


@dataclass(frozen=True, kw_only=True)
class KeyState:
    """One key as ``broker keys list`` shows it."""

    kid: str
    alg: str
    state: str  # "next" (published, not signing yet) | "current" | "retiring"
    created: float
    activates_at: float
    retired_at: float | None
    unpublish_at: float | None
    source: str


class Issuer:
    """Signs the broker's tokens for STS and publishes what verifiers need."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings.issuer
        self.issuer_url = settings.server.public_url
        self._store = store
        self._clock = clock
        self._ring_key = store.key("issuer", "keys")
        # Parsed private keys by kid: parsing an RSA key is slow, and a kid names one key.
        self._parsed: dict[str, PrivateKey] = {}
        self._file_keys = tuple(_file_key(pem, created=0.0) for pem in settings.issuer.key_pems)

    # -- what verifiers fetch -----------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        algs = sorted({k.alg for k in self.published()} or {self._settings.algorithm})
        return {
            "issuer": self.issuer_url,
            "jwks_uri": self.issuer_url + JWKS_PATH,
            # Required by OpenID Connect Discovery; the broker has no authorization
            # endpoint of its own for this issuer, it only signs tokens for STS.
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algs,
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "iat",
                "nbf",
                "exp",
                "jti",
                "amr",
                TAGS_CLAIM,
                SOURCE_IDENTITY_CLAIM,
            ],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.published()]}

    # -- signing ------------------------------------------------------------------------

    def sign(
        self,
        identity: Identity,
        *,
        tags: tuple[tuple[str, str], ...] = (),
        transitive_tag_keys: tuple[str, ...] = (),
        source_identity: str | None = None,
    ) -> str:
        """A token for STS about ``identity``; tags and source identity already checked."""
        key = self.signing_key()
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer_url,
            "sub": identity.identity_id,
            "aud": self._settings.audience,
            "iat": now,
            "nbf": now,
            "exp": now + self._settings.token_seconds,
            "jti": secrets.token_urlsafe(16),
        }
        amr = identity.claims.get("amr")
        if isinstance(amr, list) and all(isinstance(v, str) for v in amr):
            # How the person authenticated at the provider, so a trust policy can ask
            # for MFA (a condition on amr) without trusting the provider directly.
            claims["amr"] = list(amr)
        if tags:
            claims[TAGS_CLAIM] = {
                # Built as JSON values, never text: a tag value stays one string.
                "principal_tags": {k: [v] for k, v in tags},
                "transitive_tag_keys": list(transitive_tag_keys),
            }
        if source_identity is not None:
            claims[SOURCE_IDENTITY_CLAIM] = source_identity
        return jwt.encode(
            claims, key.private, algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"}
        )

    def signing_key(self) -> SigningKey:
        ring = self._ring()
        now = self._clock()  # after _ring(), which may have made a key just now
        active = [k for k in ring if k.activates_at <= now]
        if not active:
            raise ConfigurationError("the broker has no signing key for its tokens yet")
        return max(active, key=lambda k: (k.activates_at, k.created))

    def published(self) -> list[SigningKey]:
        ring = self._ring()
        now = self._clock()
        return [k for k in ring if (until := self._unpublish_at(k)) is None or now < until]

    # -- operations (broker keys ...) ---------------------------------------------------

    def states(self) -> list[KeyState]:
        current = self.signing_key().kid
        now = self._clock()
        out = []
        for k in self.published():
            state = (
                "current" if k.kid == current else "next" if k.activates_at > now else "retiring"
            )
            out.append(
                KeyState(
                    kid=k.kid,
                    alg=k.alg,
                    state=state,
                    created=k.created,
                    activates_at=k.activates_at,
                    retired_at=k.retired_at,
                    unpublish_at=self._unpublish_at(k),
                    source=k.source,
                )
            )
        return out

    def rotate(self, *, publish_ahead_seconds: float | None = None) -> SigningKey:
        """Make the next key: published now, signing after ``publish_ahead_seconds``
        (default ``issuer.publish_ahead_seconds``); the current key retires then."""
        if self._file_keys:
            raise ConfigurationError(
                "the issuer's keys come from issuer.key_files: rotate them there (put the "
                "new key first, keep the old one listed until its tokens have expired)"
            )
        ahead = (
            self._settings.publish_ahead_seconds
            if publish_ahead_seconds is None
            else publish_ahead_seconds
        )
        with self._locked():
            return self._rotate_locked(self._load(), ahead)

    # -- internals ----------------------------------------------------------------------

    def _unpublish_at(self, key: SigningKey) -> float | None:
        if key.retired_at is None or key.source == "file":
            return None  # file keys are published while they are listed
        # The last token the old key signs is signed just before retired_at and lives
        # token_seconds, plus whatever leeway a verifier allows past exp.
        return key.retired_at + self._settings.token_seconds + VERIFIER_LEEWAY_SECONDS

    def _ring(self) -> list[SigningKey]:
        if self._file_keys:
            first, *rest = self._file_keys
            # The first file key signs; the others are published so tokens they signed
            # before the operator reordered the files still verify.
            return [first, *(_retired(k, at=0.0) for k in rest)]
        ring = self._load()
        if self._needs_rotation(ring):
            with self._locked():
                ring = self._load()  # another process may have done it meanwhile
                if not ring:
                    ring = self._save([self._generate(activates_at=self._clock())])
                elif self._needs_rotation(ring):
                    self._rotate_locked(ring, self._settings.publish_ahead_seconds)
                    ring = self._load()
        return ring

    def _needs_rotation(self, ring: list[SigningKey]) -> bool:
        if not ring:
            return True
        now = self._clock()
        if any(k.activates_at > now for k in ring):
            return False  # the next key is already published
        newest = max(ring, key=lambda k: k.activates_at)
        return newest.activates_at + self._settings.rotate_after_seconds <= now

    def _rotate_locked(self, ring: list[SigningKey], ahead: float) -> SigningKey:
        now = self._clock()
        new = self._generate(activates_at=now + max(0.0, ahead))
        kept = [
            _retired(k, at=new.activates_at) if k.retired_at is None else k
            for k in ring
            if (until := self._unpublish_at(k)) is None or now < until
        ]
        self._save([*kept, new])
        return new

    def _generate(self, *, activates_at: float) -> SigningKey:
        private: PrivateKey
        if self._settings.algorithm == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            private = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
        kid = _thumbprint(_public_jwk(private))
        self._parsed[kid] = private
        return SigningKey(
            kid=kid,
            alg=_alg(private),
            private=private,
            created=self._clock(),
            activates_at=activates_at,
        )

    def _locked(self) -> Any:
        return _RingLock(self._store)

    def _load(self) -> list[SigningKey]:
        doc = self._store.get_sealed(self._ring_key)
        if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
            return []
        out = []
        for entry in doc["keys"]:
            kid = entry["kid"]
            private = self._parsed.get(kid)
            if private is None:
                loaded = serialization.load_pem_private_key(entry["pem"].encode(), password=None)
                if not isinstance(loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                    continue
                private = self._parsed[kid] = loaded
            out.append(
                SigningKey(
                    kid=kid,
                    alg=entry["alg"],
                    private=private,
                    created=float(entry["created"]),
                    activates_at=float(entry["activates_at"]),
                    retired_at=None if entry["retired_at"] is None else float(entry["retired_at"]),
                )
            )
        return out

    def _save(self, ring: list[SigningKey]) -> list[SigningKey]:
        doc = {
            "keys": [
                {
                    "kid": k.kid,
                    "alg": k.alg,
                    "pem": _pem(k.private),
                    "created": k.created,
                    "activates_at": k.activates_at,
                    "retired_at": k.retired_at,
                }
                for k in ring
            ]
        }
        ttl = _RING_TTL_FACTOR * (
            self._settings.rotate_after_seconds + self._settings.publish_ahead_seconds
        )
        self._store.set_sealed(self._ring_key, doc, ttl=ttl)
        return ring


class _RingLock:
    """The one lock every process takes before changing the key ring."""

    def __init__(self, store: Store) -> None:
        self._cm = store.lock("issuer-keys", timeout=_LOCK_TIMEOUT_SECONDS, wait=_LOCK_WAIT_SECONDS)

    def __enter__(self) -> None:
        if not self._cm.__enter__():
            self._cm.__exit__(None, None, None)
            raise DependencyUnavailable("another broker process is changing the signing keys")

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(None, None, None)


def _retired(key: SigningKey, *, at: float) -> SigningKey:
    return SigningKey(
        kid=key.kid,
        alg=key.alg,
        private=key.private,
        created=key.created,
        activates_at=key.activates_at,
        retired_at=at,
        source=key.source,
    )


def _file_key(pem: bytes, *, created: float) -> SigningKey:
    loaded = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigurationError("issuer.key_files must hold RSA or P-256 private keys")
    return SigningKey(
        kid=_thumbprint(_public_jwk(loaded)),
        alg=_alg(loaded),
        private=loaded,
        created=created,
        activates_at=0.0,
        source="file",
    )


def _alg(private: PrivateKey) -> str:
    return "ES256" if isinstance(private, ec.EllipticCurvePrivateKey) else "RS256"


def _public_jwk(private: PrivateKey) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    return {k: v for k, v in jwk.items() if k in {"kty", "crv", "x", "y", "n", "e"}}


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, no whitespace."""
    required = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _pem(private: PrivateKey) -> str:
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
