"""The credential cache's singleflight as a state machine (broker.credentials).

States of one cache entry (one identity and grant): **empty**; **locked** (a leader took
the lock and waits on STS; followers poll); **filled** (credentials cached until their
expiry minus the safety margin); **failure held** (STS failed for the leader: the entry
answers 503 with Retry-After for ``min(retry_after, FAILURE_HOLD_SECONDS)``); **expired**;
**orphaned** (the lock holder died, or is so slow that its lock lapsed: the next caller
takes over). Each node also keeps what it handed out in memory for ``local_seconds``.

A hypothesis stateful test drives three nodes (``CredentialService`` instances with
their own store clients and memory, sharing one real redis-server) with gets from one
caller, a leader left waiting on STS with followers polling behind it, bursts of
concurrent callers, STS answering with credentials, with credentials shorter-lived than
the margin, with a dependency error (503 or 502) or with a caller error (4xx), the
clock, ``forget`` and a node dying while it holds the lock. STS is a stand-in at its
interface; Redis follows the fake clock through ``RedisTime``. A model predicts every
answer and every key in Redis, and after every step:

1. STS is called once per fill, never while a fill is in progress (unless its lock
   lapsed) or the entry is fresh enough for the caller, and never twice at once;
2. cached credentials handed out last at least the caller's ``min_left`` and more
   than the safety margin;
3. a held failure is a 503 with 1 <= Retry-After <= ``FAILURE_HOLD_SECONDS`` and lives
   in Redis no longer than that; a caller's (4xx) error is never held;
4. after ``forget`` the node that forgot never hands out credentials cached before it,
   and other nodes only from memory, for at most ``local_seconds``;
5. every failure is a broker error; and Redis holds exactly the model's keys and TTLs.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from broker import errors
from broker.credentials import (
    _BUSY_RETRY_AFTER,
    FAILURE_HOLD_SECONDS,
    SDK_REFRESH_SECONDS,
    CredentialService,
)
from broker.devstack.processes import ManagedProcess
from broker.identity import Identity, IdentityIds, VerifiedClaims, VerifiedToken
from broker.rules import Grant
from broker.settings import CacheSettings
from broker.store import Found, Sealer, Store
from broker.sts import AssumeRequest, IssuedCredentials
from tests.unit.redis_time import RedisTime, whole_second_clock

MARGIN = 60
LOCK_TIMEOUT = 10
SHORT_LIFE = 30  # credentials STS hands out inside the margin: never cached


@dataclass(frozen=True)
class Node:
    local_seconds: int
    lock_wait_seconds: float


# "a" and "b" serve the single gets and give up on a held lock after 20 ms (a busy 503,
# at once); "c" waits up to 3 s, for the threaded followers and bursts, which must
# outwait their leader even on a loaded machine.
NODES = {"a": Node(30, 0.02), "b": Node(0, 0.02), "c": Node(30, 3.0)}

IDS = IdentityIds(key=b"k" * 32, region="us-east-1")


def person(name: str) -> Identity:
    return IDS.identify(
        VerifiedToken(
            provider="google",
            subject=name,
            claims=VerifiedClaims({"sub": name}),
            token=f"token-{name}",
            sts_provider_id=None,
            expires_at=2_000_000_000,
        )
    )


def grant(seconds: int) -> Grant:
    return Grant(
        rule="readers",
        role_arn=f"arn:aws:iam::123456789012:role/r{seconds}",
        duration_seconds=seconds,
        session_policy=None,
        policy_arns=(),
    )


PEOPLE = {name: person(name) for name in ("alice", "bob")}
# The cache entries the machine plays with: (who, grant).
CASES = [("alice", grant(900)), ("alice", grant(3600)), ("bob", grant(900))]


def akid(number: int) -> str:
    return f"ASIA{number:016d}"


@dataclass(frozen=True)
class Answer:
    """What the STS stand-in answers: credentials (``life`` seconds; None: the grant's
    duration), or raises ``error``."""

    error: type[errors.BrokerError] | None = None
    retry_after: int | None = None
    life: int | None = None

    def exception(self) -> errors.BrokerError:
        assert self.error is not None
        return self.error("the STS stand-in failed", retry_after=self.retry_after)

    def issue(self, number: int, duration: int, now: float) -> IssuedCredentials:
        if self.error is not None:
            raise self.exception()
        life = duration if self.life is None else self.life
        return IssuedCredentials(
            access_key_id=akid(number),
            secret_access_key="secret",
            session_token="session",
            expiration=datetime.fromtimestamp(now + life, UTC),
            assumed_role_arn="arn:aws:sts::123456789012:assumed-role/r/x",
            assumed_role_id="AROA:x",
        )


OK = Answer()
ANSWERS = st.sampled_from(
    [
        OK,
        OK,
        OK,
        Answer(life=SHORT_LIFE),
        # Dependency faults: the leader holds them for the followers.
        Answer(errors.DependencyUnavailable),  # its default Retry-After, 5
        Answer(errors.DependencyUnavailable, 1),
        Answer(errors.DependencyUnavailable, 3),
        Answer(errors.DependencyUnavailable, 30),
        Answer(errors.UpstreamThrottled, 2),
        Answer(errors.UpstreamThrottled, 7),
        Answer(errors.UpstreamError),  # 502, no Retry-After of its own
        # The caller's fault: never held.
        Answer(errors.InvalidToken),
        Answer(errors.ExpiredToken),
        Answer(errors.AccessDenied),
    ]
)
MIN_LEFT = st.sampled_from([0.0, 0.0, 300.0, float(SDK_REFRESH_SECONDS)])


class StandInSTS:
    """STS at its interface. Every call but the leader's answers ``answer`` (after
    ``delay``, so that a burst's callers overlap); the leader's waits until the test
    answers it. Counts the calls in flight per entry, and any overlap."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.answer = OK
        self.delay = 0.0
        self.leader: threading.Thread | None = None
        self.leader_answer = OK
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []  # the case of each call, in order of arrival
        self.overlaps: list[tuple[int, int]] = []  # (case, calls in flight) beyond one
        self._lock = threading.Lock()
        self._in_flight: Counter[int] = Counter()
        self._cases = {
            (PEOPLE[who].verified.token, g.role_arn): case for case, (who, g) in enumerate(CASES)
        }

    def assume_role_with_web_identity(self, request: AssumeRequest) -> IssuedCredentials:
        case = self._cases[(request.web_identity_token, request.role_arn)]
        with self._lock:
            self.calls.append(case)
            number = len(self.calls)
            self._in_flight[case] += 1
            if self._in_flight[case] > 1:
                self.overlaps.append((case, self._in_flight[case]))
        try:
            if threading.current_thread() is self.leader:
                self.entered.set()
                if not self.release.wait(10):
                    raise TimeoutError("the test never answered the leader")
                answer = self.leader_answer
            else:
                time.sleep(self.delay)
                answer = self.answer
            return answer.issue(number, request.duration_seconds, self.clock())
        finally:
            with self._lock:
                self._in_flight[case] -= 1


