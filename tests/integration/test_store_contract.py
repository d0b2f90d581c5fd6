"""The Store's contract, method by method, on a standalone redis-server and on a real
3-master Cluster (``redis_target``): every operation the broker relies on behaves the
same on both, including the multi-key ones (tagged indexes, locks, the singleflight
scripts, the refresh bucket).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from broker.store import Found, Sealer, Store
from tests.redis_ha import RedisTarget, close_clients

pytestmark = pytest.mark.integration


@pytest.fixture
def store(redis_target: RedisTarget) -> Iterator[Store]:
    prefix = f"contract:{uuid.uuid4().hex[:8]}:"
    client = redis_target.connect()
    yield Store(client=client, prefix=prefix, sealer=Sealer([b"c" * 32]))
    close_clients([client])


def test_plain_and_sealed_json_round_trip_and_expire(store: Store) -> None:
    store.set_json(store.key("plain"), {"a": [1, 2]}, ttl=60)
    assert store.get_json(store.key("plain")) == {"a": [1, 2]}
    store.set_sealed(store.key("secret"), {"s": "value"}, ttl=0.3)
    assert store.get_sealed(store.key("secret")) == {"s": "value"}
    raw = store.client.get(store.key("secret"))
    assert raw is not None
    assert b"value" not in raw
    time.sleep(0.5)
    assert store.get_sealed(store.key("secret")) is None


def test_sealed_writes_honour_nx_and_xx_and_take_is_one_time(store: Store) -> None:
    key = store.key("one")
    assert store.set_sealed(key, 1, ttl=60, only_if_exists=True) is False
    assert store.set_sealed(key, 1, ttl=60, only_if_new=True) is True
    assert store.set_sealed(key, 2, ttl=60, only_if_new=True) is False
    assert store.set_sealed(key, 3, ttl=60, only_if_exists=True) is True
    assert store.take_sealed(key) == 3
    assert store.take_sealed(key) is None


def test_a_sealed_value_is_replaced_only_over_what_was_read(store: Store) -> None:
    key = store.key("ring")
    assert store.read_sealed(key) is None
    assert store.replace_sealed(key, {"v": 1}, ttl=60, expected=None) is True
    assert store.replace_sealed(key, {"v": 9}, ttl=60, expected=None) is False
    first = store.read_sealed(key)
    assert first is not None
    assert first.value == {"v": 1}
    assert store.replace_sealed(key, {"v": 2}, ttl=60, expected=first.sealed) is True
    # A writer still holding the first read (its lock lost, say) writes nothing.
    assert store.replace_sealed(key, {"v": 9}, ttl=60, expected=first.sealed) is False
    assert store.get_sealed(key) == {"v": 2}
    store.delete(key)
    assert store.replace_sealed(key, {"v": 9}, ttl=60, expected=first.sealed) is False
    assert store.read_sealed(key) is None


def test_a_sealed_value_does_not_open_under_another_key(store: Store) -> None:
    store.set_sealed(store.key("a"), {"x": 1}, ttl=60)
    sealed = store.client.get(store.key("a"))
    assert isinstance(sealed, bytes)
    store.client.set(store.key("b"), sealed)
    assert store.get_sealed(store.key("b")) is None


@pytest.mark.parametrize("tag", [None, "us-east-1:identity"])
def test_an_index_drops_every_member_and_itself(store: Store, tag: str | None) -> None:
    index = store.key("index", tag=tag)
    members = [store.key("member", str(i), tag=tag) for i in range(5)]
    for member in members:
        store.set_json(member, 1, ttl=60)
        store.index_add(index, member, ttl=60)
    assert store.ttl_seconds(index) is not None
    assert store.drop_index(index) == 5
    assert all(store.get_json(member) is None for member in members)
    assert store.drop_index(index) == 0


def test_the_fixed_window_counter_counts_and_expires(store: Store) -> None:
    key = store.key("rate", "x")
    assert [store.hit(key, window=0.4) for _ in range(3)] == [1, 2, 3]
    time.sleep(0.6)
    assert store.hit(key, window=0.4) == 1


def test_flags_are_set_once_read_and_taken_once(store: Store) -> None:
    key = store.key("flag")
    assert store.set_flag(key, ttl=60, only_if_new=True, value="v") is True
    assert store.set_flag(key, ttl=60, only_if_new=True) is False
    assert store.get_flag(key) == "v"
    assert store.take_flag(key) == "v"
    assert store.take_flag(key) is None


def test_the_token_bucket_gives_its_capacity_then_refills(store: Store) -> None:
    key = store.key("bucket")
    taken = [store.take_token(key, capacity=3, refill_seconds=0.5) for _ in range(5)]
    assert taken == [True, True, True, False, False]
    time.sleep(0.6)
    assert store.take_token(key, capacity=3, refill_seconds=0.5) is True


def test_one_lock_holder_at_a_time(store: Store) -> None:
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with store.lock("contract", timeout=5, wait=1) as acquired:
            assert acquired
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(5)
    with store.lock("contract", timeout=5, wait=0) as second:
        assert second is False
    release.set()
    thread.join(5)
    with store.lock("contract", timeout=5, wait=1) as third:
        assert third is True


def test_read_or_lock_reads_the_value_or_takes_the_lock_for_one_caller(store: Store) -> None:
    key, lock = store.key("value", tag="id-1"), store.key("lock", "value", tag="id-1")

    assert store.read_or_lock(key, lock=lock, token="first", timeout=5) is True
    assert store.read_or_lock(key, lock=lock, token="second", timeout=5) is False
    assert store.client.get(lock) == b"first"
    assert 0 < store.client.pttl(lock) <= 5000
    store.set_sealed(key, {"v": 1}, ttl=60)
    found = store.read_or_lock(key, lock=lock, token="second", timeout=5)
    assert isinstance(found, Found)
    assert found.value == {"v": 1}
    assert found.sealed == store.client.get(key)  # as stored: never opened in Redis


def test_read_or_lock_locks_over_a_value_the_caller_cannot_use(store: Store) -> None:
    key, lock = store.key("value", tag="id-1"), store.key("lock", "value", tag="id-1")
    store.set_sealed(key, {"v": "stale"}, ttl=60)
    stale = store.read_or_lock(key, lock=lock, token="t", timeout=5)
    assert isinstance(stale, Found)

    assert store.read_or_lock(key, lock=lock, token="t", timeout=5, unless=stale.sealed) is True
    # Another caller that cannot use it either waits for the holder; any other value
    # is returned, to everyone.
    assert store.read_or_lock(key, lock=lock, token="u", timeout=5, unless=stale.sealed) is False
    store.set_sealed(key, {"v": "fresh"}, ttl=60)
    fresh = store.read_or_lock(key, lock=lock, token="u", timeout=5, unless=stale.sealed)
    assert isinstance(fresh, Found)
    assert fresh.value == {"v": "fresh"}


def test_a_value_no_key_opens_is_found_unopened(store: Store) -> None:
    key, lock = store.key("value", tag="id-1"), store.key("lock", "value", tag="id-1")
    store.client.set(key, b"\x01" + b"x" * 40)  # tampered with, or a retired key's

    found = store.read_or_lock(key, lock=lock, token="t", timeout=5)

    assert isinstance(found, Found)
    assert found.value is None
    assert found.sealed == b"\x01" + b"x" * 40


def test_store_and_unlock_stores_indexes_and_releases_only_its_own_lock(store: Store) -> None:
    key, index = store.key("value", tag="id-1"), store.key("index", tag="id-1")
    lock = store.key("lock", "value", tag="id-1")
    store.index_add(index, store.key("other", tag="id-1"), ttl=120)
    assert store.read_or_lock(key, lock=lock, token="mine", timeout=5) is True

    store.store_and_unlock(key, {"v": 1}, ttl=60, index=index, lock=lock, token="mine")

    assert store.get_sealed(key) == {"v": 1}
    assert 59 < (store.ttl_seconds(key) or 0) <= 60
    assert store.client.get(lock) is None
    # Indexed, and the index's longer TTL was kept, not shortened.
    assert store.key("value", tag="id-1").encode() in store.client.smembers(index)
    assert (store.ttl_seconds(index) or 0) > 100
    # A lock another caller holds now (ours expired meanwhile, say) is not ours to drop.
    assert store.read_or_lock(store.key("next", tag="id-1"), lock=lock, token="new", timeout=5)
    store.store_and_unlock(key, {"v": 2}, ttl=60, index=index, lock=lock, token="mine")
    assert store.client.get(lock) == b"new"
    assert store.drop_index(index) == 1  # the value; "other" was never stored


def test_unlock_releases_only_the_holders_lock(store: Store) -> None:
    key, lock = store.key("value", tag="id-1"), store.key("lock", "value", tag="id-1")
    assert store.read_or_lock(key, lock=lock, token="holder", timeout=5) is True

    store.unlock(lock, token="someone-else")
    assert store.read_or_lock(key, lock=lock, token="t", timeout=5) is False
    store.unlock(lock, token="holder")
    assert store.read_or_lock(key, lock=lock, token="t", timeout=5) is True


@pytest.mark.parametrize(
    ("key_tag", "lock_tag"),
    [("id-1", "id-2"), (None, "id-1"), ("id-1", None), (None, None)],
)
def test_keys_one_script_touches_must_share_a_hash_tag(
    store: Store, key_tag: str | None, lock_tag: str | None
) -> None:
    key, lock = store.key("value", tag=key_tag), store.key("lock", tag=lock_tag)
    index = store.key("index", tag=key_tag)
    with pytest.raises(ValueError, match="hash tag"):
        store.read_or_lock(key, lock=lock, token="t", timeout=5)
    with pytest.raises(ValueError, match="hash tag"):
        store.store_and_unlock(key, 1, ttl=60, index=index, lock=lock, token="t")
