"""The Redis guard as a state machine: closed, open (failing fast), half-open (one probe).

States: **closed** (Redis answered last; every call goes to Redis), **open** (a fault
was seen; every call fails at once with 503 until ``PROBE_INTERVAL_SECONDS`` after the
last probe ended), **half-open** (one call is probing; the others fail at once). The
first probe Redis answers closes it.

Invariants, held by a hypothesis stateful test over a fake clock, with Redis faked at
the network boundary (each operation is the callable the guard runs; it raises
redis-py's own errors while "Redis" is down):

1. once Redis is back, no call is refused for longer than one probe interval;
2. while Redis is down, Redis is asked at most once per probe interval (plus the call
   that found the fault): nobody queues behind a dead Redis;
3. every failure is ``StoreUnavailable`` (503), never a raw Redis error;
4. an operation's own (non-Redis) error passes through and does not open the breaker.
"""

from __future__ import annotations

import math

import pytest
import redis.exceptions
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from broker.errors import StoreUnavailable
from broker.store import PROBE_INTERVAL_SECONDS, RedisGuard
from tests.unit.oidc_fixtures import FakeClock

FAULTS: dict[str, type[Exception]] = {
    "killed": redis.exceptions.ConnectionError,
    "frozen": redis.exceptions.TimeoutError,
    "failing over": redis.exceptions.ReadOnlyError,
}


class GuardMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.guard = RedisGuard(clock=self.clock)
        self.fault: type[Exception] | None = None
        self.down_since: float | None = None
        self.up_since: float = self.clock()
        self.asked_while_down = 0

    def _op(self) -> str:
        if self.fault is not None:
            self.asked_while_down += 1
            raise self.fault("redis is down")
        return "answer"

    @rule(fault=st.sampled_from(sorted(FAULTS)))
    def redis_fails(self, fault: str) -> None:
        if self.fault is None:
            self.down_since = self.clock()
            self.asked_while_down = 0
        self.fault = FAULTS[fault]

    @rule()
    def redis_comes_back(self) -> None:
        if self.fault is not None:
            self.fault = None
            self.up_since = self.clock()

    @rule(seconds=st.sampled_from([0.01, 0.1, 0.24, 0.25, 0.3, 1.0, 5.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def call(self) -> None:
        now = self.clock()
        try:
            assert self.guard.call(self._op) == "answer"
        except StoreUnavailable:
            # Invariant 1: refused only while down, or within one probe interval of
            # Redis coming back.
            assert self.fault is not None or now - self.up_since < PROBE_INTERVAL_SECONDS, (
                f"refused {now - self.up_since:.3f} s after Redis came back"
            )
        else:
            assert self.fault is None

    @rule()
    def a_bug_of_ours(self) -> None:
        # Invariant 4: not a Redis fault, so it neither becomes a 503 nor opens anything.
        def broken() -> None:
            raise KeyError("ours")

        if self.fault is None and self.clock() - self.up_since >= PROBE_INTERVAL_SECONDS:
            with pytest.raises(KeyError):
                self.guard.call(broken)
            assert self.guard.call(self._op) == "answer"

    @invariant()
    def redis_is_asked_at_most_once_per_interval_while_down(self) -> None:
        if self.fault is None or self.down_since is None:
            return
        allowed = 1 + math.floor((self.clock() - self.down_since) / PROBE_INTERVAL_SECONDS)
        assert self.asked_while_down <= allowed


def test_the_guard_recovers_within_one_probe_and_never_queues() -> None:
    run_state_machine_as_test(
        GuardMachine,
        settings=settings(
            max_examples=200,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_one_probe_after_redis_is_back_closes_the_breaker() -> None:
    clock = FakeClock()
    guard = RedisGuard(clock=clock)
    down = True

    def op() -> str:
        if down:
            raise redis.exceptions.ConnectionError("refused")
        return "ok"

    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            guard.call(op)
    down = False
    with pytest.raises(StoreUnavailable):
        guard.call(op)  # within the interval: still failing fast
    clock.advance(PROBE_INTERVAL_SECONDS)
    assert guard.call(op) == "ok"  # the probe, answered: closed
    assert guard.call(op) == "ok"
