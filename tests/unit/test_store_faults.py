"""The store's failure promise, against a real redis-server killed or frozen (SIGSTOP).

Held here (see broker.store's docstring): every Store call fails as ``StoreUnavailable``
(503, Retry-After) and never as a raw Redis error; one request waits on Redis for at
most one socket timeout; the process fails fast after a fault and then lets one probe
through; a lock release never raises; an outage is logged as one warning, summaries and
one recovery line, never a traceback; credentials STS minted reach the caller even when
Redis fails before they are cached. STS is a stand-in at its interface (``STS``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.credentials import CredentialService
from broker.errors import StoreUnavailable
from broker.identity import Identity, IdentityIds, VerifiedClaims, VerifiedToken
from broker.rules import Grant
from broker.settings import CacheSettings, RedisSettings
from broker.store import PROBE_INTERVAL_SECONDS, RedisGuard, Sealer, Store, connect, request_scope
from broker.sts import AssumeRequest, IssuedCredentials
from tests.redis_faults import FaultyRedis
from tests.unit.oidc_fixtures import FakeClock

FAULTS = ["kill", "freeze"]
# The store's socket timeout in these tests, and the slack allowed on top of it for a
# loaded machine: well under a second timeout, so a doubled wait still fails the test.
TIMEOUT = 1.0
SLACK = 0.7


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[FaultyRedis]:
    server = FaultyRedis(tmp_path)
    yield server
    server.stop()


def make_store(server: FaultyRedis, guard: RedisGuard | None = None) -> Store:
    settings = RedisSettings(url=server.url, key_prefix="t:", socket_timeout_seconds=TIMEOUT)
    # connect(): the production client options (no retries, no health-check PINGs).
    return Store(client=connect(settings), prefix="t:", sealer=Sealer([b"s" * 32]), guard=guard)


@pytest.fixture
def store(faulty: FaultyRedis) -> Iterator[Store]:
    s = make_store(faulty)
    s.ping()  # connected before the fault, as a running broker is
    yield s
    s.client.close()


def timed(call: Callable[[], Any]) -> tuple[BaseException | None, float]:
    start = time.monotonic()
    try:
        call()
    except BaseException as exc:
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


def enter_lock(s: Store) -> None:
    with s.lock("l", timeout=5, wait=0):
        pass


# Every public Store operation, as the code paths use them.
CALLS: dict[str, Callable[[Store], Any]] = {
    "get_json": lambda s: s.get_json("t:a"),
    "set_json": lambda s: s.set_json("t:a", {"x": 1}, ttl=10),
    "get_sealed": lambda s: s.get_sealed("t:a"),
    "set_sealed": lambda s: s.set_sealed("t:a", {"x": 1}, ttl=10, only_if_new=True),
    "take_sealed": lambda s: s.take_sealed("t:a"),
    "delete": lambda s: s.delete("t:a"),
    "index_add": lambda s: s.index_add("t:i", "t:a", ttl=10),
    "drop_index": lambda s: s.drop_index("t:i"),
    "drop_index tagged": lambda s: s.drop_index("t:i:{id}"),
    "index_add tagged": lambda s: s.index_add("t:i:{id}", "t:a:{id}", ttl=10),
    "ttl_seconds": lambda s: s.ttl_seconds("t:a"),
    "hit": lambda s: s.hit("t:r", window=60),
    "set_flag": lambda s: s.set_flag("t:f", ttl=10, only_if_new=True),
    "ping": lambda s: s.ping(),
    "lock": enter_lock,
    "read_or_lock": lambda s: s.read_or_lock("t:a:{id}", lock="t:l:{id}", token="t", timeout=5),
    "store_and_unlock": lambda s: s.store_and_unlock(
        "t:a:{id}", {"x": 1}, ttl=10, index="t:i:{id}", lock="t:l:{id}", token="t"
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_every_store_call_fails_as_a_503_within_one_timeout(
    faulty: FaultyRedis, store: Store, call: str, fault: str
) -> None:
    faulty.fault(fault)

    error, elapsed = timed(lambda: CALLS[call](store))

    assert isinstance(error, StoreUnavailable), repr(error)
    assert (error.status, error.code, error.retry_after) == (503, "dependency_unavailable", 2)
    assert elapsed < TIMEOUT + SLACK


@pytest.mark.parametrize("fault", FAULTS)
def test_a_request_waits_on_redis_for_at_most_one_socket_timeout(
    faulty: FaultyRedis, fault: str
) -> None:
    # A long probe interval would hide a second wait: this guard has none, so only the
    # request scope can keep the later calls from waiting.
    s = make_store(faulty, RedisGuard(probe_interval_seconds=0))
    s.ping()
    faulty.fault(fault)
    errors: list[BaseException | None] = []
    start = time.monotonic()
    with request_scope():
        for name in ("get_sealed", "lock", "set_sealed", "hit", "delete"):
            errors.append(timed(lambda name=name: CALLS[name](s))[0])  # type: ignore[misc]
    elapsed = time.monotonic() - start

    assert all(isinstance(e, StoreUnavailable) for e in errors), errors
    assert elapsed < TIMEOUT + SLACK
    if fault == "freeze":
        assert elapsed >= TIMEOUT * 0.9  # the first call really waited on a frozen Redis
    # A new request asks Redis again (this guard does not fail fast).
    faulty.restore()
    with request_scope():
        assert s.ping()
    s.client.close()


def test_after_a_fault_other_threads_fail_fast_then_one_probe_finds_redis_back(
    faulty: FaultyRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.store")
    window = 0.5
    s = make_store(faulty, RedisGuard(probe_interval_seconds=window))
    s.ping()
    faulty.freeze()
    first, waited = timed(s.ping)
    assert isinstance(first, StoreUnavailable)
    assert waited >= TIMEOUT * 0.9

    # Within the window, eight threads fail at once instead of queueing on the timeout.
    results: list[tuple[BaseException | None, float]] = []
    threads = [threading.Thread(target=lambda: results.append(timed(s.ping))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(e, StoreUnavailable) and took < SLACK for e, took in results), results

    # After it, one call probes (and waits); the others still fail fast meanwhile.
    time.sleep(window + 0.1)
    probe: list[tuple[BaseException | None, float]] = []
    prober = threading.Thread(target=lambda: probe.append(timed(s.ping)))
    prober.start()
    time.sleep(0.2)
    during, took = timed(s.ping)
    prober.join()
    assert isinstance(during, StoreUnavailable)
    assert took < SLACK
    assert isinstance(probe[0][0], StoreUnavailable)
    assert probe[0][1] >= TIMEOUT * 0.9

    faulty.restore()
    time.sleep(window + 0.1)
    assert s.ping()
    assert s.get_json("t:none") is None
    assert any("available again" in r.getMessage() for r in caplog.records)
    s.client.close()


@pytest.mark.parametrize("fault", FAULTS)
def test_a_lock_release_that_fails_never_turns_the_result_into_an_error(
    faulty: FaultyRedis, store: Store, fault: str
) -> None:
    with store.lock("held", timeout=5, wait=0) as acquired:
        assert acquired
        faulty.fault(fault)
        result = "minted"
    assert result == "minted"


@pytest.mark.parametrize("fault", FAULTS)
def test_unlock_never_raises_and_waits_at_most_one_timeout(
    faulty: FaultyRedis, store: Store, fault: str
) -> None:
    assert store.read_or_lock("t:a:{id}", lock="t:l:{id}", token="t", timeout=5) is True
    faulty.fault(fault)

    error, elapsed = timed(lambda: store.unlock("t:l:{id}", token="t"))

    assert error is None
    assert elapsed < TIMEOUT + SLACK


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failing_release_does_not_mask_the_bodys_own_error(
    faulty: FaultyRedis, store: Store, fault: str
) -> None:
    def body() -> None:
        with store.lock("held", timeout=5, wait=0):
            faulty.fault(fault)
            raise KeyError("the body's own error")

    with pytest.raises(KeyError):
        body()


# --------------------------------------------------------------------------- the log


@dataclass(frozen=True)
class LogCase:
    fault: str
    seconds: float  # fake time the outage lasts, one failing call every 0.25 s
    summaries: int


@pytest.mark.parametrize(
    "case",
    [LogCase("kill", 16, 3), LogCase("freeze", 11, 2), LogCase("kill", 4, 0)],
    ids=lambda c: f"{c.fault}-{c.seconds:g}s",
)
def test_an_outage_logs_one_warning_then_summaries_then_one_recovery_line(
    faulty: FaultyRedis, caplog: pytest.LogCaptureFixture, case: LogCase
) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    s = make_store(faulty, RedisGuard(clock=clock, probe_interval_seconds=1, summary_seconds=5))
    s.ping()
    faulty.fault(case.fault)
    failures = 0
    for _ in range(int(case.seconds / 0.25)):
        with request_scope():
            for call in ("hit", "get_sealed"):  # the second one fails fast in the scope
                with pytest.raises(StoreUnavailable):
                    CALLS[call](s)
                failures += 1
        clock.advance(0.25)
    faulty.restore()
    clock.advance(1)
    assert s.ping()

    records = [r for r in caplog.records if r.name == "broker.store"]
    messages = [r.getMessage() for r in records]
    assert len(messages) == 2 + case.summaries, messages
    cause = "TimeoutError" if case.fault == "freeze" else "ConnectionError"
    assert messages[0].startswith(f"Redis is unavailable ({cause}")
    assert all(m.startswith("Redis still unavailable: ") for m in messages[1:-1])
    assert messages[-1].startswith("Redis is available again after")
    assert f"({failures} calls failed meanwhile)" in messages[-1]
    assert [r.levelname for r in records] == ["WARNING"] * (1 + case.summaries) + ["INFO"]
    # No traceback from anyone, and nothing else logged per failed call.
    assert not any(r.exc_info for r in caplog.records)
    assert [r for r in caplog.records if r.name != "broker.store"] == []
    s.client.close()


# --------------------------------------------------------------------------- credentials

IDS = IdentityIds(key=b"k" * 32, region="us-east-1")
GRANT = Grant(
    rule="readers",
    role_arn="arn:aws:iam::123456789012:role/reader",
    duration_seconds=900,
    session_policy=None,
    policy_arns=(),
)
CACHE = CacheSettings(
    enabled=True, safety_margin_seconds=60, lock_timeout_seconds=10, lock_wait_seconds=5
)


class STSStandIn:
    """STS at its interface: answers with fresh credentials, after ``during`` runs (the
    moment a real STS call is in flight while the request holds the lock)."""

    def __init__(self, during: Callable[[], None] = lambda: None) -> None:
        self.during = during
        self.calls = 0

    def assume_role_with_web_identity(self, request: AssumeRequest) -> IssuedCredentials:
        self.calls += 1
        self.during()
        return IssuedCredentials(
            access_key_id=f"ASIA{self.calls:016d}",
            secret_access_key="secret",
            session_token="session",
            expiration=datetime.now(UTC) + timedelta(seconds=request.duration_seconds),
            assumed_role_arn="arn:aws:sts::123456789012:assumed-role/reader/alice",
            assumed_role_id="AROA:alice",
        )


def alice() -> Identity:
    return IDS.identify(
        VerifiedToken(
            provider="google",
            subject="alice",
            claims=VerifiedClaims({"sub": "alice"}),
            token="token",
            sts_provider_id=None,
            expires_at=int(time.time()) + 3600,
        )
    )


@pytest.mark.parametrize("fault", FAULTS)
def test_credentials_minted_while_redis_fails_still_reach_the_caller(
    faulty: FaultyRedis, store: Store, fault: str
) -> None:
    sts = STSStandIn(during=lambda: faulty.fault(fault))
    service = CredentialService(sts=sts, store=store, settings=CACHE, config_version="v1")

    with request_scope():
        start = time.monotonic()
        issued = service.get(alice(), GRANT)
        elapsed = time.monotonic() - start

    assert issued.access_key_id == "ASIA0000000000000001"
    assert elapsed < TIMEOUT + SLACK  # the cache write waited once; the release not at all
    # This worker keeps them in memory (cache.local_seconds), Redis or not.
    faulty.restore()
    assert service.get(alice(), GRANT) == issued
    assert sts.calls == 1


@pytest.mark.parametrize("fault", FAULTS)
def test_a_redis_fault_before_sts_is_a_503_and_sts_is_never_called(
    faulty: FaultyRedis, store: Store, fault: str
) -> None:
    sts = STSStandIn()
    service = CredentialService(sts=sts, store=store, settings=CACHE, config_version="v1")
    faulty.fault(fault)

    with request_scope(), pytest.raises(StoreUnavailable):
        service.get(alice(), GRANT)
    assert sts.calls == 0


@pytest.mark.parametrize("fault", FAULTS)
def test_once_redis_is_back_requests_are_served_within_one_probe_interval(
    faulty: FaultyRedis, fault: str
) -> None:
    """On a real redis-server killed and restarted, or frozen and thawed: the breaker
    follows Redis, not a fixed window (the first probe it answers closes it)."""
    s = make_store(faulty, RedisGuard())
    s.ping()
    faulty.fault(fault)
    with pytest.raises(StoreUnavailable):
        s.ping()
    faulty.restore()
    ready = time.monotonic()
    while True:
        try:
            assert s.ping()
            break
        except StoreUnavailable:
            assert time.monotonic() - ready < PROBE_INTERVAL_SECONDS + SLACK
            time.sleep(0.01)
    s.client.close()
