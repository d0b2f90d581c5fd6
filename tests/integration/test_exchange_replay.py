"""Per-worker replay of identical POST /v1/credentials requests (broker.web.exchange),
against a live broker on the real dev stack."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from broker.devstack.processes import free_port
from broker.devstack.stack import DEV_PROVIDER, Stack
from tests.conftest import LiveBroker, make_settings, serve

pytestmark = pytest.mark.integration

CREDENTIALS = "/v1/credentials"


@pytest.fixture
def start(stack: Stack) -> Iterator[Callable[..., LiveBroker]]:
    with contextlib.ExitStack() as running:

        def start_broker(**overrides: Any) -> LiveBroker:
            port = free_port()
            settings = make_settings(stack, f"http://127.0.0.1:{port}", **overrides)
            return running.enter_context(serve(settings, stack, port))

        yield start_broker


def _body(broker: LiveBroker, user: str = "alice") -> bytes:
    nonce = secrets.token_urlsafe(8)
    token = broker.id_token(user, nonce=nonce)
    return json.dumps({"provider": DEV_PROVIDER, "token": token, "nonce": nonce}).encode()


def _post(broker: LiveBroker, body: bytes, content_type: str = "application/json") -> Any:
    return requests.post(
        f"{broker.url}{CREDENTIALS}",
        data=body,
        headers={"Content-Type": content_type},
        timeout=30,
    )


def _replayed(caplog: pytest.LogCaptureFixture) -> list[bool]:
    """For each credentials_issued audit line so far: was it a replay?"""
    return [
        bool(r.audit.get("replayed"))  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "broker.audit" and getattr(r, "audit", {}).get("event") == "credentials_issued"
    ]


def test_an_identical_request_is_replayed_byte_for_byte_and_audited(
    start: Callable[..., LiveBroker], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.audit")
    broker = start()
    body = _body(broker)

    # Kept on its second sight (a body seen once is only remembered as a digest),
    # replayed from the third.
    first, second, third = _post(broker, body), _post(broker, body), _post(broker, body)

    assert first.status_code == second.status_code == third.status_code == 200
    assert third.content == second.content == first.content
    for header in ("Content-Type", "Cache-Control", "Content-Security-Policy"):
        assert third.headers[header] == first.headers[header]
    assert third.headers["Cache-Control"] == "no-store"
    assert _replayed(caplog) == [False, False, True]


def test_a_body_seen_once_is_not_kept(start: Callable[..., LiveBroker]) -> None:
    broker = start()
    bodies = [_body(broker, user) for user in ("alice", "bob")]

    for body in bodies:
        assert _post(broker, body).status_code == 200
    assert len(broker.services.replays) == 0
    assert _post(broker, bodies[0]).status_code == 200
    assert len(broker.services.replays) == 1


def test_a_different_body_or_content_type_is_not_a_replay(
    start: Callable[..., LiveBroker], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.audit")
    broker = start()
    body = _body(broker)
    assert [_post(broker, body).status_code for _ in range(2)] == [200, 200]

    # Same bytes, but not declared JSON: the normal path refuses it.
    refused = _post(broker, body, content_type="text/plain")
    assert refused.status_code == 400
    # Same request, other formatting: a new key, the full pipeline runs again.
    reformatted = json.dumps(json.loads(body), indent=1).encode()
    again = _post(broker, reformatted)

    assert again.status_code == 200
    assert again.json()["credentials"] == _credentials_of(_post(broker, body))
    assert _replayed(caplog) == [False, False, False, True]


def _credentials_of(response: requests.Response) -> Any:
    assert response.status_code == 200
    return response.json()["credentials"]


def test_failures_are_never_replayed(start: Callable[..., LiveBroker]) -> None:
    broker = start()
    nonce = secrets.token_urlsafe(8)
    token = broker.id_token("alice", nonce=nonce)
    wrong_nonce = json.dumps({"provider": DEV_PROVIDER, "token": token, "nonce": "other"})

    for _ in range(2):
        response = _post(broker, wrong_nonce.encode())
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_token"
    assert len(broker.services.replays) == 0  # nothing remembered


def test_replays_are_still_rate_limited_and_counted_once(
    start: Callable[..., LiveBroker],
) -> None:
    broker = start(rate_limit={"per_ip_per_minute": 0, "per_identity_per_minute": 3})
    body = _body(broker)

    statuses = [_post(broker, body).status_code for _ in range(5)]

    assert statuses == [200, 200, 200, 429, 429]
    limited = _post(broker, body)
    assert limited.json()["error"] == "rate_limited"
    assert limited.headers["Retry-After"] == "60"
    identity_id = _post_identity(broker)
    count = broker.services.store.client.get(
        broker.services.store.key("rate", "identity", identity_id)
    )
    assert isinstance(count, bytes)
    assert int(count) == 6  # one per request: a refused replay is not counted twice


def _post_identity(broker: LiveBroker) -> str:
    return broker.services.identity_ids.derive(DEV_PROVIDER, "alice")


def test_sign_out_drops_this_workers_replays(
    start: Callable[..., LiveBroker], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.audit")
    broker = start()
    body = _body(broker)
    _post(broker, body)
    _post(broker, body)  # kept from here on

    broker.services.forget(_post_identity(broker))
    after = _post(broker, body)

    assert after.status_code == 200
    assert _replayed(caplog) == [False, False, False]


def test_a_replay_lives_no_longer_than_local_seconds(
    start: Callable[..., LiveBroker], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.audit")
    broker = start(cache={"local_seconds": 1})
    body = _body(broker)

    for _ in range(3):
        _post(broker, body)
    time.sleep(1.1)
    _post(broker, body)

    assert _replayed(caplog) == [False, False, True, False]


@pytest.mark.parametrize("cache", [{"replay": False}, {"local_seconds": 0}, {"enabled": False}])
def test_replay_can_be_switched_off(
    start: Callable[..., LiveBroker], caplog: pytest.LogCaptureFixture, cache: dict[str, Any]
) -> None:
    caplog.set_level(logging.INFO, logger="broker.audit")
    broker = start(cache=cache)
    body = _body(broker)

    assert [_post(broker, body).status_code for _ in range(3)] == [200, 200, 200]
    assert _replayed(caplog) == [False, False, False]


def test_a_replay_fails_closed_when_redis_cannot_count_it(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from broker.devstack.redis_server import start_redis

    own_redis = start_redis(tmp_path_factory.mktemp("own-redis"))
    port = free_port()
    settings = make_settings(
        stack,
        f"http://127.0.0.1:{port}",
        redis={"url": f"redis://127.0.0.1:{own_redis.port}/0", "socket_timeout_seconds": 1},
    )
    try:
        with serve(settings, stack, port) as broker:
            body = _body(broker)
            assert _post(broker, body).status_code == 200
            own_redis.stop()

            refused = _post(broker, body)

            assert refused.status_code == 503
            assert refused.json()["error"] == "dependency_unavailable"
    finally:
        own_redis.stop()
