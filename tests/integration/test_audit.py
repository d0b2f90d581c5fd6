"""Refusals are audited, and every request carries an id.

A live broker on a real socket (the dev stack: redis-server, moto, the OIDC provider,
the Login with Amazon / Facebook stand-ins), its log written by the broker's own JSON
writer and read back as lines:

* one ``authentication_failed`` or ``access_denied`` event per refusal, from every door
  (JSON API, console sign-in, browser session), naming the reason, the provider and the
  identity id when known, the client address and the request id; never the token;
* ``X-Request-Id``: a well-formed one is echoed, anything else replaced by a fresh id;
  the id is on every answer (replayed ones included), in every error body and in the
  log lines written for the request.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from broker import logs
from broker.devstack.processes import free_port
from broker.devstack.stack import ADMIN_ROLE, DEV_PROVIDER, USER_ROLE, Stack
from broker.settings import Settings, settings_from_mapping
from tests.conftest import LiveBroker, serve
from tests.integration.test_sso_flow import WebClient
from tests.unit.test_sts import Answer, FakeSTS, error_document

pytestmark = pytest.mark.integration

CREDENTIALS = "/v1/credentials"
MINTED = re.compile(r"[0-9a-f]{32}")
Lines = Callable[[], list[dict[str, Any]]]


def settings_for(stack: Stack, url: str, **sections: dict[str, Any]) -> Settings:
    config = stack.config(url, social=True)
    config["redis"]["key_prefix"] = f"audit-{secrets.token_hex(4)}:"
    config["rate_limit"] = {"per_ip_per_minute": 0, "per_identity_per_minute": 0}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return settings_from_mapping(config, env={}, base_dir=Path.cwd(), source="test")


def live(stack: Stack, **sections: dict[str, Any]) -> Iterator[LiveBroker]:
    port = free_port()
    with serve(settings_for(stack, f"http://127.0.0.1:{port}", **sections), stack, port) as live:
        yield live


@pytest.fixture(scope="module")
def broker(stack: Stack) -> Iterator[LiveBroker]:
    yield from live(stack)


@pytest.fixture(scope="module")
def fake_sts() -> Iterator[FakeSTS]:
    server = FakeSTS()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def refusing_sts_broker(stack: Stack, fake_sts: FakeSTS) -> Iterator[LiveBroker]:
    """STS is a local server answering with the error each test scripts."""
    yield from live(stack, sts={"endpoint_url": fake_sts.url, "max_attempts": 1})


@pytest.fixture(scope="module")
def limited_broker(stack: Stack) -> Iterator[LiveBroker]:
    yield from live(stack, rate_limit={"per_ip_per_minute": 1})


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    """The JSON lines the broker's log writer writes during the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sink = io.StringIO()
    logs.configure("info", stream=sink)

    def read() -> list[dict[str, Any]]:
        logs.stop()  # writes out everything queued
        lines = [json.loads(line) for line in sink.getvalue().splitlines()]
        sink.seek(0)
        sink.truncate()
        logs.configure("info", stream=sink)
        return lines

    yield read
    logs.stop()
    root.handlers[:] = handlers
    root.setLevel(level)


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "bob"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


# --------------------------------------------------------------------------- refusals


@dataclass(frozen=True)
class Refusal:
    event: str
    reason: str
    status: int
    provider: str | None
    subject: str | None  # whose identity id the event must name (None: not known)
    # (broker, stack, fake STS) -> (token sent, the answer)
    send: Callable[[LiveBroker, Stack, FakeSTS], tuple[str, requests.Response]]
    broker: str = "broker"


def _api(live: LiveBroker, provider: str, token: str, **fields: Any) -> requests.Response:
    return live.post(CREDENTIALS, {"provider": provider, "token": token, **fields})


def _demo(user: str, **fields: Any) -> Callable[[LiveBroker, Stack, FakeSTS], Any]:
    def send(live: LiveBroker, _stack: Stack, _sts: FakeSTS) -> tuple[str, requests.Response]:
        token = live.id_token(user)
        return token, _api(live, DEV_PROVIDER, token, **fields)

    return send