# What a get gave: ("creds", access key id) or ("error", type, status, retry_after).
Result = tuple[Any, ...]


def held(retry_after: int) -> Result:
    return ("error", errors.DependencyUnavailable, 503, retry_after)


BUSY = ("error", errors.DependencyUnavailable, 503, _BUSY_RETRY_AFTER)


def named(result: Result, calls: int) -> str:
    """A result's name for ``event``: what the examples reached."""
    if result[0] == "creds":
        return "fresh credentials" if int(result[1][4:]) > calls else "cached credentials"
    if result == BUSY:
        return "503, Retry-After 2 (busy, or a failure held 2 s)"
    return f"{result[1].__name__} {result[2]}"


@dataclass
class Cached:
    akid: str
    until: float
    # A failed refill held beside the credentials, for callers they are too short for:
    # (retry_after, until).
    failed: tuple[int, float] | None = None


@dataclass
class Held:
    retry_after: int
    until: float
    since: float


@dataclass
class Lock:
    owner: str
    until: float


@dataclass
class Index:
    members: set[int]
    until: float


@dataclass
class Minted:
    case: int
    step: int
    expires: float


@dataclass
class Leader:
    node: str
    case: int
    owner: str
    number: int
    thread: threading.Thread
    result: list[Result] = field(default_factory=list)
    crash: list[BaseException] = field(default_factory=list)
    orphaned: bool = False


