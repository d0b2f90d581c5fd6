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

The key ring is a state machine. Its states, read from the ring at a moment ``now``:

* **empty**: no ring in Redis (a new deploy, Redis flushed or restarted without its
  data, the ring's TTL passed): the first request makes a key that signs at once.
* **no signer**: keys, but none that may sign now (only a next key). The earliest next
  key is brought forward to sign at once (it has been published the longest).
* **current**: one key signs; after ``rotate_after_seconds`` the next request rotates.
* **current + next**: the next key is published and signs from its ``activates_at``;
  the current key then retires.
* **current + retiring**: a retired key stays published until ``retired_at`` plus the
  token lifetime plus ``VERIFIER_LEEWAY_SECONDS``; after that it is dropped.
* **unreadable**: a ring is in Redis but this node's ``security.encryption_keys`` cannot
  open it (or it is not a ring). Requests are 503 ``dependency_unavailable``; the ring
  is never overwritten by a request, since the nodes that can open it may still sign
  with it. ``broker keys rotate --now`` replaces it when no node can.

Transitions happen under one Redis lock, so two nodes rotating at once make one key,
and each writes the ring only over the ring it read: a process whose lock Redis lost
(a restart without data) or let expire cannot write back a ring other nodes have
replaced since (tests/integration/test_issuer_drill.py).
The invariants (tests/unit/test_issuer_states.py holds them with a stateful test):

1. There is always a key that may sign now, or the answer is a 503 with Retry-After.
2. The JWKS ``max-age`` (``cache_seconds``) never exceeds the time until the next key
   starts signing, and no rotation makes a key sign sooner than the longest
   ``max-age`` already served (``min_publish_ahead``): a verifier holding a cached key
   set always knows the signing key. The one exception is a lost ring.
3. A key that has signed stays published until its last token has expired, plus the
   leeway. Again the exception is a lost ring: its keys, and their tokens, are gone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from broker.errors import BadRequest, ConfigurationError, DependencyUnavailable
from broker.identity import Identity
from broker.settings import DEFAULT_LEEWAY_SECONDS, Settings
from broker.store import Store

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

TAGS_CLAIM = "https://aws.amazon.com/tags"
SOURCE_IDENTITY_CLAIM = "https://aws.amazon.com/source_identity"
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/.well-known/jwks.json"
# How much later than asked a rotated-in key starts signing: a JWKS answered from the
# old ring while the new one is being written, and still on its way, has the full
# max-age; one Redis write and one HTTP answer take well under this.
ACTIVATION_MARGIN_SECONDS = 1.0

# How long a verifier may still accept a token after its exp (IAM's clock skew
# allowance is not documented; a broker's own leeway is the same order of magnitude).
VERIFIER_LEEWAY_SECONDS = DEFAULT_LEEWAY_SECONDS
# The sealed key ring outlives its newest key's rotation period by this factor: a broker
# unused for that long starts afresh, which is safe (no token it signed is still valid).
_RING_TTL_FACTOR = 3
_LOCK_TIMEOUT_SECONDS = 10.0
_LOCK_WAIT_SECONDS = 5.0
_RSA_BITS = 2048
# Verifiers may keep the discovery document and the JWKS at most this long (and less
# when the next key signs sooner).
MAX_CACHE_SECONDS = 300


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


class KeyRingUnreadable(DependencyUnavailable):
    """A ring is in Redis but this node cannot open it: its security.encryption_keys
    differ from the nodes' that wrote it. Never overwritten by a request (those nodes
    may still sign with it)."""

    default_message = (
        "the broker's signing keys in Redis cannot be opened with this node's "
        "security.encryption_keys (if no node can open them, `broker keys rotate --now` "
        "replaces them)"
    )


@dataclass(frozen=True, kw_only=True)
class Publication:
    """What verifiers are served, read from one look at the ring: the published keys
    and how long a verifier may keep them (the JWKS and discovery ``max-age``)."""

    keys: list[SigningKey]
    cache_seconds: int


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

    def discovery(self, publication: Publication | None = None) -> dict[str, Any]:
        keys = (publication or self.publication()).keys
        algs = sorted({k.alg for k in keys} or {self._settings.algorithm})
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

    def jwks(self, publication: Publication | None = None) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in (publication or self.publication()).keys]}

    def publication(self) -> Publication:
        """The published keys and their ``max-age``, which never runs past the moment
        the next key starts signing (invariant 2)."""
        ring = self._ring()
        now = self._clock()
        seconds = float(self.min_publish_ahead())
        for key in ring:
            if key.activates_at > now:
                seconds = min(seconds, key.activates_at - now)
        return Publication(
            keys=self._still_published(ring, now), cache_seconds=max(0, int(seconds))
        )

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
        key = _signer(ring, self._clock())  # after _ring(), which may have made it just now
        if key is None:
            # Unreachable while _ring() keeps its promise to leave a signer; should it
            # ever break, refuse with a retryable 503 rather than sign with nothing.
            raise DependencyUnavailable("the broker's signing keys are being changed")
        return key

    def cache_seconds(self) -> int:
        return self.publication().cache_seconds

    def min_publish_ahead(self) -> int:
        """The longest max-age this issuer serves: a rotation that makes a key sign
        sooner could meet a verifier whose cached key set does not have it yet."""
        return int(min(MAX_CACHE_SECONDS, self._settings.publish_ahead_seconds))

    def published(self) -> list[SigningKey]:
        return self.publication().keys

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

    def rotate(
        self, *, publish_ahead_seconds: float | None = None, at_once: bool = False
    ) -> SigningKey:
        """Make the next key: published now, signing after ``publish_ahead_seconds``
        (default ``issuer.publish_ahead_seconds``); the current key retires then.

        ``at_once`` is for a leaked key: the new key signs now, and a verifier holding a
        cached JWKS may refuse its tokens for up to ``min_publish_ahead()`` seconds (the
        one knowing exception to invariant 2). The old key stays published as usual."""
        if self._file_keys:
            raise BadRequest(
                "the issuer's keys come from issuer.key_files: rotate them there (put the "
                "new key first, keep the old one listed until its tokens have expired)"
            )
        ahead = (
            self._settings.publish_ahead_seconds
            if publish_ahead_seconds is None
            else publish_ahead_seconds
        )
        with self._locked():
            read, sealed = self._read()
            if read is None and not at_once:
                raise KeyRingUnreadable()
            # Unreadable with --now: the operator's explicit word that no node can open
            # the ring; a new one replaces it (tokens the lost keys signed stop verifying).
            ring = [] if read is None else read
            if _signer(ring, self._clock()) is None:
                # Nothing signs yet, so no verifier can have cached a key set that
                # misses the new key's predecessor: it signs at once (invariant 1).
                return self._make_signer(ring, sealed)
            floor = self.min_publish_ahead()
            if at_once:
                ahead = 0.0
            elif ahead < floor:
                raise BadRequest(
                    f"--publish-ahead {ahead:g} is shorter than the {floor} s verifiers may "
                    "cache the JWKS: the new key could sign before they know it (use at "
                    f"least {floor}, or --now for a leaked key)"
                )
            return self._rotate_locked(ring, ahead, sealed)

    # -- internals ----------------------------------------------------------------------

    def _still_published(self, ring: list[SigningKey], now: float) -> list[SigningKey]:
        return [k for k in ring if (until := self._unpublish_at(k)) is None or now < until]

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
        if not self._needs_change(ring):
            return ring
        try:
            with self._locked():
                read, sealed = self._read()  # another process may have done it meanwhile
                if read is None:
                    raise KeyRingUnreadable()
                ring = read
                if _signer(ring, self._clock()) is None:
                    self._make_signer(ring, sealed)
                elif self._needs_change(ring):
                    self._rotate_locked(ring, self._settings.publish_ahead_seconds, sealed)
                return self._load()
        except KeyRingUnreadable:
            raise
        except DependencyUnavailable:
            # The lock is busy or Redis failed while rotating: a due rotation can wait
            # for the next request as long as a key may sign now.
            if _signer(ring, self._clock()) is None:
                raise
            return ring

    def _needs_change(self, ring: list[SigningKey]) -> bool:
        now = self._clock()
        if _signer(ring, now) is None:
            return True  # empty, or no signer: make one at once
        if any(k.activates_at > now for k in ring):
            return False  # the next key is already published
        newest = max(ring, key=lambda k: k.activates_at)
        return newest.activates_at + self._settings.rotate_after_seconds <= now

    def _make_signer(self, ring: list[SigningKey], sealed: bytes | None) -> SigningKey:
        """A key that signs from now: the earliest next key brought forward, else new."""
        now = self._clock()
        kept = self._still_published(ring, now)
        waiting = sorted((k for k in kept if k.activates_at > now), key=lambda k: k.activates_at)
        if waiting:
            first = replace(waiting[0], activates_at=now)
            kept = [first if k.kid == first.kid else k for k in kept]
        else:
            first = self._generate(activates_at=now)
            kept.append(first)
        self._save(kept, replacing=sealed)
        return first

    def _rotate_locked(
        self, ring: list[SigningKey], ahead: float, sealed: bytes | None
    ) -> SigningKey:
        made = self._generate(activates_at=0.0)
        # Counted from after the key generation (an RSA key may take a while), just
        # before the write: a JWKS served meanwhile, without the new key, may be cached
        # for a full min_publish_ahead, and must expire before the new key signs. The
        # margin covers the write itself and that answer's way to its verifier.
        now = self._clock()
        margin = ACTIVATION_MARGIN_SECONDS if ahead > 0 else 0.0
        new = replace(made, activates_at=now + ahead + margin)
        kept = [
            _retired(k, at=new.activates_at) if k.retired_at is None else k
            for k in self._still_published(ring, now)
        ]
        self._save([*kept, new], replacing=sealed)
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
        ring, _ = self._read()
        if ring is None:
            raise KeyRingUnreadable()
        return ring

    def _read(self) -> tuple[list[SigningKey] | None, bytes | None]:
        """The ring (None: there is one this node cannot open) and its sealed bytes as
        read (None: no ring), which ``_save`` writes over only if they are still there."""
        found = self._store.read_sealed(self._ring_key)
        if found is None:
            return [], None
        if found.value is None:  # sealed with other encryption keys, or damaged
            return None, found.sealed
        try:
            return [self._entry(entry) for entry in found.value["keys"]], found.sealed
        except (KeyError, TypeError, ValueError, AttributeError):
            return None, found.sealed

    def _entry(self, entry: Mapping[str, Any]) -> SigningKey:
        kid = str(entry["kid"])
        private = self._parsed.get(kid)
        if private is None:
            loaded = serialization.load_pem_private_key(entry["pem"].encode(), password=None)
            if not isinstance(loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                raise ValueError("not an RSA or P-256 key")
            private = self._parsed[kid] = loaded
        retired = entry["retired_at"]
        return SigningKey(
            kid=kid,
            alg=str(entry["alg"]),
            private=private,
            created=float(entry["created"]),
            activates_at=float(entry["activates_at"]),
            retired_at=None if retired is None else float(retired),
        )

    def _save(self, ring: list[SigningKey], *, replacing: bytes | None) -> list[SigningKey]:
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
        # Only over the ring this change was made from. The lock alone cannot promise
        # it: a Redis that restarts without its data loses the lock with the ring, and
        # a holder that read the old ring would write it back, unpublishing the key
        # other nodes made and signed with since (and reviving the lost ones).
        if not self._store.replace_sealed(self._ring_key, doc, ttl=ttl, expected=replacing):
            raise DependencyUnavailable(
                "the broker's signing keys changed while this process was changing them"
            )
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


def _signer(ring: list[SigningKey], now: float) -> SigningKey | None:
    """The key that signs at ``now``: the latest activated one not yet retired."""
    active = [
        k for k in ring if k.activates_at <= now and (k.retired_at is None or now < k.retired_at)
    ]
    return max(active, key=lambda k: (k.activates_at, k.created), default=None)


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
