"""The in-process expiring cache behind the hot path."""

from __future__ import annotations

import threading

from broker.memo import ExpiringCache
from tests.unit.oidc_fixtures import FakeClock


def test_an_entry_lives_until_its_expiry_and_not_a_moment_longer() -> None:
    clock = FakeClock()
    cache: ExpiringCache[str, int] = ExpiringCache(max_entries=10, clock=clock)
    cache.put("a", 1, expires_at=clock.now + 10)

    clock.advance(9.9)
    assert cache.get("a") == 1
    clock.advance(0.1)
    assert cache.get("a") is None
    assert len(cache) == 0


def test_already_expired_values_and_a_zero_size_cache_keep_nothing() -> None:
    clock = FakeClock()
    cache: ExpiringCache[str, int] = ExpiringCache(max_entries=10, clock=clock)
    cache.put("past", 1, expires_at=clock.now)
    assert cache.get("past") is None

    disabled: ExpiringCache[str, int] = ExpiringCache(max_entries=0, clock=clock)
    disabled.put("a", 1, expires_at=clock.now + 60)
    assert disabled.get("a") is None


def test_expired_entries_do_not_wait_for_the_size_bound() -> None:
    clock = FakeClock()
    cache: ExpiringCache[str, int] = ExpiringCache(max_entries=1000, clock=clock)
    for i in range(100):
        cache.put(f"old{i}", i, expires_at=clock.now + 30)
    clock.advance(30)
    cache.put("new", 1, expires_at=clock.now + 30)

    # Never read again, the 100 dead entries went with the next write.
    assert len(cache) == 1
    assert cache.get("new") == 1


def test_dropping_expired_entries_stops_at_the_first_live_one() -> None:
    clock = FakeClock()
    cache: ExpiringCache[str, int] = ExpiringCache(max_entries=1000, clock=clock)
    cache.put("short", 1, expires_at=clock.now + 10)
    cache.put("long", 2, expires_at=clock.now + 100)
    cache.put("short2", 3, expires_at=clock.now + 10)
    clock.advance(10)
    cache.put("new", 4, expires_at=clock.now + 10)

    # "short" went; "short2" sits behind a live entry and waits for a read or the bound.
    assert len(cache) == 3
    assert (cache.get("long"), cache.get("new"), cache.get("short")) == (2, 4, None)
    assert cache.get("short2") is None  # expired all the same: never served


def test_the_least_recently_used_entry_goes_first() -> None:
    clock = FakeClock()
    cache: ExpiringCache[str, int] = ExpiringCache(max_entries=2, clock=clock)
    cache.put("a", 1, expires_at=clock.now + 60)
    cache.put("b", 2, expires_at=clock.now + 60)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3, expires_at=clock.now + 60)

    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)


def test_discard_and_clear() -> None:
    clock = FakeClock()
    cache: ExpiringCache[str, int] = ExpiringCache(max_entries=10, clock=clock)
    for key in "abc":
        cache.put(key, 1, expires_at=clock.now + 60)
    cache.discard("a")
    assert cache.get("a") is None
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0


def test_concurrent_writers_never_exceed_the_bound() -> None:
    clock = FakeClock()
    cache: ExpiringCache[int, int] = ExpiringCache(max_entries=50, clock=clock)

    def write(offset: int) -> None:
        for i in range(500):
            cache.put(offset + i, i, expires_at=clock.now + 60)

    threads = [threading.Thread(target=write, args=(n * 1000,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 50


def test_with_second_sight_a_value_is_kept_only_when_its_key_comes_again() -> None:
    clock = FakeClock()
    cache: ExpiringCache[str, int] = ExpiringCache(max_entries=10, clock=clock, second_sight=True)
    cache.put("a", 1, expires_at=clock.now + 60)
    assert cache.get("a") is None  # seen once: only the key is remembered
    assert len(cache) == 0

    cache.put("a", 1, expires_at=clock.now + 60)
    assert cache.get("a") == 1
    cache.put("a", 2, expires_at=clock.now + 60)  # kept: an update needs no third sight
    assert cache.get("a") == 2


def test_a_first_sight_is_forgotten_with_its_expiry_and_with_the_bound() -> None:
    clock = FakeClock()
    cache: ExpiringCache[str, int] = ExpiringCache(max_entries=3, clock=clock, second_sight=True)
    cache.put("late", 1, expires_at=clock.now + 10)
    clock.advance(10)
    cache.put("late", 1, expires_at=clock.now + 10)
    assert cache.get("late") is None  # the first sight had expired: this is a first again

    for key in ("a", "b", "c", "d"):  # "late"'s second first sight and "a" fall off
        cache.put(key, 1, expires_at=clock.now + 60)
    cache.put("a", 1, expires_at=clock.now + 60)
    cache.put("d", 1, expires_at=clock.now + 60)
    assert (cache.get("a"), cache.get("d")) == (None, 1)


def test_a_stream_of_keys_seen_once_keeps_no_values() -> None:
    clock = FakeClock()
    cache: ExpiringCache[int, bytes] = ExpiringCache(
        max_entries=100, clock=clock, second_sight=True
    )
    for i in range(1000):
        cache.put(i, b"x" * 1000, expires_at=clock.now + 60)
    assert len(cache) == 0
    cache.clear()
    cache.put(999, b"x", expires_at=clock.now + 60)
    assert cache.get(999) is None  # clear() forgot the first sights too