def ask(service: CredentialService, case: int, min_left: float) -> Result:
    """One get; a broker error is an answer, anything else escapes."""
    who, g = CASES[case]
    try:
        issued = service.get(PEOPLE[who], g, min_left=min_left)
    except errors.BrokerError as exc:
        return ("error", type(exc), exc.status, exc.retry_after)
    return ("creds", issued.access_key_id)


def in_thread(
    call: Callable[[], Result], start: threading.Barrier | None = None
) -> tuple[threading.Thread, list[Result], list[BaseException]]:
    result: list[Result] = []
    crash: list[BaseException] = []

    def run() -> None:
        try:
            if start is not None:
                start.wait(5)
            result.append(call())
        except BaseException as exc:  # re-raised by the test's thread
            crash.append(exc)

    return threading.Thread(target=run, daemon=True), result, crash


def joined(thread: threading.Thread, result: list[Result], crash: list[BaseException]) -> Result:
    thread.join(10)
    assert not thread.is_alive(), "a caller is still waiting"
    if crash:
        raise crash[0]
    return result[0]


class Singleflight(RuleBasedStateMachine):
    def __init__(self, port: int) -> None:
        super().__init__()
        self.clock = whole_second_clock()
        prefix, sealer = f"test:{uuid.uuid4()}:", Sealer([os.urandom(32)])
        self.clients = [
            redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2) for _ in NODES
        ]
        self.sts = StandInSTS(self.clock)
        self.nodes = {
            name: CredentialService(
                sts=self.sts,
                store=Store(client=client, prefix=prefix, sealer=sealer),
                settings=CacheSettings(
                    enabled=True,
                    safety_margin_seconds=MARGIN,
                    lock_timeout_seconds=LOCK_TIMEOUT,
                    lock_wait_seconds=node.lock_wait_seconds,
                    local_seconds=node.local_seconds,
                ),
                config_version="v1",
                clock=self.clock,
            )
            for (name, node), client in zip(NODES.items(), self.clients, strict=True)
        }
        self.store = self.nodes["a"]._store
        self.time = RedisTime(self.clients[0], prefix, self.clock)
        self.keys = [self._keys(case) for case in range(len(CASES))]
        self.index_keys = {
            who: self.store.key("creds-index", tag=p.identity_id) for who, p in PEOPLE.items()
        }
        # The model.
        self.step = 0
        self.entries: dict[int, Cached | Held] = {}
        self.locks: dict[int, Lock] = {}
        self.indexes: dict[str, Index] = {}
        self.memory: dict[str, dict[int, Cached]] = {name: {} for name in NODES}
        self.minted: dict[str, Minted] = {}
        self.forgets: list[tuple[str, int, float, str]] = []  # (who, step, when, node)
        self.expected_calls: list[int] = []
        self.leader: Leader | None = None

    def _keys(self, case: int) -> tuple[str, str]:
        who, g = CASES[case]
        identity_id = PEOPLE[who].identity_id
        digest = self.nodes["a"]._digest(identity_id, g)
        return (
            self.store.key("creds", digest, tag=identity_id),
            self.store.key("lock", digest, tag=identity_id),
        )

    def teardown(self) -> None:
        if self.leader is not None:
            self.sts.leader_answer = Answer(errors.InvalidToken)
            self.sts.release.set()
            self.leader.thread.join(10)
        for client in self.clients:
            client.close()

    # -- the model ------------------------------------------------------------------

    def _lasts(self, akid: str, min_left: float) -> bool:
        return not min_left or self.minted[akid].expires - self.clock() >= min_left

    def _remember(self, node: str, case: int, akid: str) -> None:
        local, now = NODES[node].local_seconds, self.clock()
        until = min(now + local, self.minted[akid].expires - MARGIN)
        if local and until > now:
            self.memory[node][case] = Cached(akid, until)

    def _unlock(self, case: int, owner: str) -> None:
        if case in self.locks and self.locks[case].owner == owner:
            del self.locks[case]

    def expect(
        self, node: str, case: int, min_left: float, *, remember: bool = True
    ) -> Result | None:
        """What a get answers without calling STS; None when it takes the lock to fill.
        ``remember``: as the get does, keep what it read from Redis in the node's memory."""
        now = self.clock()
        mem = self.memory[node].get(case)
        if mem is not None and now < mem.until and self._lasts(mem.akid, min_left):
            return ("creds", mem.akid)
        entry = self.entries.get(case)
        if isinstance(entry, Held):
            return held(entry.retry_after)
        if isinstance(entry, Cached) and self._lasts(entry.akid, min_left):
            if remember:
                self._remember(node, case, entry.akid)
            return ("creds", entry.akid)
        if isinstance(entry, Cached) and entry.failed is not None and now < entry.failed[1]:
            return held(entry.failed[0])
        if case in self.locks:
            return BUSY  # the follower gave up waiting for the leader
        return None

    def fill(self, node: str, case: int, answer: Answer, owner: str, number: int) -> Result:
        """The lock holder's work once STS answered call ``number`` with ``answer``."""
        now = self.clock()
        if answer.error is None:
            who, g = CASES[case]
            key = akid(number)
            self.minted[key] = Minted(case, self.step, now + (answer.life or g.duration_seconds))
            ttl = self.minted[key].expires - now - MARGIN
            if ttl > 0:
                self._remember(node, case, key)
                self.entries[case] = Cached(key, now + ttl)  # SET: over whatever is there
                index = self.indexes.setdefault(who, Index(set(), now))
                index.members.add(case)
                index.until = max(index.until, now + ttl)
            self._unlock(case, owner)
            return ("creds", key)
        exc = answer.exception()
        hold = max(1, min(exc.retry_after or _BUSY_RETRY_AFTER, FAILURE_HOLD_SECONDS))
        entry = self.entries.get(case)
        if isinstance(exc, errors.ServerError) and entry is None:
            self.entries[case] = Held(hold, now + hold, now)
        elif isinstance(exc, errors.ServerError) and isinstance(entry, Cached):
            # The credentials it found too short stay for callers that need less.
            self.entries[case] = Cached(entry.akid, entry.until, (hold, now + hold))
        self._unlock(case, owner)
        return ("error", type(exc), exc.status, exc.retry_after)

    def get_in_model(self, node: str, case: int, min_left: float, answer: Answer) -> Result:
        expected = self.expect(node, case, min_left)
        if expected is not None:
            return expected
        self.expected_calls.append(case)
        number = len(self.expected_calls)
        return self.fill(node, case, answer, f"get-{number}", number)

    # -- checks on each answer --------------------------------------------------------

    def check_answer(self, node: str, case: int, min_left: float, got: Result, calls: int) -> None:
        """``calls``: how many STS calls there were before this get."""
        now = self.clock()
        kind, *rest = got
        if kind == "error":
            # The stand-in's own errors pass through (401, 403, 502, 503); held failures
            # and a busy leader are 503s with a Retry-After.
            _, status, retry_after = rest
            assert status in {401, 403, 502, 503}
            assert status != 503 or retry_after is not None
            return
        (key,) = rest
        if int(key[4:]) > calls:
            return  # fresh from STS for this very call: nothing to check against
        minted = self.minted[key]
        assert minted.case == case
        assert minted.expires - now > MARGIN, "cached credentials inside the safety margin"
        if min_left:
            assert minted.expires - now >= min_left, (
                f"cached credentials with {minted.expires - now:.0f} s left for a caller "
                f"asking for {min_left:.0f}"
            )
        who = CASES[case][0]
        for forgot, step, when, where in self.forgets:
            if forgot == who and minted.step < step:
                assert where != node, "the node that forgot handed out what it forgot"
                assert now < when + NODES[node].local_seconds, (
                    "credentials forgotten longer than local_seconds ago were handed out"
                )

    # -- operations -----------------------------------------------------------------

    @rule(
        node=st.sampled_from(["a", "b"]), case=st.integers(0, 2), min_left=MIN_LEFT, answer=ANSWERS
    )
    def get(self, node: str, case: int, min_left: float, answer: Answer) -> None:
        self.step += 1
        self.sts.answer, self.sts.delay = answer, 0.0
        calls = len(self.sts.calls)
        expected = self.get_in_model(node, case, min_left, answer)
        got = ask(self.nodes[node], case, min_left)
        event(f"get: {named(got, calls)}")
        self.check_answer(node, case, min_left, got, calls)
        assert got == expected

    @precondition(lambda self: self.leader is None)
    @rule(node=st.sampled_from(["a", "b"]), case=st.integers(0, 2), min_left=MIN_LEFT)
    def a_request_waits_on_sts(self, node: str, case: int, min_left: float) -> None:
        self.step += 1
        calls = len(self.sts.calls)
        expected = self.expect(node, case, min_left)
        thread, result, crash = in_thread(lambda: ask(self.nodes[node], case, min_left))
        self.sts.leader = thread
        self.sts.entered.clear()
        self.sts.release.clear()
        thread.start()
        deadline = time.monotonic() + 10
        while not self.sts.entered.wait(0.005) and thread.is_alive():
            assert time.monotonic() < deadline
        if expected is not None:
            # Served without STS: memory, the entry, a held failure, or busy.
            got = joined(thread, result, crash)
            event(f"leader not needed: {named(got, calls)}")
            self.check_answer(node, case, min_left, got, calls)
            assert got == expected
            self.sts.leader = None
            return
        assert self.sts.entered.is_set(), "the leader did not call STS"
        self.expected_calls.append(case)
        number = len(self.expected_calls)
        owner = f"leader-{number}"
        self.locks[case] = Lock(owner, self.clock() + LOCK_TIMEOUT)
        self.leader = Leader(node, case, owner, number, thread, result, crash)

    @precondition(lambda self: self.leader is not None)
    @rule(answer=ANSWERS, followers=st.integers(0, 3), then=ANSWERS)
    def sts_answers_the_leader(self, answer: Answer, followers: int, then: Answer) -> None:
        self.step += 1
        leader = self.leader
        assert leader is not None
        if leader.orphaned or self.expect("c", leader.case, 0.0, remember=False) != BUSY:
            # Whoever holds the lock now is not the one answered here; or the followers
            # have credentials to take (a leader asking for a longer min_left refills
            # an entry they may use): either way, they would not be waiting on it.
            followers = 0
        self.sts.answer, self.sts.delay = then, 0.005
        waiting = [
            in_thread(lambda: ask(self.nodes["c"], leader.case, 0.0)) for _ in range(followers)
        ]
        for thread, _, _ in waiting:
            thread.start()
        time.sleep(0.02 if followers else 0)  # the followers are polling by now
        self.sts.leader_answer = answer
        self.sts.release.set()
        calls = leader.number - 1
        got = joined(leader.thread, leader.result, leader.crash)
        followers_got = [joined(*w) for w in waiting]
        self.sts.leader, self.leader = None, None
        event(f"leader answered: {named(got, calls)}{' (orphaned)' if leader.orphaned else ''}")
        for one in followers_got:
            event(f"follower: {named(one, leader.number)}")
        expected_got = self.fill(leader.node, leader.case, answer, leader.owner, leader.number)
        self.check_answer(leader.node, leader.case, 0.0, got, calls)
        assert got == expected_got
        expected = [self.get_in_model("c", leader.case, 0.0, then) for _ in range(followers)]
        for one in followers_got:
            self.check_answer("c", leader.case, 0.0, one, leader.number)
        assert Counter(followers_got) == Counter(expected)

    @rule(case=st.integers(0, 2), callers=st.integers(2, 4), answer=ANSWERS)
    def a_burst_of_callers(self, case: int, callers: int, answer: Answer) -> None:
        if case in self.locks:
            return  # they would only wait for the lock's holder (as above)
        self.step += 1
        self.sts.answer, self.sts.delay = answer, 0.005
        calls = len(self.sts.calls)
        start = threading.Barrier(callers)
        burst = [in_thread(lambda: ask(self.nodes["c"], case, 0.0), start) for _ in range(callers)]
        for thread, _, _ in burst:
            thread.start()
        got = [joined(*b) for b in burst]
        event(f"burst of {callers}: {len(self.sts.calls) - calls} STS calls")
        expected = [self.get_in_model("c", case, 0.0, answer) for _ in range(callers)]
        for one in got:
            self.check_answer("c", case, 0.0, one, calls)
        assert Counter(got) == Counter(expected)

    @rule(case=st.integers(0, 2))
    def a_node_dies_holding_the_lock(self, case: int) -> None:
        if case in self.locks:
            return
        self.step += 1
        key, lock = self.keys[case]
        found = self.store.read_or_lock(key, lock=lock, token="dead", timeout=LOCK_TIMEOUT)
        if case in self.entries:
            assert isinstance(found, Found)  # it found the entry and died: nothing held
        else:
            assert found is True
            self.locks[case] = Lock("dead", self.clock() + LOCK_TIMEOUT)

    @rule(seconds=st.sampled_from([1, 2, 3, 4, 5, 9, 10, 29, 30, 300, 600, 780, 840, 2640]))
    def advance(self, seconds: int) -> None:
        self.step += 1
        self.time.advance(seconds)
        now = self.clock()
        self.entries = {c: e for c, e in self.entries.items() if now < e.until}
        for case, lock in list(self.locks.items()):
            if now >= lock.until:
                del self.locks[case]
                if self.leader is not None and lock.owner == self.leader.owner:
                    self.leader.orphaned = True  # so slow it counts as dead
                    event("a waiting leader's lock lapsed")
        self.indexes = {w: i for w, i in self.indexes.items() if now < i.until}
        for mem in self.memory.values():
            for case in [c for c, m in mem.items() if now >= m.until]:
                del mem[case]

    @rule(node=st.sampled_from(sorted(NODES)), who=st.sampled_from(sorted(PEOPLE)))
    def forget(self, node: str, who: str) -> None:
        self.step += 1
        self.memory[node].clear()  # a node forgets every identity it holds in memory
        index = self.indexes.pop(who, None)
        members = index.members if index is not None else set()
        dropped = sum(1 for case in members if self.entries.pop(case, None) is not None)
        assert self.nodes[node].forget(PEOPLE[who].identity_id) == dropped
        event(f"forget dropped {dropped}")
        self.forgets.append((who, self.step, self.clock(), node))

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def redis_holds_what_the_model_says(self) -> None:
        self.time.settle()
        now = self.clock()
        ttls = self.time.ttls()  # and every key has a TTL
        expected_keys: set[str] = set()
        for case, (key, lock) in enumerate(self.keys):
            entry, value = self.entries.get(case), self.store.get_sealed(key)
            if entry is None:
                assert value is None, f"entry {case}: {value!r} in Redis, the model has none"
            elif isinstance(entry, Held):
                failed = value.get("failed") if isinstance(value, dict) else None
                assert isinstance(failed, dict), f"entry {case}: no held failure in {value!r}"
                assert ttls[key] <= FAILURE_HOLD_SECONDS, f"a failure held for {ttls[key]} s"
                assert 1 <= failed["retry_after"] <= FAILURE_HOLD_SECONDS
                assert failed["retry_after"] == entry.retry_after
                assert ttls[key] == entry.until - now
                assert now - entry.since < FAILURE_HOLD_SECONDS
            else:
                assert isinstance(value, dict), f"entry {case}: {value!r}, expected credentials"
                if entry.failed is None:
                    assert "failed" not in value, f"entry {case}: a failure held, none expected"
                else:
                    retry_after, until = entry.failed
                    assert value["failed"]["retry_after"] == retry_after
                    assert 1 <= retry_after <= FAILURE_HOLD_SECONDS
                    assert value["failed"]["until"] == until
                    assert until - now <= FAILURE_HOLD_SECONDS
                assert value["access_key_id"] == entry.akid
                assert ttls[key] == entry.until - now
            if entry is not None:
                expected_keys.add(key)
            if case in self.locks:
                expected_keys.add(lock)
                assert ttls.get(lock) == self.locks[case].until - now
        for who, index in self.indexes.items():
            index_key = self.index_keys[who]
            expected_keys.add(index_key)
            members = {_text(m) for m in self.clients[0].smembers(index_key)}
            assert members == {self.keys[case][0] for case in index.members}
            assert ttls[index_key] == index.until - now
        assert set(ttls) == expected_keys

    @invariant()
    def sts_was_called_once_per_fill_and_never_twice_at_once(self) -> None:
        assert self.sts.calls == self.expected_calls
        for case, in_flight in self.sts.overlaps:
            leader = self.leader
            assert leader is not None, f"{in_flight} STS calls at once for entry {case}"
            assert leader.orphaned, f"{in_flight} STS calls at once, and no lock had lapsed"
            assert leader.case == case
            assert in_flight == 2
        self.sts.overlaps.clear()


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


@pytest.fixture(scope="module")
def port(redis_proc: ManagedProcess) -> int:
    return redis_proc.port


def test_the_singleflight_keeps_its_invariants_in_every_state(port: int) -> None:
    run_state_machine_as_test(
        lambda: Singleflight(port),  # type: ignore[arg-type]
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
