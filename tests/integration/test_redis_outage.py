"""A live broker (real socket, moto STS, the OIDC provider) whose own redis-server is
killed or frozen (SIGSTOP): every route answers 503 with Retry-After, within one
socket timeout, never a 500; credentials STS minted while Redis died are still handed
out; the outage is logged once (then in summaries), never as a traceback per request.
An STS that is unreachable or hangs is a 503 with Retry-After as well.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from werkzeug.serving import BaseWSGIServer, make_server

from broker.app import create_app
from broker.devstack.processes import free_port
from broker.devstack.stack import DEV_PROVIDER, Stack
from broker.services import Services
from broker.sts import AssumeRequest, BotocoreSTS, IssuedCredentials
from tests.conftest import LiveBroker, make_settings
from tests.redis_faults import FaultyRedis

pytestmark = pytest.mark.integration

FAULTS = ["kill", "freeze"]
TIMEOUT = 1.0  # redis.socket_timeout_seconds of these brokers
# Allowed on top of one socket timeout for the HTTP round trip on a loaded machine;
# less than a second timeout, so a request that waits twice still fails.
SLACK = 0.9


class HookedSTS:
    """The real STS (moto); ``during`` runs while the request holds the lock, just
    before the STS call."""

    def __init__(self, real: BotocoreSTS) -> None:
        self.real = real
        self.during: Callable[[], None] | None = None

    def assume_role_with_web_identity(self, request: AssumeRequest) -> IssuedCredentials:
        if self.during is not None:
            self.during()
        return self.real.assume_role_with_web_identity(request)


@dataclass
class Broker:
    live: LiveBroker
    sts: HookedSTS
    cookies: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.live.url

    def wait_ready(self) -> None:
        """Redis answers and the broker knows it (a probe closed its breaker)."""
        deadline = time.monotonic() + 15
        while requests.get(f"{self.url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the broker never saw Redis come back"
            time.sleep(0.1)


def start(stack: Stack, redis: FaultyRedis, *, limits: bool) -> Iterator[Broker]:
    port = free_port()
    overrides: dict[str, Any] = {
        "redis": {"url": redis.url, "socket_timeout_seconds": TIMEOUT},
    }
    if not limits:
        overrides["rate_limit"] = {"per_ip_per_minute": 0, "per_identity_per_minute": 0}
        # No worker memory either: every request must ask Redis for the credentials.
        overrides["cache"] = {"local_seconds": 0}
    settings = make_settings(stack, f"http://127.0.0.1:{port}", **overrides)
    real = BotocoreSTS(settings.sts)
    sts = HookedSTS(real)
    services = Services.build(settings, sts=sts)
    server: BaseWSGIServer = make_server("127.0.0.1", port, create_app(services=services), True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Broker(LiveBroker(f"http://127.0.0.1:{port}", settings, services, stack), sts)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        services.close()
        real.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyRedis]:
    server = FaultyRedis(tmp_path_factory.mktemp("faulty-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def limited(stack: Stack, redis_server: FaultyRedis) -> Iterator[Broker]:
    """Default settings: the per-address rate limit asks Redis before anything else."""
    yield from start(stack, redis_server, limits=True)


@pytest.fixture(scope="module")
def unlimited(stack: Stack, redis_server: FaultyRedis) -> Iterator[Broker]:
    """No rate limits: requests reach the deeper Redis calls (sessions, login state,
    the credential cache)."""
    yield from start(stack, redis_server, limits=False)


@pytest.fixture(autouse=True)
def redis_back(redis_server: FaultyRedis) -> Iterator[None]:
    redis_server.restore()
    yield
    redis_server.restore()


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    json: bool  # answers in the broker's JSON shape (else the HTML error page)
    body: Callable[[Broker], dict[str, Any]] | None = None
    form: dict[str, str] | None = None
    session: bool = False  # send a session cookie (any well-formed id: Redis is asked)
    without_limits: int = 503  # the status when no rate limit asks Redis first


def token_body(b: Broker) -> dict[str, Any]:
    return {"provider": DEV_PROVIDER, "token": b.live.id_token("alice")}


ROUTES = [
    Route("GET", "/readyz", json=True),
    Route("POST", "/v1/credentials", json=True, body=token_body),
    # Needs no Redis at all once the limit is off: it keeps working during an outage.
    Route("POST", "/v1/roles", json=True, body=token_body, without_limits=200),
    Route("POST", "/v1/console-url", json=True, body=token_body),
    Route("GET", "/v1/session", json=True, session=True),
    Route("POST", "/v1/session/credentials", json=True, body=lambda _: {}, session=True),
    Route("GET", "/console", json=True, session=True),
    Route("GET", "/login", json=False, session=True),
    Route("GET", f"/login/{DEV_PROVIDER}", json=False),
    Route("GET", f"/callback/{DEV_PROVIDER}?state={'s' * 32}&code=c", json=False),
    Route("GET", "/", json=False, session=True),
    Route("GET", "/credentials", json=False, session=True),
    Route("POST", "/credentials", json=False, form={"csrf_token": "x"}, session=True),
    Route("POST", "/logout", json=False, form={"csrf_token": "x"}, session=True),
]


def call(b: Broker, route: Route) -> tuple[requests.Response, float]:
    kwargs: dict[str, Any] = {"timeout": 30, "allow_redirects": False}
    if route.body is not None:
        kwargs["json"] = route.body(b)
    if route.form is not None:
        kwargs["data"] = route.form
    if route.session:
        cookie = b.live.settings.web.session_cookie
        kwargs["cookies"] = {cookie: secrets.token_urlsafe(32)}
    start = time.monotonic()
    response = requests.request(route.method, f"{b.url}{route.path}", **kwargs)
    return response, time.monotonic() - start


def assert_unavailable(response: requests.Response, route: Route) -> None:
    assert response.status_code == 503, (route.path, response.status_code, response.text)
    assert response.headers["Retry-After"] == "2"
    assert "Traceback" not in response.text
    if route.json:
        assert response.headers["Content-Type"] == "application/json"
        assert response.json()["error"] == "dependency_unavailable"
    else:
        assert response.headers["Content-Type"].startswith("text/html")
        assert "dependency_unavailable" in response.text


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path.split('?')[0]}")
def test_every_route_answers_503_with_retry_after_within_one_timeout(
    limited: Broker, redis_server: FaultyRedis, route: Route, fault: str
) -> None:
    if route.body is not None:
        route.body(limited)  # warm the OIDC login outside the timing
    redis_server.fault(fault)

    response, elapsed = call(limited, route)

    assert_unavailable(response, route)
    assert elapsed < TIMEOUT + SLACK


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path.split('?')[0]}")
def test_past_the_rate_limits_every_redis_call_answers_503_too(
    unlimited: Broker, redis_server: FaultyRedis, route: Route, fault: str
) -> None:
    body = route.body(unlimited) if route.body is not None else None
    redis_server.fault(fault)

    response, elapsed = call(unlimited, Route(**{**route.__dict__, "body": lambda _: body}))

    if route.without_limits == 503:
        assert_unavailable(response, route)
    else:
        assert response.status_code == route.without_limits, response.text
    assert elapsed < TIMEOUT + SLACK


# --------------------------------------------------------------------------- the lock


@pytest.mark.parametrize("fault", FAULTS)
def test_redis_failing_while_a_request_holds_the_lock_still_hands_out_the_credentials(
    unlimited: Broker, redis_server: FaultyRedis, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    unlimited.wait_ready()
    body = token_body(unlimited)
    unlimited.sts.during = lambda: redis_server.fault(fault)
    try:
        start = time.monotonic()
        response = requests.post(f"{unlimited.url}/v1/credentials", json=body, timeout=30)
        elapsed = time.monotonic() - start
    finally:
        unlimited.sts.during = None

    assert response.status_code == 200, response.text
    creds = response.json()["credentials"]
    assert creds["AccessKeyId"].startswith("ASIA")
    assert creds["SecretAccessKey"]
    # The STS call itself takes its time; Redis adds at most one timeout on top of it.
    assert elapsed < TIMEOUT + SLACK + 2.0
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_follower_waiting_for_the_leader_gets_a_quick_503_when_redis_fails(
    unlimited: Broker, redis_server: FaultyRedis, fault: str
) -> None:
    unlimited.wait_ready()
    # Nothing cached for alice, so the first request leads: an earlier test's
    # store-and-unlock may have run whole when its frozen Redis thawed.
    services = unlimited.live.services
    services.forget(services.identity_ids.derive(DEV_PROVIDER, "alice"))
    leader_in_sts = threading.Event()

    def during() -> None:
        leader_in_sts.set()
        time.sleep(0.5)  # the follower is polling the cache for the leader's result
        redis_server.fault(fault)

    leader_body, follower_body = token_body(unlimited), token_body(unlimited)  # both alice
    unlimited.sts.during = during
    leader: list[requests.Response] = []
    thread = threading.Thread(
        target=lambda: leader.append(
            requests.post(f"{unlimited.url}/v1/credentials", json=leader_body, timeout=30)
        )
    )
    try:
        thread.start()
        assert leader_in_sts.wait(30)
        start = time.monotonic()
        follower = requests.post(f"{unlimited.url}/v1/credentials", json=follower_body, timeout=30)
        elapsed = time.monotonic() - start
        thread.join(30)
    finally:
        unlimited.sts.during = None

    assert follower.status_code == 503, follower.text
    assert follower.headers["Retry-After"] == "2"
    # Not the lock wait (cache.lock_wait_seconds, 20 s): the fault, then one timeout.
    assert elapsed < 0.5 + TIMEOUT + SLACK + 1.0
    assert leader[0].status_code == 200, leader[0].text


# --------------------------------------------------------------------------- the log


def test_an_outage_is_one_warning_then_summaries_and_never_a_traceback(
    limited: Broker, redis_server: FaultyRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    limited.wait_ready()
    caplog.clear()
    redis_server.kill()
    statuses = []
    deadline = time.monotonic() + 6  # past one summary period (5 s)
    while time.monotonic() < deadline:
        for route in ROUTES[:3]:
            statuses.append(call(limited, route)[0].status_code)
        time.sleep(0.05)
    redis_server.restore()
    limited.wait_ready()

    assert set(statuses) == {503}
    store = [r.getMessage() for r in caplog.records if r.name == "broker.store"]
    assert store[0].startswith("Redis is unavailable (ConnectionError: ")
    assert sum(m.startswith("Redis is unavailable") for m in store) == 1
    assert 1 <= sum(m.startswith("Redis still unavailable: ") for m in store) <= 2
    assert store[-1].startswith("Redis is available again after")
    assert not [r for r in caplog.records if r.exc_info]
    # Nothing else says anything per request: the error handler leaves Redis to the store.
    assert not [r for r in caplog.records if r.name == "broker.errors"]


# --------------------------------------------------------------------------- STS


@pytest.fixture
def hung_sts() -> Iterator[str]:
    """Listens (the kernel completes connections) but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("sts_state", ["unreachable", "hung"])
def test_sts_unreachable_or_hung_is_a_503_with_retry_after(
    stack: Stack, redis_server: FaultyRedis, hung_sts: str, sts_state: str
) -> None:
    endpoint = hung_sts if sts_state == "hung" else f"http://127.0.0.1:{free_port()}"
    port = free_port()
    settings = make_settings(
        stack,
        f"http://127.0.0.1:{port}",
        redis={"url": redis_server.url},
        sts={"endpoint_url": endpoint, "timeout_seconds": 1},
    )
    services = Services.build(settings)
    server: BaseWSGIServer = make_server("127.0.0.1", port, create_app(services=services), True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    live = LiveBroker(f"http://127.0.0.1:{port}", settings, services, stack)
    try:
        response = live.post(
            "/v1/credentials", {"provider": DEV_PROVIDER, "token": live.id_token("alice")}
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        services.close()

    assert response.status_code == 503, response.text
    assert response.json()["error"] == "dependency_unavailable"
    assert response.headers["Retry-After"] == "5"
    # A timeout is reported as one, a refused connection as unreachable.
    expected = "STS timed out after 1 s" if sts_state == "hung" else "STS is unreachable"
    assert expected in response.json()["message"]
