"""Credentials for a grant: a Redis cache with singleflight around STS.

Credentials are cached per (identity, role, session policy, policy ARNs, duration,
config version, and for grants that use the broker's token: session tags, transitive tag
keys and source identity), sealed in Redis and dropped a safety margin before they expire. The
cache key is a digest of those values and never involves the provider token, so a
caller presenting a fresh token for the same identity and grant gets the same
credentials without another STS call.

A burst of requests for one uncached entry, from any number of threads and broker
processes, makes one STS call (singleflight), and a new identity costs its leader two
Redis round trips:

1. read-or-lock (``Store.read_or_lock``): one script returns the entry if there is one,
   else takes the entry's lock (SET NX PX with a token of the request's own). The
   request that gets the lock is the leader and calls STS; the others, followers, poll
   with the same script until it returns the entry the leader filled, or the lock,
   when the leader released it unfilled or its lock expired (they take over). An entry
   a caller cannot use (too close to expiry for it, unreadable) counts as none on its
   next poll, so it may take the lock and replace it.
2. store-and-unlock (``Store.store_and_unlock``): one script indexes the entry under
   its identity (for ``forget``), stores it and releases the lock if it is still the
   leader's.

If STS fails, the leader writes the failure into the entry for a few seconds before it
releases the lock: followers and new callers read it with their next read-or-lock and
answer 503 at once rather than call STS one after another. When the entry it was
refilling still holds valid credentials (too short-lived only for callers that need
more time left), those stay for callers that need less, and the failure is held beside
them. The entry, its lock and the
identity's index share the identity's hash tag, so each script runs on Redis Cluster.

Credentials STS has minted reach the caller even when Redis fails before they are
cached, or when the lock cannot be released: they are valid, and the cache is only an
optimisation from then on (the next request calls STS again; the lock expires).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from datetime import datetime
from typing import Any

from broker import metrics
from broker.errors import (
    DependencyUnavailable,
    ServerError,
    StoreUnavailable,
)
from broker.identity import Identity
from broker.issuer import Issuer
from broker.memo import ExpiringCache
from broker.policy import session_name
from broker.rules import Grant
from broker.settings import CacheSettings
from broker.store import Found, Store
from broker.sts import STS, AssumeRequest, IssuedCredentials

# Credentials in a worker's memory (cache.local_seconds): each saves one Redis round
# trip; about 1-2 KB each with a real session token.
LOCAL_CACHE_ENTRIES = 4_096
# Followers poll the cache while the leader waits on STS: fast at first (STS usually
# answers in well under a second), backing off so a slow STS is not met with a storm.
_POLL_FIRST_SECONDS = 0.01
_POLL_MAX_SECONDS = 0.1
# The AWS SDKs renew credentials with less than 15 minutes left (botocore's advisory
# refresh window) and ask again on every call until they get ones with more. A door whose
# client is such an SDK (the CLI, the container endpoint) therefore never hands out
# cached credentials with less than this left, or the SDK would ask on every call.
SDK_REFRESH_SECONDS = 15 * 60 + 60


def sdk_min_left(duration_seconds: int) -> float:
    """The least lifetime cached credentials need for a self-renewing SDK; 0 when the
    grant's whole lifetime is too short for that to matter (the SDK renews them on every
    call whatever the broker does)."""
    return float(SDK_REFRESH_SECONDS) if duration_seconds >= 2 * SDK_REFRESH_SECONDS else 0.0


# After STS failed (timed out, throttled, answered badly) for one set of credentials, how
# long every caller for the same credentials gets a 503 at once rather than a new call.
FAILURE_HOLD_SECONDS = 5

# What a caller is told when the leader is still waiting on STS after lock_wait_seconds.
_BUSY_RETRY_AFTER = 2


class CredentialService:
    def __init__(
        self,
        *,
        sts: STS,
        store: Store,
        settings: CacheSettings,
        config_version: str,
        clock: Callable[[], float] = time.time,
        issuer: Issuer | None = None,
    ) -> None:
        self._sts = sts
        self._issuer = issuer
        self._store = store
        self._settings = settings
        self._config_version = config_version
        self._clock = clock
        # The per-worker layer in front of Redis; see CacheSettings.local_seconds.
        self._local: ExpiringCache[str, IssuedCredentials] = ExpiringCache(
            max_entries=LOCAL_CACHE_ENTRIES if settings.local_seconds else 0, clock=clock
        )

    def get(self, identity: Identity, grant: Grant, *, min_left: float = 0.0) -> IssuedCredentials:
        """Credentials for ``grant``: cached ones with at least ``min_left`` seconds left
        (besides the safety margin), else fresh ones from STS (one call per burst)."""
        if not self._settings.enabled:
            metrics.cache_result("disabled")
            return self._assume(identity, grant)

        digest = self._digest(identity.identity_id, grant)
        # Tagged with the identity: the entry, its lock and the identity's index are
        # touched together by one script (read-or-lock, store-and-unlock, forget's
        # drop), which Redis Cluster runs only within one hash slot.
        key = self._store.key("creds", digest, tag=identity.identity_id)
        cached = self._from_memory(key, min_left)
        if cached is not None:
            metrics.cache_result("memory")
            return cached
        lock = self._store.key("lock", digest, tag=identity.identity_id)
        return self._singleflight(identity, grant, key, lock, min_left)

    def _singleflight(
        self, identity: Identity, grant: Grant, key: str, lock: str, min_left: float
    ) -> IssuedCredentials:
        """The entry from Redis, or the lock to fill it (``_fill``), or the leader's
        result: each attempt is one read-or-lock round trip."""
        token = secrets.token_hex(16)  # this request's hold on the lock, if it gets it
        started = time.monotonic()
        deadline = started + self._settings.lock_wait_seconds
        poll = _POLL_FIRST_SECONDS
        unusable: Found | None = None  # an entry read already, which this caller cannot use
        first = True
        waited = False  # counted as a singleflight wait once it lost the lock a first time
        while True:
            found = self._store.read_or_lock(
                key,
                lock=lock,
                token=token,
                timeout=self._settings.lock_timeout_seconds,
                unless=None if unusable is None else unusable.sealed,
            )
            # Raises the failure hold (a 503) for leader and followers alike.
            cached = self._usable(key, found.value, min_left) if isinstance(found, Found) else None
            if first:
                metrics.cache_result("miss" if cached is None else "redis")
                first = False
            if cached is not None:
                if waited:
                    metrics.singleflight_wait("filled", time.monotonic() - started)
                return cached
            if isinstance(found, Found):
                # Too close to expiry for this caller, or unreadable: ask again at once,
                # to take the lock and replace it (or get whatever replaced it meanwhile).
                unusable = found
                continue
            if found:
                if waited:
                    metrics.singleflight_wait("took_over", time.monotonic() - started)
                return self._fill(identity, grant, key, lock, token, stale=unusable)
            # Another request holds the lock. Polling, rather than queueing every
            # follower through the lock, returns as soon as the leader fills the entry.
            waited = True
            if time.monotonic() >= deadline:
                metrics.singleflight_wait("timeout", time.monotonic() - started)
                # The leader is still waiting on STS. Calling STS as well would defeat
                # the point of singleflight exactly when STS is struggling.
                raise DependencyUnavailable(
                    "STS is slow to answer: a request for the same credentials is still "
                    "waiting on it",
                    retry_after=_BUSY_RETRY_AFTER,
                )
            time.sleep(poll)
            poll = min(poll * 2, _POLL_MAX_SECONDS)
            # A leader in this worker keeps what it minted in memory, even when Redis
            # failed to store it.
            cached = self._from_memory(key, min_left)
            if cached is not None:
                metrics.singleflight_wait("filled", time.monotonic() - started)
                return cached

    def _fill(
        self,
        identity: Identity,
        grant: Grant,
        key: str,
        lock: str,
        token: str,
        *,
        stale: Found | None,
    ) -> IssuedCredentials:
        """As the lock's holder: credentials from STS, then the entry stored, indexed
        and the lock released in one round trip. ``stale`` is the entry this caller
        found too short-lived, which it replaces."""
        try:
            issued = self._assume(identity, grant)
        except BaseException as exc:
            if isinstance(exc, ServerError):
                # Before the release: no follower misses it.
                self._note_failure(key, exc, stale)
            self._store.unlock(lock, token=token)
            raise
        ttl = self._remaining(issued)
        if ttl <= 0:
            # Shorter-lived than the margin: hand out once, never cache.
            self._store.unlock(lock, token=token)
            return issued
        self._remember(key, issued)
        # If Redis fails now (the store logs it), the credentials are still valid: hand
        # them out uncached rather than turn a successful STS call into an error. The
        # lock then expires by itself.
        with suppress(StoreUnavailable):
            self._store.store_and_unlock(
                key,
                _encode(issued),
                ttl=ttl,
                index=self._index_key(identity.identity_id),
                lock=lock,
                token=token,
            )
        return issued

    def _note_failure(self, key: str, exc: ServerError, stale: Found | None) -> None:
        """Tell every process that STS just failed for these credentials: the cache
        entry holds the failure for the error's Retry-After (at most
        ``FAILURE_HOLD_SECONDS``), so followers waiting on the leader and callers
        arriving meanwhile answer 503 at once (``_usable`` raises it) instead of calling
        STS again one after another, the queue a hung STS must not build.

        An entry whose credentials are still valid, only too short-lived for the caller
        that refilled it (the SDK doors ask for 16 minutes), keeps them for callers that
        ask less, with the failure beside them until its ``until``; it is replaced only
        if it is still the entry that caller read. Otherwise the hold is an entry of its
        own for the hold's length, never written over an entry that appeared (NX)."""
        hold = max(1, min(exc.retry_after or _BUSY_RETRY_AFTER, FAILURE_HOLD_SECONDS))
        failed = {"message": exc.message, "retry_after": hold}
        kept = None if stale is None else self._live(stale.value)
        with suppress(StoreUnavailable):  # the store logs it; the caller gets ``exc``
            if kept is None:
                self._store.set_sealed(key, {"failed": failed}, ttl=hold, only_if_new=True)
                return
            assert stale is not None  # kept came from it
            self._store.replace_sealed(
                key,
                {**_encode(kept), "failed": {**failed, "until": self._clock() + hold}},
                ttl=self._remaining(kept),
                expected=stale.sealed,
            )

    def _live(self, value: Any) -> IssuedCredentials | None:
        """The credentials in an entry's value, if they may still be handed out to
        someone (whatever time left they need); None for anything else."""
        try:
            issued = _decode(value)
        except (KeyError, TypeError, ValueError):
            return None  # not credentials, or written by an incompatible version
        # Redis expires entries at the margin already; this guards against clock skew
        # between broker nodes and Redis.
        return issued if self._remaining(issued) > 0 else None

    def _assume(self, identity: Identity, grant: Grant) -> IssuedCredentials:
        # Built only on a miss: a cache hit needs neither the session name nor the token.
        token, provider_id = identity.verified.token, identity.verified.sts_provider_id
        if grant.broker_token:
            if self._issuer is None:
                # Services always builds one: reaching here is a bug.
                raise ServerError("this grant needs the broker's token, and no issuer")
            # Signed here, just before the call: the token lives minutes, and STS
            # reads it once. IAM trusts the broker as an OIDC provider, so no ProviderId.
            token, provider_id = (
                self._issuer.sign(
                    identity,
                    tags=grant.tags,
                    transitive_tag_keys=grant.transitive_tag_keys,
                    source_identity=grant.source_identity,
                ),
                None,
            )
        return self._sts.assume_role_with_web_identity(
            AssumeRequest(
                role_arn=grant.role_arn,
                session_name=session_name(identity),
                web_identity_token=token,
                provider_id=provider_id,
                duration_seconds=grant.duration_seconds,
                policy=grant.session_policy,
                policy_arns=grant.policy_arns,
            )
        )

    def forget(self, identity_id: str) -> int:
        """Drop every cached credential of one identity; returns how many were dropped.

        Other workers may still serve their in-memory copy for up to
        ``cache.local_seconds``."""
        self._local.clear()  # this worker's copies of any identity: simple and cheap
        return self._store.drop_index(self._index_key(identity_id))

    def memory_until(self, issued: IssuedCredentials) -> float:
        """Until when a worker may hand these credentials out from memory: at most
        ``local_seconds`` from now, and never inside the safety margin."""
        now = self._clock()
        return min(now + self._settings.local_seconds, now + self._remaining(issued))

    # -- internals ---------------------------------------------------------------------

    def _digest(self, identity_id: str, grant: Grant) -> str:
        # A JSON array, not a joined string: no two different grants share an encoding.
        fields: list[Any] = [
            identity_id,
            grant.role_arn,
            grant.session_policy,
            list(grant.policy_arns),
            grant.duration_seconds,
            self._config_version,
        ]
        if grant.broker_token:
            # Tags and source identity come from claims that may change between two
            # sign-ins of one identity: credentials carrying the old ones must not be
            # handed out for the new. (Only for such grants, so other keys stay as they were.)
            fields += [
                grant.sts_token,
                [list(t) for t in grant.tags],
                list(grant.transitive_tag_keys),
                grant.source_identity,
            ]
        material = json.dumps(fields, separators=(",", ":"))
        return hashlib.sha256(material.encode()).hexdigest()

    def _index_key(self, identity_id: str) -> str:
        return self._store.key("creds-index", tag=identity_id)

    def _lasts(self, issued: IssuedCredentials, min_left: float) -> bool:
        return not min_left or issued.expiration.timestamp() - self._clock() >= min_left

    def _from_memory(self, key: str, min_left: float) -> IssuedCredentials | None:
        cached = self._local.get(key)
        return cached if cached is not None and self._lasts(cached, min_left) else None

    def _usable(self, key: str, value: Any, min_left: float) -> IssuedCredentials | None:
        """The credentials in an entry read from Redis, remembered in this worker's
        memory, if they may be handed out; None if not. A failure hold is a 503."""
        if value is None:
            return None  # sealed with a retired key, or tampered with
        failed = value.get("failed") if isinstance(value, dict) else None
        if isinstance(failed, dict) and "access_key_id" not in value:
            raise _held(failed)  # a hold alone: Redis expires it with the hold
        issued = self._live(value)
        if issued is None:
            return None
        if not self._lasts(issued, min_left):
            # Too short for this caller; held beside the credentials while it lasts.
            if isinstance(failed, dict) and _holds(failed, self._clock()):
                raise _held(failed)
            return None
        self._remember(key, issued)
        return issued

    def _remember(self, key: str, issued: IssuedCredentials) -> None:
        self._local.put(key, issued, expires_at=self.memory_until(issued))

    def _remaining(self, issued: IssuedCredentials) -> float:
        """Seconds the credentials may still be handed out."""
        return issued.expiration.timestamp() - self._clock() - self._settings.safety_margin_seconds