def _tampered_token(live: LiveBroker, _stack: Stack, _sts: FakeSTS) -> tuple[str, Any]:
    token = _tampered(live.id_token("alice"))
    return token, _api(live, DEV_PROVIDER, token)


def _expired_facebook(_live: LiveBroker, stack: Stack, _sts: FakeSTS) -> tuple[str, Any]:
    token = stack.social.facebook.mint("alice", expires_in=-5)
    return token, _api(_live, "facebook", token)


def _unknown_provider(live: LiveBroker, _stack: Stack, _sts: FakeSTS) -> tuple[str, Any]:
    token = live.id_token("alice")
    return token, _api(live, "no-such-provider", token)


def _sts_says(code: str, status: int) -> Callable[[LiveBroker, Stack, FakeSTS], Any]:
    def send(live: LiveBroker, _stack: Stack, sts: FakeSTS) -> tuple[str, requests.Response]:
        sts.reset(Answer(status, error_document(code, "refused by the test")))
        token = live.id_token("bob")
        return token, _api(live, DEV_PROVIDER, token)

    return send


def _twice(live: LiveBroker, _stack: Stack, _sts: FakeSTS) -> tuple[str, requests.Response]:
    token = live.id_token("bob")
    first = _api(live, "no-such-provider", token)  # counted, refused for its own reason
    assert first.status_code == 400, first.text
    return token, _api(live, DEV_PROVIDER, token)


def _console(live: LiveBroker, _stack: Stack, _sts: FakeSTS) -> tuple[str, requests.Response]:
    token = live.id_token("mallory")
    return token, live.post("/v1/console-url", {"provider": DEV_PROVIDER, "token": token})


def _browser_csrf(live: LiveBroker, _stack: Stack, _sts: FakeSTS) -> tuple[str, Any]:
    web = WebClient(live)
    web.login("bob")
    response = web.post("/credentials", data={"role_arn": USER_ROLE, "csrf_token": "wrong"})
    web.http.close()
    return "no token in this door", response


