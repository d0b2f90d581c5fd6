"""The CLI's device sign-in (RFC 8628) as a state machine (broker.cli_auth).

States of one device code: **pending** (issued, the person has not answered yet);
**approved** (signed in in the browser and confirmed, at ``/device``); **denied**;
**slowed** (polled again sooner than the interval allows: ``slow_down``, whatever the
state); **redeemed** (the CLI session handed out, exactly once); **told** (a poll
said the sign-in was refused: the record is used up); **expired** (``login_ttl_seconds``
after the start). The user code the person types is used up by the first answer.

A hypothesis stateful test drives device starts, polls at various intervals (from two
broker nodes, and two CLIs at once), approvals and denials typed the ways people type
codes, unknown and malformed device and user codes, and the clock, against a real
redis-server (its expiry follows the fake clock through ``RedisTime``). A model predicts
every answer and every key the flow keeps in Redis, and after every step:

1. a device code is redeemed at most once, and only after an approval, for the person
   who approved;
2. after expiry every poll says ``expired_token``;
3. a poll sooner than the interval allows is ``slow_down`` and redeems nothing;
4. a denial is final: the code never gives a session, and the user code cannot be
   answered again (nor can an approval be changed);
5. every refusal is a broker error with a 4xx status, never a 500.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
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
from broker.cli_auth import (
    USER_CODE_ALPHABET,
    AuthorizationPending,
    CLIAuth,
    ExpiredDeviceCode,
    LoginRefused,
    SlowDown,
    format_user_code,
    normalize_user_code,
)
from broker.devstack.processes import ManagedProcess
from broker.identity import IdentityIds
from broker.sessions import SessionStore, WebSession
from broker.settings import CLISettings
from broker.store import Sealer, Store
from tests.unit.redis_time import RedisTime, whole_second_clock

LOGIN_TTL = 600
INTERVAL = 5
# The broker lets a poll through 80% of the interval after the last one (for the
# CLI's timer jitter); sooner is slow_down.
POLL_GAP = INTERVAL * 0.8

SETTINGS = CLISettings(
    enabled=True,
    session_idle_seconds=3600,
    session_absolute_seconds=86400,
    login_ttl_seconds=LOGIN_TTL,
    device_poll_seconds=INTERVAL,
)
IDS = IdentityIds(key=b"k" * 32, region="us-east-1")
PEOPLE = ("alice@example.com", "bob@example.com")


def browser_session(subject: str) -> WebSession:
    """The person at /device, signed in to the broker's web sign-in."""
    return WebSession.from_json(
        secrets.token_urlsafe(32),
        {
            "provider": "demo",
            "subject": subject,
            "claims": {"sub": subject, "email": subject},
            "token": "upstream-id-token",
            "sts_provider_id": None,
            "token_expires_at": 2_000_000_000,
            "refresh_token": None,
            "csrf_token": "browser-csrf",
            "created_at": 1_900_000_000,
            "last_seen": 1_900_000_000,
        },
    )


# Ways a person types the code the CLI shows ("BCDF-GHJK").
TYPINGS: dict[str, Callable[[str], str]] = {
    "as shown": lambda code: code,
    "lower case": str.lower,
    "no dash": lambda code: code.replace("-", ""),
    "a space": lambda code: code.replace("-", " "),
}
MALFORMED_DEVICE_CODES = [None, "", "short", "x" * 42 + "!", "y" * 44]


# What a call gave: ("session", subject) or ("error", type, status).
Result = tuple[Any, ...]


def refused(cls: type[errors.BrokerError]) -> Result:
    return ("error", cls, cls.status)


EXPIRED = refused(ExpiredDeviceCode)
SLOW_DOWN = refused(SlowDown)
PENDING = refused(AuthorizationPending)
REFUSED = refused(LoginRefused)
NO_SUCH_CODE = refused(errors.BadRequest)


def answer(call: Any, sessions: list[WebSession] | None = None) -> Result:
    """A call's result; a broker error is an answer, anything else escapes. A session
    handed out is also appended to ``sessions``."""
    try:
        got = call()
    except errors.BrokerError as exc:
        return ("error", type(exc), exc.status)
    if isinstance(got, WebSession):
        if sessions is not None:
            sessions.append(got)
        return ("session", got.subject)
    return ("ok", got)


def named(result: Result) -> str:
    """A result's name for ``event``: what the examples reached."""
    return str(result[1].__name__ if result[0] == "error" else result[0])


@dataclass
class Flow:
    device_code: str
    user_code: str  # as the CLI shows it
    expires: float
    status: str = "pending"  # "approved", "denied"
    approver: str | None = None
    answered: bool = False  # the user code is used up
    taken: bool = False  # a poll used the record up (redeemed, or told of the denial)
    poll_until: float = 0.0  # until when the next poll is too soon
    sessions: int = 0


