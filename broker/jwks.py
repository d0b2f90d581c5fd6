"""Identity providers' public documents (JWKS, OIDC discovery): fetched, cached, kept.

Two cache layers: an in-process snapshot (no I/O on the hot path) and a copy in Redis,
so a new worker or node starts warm and one refetch serves every process. Public keys
are not secret, so Redis holds plain JSON.

Failure policy (a hung or sick IdP never makes callers queue):

* One fetch per document at a time per process (``broker.http.SingleFlight``). While it
  is in flight every other caller uses the last good document at once; a caller with no
  document at all waits at most ``FOLLOWER_WAIT_SECONDS`` for it, then gets a 503 with
  ``Retry-After``. The fetch itself is bounded by the one upstream budget (``Http``).
* When a fetch fails (timeout, 5xx, malformed body) the last good document stays in use
  and a warning is logged; only with no document at all does the error reach the caller
  (with ``Retry-After``). The IdP is not asked again for ``FAILED_FETCH_BACKOFF_SECONDS``
  counted from the moment the failed attempt *ended*; meanwhile callers with no document
  fail fast with a 503 and ``Retry-After``.

Unknown ``kid`` (or no ``kid`` while several keys are published): the IdP may have
rotated its keys, or someone is sending junk. We refetch, but only with a token from a
bucket shared by *all* broker processes (``Store.take_token``: ``jwks_refresh_burst``
refreshes at once, one more earned every ``jwks_refresh_cooldown_seconds``), so a flood
of tokens with random kids cannot turn the broker into a DoS amplifier against the IdP,
while a real rotation right after an unrelated refresh still gets its refetch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import urlsplit

import jwt

from broker import errors, metrics
from broker.http import (
    BACKOFF_ERRORS,
    FAILED_FETCH_BACKOFF_SECONDS,
    FOLLOWER_WAIT_SECONDS,
    Http,
    SingleFlight,
    Skipped,
)
from broker.jwk import parse_key_set
from broker.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")

# At most this many JWKS refetches on unknown kids at once, per JWKS URL, across all
# broker processes; one more is earned every ``jwks_refresh_cooldown_seconds``.
JWKS_REFRESH_BURST = 3


def url_digest(url: str) -> str:
    """A fixed-length Redis key part for a URL (URLs can be long and contain ``:``)."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class DocumentState:
    """What a process knows about a provider's key material, for ``/readyz``:

    * ``ok``: a copy is in use and the last fetch (if any) succeeded;
    * ``stale``: the last refetch failed, the last good copy is still in use;
    * ``unavailable``: no copy at all and the last fetch failed;
    * ``pending``: not fetched yet (by this process or, through Redis, any other).
    """

    state: Literal["ok", "stale", "unavailable", "pending"]
    detail: str = ""

    @property
    def usable(self) -> bool:
        return self.state != "unavailable"

    def describe(self) -> str:
        return f"{self.state}: {self.detail}" if self.detail else self.state


@dataclass(frozen=True)
class _Snapshot(Generic[T]):
    value: T
    # Wall-clock time the IdP served it: compared across processes through Redis, so
    # it cannot be a monotonic clock.
    fetched_at: float
    usable_until: float


