"""A small in-process cache with per-entry expiry, bounded in size.

The hot path (a repeat ``POST /v1/credentials``) would otherwise verify an RSA signature
and make a Redis round trip per request; each worker keeps what it verified or fetched
for a short, bounded time instead. Thread-safe: gunicorn's gthread workers share it.

Memory follows the live entries, not the bound: each ``put`` first drops the expired
entries at the least recently used end. Without that, a stream of new keys (new tokens,
new people) would keep the cache full of dead entries up to ``max_entries``.

``second_sight``: a value is kept only when its key is put a second time (within the
first put's lifetime); the first put records just the key. A stream of keys seen once
(every mobile app's token refresh is a new token) then costs a key each, not a value
each, and what the cache holds is what repeats: a doorkeeper, as in TinyLFU. The price
is one more miss for each key that does repeat.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")


class ExpiringCache(Generic[K, V]):
    def __init__(
        self, *, max_entries: int, clock: Callable[[], float], second_sight: bool = False
    ) -> None:
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        # Keys put once, with the first put's expiry (only with second_sight).
        self._seen: OrderedDict[K, float] | None = OrderedDict() if second_sight else None

    @property
    def enabled(self) -> bool:
        return self._max > 0

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires_at, value = entry
            if self._clock() >= expires_at:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V, *, expires_at: float) -> None:
        if self._max <= 0 or expires_at <= self._clock():
            return
        now = self._clock()
        with self._lock:
            seen = self._seen
            if seen is not None and key not in self._entries:
                first_until = seen.pop(key, None)
                if first_until is None or first_until <= now:
                    _drop_expired(seen, now, lambda until: until)
                    seen[key] = expires_at
                    _bound(seen, self._max)
                    return
            _drop_expired(self._entries, now, lambda entry: entry[0])
            self._entries[key] = (expires_at, value)
            self._entries.move_to_end(key)
            _bound(self._entries, self._max)

    def discard(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            if self._seen is not None:
                self._seen.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _drop_expired(entries: OrderedDict[K, T], now: float, expiry: Callable[[T], float]) -> None:
    """Oldest first, stopping at the first live one: amortised O(1) per put. Entries
    share a lifetime in practice (local_seconds, a token's hour), so least recently
    used is nearly soonest expired."""
    while entries:
        oldest = next(iter(entries))
        if expiry(entries[oldest]) > now:
            break
        del entries[oldest]


def _bound(entries: OrderedDict[K, T], most: int) -> None:
    while len(entries) > most:
        entries.popitem(last=False)  # least recently used