class DeviceFlow(RuleBasedStateMachine):
    def __init__(self, port: int) -> None:
        super().__init__()
        self.clock = whole_second_clock()
        prefix, sealer = f"test:{uuid.uuid4()}:", Sealer([secrets.token_bytes(32)])
        self.clients = [
            redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2) for _ in range(2)
        ]
        # Two broker nodes on one Redis: the CLI's polls may land on either.
        self.nodes = []
        for client in self.clients:
            store = Store(client=client, prefix=prefix, sealer=sealer)
            sessions = SessionStore(
                store=store,
                idle_seconds=SETTINGS.session_idle_seconds,
                absolute_seconds=SETTINGS.session_absolute_seconds,
                namespace="cli-session",
                clock=self.clock,
            )
            self.nodes.append(
                CLIAuth(
                    store=store,
                    settings=SETTINGS,
                    sessions=sessions,
                    identity_ids=IDS,
                    clock=self.clock,
                )
            )
        self.store = self.nodes[0]._store
        self.time = RedisTime(self.clients[0], prefix, self.clock)
        self.flows: list[Flow] = []

    def teardown(self) -> None:
        for client in self.clients:
            client.close()

    def _flow(self, i: int) -> Flow:
        return self.flows[i % len(self.flows)]

    # -- the model ------------------------------------------------------------------

    def expect_poll(self, flow: Flow) -> Result:
        now = self.clock()
        if flow.taken or now >= flow.expires:
            return EXPIRED
        if now < flow.poll_until:
            return SLOW_DOWN
        flow.poll_until = now + POLL_GAP
        if flow.status == "pending":
            return PENDING
        flow.taken = True
        if flow.status == "denied":
            return REFUSED
        assert flow.approver is not None
        return ("session", flow.approver)

    def waiting_for(self, typed: str) -> Flow | None:
        """The flow a user code (as typed) answers, if one waits for it."""
        code = normalize_user_code(typed)
        now = self.clock()
        for flow in self.flows:
            if normalize_user_code(flow.user_code) == code:
                return flow if not flow.answered and now < flow.expires else None
        return None

    # -- checks on each answer ------------------------------------------------------

    def check_poll(self, flow: Flow, got: Result, before: Flow) -> None:
        """``before``: the flow as it was when the poll was made."""
        now = self.clock()
        kind, *rest = got
        if kind == "error":
            assert 400 <= rest[1] < 500, f"a poll answered {rest[1]}"
        if now >= flow.expires:
            assert got == EXPIRED, f"{got} for an expired device code"
        elif not before.taken and now < before.poll_until:
            assert got == SLOW_DOWN, f"{got} for a poll sooner than the interval allows"
        if kind != "session":
            return
        flow.sessions += 1
        assert flow.sessions == 1, "a device code was redeemed twice"
        assert before.status == "approved", f"a session for a {before.status} device code"
        assert now >= before.poll_until, "a poll sooner than the interval was redeemed"
        assert rest[0] == before.approver, "the session is not the approver's"

    # -- operations -----------------------------------------------------------------

    @rule(node=st.integers(0, 1))
    def start(self, node: int) -> None:
        started = self.nodes[node].start_device()
        assert started.expires_in == LOGIN_TTL
        assert started.interval == INTERVAL
        assert format_user_code(normalize_user_code(started.user_code)) == started.user_code
        assert all(flow.user_code != started.user_code for flow in self.flows)
        self.flows.append(Flow(started.device_code, started.user_code, self.clock() + LOGIN_TTL))

    @precondition(lambda self: self.flows)
    @rule(i=st.integers(0, 7), node=st.integers(0, 1), times=st.integers(1, 2))
    def the_cli_polls(self, i: int, node: int, times: int) -> None:
        flow = self._flow(i)
        for _ in range(times):  # twice: a CLI that does not wait
            before = replace(flow)
            expected = self.expect_poll(flow)
            handed: list[WebSession] = []
            got = answer(lambda: self.nodes[node].poll_device(flow.device_code), handed)
            event(f"poll: {named(got)}")
            self.check_poll(flow, got, before)
            assert got == expected
            for ws in handed:
                # A CLI session of its own, that every node knows.
                loaded = self.nodes[1 - node].sessions.load(ws.session_id)
                assert loaded is not None
                assert loaded.subject == flow.approver

    @precondition(lambda self: self.flows)
    @rule(i=st.integers(0, 7))
    def two_clis_poll_at_once(self, i: int) -> None:
        flow = self._flow(i)
        before = replace(flow)
        first = self.expect_poll(flow)
        # The other poll finds the record before or after the first one used it up.
        if first[0] == "session" or first == REFUSED:
            others = {SLOW_DOWN, EXPIRED}
        elif first == EXPIRED:
            others = {EXPIRED}
        else:
            others = {SLOW_DOWN}
        results: list[Result] = []
        crashes: list[BaseException] = []
        start = threading.Barrier(2)

        def poll(node: int) -> None:
            try:
                start.wait(5)
                results.append(answer(lambda: self.nodes[node].poll_device(flow.device_code)))
            except BaseException as exc:  # re-raised below
                crashes.append(exc)

        threads = [threading.Thread(target=poll, args=(n,), daemon=True) for n in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        if crashes:
            raise crashes[0]
        assert len(results) == 2
        for got in results:
            event(f"two polls at once: {named(got)}")
            self.check_poll(flow, got, before)
        assert first in results, f"{results}, expected {first} from one of them"
        rest = list(results)
        rest.remove(first)
        assert rest[0] in others, f"{rest[0]}, expected one of {others}"

    @precondition(lambda self: self.flows)
    @rule(
        i=st.integers(0, 7),
        approve=st.booleans(),
        who=st.sampled_from(PEOPLE),
        typing=st.sampled_from(sorted(TYPINGS)),
        node=st.integers(0, 1),
    )
    def the_person_answers(self, i: int, approve: bool, who: str, typing: str, node: int) -> None:
        flow = self._flow(i)
        typed = TYPINGS[typing](flow.user_code)
        was = flow.status
        waiting = self.waiting_for(typed)
        auth = self.nodes[node]
        # GET /device shows the code only while a sign-in waits for it.
        shown = answer(lambda: auth.pending_device(typed))
        assert shown == (NO_SUCH_CODE if waiting is None else ("ok", shown[1]))
        got = answer(
            lambda: auth.decide_device(browser_session(who), user_code=typed, approve=approve)
        )
        event(f"the person answers a {was} code: {named(got)}")
        if waiting is None:
            assert got == NO_SUCH_CODE, f"an answer to a {was} code was taken: {got}"
            assert flow.status == was  # denial and approval are final
            return
        assert got == ("ok", None)
        waiting.answered = True
        waiting.status = "approved" if approve else "denied"
        waiting.approver = who if approve else None

    @rule(typed=st.text(alphabet=USER_CODE_ALPHABET, min_size=8, max_size=8))
    def someone_types_an_unknown_code(self, typed: str) -> None:
        if self.waiting_for(typed) is not None:
            return  # by chance a live one: the rule above covers it
        got = answer(
            lambda: self.nodes[0].decide_device(
                browser_session(PEOPLE[1]), user_code=typed, approve=True
            )
        )
        assert got == NO_SUCH_CODE

    @rule(malformed=st.sampled_from(["", "BCDF", "BCDF-GHJA", "ÄBCD-GHJK", "BCDF_GHJK"]))
    def someone_types_a_malformed_code(self, malformed: str) -> None:
        got = answer(
            lambda: self.nodes[0].decide_device(
                browser_session(PEOPLE[1]), user_code=malformed, approve=True
            )
        )
        assert got == NO_SUCH_CODE

    @rule(code=st.sampled_from([*MALFORMED_DEVICE_CODES, "unknown"]))
    def a_cli_polls_with_a_code_it_was_never_given(self, code: str | None) -> None:
        if code == "unknown":
            got = answer(lambda: self.nodes[0].poll_device(secrets.token_urlsafe(32)))
            assert got == EXPIRED
        else:
            got = answer(lambda: self.nodes[0].poll_device(code))
            assert got == NO_SUCH_CODE

    @rule(seconds=st.sampled_from([1, 2, 3, 4, 5, 10, 60, 299, 300, 595, 600]))
    def advance(self, seconds: int) -> None:
        self.time.advance(seconds)

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def redis_holds_what_the_model_says(self) -> None:
        self.time.settle()
        now = self.clock()
        ttls = self.time.ttls()  # and every key has a TTL
        kinds = ("cli-device:", "cli-user-code:", "cli-poll:")
        expected: dict[str, float] = {}
        for flow in self.flows:
            digest = _digest(flow.device_code)
            device_key = self.store.key("cli-device", digest)
            if flow.taken:
                assert device_key not in ttls, (
                    f"a used-up ({flow.status}) device code is still in Redis: "
                    "it could be redeemed again"
                )
            if not flow.taken and now < flow.expires:
                expected[device_key] = flow.expires - now
                record = self.store.get_sealed(device_key)
                assert isinstance(record, dict)
                assert record["status"] == flow.status
            code_key = self.store.key("cli-user-code", normalize_user_code(flow.user_code))
            if flow.answered:
                assert code_key not in ttls, (
                    f"the user code of a {flow.status} sign-in can be answered again"
                )
            if not flow.answered and now < flow.expires:
                expected[code_key] = flow.expires - now
                assert self.store.get_flag(code_key) == digest
            if now < flow.poll_until:
                expected[self.store.key("cli-poll", digest)] = flow.poll_until - now
            assert flow.sessions <= 1
        found = {
            key: ttl
            for key, ttl in ttls.items()
            if key.removeprefix(self.store.prefix).startswith(kinds)
        }
        assert found == expected


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture(scope="module")
def port(redis_proc: ManagedProcess) -> int:
    return redis_proc.port


def test_the_device_flow_keeps_its_invariants_in_every_state(port: int) -> None:
    run_state_machine_as_test(
        lambda: DeviceFlow(port),  # type: ignore[arg-type]
        settings=settings(
            max_examples=200,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
