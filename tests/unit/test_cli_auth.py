"""The CLI sign-in grants (broker.cli_auth) on a real redis-server: every rejection is
a row, every one-time value is used up once."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import pytest

from broker import errors
from broker.cli_auth import (
    AuthorizationPending,
    CLIAuth,
    ExpiredDeviceCode,
    InvalidGrant,
    LoginRefused,
    SlowDown,
    check_challenge,
    check_loopback_redirect,
    check_state,
    normalize_user_code,
    s256,
)
from broker.identity import IdentityIds
from broker.sessions import SessionStore, WebSession
from broker.settings import CLISettings
from broker.store import Store

REDIRECT = "http://127.0.0.1:53682/callback"


@pytest.fixture
def auth(store: Store) -> CLIAuth:
    settings = CLISettings(
        enabled=True,
        session_idle_seconds=3600,
        session_absolute_seconds=86400,
        login_ttl_seconds=600,
        device_poll_seconds=1,
    )
    sessions = SessionStore(
        store=store, idle_seconds=3600, absolute_seconds=86400, namespace="cli-session"
    )
    ids = IdentityIds(key=b"k" * 32, region="us-east-1")
    return CLIAuth(store=store, settings=settings, sessions=sessions, identity_ids=ids)


def browser_session(**changes: Any) -> WebSession:
    data: dict[str, Any] = {
        "provider": "demo",
        "subject": "alice@example.com",
        "claims": {"sub": "alice@example.com", "email": "alice@example.com"},
        "token": "upstream-id-token",
        "sts_provider_id": None,
        "token_expires_at": 2_000_000_000,
        "refresh_token": None,
        "csrf_token": "browser-csrf",
        "created_at": 1_900_000_000,
        "last_seen": 1_900_000_000,
    }
    data.update(changes)
    return WebSession.from_json("browser-session-id", data)


@pytest.mark.parametrize(
    "uri",
    [
        None,
        "",
        "https://127.0.0.1:5000/cb",  # not plain http: RFC 8252 loopback is http
        "http://evil.example:5000/cb",
        "http://127.0.0.1.evil.example:5000/cb",
        "http://10.0.0.1:5000/cb",
        "http://127.0.0.1/cb",  # no port
        "http://user@127.0.0.1:5000/cb",
        "http://127.0.0.1:5000/cb#frag",
        "http://127.0.0.1:99999/cb",
        "javascript:alert(1)",
        "//127.0.0.1:5000/cb",
        "http://127.0.0.1:5000\\@evil.example/",
        "http://localhost:5000/cb",  # RFC 8252 8.3: IP literals, not a name
        "http://" + "a" * 3000,
    ],
)
def test_only_a_loopback_redirect_with_a_port_is_accepted(uri: str | None) -> None:
    with pytest.raises(errors.BadRequest):
        check_loopback_redirect(uri)


@pytest.mark.parametrize(
    "uri", ["http://127.0.0.1:5000/callback", "http://[::1]:80/x", "http://127.8.9.10:8/"]
)
def test_loopback_redirects_are_accepted(uri: str) -> None:
    assert check_loopback_redirect(uri) == uri


@pytest.mark.parametrize(
    ("challenge", "method"),
    [
        (s256("x" * 43), "plain"),
        (s256("x" * 43), None),
        ("short", "S256"),
        ("=" * 43, "S256"),
        (None, "S256"),
    ],
)
def test_pkce_challenge_must_be_s256(challenge: str | None, method: str | None) -> None:
    with pytest.raises(errors.BadRequest):
        check_challenge(challenge, method)


@pytest.mark.parametrize("state", [None, "", "s" * 513])
def test_state_is_required_and_bounded(state: str | None) -> None:
    with pytest.raises(errors.BadRequest):
        check_state(state)


def test_a_loopback_code_becomes_a_cli_session_once(auth: CLIAuth) -> None:
    verifier = secrets.token_urlsafe(64)
    code = auth.authorize(browser_session(), redirect_uri=REDIRECT, code_challenge=s256(verifier))
    ws = auth.exchange_code(code=code, code_verifier=verifier, redirect_uri=REDIRECT)
    assert ws.subject == "alice@example.com"
    assert ws.session_id != "browser-session-id"
    assert ws.csrf_token != "browser-csrf"
    assert auth.sessions.load(ws.session_id) is not None
    with pytest.raises(InvalidGrant):
        auth.exchange_code(code=code, code_verifier=verifier, redirect_uri=REDIRECT)


@pytest.mark.parametrize(
    ("verifier_override", "redirect_override", "message"),
    [
        ("v" * 60, None, "code_verifier does not match"),
        (None, "http://127.0.0.1:1/other", "redirect_uri does not match"),
    ],
)
def test_a_wrong_verifier_or_redirect_uses_the_code_up(
    auth: CLIAuth, verifier_override: str | None, redirect_override: str | None, message: str
) -> None:
    verifier = secrets.token_urlsafe(64)
    code = auth.authorize(browser_session(), redirect_uri=REDIRECT, code_challenge=s256(verifier))
    with pytest.raises(InvalidGrant, match=message):
        auth.exchange_code(
            code=code,
            code_verifier=verifier_override or verifier,
            redirect_uri=redirect_override or REDIRECT,
        )
    # The right values afterwards do not help: the first presentation used the code.
    with pytest.raises(InvalidGrant):
        auth.exchange_code(code=code, code_verifier=verifier, redirect_uri=REDIRECT)


@pytest.mark.parametrize(
    ("code", "verifier", "error"),
    [
        (None, "v" * 43, errors.BadRequest),
        ("", "v" * 43, errors.BadRequest),
        ("c" * 200, "v" * 43, errors.BadRequest),
        ("unknown-code", "v" * 43, InvalidGrant),
        ("unknown-code", "short", errors.BadRequest),
        ("unknown-code", "v" * 129, errors.BadRequest),
        ("unknown-code", "bad verifier with spaces" * 3, errors.BadRequest),
    ],
)
def test_malformed_token_requests_are_refused(
    auth: CLIAuth, code: str | None, verifier: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        auth.exchange_code(code=code, code_verifier=verifier, redirect_uri=REDIRECT)


@pytest.mark.parametrize(
    "typed", ["", "ABC", "BCDF-GHJ", "BCDF-GHJA", "bcdf ghjk x", "BCDF_GHJK", "ÄBCD-GHJK"]
)
def test_user_codes_are_checked(typed: str) -> None:
    with pytest.raises(errors.BadRequest):
        normalize_user_code(typed)


def test_user_codes_ignore_case_and_separators() -> None:
    assert normalize_user_code("bcdf ghjk") == normalize_user_code("BCDF-GHJK") == "BCDFGHJK"


def test_the_device_grant_waits_then_hands_out_one_session(auth: CLIAuth, store: Store) -> None:
    started = auth.start_device()
    assert started.interval == 1
    with pytest.raises(AuthorizationPending):
        auth.poll_device(started.device_code)
    with pytest.raises(SlowDown):
        auth.poll_device(started.device_code)  # at once again: too fast
    store.delete(store.key("cli-poll", _digest(started.device_code)))
    auth.decide_device(browser_session(), user_code=started.user_code, approve=True)
    ws = auth.poll_device(started.device_code)
    assert ws.subject == "alice@example.com"
    store.delete(store.key("cli-poll", _digest(started.device_code)))
    with pytest.raises(ExpiredDeviceCode):
        auth.poll_device(started.device_code)  # used up
    with pytest.raises(errors.BadRequest):
        auth.decide_device(browser_session(), user_code=started.user_code, approve=True)


def test_a_refused_device_grant_says_so(auth: CLIAuth) -> None:
    started = auth.start_device()
    auth.decide_device(browser_session(), user_code=started.user_code, approve=False)
    with pytest.raises(LoginRefused):
        auth.poll_device(started.device_code)


@pytest.mark.parametrize("device_code", [None, "", "short", "x" * 43 + "!", "y" * 43])
def test_unknown_or_malformed_device_codes_are_refused(
    auth: CLIAuth, device_code: str | None
) -> None:
    with pytest.raises((errors.BadRequest, ExpiredDeviceCode)):
        auth.poll_device(device_code)


def test_device_state_in_redis_holds_no_device_code(auth: CLIAuth, store: Store) -> None:
    started = auth.start_device()
    keys = store.client.keys(store.prefix + "*")
    assert len(keys) >= 2  # the pending grant and its user code, at least
    for key in keys:
        value = store.client.get(key) if store.client.type(key) == b"string" else b""
        assert started.device_code.encode() not in (value or b"")
        assert started.device_code.encode() not in key


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def test_an_operator_can_end_every_cli_session_of_an_identity(auth: CLIAuth) -> None:
    made = []
    for _ in range(3):
        verifier = secrets.token_urlsafe(64)
        code = auth.authorize(
            browser_session(), redirect_uri=REDIRECT, code_challenge=s256(verifier)
        )
        made.append(auth.exchange_code(code=code, code_verifier=verifier, redirect_uri=REDIRECT))
    other_code_verifier = secrets.token_urlsafe(64)
    other = auth.exchange_code(
        code=auth.authorize(
            browser_session(subject="bob@example.com"),
            redirect_uri=REDIRECT,
            code_challenge=s256(other_code_verifier),
        ),
        code_verifier=other_code_verifier,
        redirect_uri=REDIRECT,
    )
    alice = IdentityIds(key=b"k" * 32, region="us-east-1").derive("demo", "alice@example.com")
    assert auth.revoke(alice) == 3
    assert all(auth.sessions.load(ws.session_id) is None for ws in made)
    assert auth.sessions.load(other.session_id) is not None  # bob's is untouched
    assert auth.revoke(alice) == 0
