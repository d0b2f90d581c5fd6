"""Browser and CLI sessions as a state machine (broker.sessions, broker.cli_auth).

States of one session id: **active** (used within the idle timeout, inside its absolute
lifetime), **idle-expired**, **absolute-expired**, **renewed** (its upstream token was
refreshed: same id, same creation time, so the same absolute end), **rotated away**
(the browser signed in again and its old id was destroyed), **logged out**, **revoked**
(an operator ended every CLI session of the identity; browser sessions are not
revocable) and **lost** (Redis flushed). A browser session and a CLI session are the
same record under different key namespaces, each with its own lifetimes.

A hypothesis stateful test drives browser sign-ins (``begin_session``, as the callback
does), CLI sign-ins over HTTP (``/cli/authorize`` then ``/v1/cli/token``), uses over
HTTP (``/v1/session``, ``/v1/cli/session``) and straight on the store, upstream-token
refreshes (``WebSSO.renew``) against the Login with Amazon stand-in, which hands out a
new refresh token on every refresh, the clock, sign-outs, revocation, forged and
crossed ids, a request that writes a session back after it ended, and a Redis flush,
on a real redis-server and the real app. It keeps a plain model: per id, its kind,
owner, times and why it ended. After every step:

1. an ended session is refused in both namespaces, and stays refused;
2. a live session's record in Redis has the model's creation time, last-use time and
   refresh token (a renewal never moves the creation time, so never the absolute end;
   the refresh token it replaced is gone), and its Redis TTL is at most
   ``min(idle, absolute remaining)`` as of its last write;
3. every refusal is a broker error with a 4xx status (401 for a session that is gone),
   never a 500 or a bare exception, and every answer about a live session agrees with
   the model (whose it is, when it ends);
4. (checked where it is staged) a late write never brings an ended session back.

The broker never hands a refresh token to a client: the session id is the only bearer
secret, and it changes only at a new sign-in (rotation), never on a refresh.

Redis TTLs run on the real clock and the broker's checks on the fake one, so a session
last written with only seconds of absolute lifetime left may vanish in real time; the
model accepts that, and only that, as an early end.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import requests
from flask import Flask, make_response
from flask.testing import FlaskClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from werkzeug.test import TestResponse

from broker import errors
from broker.app import create_app
from broker.cli_auth import CODE_GRANT, s256
from broker.devstack.processes import ManagedProcess
from broker.devstack.social_servers import (
    AMAZON_DEMO_USERS,
    LWA_TOKEN_SECONDS,
    FakeLoginWithAmazon,
    start_amazon_server,
)
from broker.providers.amazon import AmazonProvider
from broker.services import Services
from broker.sessions import (
    EXTENSION_KEY,
    TOKEN_EXPIRY_MARGIN_SECONDS,
    TOUCH_INTERVAL_SECONDS,
    SessionStore,
    WebSession,
    WebSSO,
    begin_session,
)
from broker.settings import AmazonProviderSettings, settings_from_mapping
from broker.sts import iso_utc
from tests.unit.oidc_fixtures import FakeClock

KEY = base64.b64encode(b"k" * 32).decode()
ADMIN_TOKEN = "admin-" + "t" * 40
LOOPBACK = "http://127.0.0.1:53682/callback"
# Lifetimes short enough that a run meets every state: the upstream token (one hour)
# expires inside a busy browser session, and a CLI session outlives its browser one.
WEB_IDLE, WEB_ABSOLUTE = 600, 7200
CLI_IDLE, CLI_ABSOLUTE = 1800, 10800
LIFETIMES = {"web": (WEB_IDLE, WEB_ABSOLUTE), "cli": (CLI_IDLE, CLI_ABSOLUTE)}
# A write that left less than this much Redis TTL may expire in real time before the
# next step looks (see the module docstring).
FRAGILE_TTL_SECONDS = 30
USERS = {u.key: u for u in AMAZON_DEMO_USERS if u.key in ("alice", "bob")}
MALFORMED_IDS = ["", "short", "x" * 42, "x" * 44, "a" * 42 + "=", "a" * 42 + "/", "." * 43]


@dataclass
class World:
    """What every example shares: the app, its services and the stand-in, all on one
    redis-server and one fake clock (reset per example)."""

    app: Flask
    http: FlaskClient
    services: Services
    sso: WebSSO
    amazon: FakeLoginWithAmazon
    clock: FakeClock
    redis: redis.Redis


def broker_settings(amazon: FakeLoginWithAmazon, redis_port: int) -> dict[str, Any]:
    client_id, secret = next(iter(amazon.clients.items()))
    return {
        "security": {"identity_key": KEY, "encryption_keys": [KEY]},
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "key_prefix": "sessions:"},
        "providers": {
            "amazon": {
                "type": "amazon",
                "client_ids": [client_id],
                "client_secret": secret,
                "api_url": amazon.url,
                "authorize_url": f"{amazon.url}/ap/oa",
                "timeout_seconds": 5,
            }
        },
        "rules": [
            {
                "name": "readers",
                "providers": ["amazon"],
                "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
                "roles": ["arn:aws:iam::123456789012:role/Reader"],
            }
        ],
        "web": {
            "session_idle_seconds": WEB_IDLE,
            "session_absolute_seconds": WEB_ABSOLUTE,
            "cookie_secure": False,
        },
        "cli": {"session_idle_seconds": CLI_IDLE, "session_absolute_seconds": CLI_ABSOLUTE},
        "rate_limit": {"per_ip_per_minute": 0, "per_identity_per_minute": 0},
        "admin": {"token": ADMIN_TOKEN},
    }


@pytest.fixture(scope="module")
def world(redis_proc: ManagedProcess) -> Iterator[World]:
    clock = FakeClock()
    amazon = start_amazon_server(clock=clock)
    client = redis.Redis(port=redis_proc.port, socket_timeout=2, socket_connect_timeout=2)
    config = settings_from_mapping(broker_settings(amazon, redis_proc.port), env={}, source="test")
    services = Services.build(config, redis_client=client)
    amazon_settings = config.providers["amazon"]
    assert isinstance(amazon_settings, AmazonProviderSettings)
    # The provider's own clock seam: upstream token expiry is read on the fake clock,
    # as the stand-in mints it.
    services.providers = {
        "amazon": AmazonProvider(
            settings=amazon_settings,
            http=services.http,
            store=services.store,
            clock=clock,
        )
    }
    app = create_app(services=services)
    sso = WebSSO(services, clock=clock)
    app.extensions[EXTENSION_KEY] = sso  # what sessions.install() would build, on our clock
    try:
        yield World(
            app=app,
            http=app.test_client(use_cookies=False),
            services=services,
            sso=sso,
            amazon=amazon,
            clock=clock,
            redis=client,
        )
    finally:
        services.close()
        amazon.stop()
        client.close()


def amazon_sign_in(amazon: FakeLoginWithAmazon, user: str) -> tuple[str, str]:
    """An access token and a refresh token, by the authorization code grant."""
    client_id, secret = next(iter(amazon.clients.items()))
    redirect_uri = "http://127.0.0.1:9/callback/amazon"
    answer = requests.get(
        f"{amazon.url}/ap/oa",
        params={
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "response_type": "code",
            "user": user,
            "scope": "profile",
        },
        allow_redirects=False,
        timeout=5,
    )
    code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    tokens = requests.post(
        f"{amazon.url}/auth/o2/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": client_id,
            "client_secret": secret,
        },
        timeout=5,
    ).json()
    return str(tokens["access_token"]), str(tokens["refresh_token"])


@dataclass
class Modelled:
    """What the model knows of one session id."""

    kind: str  # "web" | "cli"
    user: str
    session_id: str
    csrf_token: str
    created_at: int
    last_seen: int
    token_expires_at: int
    refresh_token: str
    held: WebSession  # the copy the client got at sign-in (what a request passes on)
    ttl_at_write: float  # the Redis TTL its last write set, by the documented formula
    ended: str | None = None  # why: idle, absolute, logged out, rotated, revoked, lost

    @property
    def idle(self) -> int:
        return LIFETIMES[self.kind][0]

    @property
    def absolute(self) -> int:
        return LIFETIMES[self.kind][1]

    def ends_at(self) -> int:
        return min(self.created_at + self.absolute, self.last_seen + self.idle)

    def ttl(self, now: float) -> float:
        return max(1.0, min(float(self.idle), self.created_at + self.absolute - now))

    def written(self, now: float) -> None:
        self.ttl_at_write = self.ttl(now)

    def touched(self, now: float) -> None:
        """A successful load: last use is written at most every TOUCH_INTERVAL_SECONDS."""
        if now - self.last_seen >= TOUCH_INTERVAL_SECONDS:
            self.last_seen = int(now)
            self.written(now)

    def age(self, now: float) -> None:
        if self.ended is None and now - self.created_at > self.absolute:
            self.ended = "absolute"
        elif self.ended is None and now - self.last_seen > self.idle:
            self.ended = "idle"


def refusal(exc: BaseException, *allowed: type[errors.BrokerError]) -> None:
    """A refusal is one of the broker's errors, a 4xx, of the kinds expected."""
    assert isinstance(exc, errors.BrokerError), f"a bare {type(exc).__name__}: {exc}"
    assert 400 <= exc.status < 500, f"{type(exc).__name__} is a {exc.status}"
    assert isinstance(exc, allowed), f"{type(exc).__name__}, expected one of {allowed}"


