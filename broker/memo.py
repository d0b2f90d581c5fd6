"""A small in-process cache with per-entry expiry, bounded in size.

The hot path (a repeat ``POST /v1/credentials``) would otherwise verify an RSA signature
and make a Redis round trip per request; each worker keeps what it verified or fetched
for a short, bounded time instead. Thread-safe: gunicorn's gthread workers share it.

Memory follows the live entries, not the bound: each ``put`` first drops the expired
entries at the least recently used end. Without that, a stream of new keys (new tokens,
new people) would keep the cache full of dead entries up to ``max_entries``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    def __init__(self, *, max_entries: int, clock: Callable[[], float]) -> None:
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

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
            # Oldest first, stopping at the first live one: amortised O(1) per put.
            # Entries share a lifetime in practice (local_seconds, a token's hour), so
            # least recently used is nearly soonest expired.
            while self._entries:
                oldest = next(iter(self._entries))
                if self._entries[oldest][0] > now:
                    break
                del self._entries[oldest]
            self._entries[key] = (expires_at, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)  # least recently used

    def discard(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
