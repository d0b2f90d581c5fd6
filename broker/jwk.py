"""JSON Web Keys and key sets: which published keys may verify which algorithm.

Pure parsing, no I/O: the configuration checks a developer provider's keys with it at
load time, and ``broker.jwks`` uses it for the key sets it fetches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from broker import errors

log = logging.getLogger(__name__)

# Which key may verify which JWS algorithm (RFC 7518 section 3.1): key type and, for
# ECDSA, the one curve the algorithm is defined on. Anything not listed, above all
# "none" and the HS* family, is never verified: an HMAC "signature" keyed with a
# published public key can be forged by anyone who can read the JWKS.
KEY_TYPES: Mapping[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
}
ASYMMETRIC_ALGORITHMS = frozenset(KEY_TYPES)


class MalformedDocument(ValueError):
    """A fetched document does not have the expected shape (the reason is the message)."""


# --------------------------------------------------------------------------- key sets


@dataclass(frozen=True)
class KeySet:
    """The usable signing keys of one JWKS document, as published (JWK dicts)."""

    by_kid: Mapping[str, Mapping[str, Any]]
    keys: tuple[Mapping[str, Any], ...]
    # Parsed keys per (kid, alg); filled lazily, shared by threads (dict writes are atomic).
    _parsed: dict[tuple[int, str], jwt.PyJWK] = field(
        default_factory=dict, compare=False, repr=False
    )

    def find(self, kid: str | None) -> Mapping[str, Any] | None:
        if kid is None:
            # Without a kid the key is only unambiguous when exactly one is published.
            return self.keys[0] if len(self.keys) == 1 else None
        return self.by_kid.get(kid)

    def pyjwk(self, jwk: Mapping[str, Any], algorithm: str) -> jwt.PyJWK:
        slot = (id(jwk), algorithm)
        parsed = self._parsed.get(slot)
        if parsed is None:
            parsed = self._parsed[slot] = key_for_algorithm(jwk, algorithm)
        return parsed


def parse_key_set(document: Any) -> KeySet:
    """Keep the keys we may verify signatures with; skip (and log) everything else."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise MalformedDocument('not a JSON Web Key Set (no "keys" list)')
    by_kid: dict[str, Mapping[str, Any]] = {}
    keys: list[Mapping[str, Any]] = []
    for index, jwk in enumerate(document["keys"]):
        reason = _unusable(jwk)
        if reason is None:
            kid = jwk.get("kid")
            if kid is None:
                keys.append(jwk)
            elif kid in by_kid:
                reason = "duplicate kid"
            else:
                by_kid[kid] = jwk
                keys.append(jwk)
        if reason is not None:
            label = jwk.get("kid") if isinstance(jwk, dict) else None
            log.warning("skipping JWKS key #%d (kid %r): %s", index, label, reason)
    if not keys:
        raise MalformedDocument("no usable signing keys")
    return KeySet(by_kid=by_kid, keys=tuple(keys))


def _unusable(jwk: Any) -> str | None:
    if not isinstance(jwk, dict):
        return "not a JSON object"
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return "kid is not a string"
    # "use" is optional (RFC 7517 section 4.2) and many IdPs omit it: absent means any.
    use = jwk.get("use")
    if use is not None and use != "sig":
        return f"use is {use!r}, not 'sig'"
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return "key_ops does not allow verify"
    if jwk.get("kty") not in {"RSA", "EC"}:
        return f"key type {jwk.get('kty')!r} never verifies an ID token"
    if "d" in jwk:
        # A published private key is compromised by definition: never trust it.
        return "the JWK contains private key material"
    alg = jwk.get("alg")
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        return f"alg {alg!r} is not an allowed asymmetric algorithm"
    try:
        jwt.PyJWK(jwk)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        return f"unparseable ({type(exc).__name__})"
    return None


def key_for_algorithm(jwk: Mapping[str, Any], algorithm: str) -> jwt.PyJWK:
    """The key bound to exactly ``algorithm``, or ``InvalidToken`` if it does not fit.

    Binding the algorithm here (not letting the token header pick it) is what stops
    algorithm confusion: pyjwt then verifies with this algorithm and nothing else.
    """
    expected = KEY_TYPES.get(algorithm)
    if expected is None:
        raise errors.InvalidToken("algorithm not allowed")
    declared = jwk.get("alg")
    if declared is not None and declared != algorithm:
        raise errors.InvalidToken("signing key is published for another algorithm")
    kty, crv = expected
    if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv):
        raise errors.InvalidToken("signing key type does not fit the algorithm")
    try:
        return jwt.PyJWK(dict(jwk), algorithm=algorithm)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise errors.InvalidToken("signing key is unusable") from None


class StaticKeySet:
    """Keys configured by the operator (developer providers): nothing fetched, nothing
    refreshed; the same lookup rules as ``JWKSCache.get_key``."""

    def __init__(self, document: Any) -> None:
        self._keys = parse_key_set(document)

    def usable_until(self) -> float:
        return math.inf  # configured, never refetched

    def get_key(self, kid: str | None, *, algorithm: str) -> jwt.PyJWK:
        jwk = self._keys.find(kid)
        if jwk is None:
            if kid is None:
                raise errors.InvalidToken("token has no key id (kid)")
            raise errors.InvalidToken("unknown signing key")
        return self._keys.pyjwk(jwk, algorithm)
