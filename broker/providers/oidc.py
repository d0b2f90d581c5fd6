"""Generic OpenID Connect ID tokens; Google is a preset of the same class.

``verify`` follows OpenID Connect Core 1.0 section 3.1.3.7 (ID token validation) and
checks every step itself, in order, so a reviewer can tick them off:

1. one strict reading of the token (``broker.jws.parse``: canonical base64url, no
   duplicate JSON members, ``typ`` absent or ``JWT``...), then the JOSE header: ``alg``
   in the asymmetric allow-list, ``kid``
2. the key: from the provider's JWKS, published for this algorithm, of a fitting type
3. signature with exactly that algorithm over the bytes step 1 read (pyjwt's algorithm
   object, no second decoding of the token); the required claims present and typed,
   ``exp``/``iat``/``nbf`` with a small leeway
4. ``iss`` exactly one of the configured issuers
5. every ``aud`` a configured client id; ``azp`` present with several audiences and,
   when present, a configured client id
6. ``nonce`` equal to the one the caller sent (or required by configuration)

The key set comes from ``jwks_url`` when configured, else from the discovery document,
whose ``issuer`` must be one of the configured issuers (OpenID Connect Discovery 4.3).
Developer providers (``type = "developer"``: the operator's backend signs tokens for its
own users) take their keys from a configured JWKS file instead, fetch nothing, and go
through exactly the same steps 1-6.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import jwt

from broker import errors, jws
from broker.http import Http
from broker.identity import VerifiedClaims, VerifiedToken
from broker.jwk import ASYMMETRIC_ALGORITHMS, MalformedDocument, StaticKeySet
from broker.jwks import DocumentState, JWKSCache, RemoteDocument
from broker.memo import ExpiringCache
from broker.providers.base import IdentityProvider
from broker.settings import OIDCProviderSettings
from broker.store import Store

log = logging.getLogger(__name__)

# Real ID tokens are 1-2 KiB; the strict parser's bound, checked here too so an
# oversize token never costs a SHA-256 for the verified-token memory.
MAX_TOKEN_LENGTH = jws.MAX_TOKEN_LENGTH

REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "sub"]

# Tokens verified recently, per worker: a mobile app presents the same ID token for
# its whole life (about an hour), and re-checking an RSA signature each time is most of
# the cost of a cached credentials request. An entry (the token and its claims) is 2-3
# KB: this bound keeps the memory within about 10 MB a worker (the soak in the README's
# Benchmark); a token that dropped out costs one more signature check (RS256: ~0.1 ms).
VERIFIED_CACHE_ENTRIES = 4_096


class OIDCProvider(IdentityProvider):
    def __init__(
        self,
        *,
        settings: OIDCProviderSettings,
        http: Http,
        store: Store,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = settings.name
        self.display_name = settings.display_name
        self._settings = settings
        self._http = http
        self._store = store
        self._clock = clock
        refused = sorted(set(settings.algorithms) - ASYMMETRIC_ALGORITHMS)
        if refused:
            # Settings validation already refuses these; a hand-built settings object
            # must not be able to switch on "none" or HS* either.
            log.error("provider %s: ignoring non-asymmetric algorithms %s", self.name, refused)
        self._algorithms = frozenset(settings.algorithms) & ASYMMETRIC_ALGORITHMS
        if not self._algorithms:
            raise errors.ConfigurationError(
                f"provider {self.name!r}: no allowed asymmetric signing algorithm configured"
            )
        if not settings.issuers or not settings.client_ids:
            raise errors.ConfigurationError(
                f"provider {self.name!r}: issuers and client_ids must not be empty"
            )
        # Second sight: a token is remembered once it comes back (see broker.memo).
        # Under token refreshes most tokens come once, and holding each with its claims
        # was most of a worker's memory growth; one that repeats pays one more check.
        self._verified: ExpiringCache[bytes, VerifiedToken] = ExpiringCache(
            max_entries=VERIFIED_CACHE_ENTRIES, clock=clock, second_sight=True
        )
        self._jwks_lock = threading.Lock()
        self._jwks: JWKSCache | None = None
        self._discovery: RemoteDocument[str] | None = None
        # Developer providers: the operator's backend signs, its keys come from a file.
        self._static = StaticKeySet(settings.static_jwks) if settings.static_jwks else None
        if self._static is not None:
            return
        if settings.jwks_url:
            self._jwks = self._jwks_cache(settings.jwks_url)
        elif settings.discovery_url:
            self._discovery = RemoteDocument(
                url=settings.discovery_url,
                http=http,
                store=store,
                namespace="oidc-discovery",
                parse=self._jwks_uri_from_discovery,
                cache_seconds=settings.jwks_cache_seconds,
                timeout=settings.timeout_seconds,
                what=f"{self.name} discovery document",
                clock=clock,
            )
        else:
            raise errors.ConfigurationError(
                f"provider {self.name!r}: set jwks_url or discovery_url (or an issuer)"
            )

    # ------------------------------------------------------------------------ verify

    def verify(self, token: str, *, nonce: str | None = None) -> VerifiedToken:
        s = self._settings
        if nonce is None and s.require_nonce:
            # Without the nonce we sent, a token stolen from another login could be
            # replayed here; this provider is configured to refuse that outright.
            raise errors.InvalidToken("a nonce is required for this provider")
        if not token:
            raise errors.InvalidToken("token is empty")
        if len(token) > MAX_TOKEN_LENGTH:
            raise errors.InvalidToken("token is too large")

        # Only a token that passed steps 1-5 is remembered, by its SHA-256 and never
        # past its exp (no leeway) or the refetch of the keys that verified it (so a key
        # withdrawn by the provider stops working here as soon as it would without this
        # memory).
        digest = hashlib.sha256(token.encode()).digest()
        remembered = self._verified.get(digest)
        if remembered is not None:
            # Kept without the token (the caller holds it: its digest is the key), so
            # the memory is the claims' size, not twice the token's.
            verified = dataclasses.replace(remembered, token=token)
        else:
            # Discovery and JWKS share one upstream budget for this token.
            with self._http.budget():
                verified, keys_until = self._verify_signed(token)
            self._verified.put(
                digest,
                dataclasses.replace(verified, token=""),
                expires_at=min(verified.expires_at, keys_until),
            )

        # Step 6: nonce, in constant time (it is a secret bound to the browser session).
        # Checked on every call: the same token may come with another caller's nonce.
        if nonce is not None:
            token_nonce = verified.claims.get("nonce")
            if not isinstance(token_nonce, str):
                raise errors.InvalidToken("token has no nonce")
            if not hmac.compare_digest(token_nonce.encode(), nonce.encode()):
                raise errors.InvalidToken("wrong nonce")
        return verified

    def _verify_signed(self, token: str) -> tuple[VerifiedToken, float]:
        """Steps 1-5 of OIDC Core 3.1.3.7 and the subject: everything but the nonce;
        with when the keys that verified it are due for a refetch."""
        s = self._settings
        # Step 1: one strict reading of the whole token before anything uses any part
        # of it: the header that picks the key below is this reading's header, and the
        # claims pyjwt checks are the same bytes, which can be read only one way.
        parsed = jws.parse(token)
        header = parsed.header
        alg = header.get("alg")
        # The allow-list holds asymmetric algorithms only, so "none" and HS* never pass.
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise errors.InvalidToken("algorithm not allowed")
        # jws.parse guarantees a string kid when present. An absent kid is allowed only
        # while the provider publishes exactly one key (JWKSCache.get_key), so it can
        # never mean "try every key".
        kid: str | None = header.get("kid")

        # Step 2: the key must be published for this alg (if the JWK names one) and be
        # of the matching type and curve; an RSA key can never verify HS256.
        keys = self._key_set()
        key = keys.get_key(kid, algorithm=alg)

        # Step 3: signature with exactly this algorithm, lifetime, required claims.
        self._check_signature(parsed, key, alg)
        claims = self._check_claims(parsed.payload)

        # Step 4: issuer, compared exactly against the configured tuple. Google issues
        # both "accounts.google.com" and "https://accounts.google.com"; a trailing
        # slash or another scheme is another issuer.
        iss = claims["iss"]
        if not isinstance(iss, str) or iss not in s.issuers:
            raise errors.InvalidToken("wrong issuer")

        # Step 5: audience. Every aud must be ours (OIDC: the ID token must be refused
        # if it lists audiences not trusted) and, with several, an azp that is ours too. Google puts
        # the web client id in aud and the Android/iOS client id in azp.
        audiences = [claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"]
        if not all(aud in s.client_ids for aud in audiences):
            raise errors.InvalidToken("wrong audience")
        azp = claims.get("azp")
        if len(audiences) > 1 and azp is None:
            raise errors.InvalidToken("token has several audiences but no azp")
        if azp is not None and azp not in s.client_ids:
            raise errors.InvalidToken("wrong authorized party (azp)")

        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise errors.InvalidToken("token has an empty subject")
        verified = VerifiedToken(
            provider=self.name,
            subject=subject,
            claims=VerifiedClaims(claims),
            token=token,
            sts_provider_id=None,
            expires_at=int(claims["exp"]),
        )
        return verified, keys.usable_until()

    def _check_signature(self, parsed: jws.CompactJWS, key: jwt.PyJWK, alg: str) -> None:
        """The signature over exactly what ``jws.parse`` read, with exactly ``alg``.

        pyjwt's algorithm object verifies (cryptography underneath); the token is not
        decoded a second time, so the claims checked below are the one reading's."""
        if key.algorithm_name != alg:  # get_key binds the key to alg; never another
            raise errors.InvalidToken("algorithm not allowed")
        algorithm = key.Algorithm
        # A short RSA key is as good as none: refuse it, do not warn.
        if algorithm.check_key_length(key.key) is not None:
            raise errors.InvalidToken("signing key is unusable")
        if not algorithm.verify(parsed.signing_input, key.key, parsed.signature):
            raise errors.InvalidToken("signature verification failed")

    def _check_claims(self, claims: Mapping[str, Any]) -> Mapping[str, Any]:
        """Required claims, their types, the lifetime (RFC 7519 section 4.1) and that
        one audience is ours. A small leeway (settings, default 60 s) absorbs clock
        skew between the IdP and us, for exp, iat and nbf alike; larger values would
        extend the life of a stolen token."""
        for name in REQUIRED_CLAIMS:
            if claims.get(name) is None:
                raise errors.InvalidToken(f"token has no {name} claim")
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name)
            # RFC 7519 NumericDate: a JSON number. Not "123", not true.
            if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise errors.InvalidToken(f"token has a non-numeric {name} claim")
        now, leeway = self._clock(), self._settings.leeway_seconds
        if int(claims["iat"]) > now + leeway:
            raise errors.InvalidToken("token is issued in the future (iat)")
        if "nbf" in claims and int(claims["nbf"]) > now + leeway:
            raise errors.InvalidToken("token is not yet valid (nbf)")
        if int(claims["exp"]) <= now - leeway:
            raise errors.ExpiredToken("token has expired")
        aud = claims["aud"]
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or not audiences:
            raise errors.InvalidToken("wrong audience")
        if not all(isinstance(a, str) for a in audiences):
            raise errors.InvalidToken("wrong audience")
        if not isinstance(claims["sub"], str):
            raise errors.InvalidToken("token has a non-string subject")
        if "jti" in claims and not isinstance(claims["jti"], str):
            raise errors.InvalidToken("token has a non-string jti claim")
        return claims

    # ------------------------------------------------------------------------ keys

    def key_state(self, *, check: bool) -> DocumentState:
        """The key set's state; the discovery document's while it names no key set, or
        when it is stale and the keys are fine."""
        if self._static is not None:
            return DocumentState(state="ok")  # configured keys: nothing to fetch
        jwks = self._jwks
        discovery: DocumentState | None = None
        if self._discovery is not None:
            discovery = self._discovery.state(read_shared=check)
            if check:
                self._discovery.warm_in_background()
            jwks_uri = self._discovery.peek()  # never a fetch: readyz must not wait
            if jwks_uri is None:
                return discovery
            jwks = self._key_set_for(jwks_uri)
        assert jwks is not None  # set in __init__ when there is no discovery document
        keys = jwks.state(read_shared=check)
        if check:
            jwks.warm_in_background()
        return discovery if keys.state == "ok" and discovery is not None else keys

    def _key_set(self) -> JWKSCache | StaticKeySet:
        if self._static is not None:
            return self._static
        if self._discovery is None:
            assert self._jwks is not None  # set in __init__ when jwks_url is configured
            return self._jwks
        return self._key_set_for(self._discovery.get())

    def _key_set_for(self, jwks_uri: str) -> JWKSCache:
        current = self._jwks
        if current is not None and current.url == jwks_uri:
            return current
        with self._jwks_lock:
            if self._jwks is None or self._jwks.url != jwks_uri:
                self._jwks = self._jwks_cache(jwks_uri)
            return self._jwks

    def _jwks_cache(self, url: str) -> JWKSCache:
        s = self._settings
        return JWKSCache(
            url=url,
            http=self._http,
            store=self._store,
            cache_seconds=s.jwks_cache_seconds,
            refresh_cooldown_seconds=s.jwks_refresh_cooldown_seconds,
            refresh_burst=s.jwks_refresh_burst,
            timeout=s.timeout_seconds,
            clock=self._clock,
            what=f"{self.name} JWKS endpoint",
        )

    def _jwks_uri_from_discovery(self, document: Any) -> str:
        if not isinstance(document, Mapping):
            raise MalformedDocument("not a JSON object")
        issuer = document.get("issuer")
        # Discovery 4.3: the document must name the issuer we trust, or an attacker
        # who controls the discovery URL could point us at keys of their choosing.
        if not isinstance(issuer, str) or issuer not in self._settings.issuers:
            raise MalformedDocument(
                f"issuer {issuer!r} is not a configured issuer {list(self._settings.issuers)}"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in {"http", "https"}:
            raise MalformedDocument("jwks_uri is missing or not an http(s) URL")
        return jwks_uri