REFUSALS = {
    "invalid-token": Refusal(
        "authentication_failed", "invalid_token", 401, DEV_PROVIDER, None, _tampered_token
    ),
    "expired-token": Refusal(
        "authentication_failed", "expired_token", 401, "facebook", None, _expired_facebook
    ),
    "unknown-provider": Refusal(
        "authentication_failed", "unknown_provider", 400, None, None, _unknown_provider
    ),
    "no-matching-rule": Refusal(
        "access_denied", "no_matching_rule", 403, DEV_PROVIDER, "mallory", _demo("mallory")
    ),
    "role-not-allowed": Refusal(
        "access_denied",
        "role_not_allowed",
        403,
        DEV_PROVIDER,
        "bob",
        _demo("bob", role_arn=ADMIN_ROLE),
    ),
    "sts-access-denied": Refusal(
        "access_denied",
        "access_denied",
        403,
        DEV_PROVIDER,
        "bob",
        _sts_says("AccessDenied", 403),
        broker="refusing_sts_broker",
    ),
    "sts-refuses-the-token": Refusal(
        "authentication_failed",
        "invalid_token",
        401,
        DEV_PROVIDER,
        "bob",
        _sts_says("InvalidIdentityToken", 400),
        broker="refusing_sts_broker",
    ),
    "rate-limited": Refusal(
        "access_denied", "rate_limited", 429, None, None, _twice, broker="limited_broker"
    ),
    "console-door": Refusal(
        "access_denied", "no_matching_rule", 403, DEV_PROVIDER, "mallory", _console
    ),
    "browser-door-csrf": Refusal(
        "access_denied", "access_denied", 403, DEV_PROVIDER, "bob", _browser_csrf
    ),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_every_refusal_is_one_audit_event_without_the_token(
    request: pytest.FixtureRequest,
    stack: Stack,
    fake_sts: FakeSTS,
    log_lines: Lines,
    case: Refusal,
) -> None:
    live: LiveBroker = request.getfixturevalue(case.broker)
    token, response = case.send(live, stack, fake_sts)

    assert response.status_code == case.status, response.text
    rid = response.headers["X-Request-Id"]
    lines = log_lines()
    events = [
        line for line in lines if line.get("event") in {"access_denied", "authentication_failed"}
    ]
    mine = [line for line in events if line.get("request_id") == rid]
    assert len(mine) == 1, events
    [event] = mine
    assert event["logger"] == "broker.audit"
    assert event["event"] == case.event
    assert event["reason"] == case.reason
    assert event["status"] == case.status
    assert event["provider"] == case.provider
    expected_id = (
        None
        if case.subject is None
        else live.services.identity_ids.derive(DEV_PROVIDER, case.subject)
    )
    assert event["identity_id"] == expected_id
    assert event["client"] == "127.0.0.1"
    everything = json.dumps(lines)
    for part in token.split("."):
        assert part not in everything


def test_issuance_and_refusal_lines_carry_the_request_id_sent(
    broker: LiveBroker, log_lines: Lines
) -> None:
    token = broker.id_token("bob")
    ok = broker.post(
        CREDENTIALS,
        {"provider": DEV_PROVIDER, "token": token},
        headers={"X-Request-Id": "client-chosen.id_1"},
    )
    assert ok.status_code == 200, ok.text
    assert ok.headers["X-Request-Id"] == "client-chosen.id_1"
    [issued] = [line for line in log_lines() if line.get("event") == "credentials_issued"]
    assert issued["request_id"] == "client-chosen.id_1"


# --------------------------------------------------------------------------- request ids


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        pytest.param("abc-123_DEF.456", True, id="well-formed"),
        pytest.param("x", True, id="one-character"),
        pytest.param("a" * 128, True, id="128-characters"),
        pytest.param(None, False, id="absent"),
        pytest.param("", False, id="empty"),
        pytest.param("a" * 129, False, id="129-characters"),
        pytest.param("has space", False, id="space"),
        pytest.param("<script>alert(1)</script>", False, id="markup"),
        pytest.param("id\u00e9", False, id="non-ascii"),
        pytest.param('quote"d', False, id="quote"),
        pytest.param("a/b", False, id="slash"),
    ],
)
@pytest.mark.parametrize("path", ["/healthz", "/no-such-page", CREDENTIALS])
def test_request_ids_are_echoed_when_well_formed_else_minted(
    broker: LiveBroker, sent: str | None, echoed: bool, path: str
) -> None:
    headers = {} if sent is None else {"X-Request-Id": sent.encode()}
    response = requests.post(f"{broker.url}{path}", headers=headers, json={}, timeout=10)
    rid = response.headers["X-Request-Id"]
    if echoed:
        assert rid == sent
    else:
        assert MINTED.fullmatch(rid), rid
        assert not sent or sent not in response.text
    if response.status_code >= 400:
        assert response.json()["request_id"] == rid


def test_minted_ids_differ_per_request(broker: LiveBroker) -> None:
    ids = {
        requests.get(f"{broker.url}/healthz", timeout=10).headers["X-Request-Id"] for _ in range(5)
    }
    assert len(ids) == 5


def test_a_replayed_answer_carries_its_own_request_id(broker: LiveBroker) -> None:
    body = {"provider": DEV_PROVIDER, "token": broker.id_token("carol")}
    first = broker.post(CREDENTIALS, body, headers={"X-Request-Id": "first"})
    again = broker.post(CREDENTIALS, body, headers={"X-Request-Id": "second"})
    minted = broker.post(CREDENTIALS, body)
    assert first.status_code == again.status_code == minted.status_code == 200, minted.text
    assert again.content == first.content  # the replay, byte for byte
    assert first.headers["X-Request-Id"] == "first"
    assert again.raw.headers.getlist("X-Request-Id") == ["second"]
    assert MINTED.fullmatch(minted.headers["X-Request-Id"])