class RemoteDocument(Generic[T]):
    """One JSON document at a URL, cached in process and in Redis, last good kept.

    ``parse`` turns the JSON body into ``T`` or raises ``MalformedDocument``; a body
    that does not parse is treated like a failed fetch. Thread-safe: readers never
    lock (snapshots are immutable and swapped atomically); fetches go through one
    ``SingleFlight``, so a burst of requests on a cold or expired cache makes one HTTP
    request per process and nobody waits behind a hung one (see the module docstring).
    """

    def __init__(
        self,
        *,
        url: str,
        http: Http,
        store: Store,
        namespace: str,
        parse: Callable[[Any], T],
        cache_seconds: float,
        timeout: float,
        what: str,
        failure_backoff_seconds: float = FAILED_FETCH_BACKOFF_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self._http = http
        self._store = store
        self._redis_key = store.key(namespace, url_digest(url))
        self._parse = parse
        self._cache_seconds = cache_seconds
        self._timeout = timeout
        self._what = what
        self._host = urlsplit(url).netloc
        self._clock = clock
        self._lock = threading.Lock()  # guards the snapshot swap only; never held for I/O
        self._warming = threading.Lock()  # held while a background fetch thread runs
        self._snapshot: _Snapshot[T] | None = None
        self._flight: SingleFlight[_Snapshot[T]] = SingleFlight(
            what=f"{what} ({self._host})", backoff_seconds=failure_backoff_seconds, clock=clock
        )

    def get(self) -> T:
        """The cached document, fetched first if there is none or it has expired."""
        snapshot = self._snapshot
        if snapshot is not None and self._clock() < snapshot.usable_until:
            return snapshot.value
        return self._load(force=False).value

    def usable_until(self) -> float:
        """When the copy in use is due for a refetch (now, if there is none)."""
        snapshot = self._snapshot
        return self._clock() if snapshot is None else snapshot.usable_until

    def peek(self) -> T | None:
        """The copy in use, however old, without fetching anything; None if none."""
        snapshot = self._snapshot
        return None if snapshot is None else snapshot.value

    def refresh(self) -> T:
        """Fetch now, whatever the cache says (the caller rate-limits this).

        On failure the current document is kept; raises only when there is none.
        """
        return self._load(force=True).value

    def adopt_newer_shared(self) -> T | None:
        """A newer document another process put in Redis, without any HTTP request."""
        current = self._snapshot
        shared = self._read_shared(newer_than=None if current is None else current.fetched_at)
        if shared is None:
            return None
        return self._adopt(shared).value

    def state(self, *, read_shared: bool = True) -> DocumentState:
        """What this process knows, without any HTTP request (see ``DocumentState``).
        With ``read_shared``, a process with no copy yet looks for one in Redis."""
        snapshot = self._snapshot
        # Set by a failed fetch, cleared by the next successful one.
        failed = self._flight.last_error
        # Only a read, never an adoption: its first use adopts it anyway.
        if snapshot is None and read_shared and self._read_shared(newer_than=None) is not None:
            return DocumentState("ok")
        if snapshot is None:
            if failed is not None:
                return DocumentState("unavailable", failed.message)
            return DocumentState("pending", f"{self._what} not fetched yet")
        if failed is not None:
            age = self._clock() - snapshot.fetched_at
            return DocumentState(
                "stale", f"{failed.message}; using the copy fetched {age:.0f} s ago"
            )
        return DocumentState("ok")

    def warm_in_background(self) -> None:
        """Fetch in a thread of its own when the copy is missing or due for a refresh,
        unless a fetch is already running: a readiness probe learns the answer on its
        next call and never waits for an IdP. Nothing happens while a fresh copy exists
        or while the backoff after a failure lasts (``SingleFlight``'s own rules), so
        probes cannot cause a storm."""
        snapshot = self._snapshot
        if snapshot is not None and self._clock() < snapshot.usable_until:
            return
        if self._flight.retry_in() > 0 or self._flight.in_flight:
            return  # get() would only fail fast, or wait for the fetch already running
        if not self._warming.acquire(blocking=False):
            return

        def fetch() -> None:
            try:
                self.get()
            except errors.BrokerError:
                pass  # kept as the flight's last_error, which state() reports
            finally:
                self._warming.release()

        threading.Thread(target=fetch, name="broker-key-warmup", daemon=True).start()

    def _adopt(self, snapshot: _Snapshot[T]) -> _Snapshot[T]:
        with self._lock:
            if self._snapshot is None or snapshot.fetched_at >= self._snapshot.fetched_at:
                self._snapshot = snapshot
                return snapshot
            return self._snapshot

    def _load(self, *, force: bool) -> _Snapshot[T]:
        seen = self._snapshot
        shared = self._read_shared(newer_than=None if seen is None else seen.fetched_at)
        # A forced refresh (unknown kid) always asks the IdP: a copy another process
        # fetched a moment ago may predate the key this token was signed with.
        if not force and shared is not None and self._clock() < shared.usable_until:
            return self._adopt(shared)  # another process fetched it: no need to ask the IdP
        fallback = _newest(seen, shared)
        # With a last good copy, never wait for a fetch in flight; without one (or when a
        # token needs the newest keys) wait a moment, so a healthy IdP's cold start does
        # not turn into a 503 per caller.
        wait = 0.0 if fallback is not None and not force else FOLLOWER_WAIT_SECONDS

        def fetch() -> _Snapshot[T]:
            # A flight that ended between our look at the snapshot and now has already
            # fetched it: leading a second flight would ask the IdP twice for a burst.
            current = self._snapshot
            if (
                not force
                and current is not None
                and current is not seen
                and self._clock() < current.usable_until
            ):
                return current
            return self._fetch_and_keep()

        try:
            result = self._flight.run(fetch, wait=wait)
        except BACKOFF_ERRORS as exc:
            if fallback is None:
                raise
            log.warning(
                "%s; still using the copy fetched %.0f s ago",
                exc.message,
                self._clock() - fallback.fetched_at,
            )
            # Serve it without asking Redis again until the backoff ends.
            return self._adopt(
                _Snapshot(
                    fallback.value,
                    fallback.fetched_at,
                    max(fallback.usable_until, self._clock() + self._flight.retry_in()),
                )
            )
        if isinstance(result, Skipped):
            if fallback is None:
                raise result.error
            return self._adopt(fallback)
        return result

    def _fetch_and_keep(self) -> _Snapshot[T]:
        raw, value = self._fetch()
        now = self._clock()
        fresh = self._adopt(_Snapshot(value, now, now + self._cache_seconds))
        self._write_shared(raw, now)
        return fresh

    def _fetch(self) -> tuple[Any, T]:
        result = self._http.get_json(self.url, timeout=self._timeout, what=self._what)
        if result.status != 200:
            raise errors.UpstreamError(f"{self._what} ({self._host}) answered HTTP {result.status}")
        try:
            return result.body, self._parse(result.body)
        except ValueError as exc:
            raise errors.UpstreamError(f"{self._what} ({self._host}) is malformed: {exc}") from exc

    # Redis is an optimisation here, not a dependency: public keys can always be
    # fetched again, so a Redis fault degrades to the in-process cache, never a 503.

    def _read_shared(self, *, newer_than: float | None) -> _Snapshot[T] | None:
        try:
            entry = self._store.get_json(self._redis_key)
        except errors.StoreUnavailable:
            return None  # the store logs the outage (once, not per request)
        except ValueError as exc:
            log.warning("cannot read the cached %s from Redis: %s", self._what, exc)
            return None
        if not isinstance(entry, dict):
            return None
        fetched_at = entry.get("fetched_at")
        if isinstance(fetched_at, bool) or not isinstance(fetched_at, int | float):
            return None
        if newer_than is not None and fetched_at <= newer_than:
            return None
        try:
            value = self._parse(entry.get("document"))
        except ValueError as exc:
            log.warning("ignoring a malformed cached %s in Redis: %s", self._what, exc)
            return None
        return _Snapshot(value, float(fetched_at), float(fetched_at) + self._cache_seconds)

    def _write_shared(self, raw: Any, fetched_at: float) -> None:
        with suppress(errors.StoreUnavailable):  # the store logs the outage
            self._store.set_json(
                self._redis_key,
                {"fetched_at": fetched_at, "document": raw},
                ttl=self._cache_seconds,
            )


def _newest(a: _Snapshot[T] | None, b: _Snapshot[T] | None) -> _Snapshot[T] | None:
    if a is None or (b is not None and b.fetched_at > a.fetched_at):
        return b
    return a


class JWKSCache:
    """The signing keys of one provider's JWKS URL (see the module docstring)."""

    def __init__(
        self,
        *,
        url: str,
        http: Http,
        store: Store,
        cache_seconds: int,
        refresh_cooldown_seconds: int,
        timeout: float,
        refresh_burst: int = JWKS_REFRESH_BURST,
        clock: Callable[[], float] = time.time,
        failure_backoff_seconds: float = FAILED_FETCH_BACKOFF_SECONDS,
        what: str = "JWKS endpoint",
    ) -> None:
        self.url = url
        self._document = RemoteDocument(
            url=url,
            http=http,
            store=store,
            namespace="jwks",
            parse=parse_key_set,
            cache_seconds=cache_seconds,
            timeout=timeout,
            what=what,
            failure_backoff_seconds=failure_backoff_seconds,
            clock=clock,
        )
        self._store = store
        self._refill_seconds = refresh_cooldown_seconds
        self._burst = refresh_burst
        self._bucket_key = store.key("jwks-refresh", url_digest(url))
        # Used only while Redis cannot be asked: this process alone stays within the
        # same numbers (so the fleet makes at most one bucket's worth per process).
        self._local_bucket = _LocalBucket(
            capacity=refresh_burst, refill_seconds=refresh_cooldown_seconds
        )

    def state(self, *, read_shared: bool = True) -> DocumentState:
        return self._document.state(read_shared=read_shared)

    def warm_in_background(self) -> None:
        self._document.warm_in_background()

    def usable_until(self) -> float:
        """When the keys in use are due for a refetch: a key the provider withdraws
        stops verifying tokens then."""
        return self._document.usable_until()

    def get_key(self, kid: str | None, *, algorithm: str) -> jwt.PyJWK:
        """The key for ``kid``, bound to ``algorithm``; ``InvalidToken`` if there is none.

        ``kid`` None is accepted only while the provider publishes exactly one key. The
        key must fit the algorithm (see ``broker.jwk.key_for_algorithm``).
        """
        keys = self._document.get()
        jwk = keys.find(kid)
        # No kid and several keys: the provider may just have gone down to one key, so
        # this earns the same bounded refresh as an unknown kid.
        if jwk is None:
            if self._refresh_allowed():
                metrics.key_refresh("refetched")
                keys = self._document.refresh()
            else:
                metrics.key_refresh("cooldown")
                keys = self._document.adopt_newer_shared() or keys
            jwk = keys.find(kid)
        if jwk is None:
            if kid is None:
                raise errors.InvalidToken("token has no key id (kid)")
            raise errors.InvalidToken("unknown signing key")
        return keys.pyjwk(jwk, algorithm)

    def _refresh_allowed(self) -> bool:
        if self._refill_seconds <= 0:
            return True
        try:
            return self._store.take_token(
                self._bucket_key, capacity=self._burst, refill_seconds=self._refill_seconds
            )
        except errors.StoreUnavailable:
            # The store logs the outage; this process keeps the same limits on its own.
            return self._local_bucket.take()


class _LocalBucket:
    """An in-process token bucket: ``capacity`` at once, one more per ``refill_seconds``."""

    def __init__(
        self, *, capacity: int, refill_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._capacity = float(capacity)
        self._refill = refill_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(capacity)
        self._updated = clock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            if self._refill > 0:
                earned = (now - self._updated) / self._refill
                self._tokens = min(self._capacity, self._tokens + earned)
            self._updated = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True
