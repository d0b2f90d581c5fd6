"""What the OAuth 2.0 access-token providers (Login with Amazon, Facebook) share.

Unlike an OpenID Connect ID token, an OAuth access token says nothing about itself: only
the provider can tell whether it is valid, for which app and for whom. Verifying one
costs HTTP round trips, so the verdict is cached in Redis until the token expires:

* keyed by ``sha256(token)``, never the token itself, so a Redis dump holds nothing a
  caller could present;
* the value (subject, claims, expiry, no token) is sealed like every other secret the
  broker keeps, because claims hold e-mail addresses and names;
* on a hit the token the caller just presented is re-attached: the key is its hash, so
  it is the same token that was verified;
* kept at most ``VERIFICATION_CACHE_MAX_SECONDS`` even when the token lives longer, so a
  token the user revoked upstream stops working here within that bound;
* only successes are cached: a failed verification (or an upstream blip) must never
  lock a good token out.

Redis is an optimisation for this cache, not a dependency: when it is down the token
is verified upstream again (and the credential step reports Redis on its own).

Two of the documented calls put the caller's token in a query string
(``tokeninfo?access_token=``, ``debug_token?input_token=``), and urllib3 quotes request
URLs in two places, so both are closed here:

* ``Http`` never chains the requests/urllib3 exception, which quotes the URL, onto
  its own errors (the error handler logs cause chains).
* ``redact_urllib3_urls`` installs a logging filter that strips query strings from
  urllib3's own log records: its retry warnings (``Retrying (...) after connection
  broken by ...: /auth/o2/tokeninfo?access_token=...``) are WARNING, above the level
  ``logs.configure`` keeps for it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from broker import errors
from broker.identity import VerifiedClaims, VerifiedToken
from broker.store import Store

log = logging.getLogger(__name__)

# Login with Amazon documents access tokens of at most 2048 bytes; Facebook user tokens
# are a few hundred characters. Anything far larger is junk we should not send on.
MAX_ACCESS_TOKEN_LENGTH = 4096

# How long a verified access token is trusted without asking the provider again, even
# if it lives longer (Facebook long-lived tokens: 60 days; some never expire). Revoking
# the app or changing a password upstream takes effect here within this bound.
VERIFICATION_CACHE_MAX_SECONDS = 3600

# The cached value's layout version: a broker that finds another layout treats it as a
# miss instead of misreading it.
_CACHE_VERSION = 1


# A URL path followed by a query string, as urllib3 writes it into log messages.
_QUERY_RE = re.compile(r"(/[^\s?'\"]*)\?[^\s'\"]+")
_URLLIB3_LOGGERS = ("urllib3.connectionpool", "urllib3.util.retry")
_redaction_lock = threading.Lock()


class RedactQueryStrings(logging.Filter):
    """Rewrites a record's message with every query string replaced by ``[redacted]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _QUERY_RE.sub(r"\1?[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact_urllib3_urls() -> None:
    """Install ``RedactQueryStrings`` on urllib3's loggers, once per process.

    Called when a provider that sends tokens in query strings is built (never at
    import). Filters on a logger apply to records it emits itself, hence each module.
    """
    with _redaction_lock:
        for name in _URLLIB3_LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, RedactQueryStrings) for f in logger.filters):
                logger.addFilter(RedactQueryStrings())


def token_digest(token: str) -> str:
    """The cache key part for a token: its SHA-256, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_access_token_shape(token: str) -> None:
    """Refuse what cannot be an access token before any upstream request.

    Both providers' tokens are printable ASCII without spaces (LWA's start ``Atza|``,
    Facebook's ``EAA``). Anything else is junk, and control characters or spaces have
    no business in a query string we build.
    """
    if not token:
        raise errors.InvalidToken("token is empty")
    if len(token) > MAX_ACCESS_TOKEN_LENGTH:
        raise errors.InvalidToken("token is too large")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise errors.InvalidToken("token contains characters no access token has")


def refuse_nonce(nonce: str | None, display_name: str) -> None:
    """A nonce binds an OpenID Connect ID token to one login; an OAuth access token
    carries none, so one sent along would be silently unchecked. Say so instead."""
    if nonce is not None:
        raise errors.BadRequest(
            f"{display_name} access tokens carry no nonce: send the request without one"
        )


def integer(value: Any) -> int | None:
    """A JSON number as an int; None for anything else (``true`` is not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def text(value: Any) -> str | None:
    """A non-empty JSON string, else None."""
    return value if isinstance(value, str) and value else None


def same_text(value: Any, expected: str) -> bool:
    """``value`` is the string ``expected``, compared in constant time: app ids, client
    ids and user ids decide whose token this is, and a timing side channel must not
    tell an attacker how much of one they have guessed."""
    return isinstance(value, str) and hmac.compare_digest(value.encode(), expected.encode())


class VerificationCache:
    """Verified access tokens, sealed in Redis under ``verified:<provider>:<sha256>``."""

    def __init__(
        self,
        *,
        store: Store,
        provider: str,
        max_seconds: float = VERIFICATION_CACHE_MAX_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._provider = provider
        self._max_seconds = max_seconds
        self._clock = clock

    def key(self, token: str) -> str:
        return self._store.key("verified", self._provider, token_digest(token))

    def get(self, token: str) -> VerifiedToken | None:
        key = self.key(token)
        try:
            value = self._store.get_sealed(key)
        except errors.StoreUnavailable:
            return None  # ask upstream; the store logs the outage (once, not per request)
        except ValueError:  # not JSON: written by something else; ignore it
            return None
        if not isinstance(value, dict) or value.get("v") != _CACHE_VERSION:
            return None
        subject = text(value.get("subject"))
        claims = value.get("claims")
        expires_at = integer(value.get("expires_at"))
        sts_provider_id = value.get("sts_provider_id")
        if (
            subject is None
            or not isinstance(claims, dict)
            or expires_at is None
            or not (sts_provider_id is None or isinstance(sts_provider_id, str))
        ):
            return None
        # Redis expires the entry with the token; this guards against clock skew
        # between broker nodes and Redis.
        if expires_at <= self._clock():
            return None
        # The key is this token's hash, so this is the token that was verified.
        return self._verified(token, subject, claims, sts_provider_id, expires_at)

    def remember(
        self,
        token: str,
        *,
        subject: str,
        claims: dict[str, Any],
        sts_provider_id: str | None,
        expires_at: int,
    ) -> VerifiedToken:
        """The identity upstream just vouched for, kept until the token expires."""
        verified = self._verified(token, subject, claims, sts_provider_id, expires_at)
        self.put(verified)
        return verified

    def _verified(
        self,
        token: str,
        subject: str,
        claims: dict[str, Any],
        sts_provider_id: str | None,
        expires_at: int,
    ) -> VerifiedToken:
        return VerifiedToken(
            provider=self._provider,
            subject=subject,
            claims=VerifiedClaims(claims),
            token=token,
            sts_provider_id=sts_provider_id,
            expires_at=expires_at,
        )

    def put(self, verified: VerifiedToken) -> None:
        ttl = min(verified.expires_at - self._clock(), self._max_seconds)
        if ttl <= 0:
            return  # already expired (or about to): nothing worth remembering
        value = {
            "v": _CACHE_VERSION,
            "subject": verified.subject,
            "claims": dict(verified.claims),
            "sts_provider_id": verified.sts_provider_id,
            "expires_at": verified.expires_at,
            # Deliberately no token: the caller presents it again on every request.
        }
        # Not cached this time when Redis fails; the store logs the outage.
        with suppress(errors.StoreUnavailable):
            self._store.set_sealed(self.key(verified.token), value, ttl=ttl)