def _holds(failed: Mapping[str, Any], now: float) -> bool:
    until = failed.get("until")
    return isinstance(until, int | float) and until > now


def _held(failed: Mapping[str, Any]) -> DependencyUnavailable:
    retry_after = failed.get("retry_after")
    return DependencyUnavailable(
        "STS failed a moment ago for the same credentials "
        f"({failed.get('message', 'no detail')}); try again shortly",
        retry_after=max(1, min(retry_after, FAILURE_HOLD_SECONDS))
        if isinstance(retry_after, int)
        else FAILURE_HOLD_SECONDS,
    )


def _encode(issued: IssuedCredentials) -> dict[str, Any]:
    return {
        "access_key_id": issued.access_key_id,
        "secret_access_key": issued.secret_access_key,
        "session_token": issued.session_token,
        "expiration": issued.expiration.isoformat(),
        "assumed_role_arn": issued.assumed_role_arn,
        "assumed_role_id": issued.assumed_role_id,
    }


def _decode(value: Any) -> IssuedCredentials:
    expiration = datetime.fromisoformat(value["expiration"])
    if expiration.tzinfo is None:
        raise ValueError("expiration without a timezone")
    return IssuedCredentials(
        access_key_id=value["access_key_id"],
        secret_access_key=value["secret_access_key"],
        session_token=value["session_token"],
        expiration=expiration,
        assumed_role_arn=value["assumed_role_arn"],
        assumed_role_id=value["assumed_role_id"],
    )
