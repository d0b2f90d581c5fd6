"""CredentialService with a real Redis (standalone and Cluster) and BotocoreSTS against
moto.

STS calls are counted by a proxy implementing the ``STS`` protocol that delegates to the
real BotocoreSTS, and cross-checked with moto's request recorder.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
import redis

from broker import errors, metrics
from broker.credentials import CredentialService, sdk_min_left
from broker.identity import Identity, IdentityIds, VerifiedClaims, VerifiedToken
from broker.rules import Grant
from broker.settings import CacheSettings
from broker.store import Sealer, Store
from broker.sts import AssumeRequest, BotocoreSTS, IssuedCredentials
from tests.integration.aws_fixtures import READER_ROLE, WRITER_ROLE, LocalAWS, local_aws
from tests.redis_ha import (
    RedisTarget,
    close_clients,
    keys_matching,
    round_trips,
)
from tests.unit.oidc_fixtures import FakeClock

pytestmark = pytest.mark.integration

SEALER = Sealer([b"e" * 32])
IDS = IdentityIds(key=b"k" * 32, region="us-east-1")
CACHE = CacheSettings(
    enabled=True, safety_margin_seconds=300, lock_timeout_seconds=10, lock_wait_seconds=5
)
GRANT = Grant(
    rule="readers", role_arn=READER_ROLE, duration_seconds=900, session_policy=None, policy_arns=()
)


def cache_counts() -> dict[str, float]:
    """Cache results and singleflight waits counted so far in this process."""
    registry = metrics.REGISTRY
    counts = {
        result: registry.get_sample_value("broker_credential_cache_total", {"result": result})
        or 0.0
        for result in ("memory", "redis", "miss", "disabled")
    }
    for outcome in ("filled", "took_over", "timeout"):
        counts[outcome] = (
            registry.get_sample_value("broker_singleflight_waits_total", {"outcome": outcome})
            or 0.0
        )
    return counts


def counted_since(before: dict[str, float]) -> dict[str, float]:
    return {name: value - before[name] for name, value in cache_counts().items()}


class CountingSTS:
    """The real STS, counted; optionally slowed so concurrent callers overlap for sure."""

    def __init__(self, sts: BotocoreSTS, *, delay: float = 0.0) -> None:
        self._sts = sts
        self._delay = delay
        self._lock = threading.Lock()
        self.requests: list[AssumeRequest] = []

    @property
    def calls(self) -> int:
        return len(self.requests)

    def assume_role_with_web_identity(self, request: AssumeRequest) -> IssuedCredentials:
        with self._lock:
            self.requests.append(request)
        time.sleep(self._delay)
        return self._sts.assume_role_with_web_identity(request)


class FailingOnceSTS(CountingSTS):
    def assume_role_with_web_identity(self, request: AssumeRequest) -> IssuedCredentials:
        if self.calls == 0:
            with self._lock:
                self.requests.append(request)
            raise errors.UpstreamError("STS failed")
        return super().assume_role_with_web_identity(request)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAWS]:
    with local_aws(tmp_path_factory.mktemp("moto")) as running:
        yield running


@pytest.fixture(scope="module")
def real_sts(aws: LocalAWS) -> Iterator[BotocoreSTS]:
    client = BotocoreSTS(aws.sts_settings())
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    # A fresh prefix per test keeps tests independent on the shared redis-server.
    return f"test:{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def new_store(redis_target: RedisTarget, prefix: str) -> Iterator[Callable[[], Store]]:
    """Stores with their own Redis connections, as separate broker processes have; on a
    standalone Redis and on a Cluster (the ``redis_target`` parameter)."""
    clients: list[redis.Redis] = []

    def make() -> Store:
        client = redis_target.connect()
        clients.append(client)
        return Store(client=client, prefix=prefix, sealer=SEALER)

    yield make
    close_clients(clients)


@pytest.fixture
def store(new_store: Callable[[], Store]) -> Store:
    return new_store()


@pytest.fixture
def sts(real_sts: BotocoreSTS) -> CountingSTS:
    return CountingSTS(real_sts)


def service(
    sts: CountingSTS, store: Store, *, config_version: str = "v1", **settings: Any
) -> CredentialService:
    return CredentialService(
        sts=sts, store=store, settings=replace(CACHE, **settings), config_version=config_version
    )


def identity(subject: str = "alice", *, token: str = "token-1") -> Identity:
    return IDS.identify(
        VerifiedToken(
            provider="google",
            subject=subject,
            claims=VerifiedClaims({"sub": subject, "email": f"{subject}@example.com"}),
            token=token,
            sts_provider_id=None,
            expires_at=int(time.time()) + 3600,
        )
    )


def keys_with_prefix(store: Store) -> list[bytes]:
    return keys_matching(store.client, f"{store.prefix}*")


# --------------------------------------------------------------------------- cache


def test_a_hit_returns_the_same_credentials_without_calling_sts(
    sts: CountingSTS, store: Store
) -> None:
    credentials = service(sts, store)

    first = credentials.get(identity(), GRANT)
    # A fresh upstream token for the same person: the token is not part of the key.
    second = credentials.get(identity(token="token-2"), GRANT)

    assert second == first
    assert sts.calls == 1


def test_the_request_carries_the_grant_and_the_identity(sts: CountingSTS, store: Store) -> None:
    grant = replace(
        GRANT,
        duration_seconds=1200,
        session_policy='{"Version":"2012-10-17","Statement":[]}',
        policy_arns=("arn:aws:iam::aws:policy/ReadOnlyAccess",),
    )
    amazon = replace(identity(token="lwa-access-token").verified, sts_provider_id="www.amazon.com")

    service(sts, store).get(IDS.identify(amazon), grant)

    [sent] = sts.requests
    assert sent.role_arn == grant.role_arn
    assert sent.duration_seconds == 1200
    assert sent.policy == grant.session_policy
    assert sent.policy_arns == grant.policy_arns
    assert sent.web_identity_token == "lwa-access-token"
    assert sent.provider_id == "www.amazon.com"
    assert sent.session_name


def test_cached_credentials_are_sealed_in_redis(sts: CountingSTS, store: Store) -> None:
    issued = service(sts, store).get(identity(), GRANT)

    raw = b""
    for key in keys_with_prefix(store):
        stored: Any = (
            store.client.smembers(key)
            if store.client.type(key) == b"set"
            else [store.client.get(key)]
        )
        raw += b"".join(stored)
    assert raw
    for secret in (issued.access_key_id, issued.secret_access_key, issued.session_token):
        assert secret.encode() not in raw
    assert b"token-1" not in raw


def test_every_key_expires_and_no_lock_is_left_behind(sts: CountingSTS, store: Store) -> None:
    service(sts, store).get(identity(), GRANT)

    keys = keys_with_prefix(store)
    assert len(keys) == 2  # the entry and its identity's index
    assert all(store.client.pttl(key) > 0 for key in keys)
    assert not [key for key in keys if b":lock" in key]


def test_entries_expire_a_safety_margin_before_the_credentials(
    sts: CountingSTS, store: Store
) -> None:
    issued = service(sts, store, safety_margin_seconds=300).get(identity(), GRANT)

    [entry] = [k for k in keys_with_prefix(store) if b"creds:" in k]
    ttl = store.client.pttl(entry) / 1000
    expected = issued.expiration.timestamp() - time.time() - 300
    assert expected - 5 < ttl <= expected + 1


def test_credentials_within_the_margin_are_neither_cached_nor_served(
    sts: CountingSTS, store: Store
) -> None:
    # 900 s credentials and a clock 650 s ahead: 250 s left, inside the 300 s margin.
    late = CredentialService(
        sts=sts, store=store, settings=CACHE, config_version="v1", clock=lambda: time.time() + 650
    )
    late.get(identity(), GRANT)
    assert not [k for k in keys_with_prefix(store) if b"creds:" in k]

    # Cached by a node with a correct clock, the entry is still too old for this one.
    service(sts, store).get(identity(), GRANT)
    late.get(identity(), GRANT)
    assert sts.calls == 3


@pytest.mark.parametrize(
    ("grant", "config_version", "subject"),
    [
        pytest.param(replace(GRANT, role_arn=WRITER_ROLE), "v1", "alice", id="role"),
        pytest.param(replace(GRANT, session_policy="{}"), "v1", "alice", id="policy"),
        pytest.param(
            replace(GRANT, policy_arns=("arn:aws:iam::aws:policy/ReadOnlyAccess",)),
            "v1",
            "alice",
            id="policy-arns",
        ),
        pytest.param(replace(GRANT, duration_seconds=1800), "v1", "alice", id="duration"),
        pytest.param(GRANT, "v2", "alice", id="config-version"),
        pytest.param(GRANT, "v1", "bob", id="identity"),
    ],
)
def test_a_different_grant_config_or_identity_is_a_different_entry(
    sts: CountingSTS, store: Store, grant: Grant, config_version: str, subject: str
) -> None:
    first = service(sts, store).get(identity(), GRANT)
    second = service(sts, store, config_version=config_version).get(identity(subject), grant)

    assert second.access_key_id != first.access_key_id
    assert sts.calls == 2
    assert len([k for k in keys_with_prefix(store) if b"creds:" in k]) == 2


def test_forget_drops_every_entry_of_one_identity(sts: CountingSTS, store: Store) -> None:
    credentials = service(sts, store)
    alice, bob = identity("alice"), identity("bob")
    credentials.get(alice, GRANT)
    credentials.get(alice, replace(GRANT, role_arn=WRITER_ROLE))
    credentials.get(bob, GRANT)

    assert credentials.forget(alice.identity_id) == 2

    credentials.get(bob, GRANT)
    assert sts.calls == 3  # bob's entry survived
    credentials.get(alice, GRANT)
    assert sts.calls == 4
    assert credentials.forget("us-east-1:nobody") == 0


def test_a_disabled_cache_calls_sts_every_time(sts: CountingSTS, store: Store) -> None:
    credentials = service(sts, store, enabled=False)
    before = cache_counts()

    credentials.get(identity(), GRANT)
    credentials.get(identity(), GRANT)

    assert sts.calls == 2
    assert keys_with_prefix(store) == []
    assert counted_since(before)["disabled"] == 2


def test_lookups_are_counted_by_where_they_were_answered(
    sts: CountingSTS, new_store: Callable[[], Store]
) -> None:
    worker, other_worker = service(sts, new_store()), service(sts, new_store())
    before = cache_counts()

    worker.get(identity(), GRANT)  # miss: STS
    worker.get(identity(token="token-2"), GRANT)  # this worker's memory
    other_worker.get(identity(token="token-3"), GRANT)  # Redis, filled by the first

    counted = counted_since(before)
    assert (counted["miss"], counted["memory"], counted["redis"]) == (1, 1, 1)
    assert sts.calls == 1


def test_failures_are_not_cached_and_release_the_lock(real_sts: BotocoreSTS, store: Store) -> None:
    sts = FailingOnceSTS(real_sts)
    credentials = service(sts, store)

    with pytest.raises(errors.UpstreamError):
        credentials.get(identity(), GRANT)
    # For the failure's short hold (2 s for a 502), callers are told at once...
    with pytest.raises(errors.DependencyUnavailable, match="failed a moment ago"):
        credentials.get(identity(), GRANT)
    assert sts.calls == 1
    time.sleep(2.2)
    # ...then the next caller asks STS again: nothing was cached, the lock was released.
    assert credentials.get(identity(), GRANT).access_key_id
    assert sts.calls == 2


# --------------------------------------------------------------------------- round trips


def test_a_new_identity_costs_the_leader_two_round_trips(
    sts: CountingSTS, new_store: Callable[[], Store]
) -> None:
    stores = new_store(), new_store()
    worker, other_worker = service(sts, stores[0]), service(sts, stores[1])
    new = identity(f"new-{uuid.uuid4().hex[:8]}")

    with round_trips(stores[0].client) as sent:
        worker.get(new, GRANT)

    # Read-or-lock, then store-and-unlock: one script each (before: GET, SET NX, GET,
    # EVAL, SET, EVALSHA).
    assert sent == {"eval": 2}
    assert sts.calls == 1
    # Another worker reads them in one round trip, then from its memory in none.
    with round_trips(stores[1].client) as sent:
        other_worker.get(new, GRANT)
        other_worker.get(new, GRANT)
    assert sent == {"eval": 1}
    assert sts.calls == 1


def test_renewing_an_entry_the_caller_cannot_use_costs_three_round_trips(
    sts: CountingSTS, store: Store
) -> None:
    grant = replace(GRANT, duration_seconds=3600)
    first = service(sts, store).get(identity(), grant)
    # 15 minutes left: too few for a self-renewing SDK, so it takes the lock over them.
    skew = first.expiration.timestamp() - time.time() - 900
    later = CredentialService(
        sts=sts, store=store, settings=CACHE, config_version="v1", clock=lambda: time.time() + skew
    )

    with round_trips(store.client) as sent:
        renewed = later.get(identity(), grant, min_left=sdk_min_left(grant.duration_seconds))

    assert renewed != first
    assert sts.calls == 2
    # The read, the lock taken over the entry it cannot use, store-and-unlock.
    assert sent == {"eval": 3}


def test_a_burst_for_a_new_identity_polls_with_the_script_alone(
    real_sts: BotocoreSTS, new_store: Callable[[], Store]
) -> None:
    sts = CountingSTS(real_sts, delay=0.2)
    stores = [new_store(), new_store()]

    # No worker memory: every request asks Redis at least once.
    with round_trips(stores[0].client) as sent:
        results = burst([service(sts, s, local_seconds=0) for s in stores], 20)

    assert sts.calls == 1
    assert len({r.access_key_id for r in results}) == 1
    # Leader and followers alike: read-or-lock polls, one store-and-unlock; no GET, no
    # lock SET, no EVALSHA of a lock release.
    assert set(sent) == {"eval"}
    assert sent["eval"] >= 20 + 1


class BrokenOnceSTS(CountingSTS):
    """The first call fails with a bug of ours (not an STS failure: no failure hold)."""

    def assume_role_with_web_identity(self, request: AssumeRequest) -> IssuedCredentials:
        if self.calls == 0:
            with self._lock:
                self.requests.append(request)
            time.sleep(self._delay)
            raise RuntimeError("a bug in the leader")
        return super().assume_role_with_web_identity(request)


def test_a_follower_takes_over_when_the_leader_released_without_filling(
    real_sts: BotocoreSTS, new_store: Callable[[], Store]
) -> None:
    sts = BrokenOnceSTS(real_sts, delay=0.5)
    store = new_store()
    leader, follower = service(sts, new_store()), service(sts, store)
    before = cache_counts()
    with ThreadPoolExecutor(max_workers=1) as pool:
        leading = pool.submit(leader.get, identity(), GRANT)
        while sts.calls == 0:
            time.sleep(0.01)

        started = time.monotonic()
        issued = follower.get(identity(token="token-2"), GRANT)
        # Released, not expired: well before lock_timeout_seconds (10 s).
        assert time.monotonic() - started < 3.0
        with pytest.raises(RuntimeError):
            leading.result(timeout=10)

    assert issued.access_key_id
    assert sts.calls == 2
    assert counted_since(before)["took_over"] == 1
    assert not [k for k in keys_with_prefix(store) if b":lock" in k]


def test_the_failure_hold_answers_a_new_caller_in_one_round_trip(
    real_sts: BotocoreSTS, new_store: Callable[[], Store]
) -> None:
    sts = FailingOnceSTS(real_sts)
    store = new_store()
    leader, caller = service(sts, new_store()), service(sts, store)
    with pytest.raises(errors.UpstreamError):
        leader.get(identity(), GRANT)

    with (
        round_trips(store.client) as sent,
        pytest.raises(errors.DependencyUnavailable, match="failed a moment ago"),
    ):
        caller.get(identity(token="token-2"), GRANT)

    assert sum(sent.values()) == 1
    assert sts.calls == 1


# --------------------------------------------------------------------------- singleflight


def burst(credentials: list[CredentialService], n: int) -> list[IssuedCredentials]:
    start = threading.Barrier(n)

    def one(i: int) -> IssuedCredentials:
        start.wait()
        return credentials[i % len(credentials)].get(identity(token=f"token-{i}"), GRANT)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def test_a_burst_for_one_identity_makes_one_sts_call(
    aws: LocalAWS, real_sts: BotocoreSTS, store: Store
) -> None:
    sts = CountingSTS(real_sts, delay=0.2)
    before = cache_counts()

    with aws.recording() as recording:
        results = burst([service(sts, store)], 50)

    assert sts.calls == 1
    assert len(recording.sts_calls()) == 1
    assert {r.access_key_id for r in results} == {results[0].access_key_id}
    # Metrics: one lookup result per request; the slowed leader made followers wait.
    counted = counted_since(before)
    assert counted["miss"] + counted["memory"] + counted["redis"] == 50
    assert counted["miss"] >= 1
    assert counted["filled"] >= 1
    assert counted["timeout"] == counted["took_over"] == 0


def test_separate_processes_share_singleflight(
    real_sts: BotocoreSTS, new_store: Callable[[], Store], aws: LocalAWS
) -> None:
    # Two services with their own Redis connections and STS clients: two processes.
    other_sts = BotocoreSTS(aws.sts_settings())
    try:
        counters = [CountingSTS(real_sts, delay=0.2), CountingSTS(other_sts, delay=0.2)]
        services = [service(counters[0], new_store()), service(counters[1], new_store())]

        results = burst(services, 40)
    finally:
        other_sts.close()

    assert sum(c.calls for c in counters) == 1
    assert len({r.access_key_id for r in results}) == 1


def test_a_follower_gives_up_when_the_leader_takes_too_long(
    real_sts: BotocoreSTS, store: Store
) -> None:
    # The leader is far slower than the follower's wait so a loaded machine cannot
    # blur "gave up after lock_wait_seconds" into "waited for the leader".
    slow = CountingSTS(real_sts, delay=3.0)
    credentials = service(slow, store, lock_wait_seconds=1.0)
    leader = ThreadPoolExecutor(max_workers=1)
    try:
        leading = leader.submit(credentials.get, identity(), GRANT)
        while slow.calls == 0:
            time.sleep(0.01)

        started = time.monotonic()
        before = cache_counts()
        with pytest.raises(errors.DependencyUnavailable) as caught:
            credentials.get(identity(token="token-2"), GRANT)
        assert 0.9 < time.monotonic() - started < 2.5
        assert caught.value.retry_after
        assert counted_since(before)["timeout"] == 1

        assert leading.result(timeout=10).access_key_id
    finally:
        leader.shutdown()
    assert slow.calls == 1


# --------------------------------------------------------------------------- worker memory


def test_a_worker_serves_from_memory_for_local_seconds_only(
    sts: CountingSTS, new_store: Callable[[], Store]
) -> None:
    clock = FakeClock()
    worker = CredentialService(
        sts=sts,
        store=new_store(),
        settings=replace(CACHE, local_seconds=30),
        config_version="v1",
        clock=clock,
    )
    other_worker = service(sts, new_store())
    before = cache_counts()
    first = worker.get(identity(), GRANT)

    # Another worker's logout drops the Redis entry; this worker may keep its copy
    # for local_seconds, and no longer.
    assert other_worker.forget(identity().identity_id) == 1
    assert worker.get(identity(), GRANT) == first
    assert sts.calls == 1
    clock.advance(31)
    assert worker.get(identity(), GRANT) != first
    assert sts.calls == 2
    counted = counted_since(before)
    assert (counted["miss"], counted["memory"], counted["redis"]) == (2, 1, 0)


def test_local_seconds_zero_asks_redis_every_time(
    sts: CountingSTS, new_store: Callable[[], Store]
) -> None:
    worker = service(sts, new_store(), local_seconds=0)
    other_worker = service(sts, new_store())
    worker.get(identity(), GRANT)

    other_worker.forget(identity().identity_id)
    worker.get(identity(), GRANT)

    assert sts.calls == 2


def test_forget_also_drops_this_workers_memory(sts: CountingSTS, store: Store) -> None:
    worker = service(sts, store, local_seconds=300)
    worker.get(identity(), GRANT)

    worker.forget(identity().identity_id)
    worker.get(identity(), GRANT)

    assert sts.calls == 2


@pytest.mark.parametrize(
    ("duration", "left_after", "renewed"),
    [
        (3600, 3600 - 2000, False),  # 26 min left: fine for an SDK
        (3600, 900, True),  # 15 min left: an SDK would ask again on every call
        (1800, 700, False),  # too short-lived for the rule: the ordinary margin only
    ],
)
def test_self_renewing_callers_never_get_credentials_inside_the_sdk_window(
    sts: CountingSTS, store: Store, duration: int, left_after: int, renewed: bool
) -> None:
    grant = replace(GRANT, duration_seconds=duration)
    first = service(sts, store).get(identity(), grant)
    # A node whose clock is where the credentials have ``left_after`` seconds left.
    skew = first.expiration.timestamp() - time.time() - left_after
    later = CredentialService(
        sts=sts, store=store, settings=CACHE, config_version="v1", clock=lambda: time.time() + skew
    )
    later.get(identity(), grant)  # an ordinary caller: the cache serves it
    assert sts.calls == 1
    later.get(identity(), grant, min_left=sdk_min_left(grant.duration_seconds))
    assert sts.calls == (2 if renewed else 1)


class HungSTS(CountingSTS):
    """STS that hangs for ``delay`` and then times out, as a frozen STS does."""

    def assume_role_with_web_identity(self, request: AssumeRequest) -> IssuedCredentials:
        with self._lock:
            self.requests.append(request)
        time.sleep(self._delay)
        raise errors.DependencyUnavailable("STS timed out after 2 s", retry_after=5)


def test_a_hung_sts_is_asked_once_and_callers_do_not_queue(
    real_sts: BotocoreSTS, new_store: Callable[[], Store]
) -> None:
    hung = HungSTS(real_sts, delay=2.0)
    services = [service(hung, new_store(), lock_wait_seconds=20) for _ in range(5)]

    def call(credentials: CredentialService) -> tuple[type[BaseException], float]:
        started = time.monotonic()
        with pytest.raises(errors.DependencyUnavailable) as failed:
            credentials.get(identity(), GRANT)
        assert failed.value.retry_after is not None
        return type(failed.value), time.monotonic() - started

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(call, services))
    # One STS call; every follower learns of its failure instead of calling STS in turn
    # (before: 5 calls, the last caller answered after 5 x 2 s).
    assert hung.calls == 1
    assert max(elapsed for _, elapsed in results) < 4.0
    # For FAILURE_HOLD_SECONDS a new caller gets the 503 at once, without a call.
    started = time.monotonic()
    with pytest.raises(errors.DependencyUnavailable, match="failed a moment ago"):
        services[0].get(identity(), GRANT)
    assert time.monotonic() - started < 1.0
    assert hung.calls == 1