def signed_out(response: TestResponse) -> None:
    assert response.status_code == 401, (response.status_code, response.get_data(as_text=True))
    assert response.get_json()["error"] == "unauthenticated"


class SessionMachine(RuleBasedStateMachine):
    def __init__(self, world: World) -> None:
        super().__init__()
        self.w = world
        world.redis.flushdb()
        world.clock.now = float(int(time.time()))  # whole seconds, as sessions store them
        self.records: list[Modelled] = []
        self.browsers: list[str | None] = [None, None]  # each browser's session cookie
        self.used_codes: list[tuple[str, str]] = []  # (code, verifier) already exchanged
        self.flushed = False

    # -- helpers ------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.w.clock()

    def store_for(self, kind: str) -> SessionStore:
        return self.w.sso.sessions if kind == "web" else self.w.sso.cli_sessions

    def pick(self, index: int, kind: str | None = None) -> Modelled | None:
        chosen = [r for r in self.records if kind is None or r.kind == kind]
        return chosen[index % len(chosen)] if chosen else None

    def pick_live(self, index: int, kind: str) -> Modelled | None:
        self.age_all()
        live = [r for r in self.records if r.ended is None]
        chosen = [r for r in live if r.kind == kind] or live
        return chosen[index % len(chosen)] if chosen else None

    def by_id(self, session_id: str | None) -> Modelled | None:
        return next((r for r in self.records if r.session_id == session_id), None)

    def age_all(self) -> None:
        for record in self.records:
            record.age(self.now)

    def expect_live(self, record: Modelled) -> bool:
        """Whether the model says ``record`` is usable now."""
        record.age(self.now)
        return record.ended is None

    def answered(self, record: Modelled, live: bool) -> None:
        """The code said ``live`` about ``record``: the model must agree (touching it)."""
        expected = self.expect_live(record)
        if expected and not live and record.ttl_at_write <= FRAGILE_TTL_SECONDS:
            record.ended = "redis ttl"  # expired in real time (module docstring)
            return
        assert live == expected, (
            f"{record.kind} session of {record.user}: the code says "
            f"{'live' if live else 'gone'}, the model {record.ended or 'live'} "
            f"(age {self.now - record.created_at:.0f}s, idle {self.now - record.last_seen:.0f}s)"
        )
        if live:
            record.touched(self.now)

    def token_due(self, record: Modelled) -> bool:
        return record.token_expires_at - TOKEN_EXPIRY_MARGIN_SECONDS <= self.now

    def cookie(self, session_id: str | None) -> dict[str, str]:
        return {"Cookie": f"{self.w.sso.cookie_name}={session_id}"} if session_id else {}

    @staticmethod
    def bearer(session_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {session_id}"}

    def identity_id(self, user: str) -> str:
        return self.w.services.identity_ids.derive("amazon", USERS[user].user_id)

    # -- sign-in ------------------------------------------------------------------------

    @initialize(user=st.sampled_from(sorted(USERS)), with_cli=st.booleans())
    def someone_signs_in(self, user: str, with_cli: bool) -> None:
        # Every run starts with a session or two: the states worth exploring follow one.
        self.browser_signs_in(0, user)
        if with_cli:
            self.cli_signs_in_from_the_browser(0)

    @rule(browser=st.integers(0, 1), user=st.sampled_from(sorted(USERS)))
    def browser_signs_in(self, browser: int, user: str) -> None:
        token, refresh = amazon_sign_in(self.w.amazon, user)
        verified = self.w.services.provider("amazon").verify(token)
        old = self.browsers[browser]
        with self.w.app.test_request_context("/callback/amazon", headers=self.cookie(old)):
            ws = begin_session(make_response(), verified, refresh_token=refresh)
        previous = self.by_id(old)
        if previous is not None and self.expect_live(previous):
            previous.ended = "rotated"  # fixation defence: the old id never carries over
        self.browsers[browser] = ws.session_id
        assert ws.created_at == ws.last_seen == int(self.now)
        self.records.append(
            Modelled(
                kind="web",
                user=user,
                session_id=ws.session_id,
                csrf_token=ws.csrf_token,
                created_at=ws.created_at,
                last_seen=ws.last_seen,
                token_expires_at=verified.expires_at,
                refresh_token=refresh,
                held=ws,
                ttl_at_write=min(WEB_IDLE, WEB_ABSOLUTE),
            )
        )

    @precondition(lambda self: any(self.browsers))
    @rule(browser=st.integers(0, 1))
    def cli_signs_in_from_the_browser(self, browser: int) -> None:
        session_id = self.browsers[browser] or next(b for b in self.browsers if b)
        parent = self.by_id(session_id)
        assert parent is not None
        verifier = secrets.token_urlsafe(48)
        answer = self.w.http.post(
            "/cli/authorize",
            headers=self.cookie(session_id),
            data={
                "redirect_uri": LOOPBACK,
                "code_challenge": s256(verifier),
                "code_challenge_method": "S256",
                "state": "s",
                "csrf_token": parent.csrf_token,
                "decision": "approve",
            },
        )
        if answer.status_code == 401:
            self.answered(parent, live=False)
            return
        assert answer.status_code == 303, answer.get_data(as_text=True)
        self.answered(parent, live=True)
        code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
        issued = self.exchange(code, verifier)
        assert issued.status_code == 200, issued.get_data(as_text=True)
        body = issued.get_json()
        now = int(self.now)
        assert body["expires_at"] == iso_utc(min(now + CLI_IDLE, now + CLI_ABSOLUTE))
        assert body["absolute_expires_at"] == iso_utc(now + CLI_ABSOLUTE)
        assert body["identity_id"] == self.identity_id(parent.user)
        session_id = body["session_token"]
        assert session_id != parent.session_id
        held = self.w.sso.cli_sessions.load(session_id)
        assert held is not None
        assert held.last_seen == now
        self.used_codes.append((code, verifier))
        self.records.append(
            Modelled(
                kind="cli",
                user=parent.user,
                session_id=session_id,
                csrf_token=held.csrf_token,
                created_at=now,
                last_seen=now,
                # The CLI session carries the person's upstream token as it was then.
                token_expires_at=parent.token_expires_at,
                refresh_token=parent.refresh_token,
                held=held,
                ttl_at_write=min(CLI_IDLE, CLI_ABSOLUTE),
            )
        )

    def exchange(self, code: str, verifier: str) -> TestResponse:
        """The CLI's half of the loopback sign-in: the code for a CLI session."""
        return self.w.http.post(
            "/v1/cli/token",
            json={
                "grant_type": CODE_GRANT,
                "code": code,
                "code_verifier": verifier,
                "redirect_uri": LOOPBACK,
            },
        )

    @precondition(lambda self: bool(self.used_codes))
    @rule(index=st.integers(0, 50))
    def a_used_cli_code_is_replayed(self, index: int) -> None:
        code, verifier = self.used_codes[index % len(self.used_codes)]
        answer = self.exchange(code, verifier)
        assert answer.status_code == 400
        assert answer.get_json()["error"] == "invalid_grant"

    # -- use ----------------------------------------------------------------------------

    @precondition(lambda self: bool(self.records))
    @rule(index=st.integers(0, 50), over_http=st.booleans())
    def use(self, index: int, over_http: bool) -> None:
        record = self.pick(index)
        assert record is not None
        if not over_http:
            ws = self.store_for(record.kind).load(record.session_id)
            self.answered(record, live=ws is not None)
            if ws is not None:
                assert ws.subject == USERS[record.user].user_id
                assert (ws.created_at, ws.last_seen) == (record.created_at, record.last_seen)
            return
        if record.kind == "web":
            answer = self.w.http.get("/v1/session", headers=self.cookie(record.session_id))
            ends_field = "session_expires_at"
        else:
            answer = self.w.http.get("/v1/cli/session", headers=self.bearer(record.session_id))
            ends_field = "expires_at"
        assert answer.status_code in (200, 401), answer.get_data(as_text=True)
        self.answered(record, live=answer.status_code == 200)
        if answer.status_code == 401:
            signed_out(answer)
            return
        body = answer.get_json()
        assert body["subject"] == USERS[record.user].user_id
        assert body[ends_field] == iso_utc(record.ends_at())
        assert record.ends_at() <= record.created_at + record.absolute

    def work(self) -> None:
        """WEB_IDLE - 10 seconds pass, and then every session is used."""
        self.w.clock.advance(WEB_IDLE - 10)
        for record in self.records:
            ws = self.store_for(record.kind).load(record.session_id)
            self.answered(record, live=ws is not None)

    @precondition(lambda self: bool(self.records))
    @rule(chunks=st.integers(1, 13))
    def someone_keeps_working(self, chunks: int) -> None:
        """Busy sessions: they reach their absolute end and the upstream token's expiry,
        which idle timeouts would otherwise end first."""
        for _ in range(chunks):
            self.work()

    # -- refresh ------------------------------------------------------------------------

    @precondition(lambda self: bool(self.records))
    @rule(
        index=st.integers(0, 50), kind=st.sampled_from(["web", "cli"]), work_until_due=st.booleans()
    )
    def upstream_token_is_refreshed(self, index: int, kind: str, work_until_due: bool) -> None:
        # Working until the token is due is about a session still in use: pick a live one.
        record = (self.pick_live(index, kind) if work_until_due else None) or (
            self.pick(index, kind) or self.pick(index)
        )
        assert record is not None
        while work_until_due and self.expect_live(record) and not self.token_due(record):
            self.work()
        due = self.token_due(record)
        try:
            renewed = self.w.sso.renew(record.held, sessions=self.store_for(record.kind))
        except Exception as exc:  # every refusal is checked, a bare exception fails
            refusal(exc, errors.Unauthenticated)
            self.answered(record, live=False)
            return
        self.answered(record, live=True)
        assert renewed.session_id == record.session_id  # a refresh never rotates the id
        assert renewed.created_at == record.created_at  # so never the absolute end
        assert renewed.last_seen == record.last_seen
        if due:
            assert renewed.token_expires_at == int(self.now) + LWA_TOKEN_SECONDS
            assert renewed.refresh_token not in (None, record.refresh_token)
            record.token_expires_at = renewed.token_expires_at
            record.refresh_token = str(renewed.refresh_token)
            record.written(self.now)
        else:
            # Still valid: nothing was refreshed (another request may have just done it).
            assert renewed.token_expires_at == record.token_expires_at
            assert renewed.refresh_token == record.refresh_token

    # -- time ---------------------------------------------------------------------------

    @rule(
        seconds=st.sampled_from(
            [
                1,
                TOUCH_INTERVAL_SECONDS - 1,
                TOUCH_INTERVAL_SECONDS,
                300,
                WEB_IDLE - 1,
                WEB_IDLE,
                WEB_IDLE + 1,
                CLI_IDLE - 1,
                CLI_IDLE + 1,
                LWA_TOKEN_SECONDS - TOKEN_EXPIRY_MARGIN_SECONDS,
                WEB_ABSOLUTE,
                CLI_ABSOLUTE + 1,
            ]
        )
    )
    def time_passes(self, seconds: int) -> None:
        self.w.clock.advance(seconds)

    # -- ending -------------------------------------------------------------------------

    @rule(browser=st.integers(0, 1), right_csrf=st.booleans())
    def browser_signs_out(self, browser: int, right_csrf: bool) -> None:
        session_id = self.browsers[browser]
        record = self.by_id(session_id)
        csrf = record.csrf_token if record is not None and right_csrf else "wrong"
        answer = self.w.http.post(
            "/logout", headers=self.cookie(session_id), data={"csrf_token": csrf}
        )
        if record is not None and not right_csrf:
            # A forged sign-out form: refused (AccessDenied) while the session lives.
            self.answered(record, live=answer.status_code == 403)
            if answer.status_code == 403:
                return
        assert answer.status_code == 303, answer.get_data(as_text=True)
        if record is not None and right_csrf and self.expect_live(record):
            self.answered(record, live=True)
            record.ended = "logged out"
        self.browsers[browser] = None  # the response cleared the cookie

    @precondition(lambda self: any(r.kind == "cli" for r in self.records))
    @rule(index=st.integers(0, 50))
    def cli_signs_out(self, index: int) -> None:
        record = self.pick(index, "cli")
        assert record is not None
        self.cli_session_signs_out(record)

    def cli_session_signs_out(self, record: Modelled) -> None:
        answer = self.w.http.post("/v1/cli/logout", headers=self.bearer(record.session_id))
        self.answered(record, live=answer.status_code == 200)
        if answer.status_code == 200:
            record.ended = "logged out"
        else:
            signed_out(answer)

    @rule(user=st.sampled_from(sorted(USERS)))
    def operator_revokes(self, user: str) -> None:
        self.age_all()
        cli = [r for r in self.records if r.kind == "cli" and r.user == user]
        live = [r for r in cli if r.ended is None]
        fragile = [r for r in live if r.ttl_at_write <= FRAGILE_TTL_SECONDS]
        answer = self.w.http.post(
            "/v1/cli/revoke",
            headers=self.bearer(ADMIN_TOKEN),
            json={"identity_id": self.identity_id(user)},
        )
        assert answer.status_code == 200, answer.get_data(as_text=True)
        # The invariant below has already dropped every ended session's key.
        revoked = answer.get_json()["revoked_sessions"]
        assert len(live) - len(fragile) <= revoked <= len(live)
        for record in live:
            record.ended = "revoked"

    # Once per run is enough to reach "lost", and leaves the rest of the run for states
    # that take many steps to reach.
    @precondition(lambda self: not self.flushed)
    @rule()
    def redis_is_flushed(self) -> None:
        self.flushed = True
        self.w.redis.flushdb()
        for record in self.records:
            if record.ended is None:
                record.ended = "lost"

    @precondition(lambda self: bool(self.records))
    @rule(
        index=st.integers(0, 50),
        kind=st.sampled_from(["web", "cli"]),
        end=st.sampled_from(["signed out", "revoked", "lost"]),
    )
    def a_slow_request_writes_back_after_the_end(self, index: int, kind: str, end: str) -> None:
        """A request loads a session, the session ends, then the request touches it: the
        write must not bring the session back (SET XX)."""
        record = self.pick_live(index, kind)
        if record is None:
            return
        ws = self.store_for(record.kind).load(record.session_id)
        self.answered(record, live=ws is not None)
        if ws is None:
            return
        if end == "lost" and not self.flushed:
            self.redis_is_flushed()
        elif end == "revoked" and record.kind == "cli":
            self.operator_revokes(record.user)
        elif record.kind == "cli":
            self.cli_session_signs_out(record)
        else:
            self.browser_signs_out(self.browsers.index(record.session_id), right_csrf=True)
        assert record.ended is not None
        late = replace(ws, last_seen=int(self.now))
        assert not self.store_for(record.kind).save(late), f"a {record.ended} session came back"

    # -- ids nobody was given -----------------------------------------------------------

    @rule(
        forged=st.one_of(
            st.sampled_from(MALFORMED_IDS),
            # Well-formed (43 URL-safe characters), never minted.
            st.binary(min_size=32, max_size=32).map(
                lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
            ),
        ),
        kind=st.sampled_from(["web", "cli"]),
    )
    def a_forged_id_is_presented(self, forged: str, kind: str) -> None:
        assert self.store_for(kind).load(forged) is None
        if kind == "web":
            signed_out(self.w.http.get("/v1/session", headers=self.cookie(forged)))
        else:
            signed_out(self.w.http.get("/v1/cli/session", headers=self.bearer(forged)))
            signed_out(self.w.http.post("/v1/cli/logout", headers=self.bearer(forged)))

    @precondition(lambda self: bool(self.records))
    @rule(index=st.integers(0, 50))
    def an_id_is_used_at_the_other_door(self, index: int) -> None:
        """A CLI session id never opens a browser session, nor the other way round."""
        record = self.pick(index)
        assert record is not None
        if record.kind == "web":
            signed_out(self.w.http.get("/v1/cli/session", headers=self.bearer(record.session_id)))
            assert self.w.sso.cli_sessions.load(record.session_id) is None
        else:
            signed_out(self.w.http.get("/v1/session", headers=self.cookie(record.session_id)))
            assert self.w.sso.sessions.load(record.session_id) is None

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def an_ended_session_is_refused_for_good(self) -> None:
        # A load of an ended session deletes its key if time ended it, as any request
        # would; it touches nothing the model tracks.
        self.age_all()
        for record in self.records:
            if record.ended is not None:
                for kind in ("web", "cli"):
                    assert self.store_for(kind).load(record.session_id) is None, (
                        f"{record.kind} session of {record.user} ({record.ended}) "
                        f"opens the {kind} door"
                    )

    @invariant()
    def a_live_session_is_stored_as_the_model_says(self) -> None:
        for record in self.records:
            if record.ended is not None:
                continue
            sessions = self.store_for(record.kind)
            key = sessions.key(record.session_id)
            data = self.w.services.store.get_sealed(key)
            if data is None and record.ttl_at_write <= FRAGILE_TTL_SECONDS:
                record.ended = "redis ttl"
                continue
            assert isinstance(data, dict), f"live {record.kind} session of {record.user} lost"
            stored = WebSession.from_json(record.session_id, data)
            assert (stored.created_at, stored.last_seen) == (record.created_at, record.last_seen)
            assert stored.refresh_token == record.refresh_token
            assert stored.token_expires_at == record.token_expires_at
            assert sessions.expires_at(stored) == record.ends_at()
            assert sessions.expires_at(stored) <= stored.created_at + record.absolute
            ttl_ms = self.w.redis.pttl(key)
            assert 0 < ttl_ms <= record.ttl_at_write * 1000, (ttl_ms, record.ttl_at_write)


def test_sessions_end_when_and_only_when_they_should(world: World) -> None:
    run_state_machine_as_test(
        lambda: SessionMachine(world),  # type: ignore[arg-type]
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
