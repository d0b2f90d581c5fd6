"""A hung or sick upstream never makes callers queue; key rotation is never refused.

Issue 8, sections 2 and 4, against real local HTTP servers (hanging, slow, trickling,
failing) and a real redis-server. Timing bounds have generous margins (a loaded 2-core
box): what they tell apart is "about one timeout" from "a queue of timeouts", and "at
once" from "after a timeout".
"""

from __future__ import annotations

import re
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import pytest
import redis
from werkzeug.wrappers import Request, Response

from broker import errors
from broker.devstack.processes import ManagedProcess, ThreadedServer, free_port, serve_in_thread
from broker.devstack.social_servers import (
    DEMO_AMAZON_CLIENT_ID,
    DEMO_FACEBOOK_APP_ID,
    DEMO_FACEBOOK_APP_SECRET,
    FakeFacebook,
    FakeLoginWithAmazon,
    start_amazon_server,
    start_facebook_server,
)
from broker.http import FOLLOWER_WAIT_SECONDS, Http, SingleFlight, Skipped
from broker.jwks import JWKS_REFRESH_BURST, JWKSCache
from broker.providers.amazon import AmazonProvider
from broker.providers.facebook import FacebookProvider
from broker.providers.oidc import OIDCProvider
from broker.server import gunicorn_options
from broker.settings import (
    MAX_UPSTREAM_BUDGET_SECONDS,
    WORKER_TIMEOUT_SECONDS,
    AmazonProviderSettings,
    ConfigError,
    FacebookProviderSettings,
    settings_from_mapping,
)
from broker.store import Sealer, Store
from tests.unit.oidc_fixtures import FakeClock, FakeIdP, claims, oidc_settings, rsa_key, sign

K1 = rsa_key("k1")
K2 = rsa_key("k2")
K3 = rsa_key("k3")

# Slack added to every "within N s" bound: scheduling on a loaded box, not behaviour.
MARGIN = 1.5


# --------------------------------------------------------------------------- servers


class Misbehaving:
    """A real HTTP server whose paths misbehave on purpose (counts requests per path)."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        self.release = threading.Event()
        self.served: ThreadedServer = serve_in_thread(self._app, name="misbehaving")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.served.port}{path}"

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = Request(environ).path
        with self._lock:
            self.hits[path] = self.hits.get(path, 0) + 1
        response: Any
        if path == "/hang":
            self.release.wait(30)
            response = Response('{"late": true}', mimetype="application/json")
        elif path == "/slow":  # late, but within the timeout
            time.sleep(0.3)
            response = Response('{"ok": true}', mimetype="application/json")
        elif path == "/trickle":  # headers at once, then one byte every 0.2 s for 20 s
            response = Response(self._trickle(), mimetype="application/json")
        elif path == "/error":
            response = Response("boom", status=500)
        elif path == "/garbage":
            response = Response("<html>not json", mimetype="text/html")
        elif path == "/huge":
            response = Response(b'"' + b"a" * (2 * 1024 * 1024) + b'"', mimetype="text/plain")
        else:
            response = Response('{"ok": true}', mimetype="application/json")
        return response(environ, start_response)

    def _trickle(self) -> Iterator[bytes]:
        yield b" "
        for _ in range(100):
            if self.release.wait(0.2):
                return
            yield b" "

    def close(self) -> None:
        self.release.set()
        self.served.stop()


class TrickledHeaders(socketserver.ThreadingTCPServer):
    """Raw sockets: a status line, then one header byte every 0.2 s for 30 s. Each read
    gets a byte well within any read timeout; only a deadline on the whole answer ends it.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.release = threading.Event()
        release = self.release

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.recv(65536)
                self.request.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(150):
                    if release.wait(0.2):
                        return
                    try:
                        self.request.sendall(b"a")
                    except OSError:
                        return  # the client gave up: what the test wants

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/headers"

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.fixture(scope="module")
def trickled_headers() -> Iterator[TrickledHeaders]:
    served = TrickledHeaders()
    yield served
    served.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Misbehaving]:
    served = Misbehaving()
    yield served
    served.close()


@pytest.fixture
def idp(idp_server: FakeIdP) -> FakeIdP:
    idp_server.reset(K1)
    idp_server.hang_seconds = 8.0
    return idp_server


def elapsed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result or the BrokerError raised)."""
    started = time.monotonic()
    try:
        outcome: Any = fn()
    except errors.BrokerError as exc:
        outcome = exc
    return time.monotonic() - started, outcome


def concurrently(n: int, fn: Callable[[int], Any]) -> list[tuple[float, Any]]:
    """Run fn(0..n-1) in n threads released together; each call's (seconds, outcome)."""
    barrier = threading.Barrier(n)

    def one(i: int) -> tuple[float, Any]:
        barrier.wait()
        return elapsed(lambda: fn(i))

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


# --------------------------------------------------------------------------- Http


@dataclass(frozen=True)
class HttpCase:
    path: str
    timeout: float
    budget: float
    retries: int
    error: type[errors.BrokerError] | None
    message: str
    within: float  # seconds, before MARGIN


HTTP_CASES = [
    # Three 0.6 s attempts would be 1.8 s; the budget stops it at 1.0 s.
    pytest.param(
        HttpCase("/hang", 0.6, 1.0, 2, errors.DependencyUnavailable, r"timed out after", 1.0),
        id="hang-retries-cut-by-budget",
    ),
    # One attempt's timeout longer than the whole budget: the budget wins.
    pytest.param(
        HttpCase("/hang", 10.0, 1.0, 0, errors.DependencyUnavailable, r"timed out after 1\.", 1.0),
        id="hang-timeout-above-budget",
    ),
    # A server that trickles a byte before every read timeout would hold a plain
    # requests call forever; the deadline cuts it.
    pytest.param(
        HttpCase("/trickle", 1.0, 1.5, 2, errors.DependencyUnavailable, r"timed out after", 1.5),
        id="trickling-body",
    ),
    pytest.param(
        HttpCase("/error", 1.0, 5.0, 2, errors.UpstreamError, r"failed with HTTP 500", 1.0),
        id="http-500-retried",
    ),
    pytest.param(
        HttpCase("/garbage", 1.0, 5.0, 2, errors.UpstreamError, r"malformed", 1.0),
        id="not-json",
    ),
    pytest.param(
        HttpCase("/huge", 1.0, 5.0, 2, errors.UpstreamError, r"more than 1048576 bytes", 2.0),
        id="oversized-body",
    ),
    pytest.param(
        HttpCase("/slow", 2.0, 5.0, 0, None, "", 0.3),
        id="slow-but-in-time",
    ),
]


@pytest.mark.parametrize("case", HTTP_CASES)
def test_every_call_ends_within_the_budget_and_says_what_happened(
    server: Misbehaving, case: HttpCase
) -> None:
    http = Http(retries=case.retries, backoff_seconds=0.05, budget_seconds=case.budget)
    try:
        seconds, outcome = elapsed(
            lambda: http.get_json(server.url(case.path), timeout=case.timeout, what="the IdP")
        )
    finally:
        http.close()
    assert seconds <= case.within + MARGIN
    if case.error is None:
        assert outcome.status == 200
        return
    assert isinstance(outcome, case.error)
    assert outcome.code == case.error.code
    assert f"the IdP (127.0.0.1:{server.served.port})" in outcome.message
    assert re.search(case.message, outcome.message), outcome.message
    if outcome.status == 503:
        assert outcome.retry_after is not None
        assert outcome.retry_after >= 1


@pytest.mark.parametrize(("timeout", "budget"), [(1.0, 1.5), (10.0, 1.0)])
def test_trickled_headers_are_cut_at_the_deadline(
    trickled_headers: TrickledHeaders, timeout: float, budget: float
) -> None:
    http = Http(retries=2, backoff_seconds=0.05, budget_seconds=budget)
    try:
        seconds, outcome = elapsed(lambda: http.get_json(trickled_headers.url, timeout=timeout))
    finally:
        http.close()
    assert isinstance(outcome, errors.DependencyUnavailable), outcome
    assert "timed out after" in outcome.message
    assert seconds <= budget + MARGIN


def test_a_timeout_is_never_called_unreachable(server: Misbehaving) -> None:
    # urllib3 used to turn "read timed out" after its retries into a connection error.
    http = Http(retries=2, backoff_seconds=0.01, budget_seconds=3.0)
    try:
        _, timed_out = elapsed(lambda: http.get_json(server.url("/hang"), timeout=0.4))
        _, refused = elapsed(lambda: http.get_json(f"http://127.0.0.1:{free_port()}/x"))
    finally:
        http.close()
    assert isinstance(timed_out, errors.DependencyUnavailable)
    assert "timed out" in timed_out.message
    assert "unreachable" not in timed_out.message
    assert isinstance(refused, errors.DependencyUnavailable)
    assert "unreachable" in refused.message
    assert refused.retry_after is not None


def test_calls_in_one_budget_scope_share_one_deadline(server: Misbehaving) -> None:
    http = Http(retries=0, budget_seconds=1.2)
    try:

        def two_calls() -> None:
            with http.budget():
                for _ in range(3):
                    with pytest.raises(errors.DependencyUnavailable, match="timed out"):
                        http.get_json(server.url("/hang"), timeout=1.0)

        seconds, _ = elapsed(two_calls)
    finally:
        http.close()
    # Three calls of 1 s each would take 3 s; together they get one 1.2 s budget.
    assert seconds <= 1.2 + MARGIN
    assert seconds < 2.5


# --------------------------------------------------------------------------- SingleFlight


def test_single_flight_followers_do_not_queue_behind_the_leader() -> None:
    flight: SingleFlight[str] = SingleFlight(what="the thing", backoff_seconds=5)
    release = threading.Event()
    calls: list[int] = []

    def slow() -> str:
        calls.append(1)
        release.wait(10)
        raise errors.DependencyUnavailable("the thing timed out after 3.0 s")

    def run(i: int) -> Any:
        if i:
            time.sleep(0.2)  # let caller 0 lead
        else:
            threading.Timer(3.0, release.set).start()
        return flight.run(slow, wait=0.1 if i % 2 else 0.0)

    results = concurrently(6, run)
    assert len(calls) == 1
    leader_seconds, leader = results[0]
    assert isinstance(leader, errors.DependencyUnavailable)
    for seconds, outcome in results[1:]:
        assert isinstance(outcome, Skipped)
        assert outcome.error.retry_after is not None
        assert seconds < 1.5  # far less than the leader's 3 s
    assert leader_seconds >= 2.5
    # The backoff started when the failed attempt ended: 5 s from now, not from its start.
    assert 3.5 <= flight.retry_in() <= 5.0


# --------------------------------------------------------------------------- documents


def jwks_cache(idp: FakeIdP, store: Store, http: Http, **overrides: Any) -> JWKSCache:
    options: dict[str, Any] = {
        "url": idp.jwks_url,
        "http": http,
        "store": store,
        "cache_seconds": 3600,
        "refresh_cooldown_seconds": 30,
        "timeout": 3.0,
    }
    options.update(overrides)
    return JWKSCache(**options)


@pytest.fixture
def http() -> Iterator[Http]:
    client = Http(retries=0, budget_seconds=10.0)
    yield client
    client.close()


def test_callers_use_the_last_good_keys_at_once_while_one_fetch_hangs(
    idp: FakeIdP, store: Store, http: Http
) -> None:
    clock = FakeClock()
    cache = jwks_cache(idp, store, http, clock=clock)
    cache.get_key("k1", algorithm="RS256")
    idp.mode = "hang"
    clock.advance(3601)  # expired in process and in Redis: everyone wants a refetch

    results = concurrently(8, lambda _: cache.get_key("k1", algorithm="RS256").key_id)

    assert [outcome for _, outcome in results] == ["k1"] * 8
    times = sorted(seconds for seconds, _ in results)
    # One caller led the fetch and waited out its 3 s timeout; the others did not wait.
    assert all(t < 1.5 for t in times[:-1]), times
    assert times[-1] <= 3.0 + MARGIN
    assert idp.jwks_hits == 2  # the first load, and one refetch for all eight


def test_with_no_keys_at_all_callers_fail_fast_with_503_and_retry_after(
    idp: FakeIdP, store: Store, http: Http
) -> None:
    idp.mode = "hang"
    cache = jwks_cache(idp, store, http)

    results = concurrently(8, lambda _: cache.get_key("k1", algorithm="RS256"))

    times = sorted(seconds for seconds, _ in results)
    outcomes = [outcome for _, outcome in results]
    assert all(isinstance(o, errors.DependencyUnavailable) for o in outcomes), outcomes
    assert all(o.retry_after is not None and o.retry_after >= 1 for o in outcomes)
    # Seven waited at most FOLLOWER_WAIT_SECONDS for the one fetch; none queued behind it.
    assert all(t <= FOLLOWER_WAIT_SECONDS + MARGIN for t in times[:-1]), times
    assert times[-1] <= 3.0 + MARGIN
    assert sum("timed out after" in o.message for o in outcomes) >= 1  # the leader's own
    assert idp.jwks_hits == 1

    # Backing off: the next caller is answered at once, without asking the IdP.
    seconds, again = elapsed(lambda: cache.get_key("k1", algorithm="RS256"))
    assert isinstance(again, errors.DependencyUnavailable)
    assert again.retry_after is not None
    assert again.retry_after >= 1
    assert seconds < 1.0
    assert idp.jwks_hits == 1


def test_backoff_is_measured_from_the_end_of_the_failed_attempt(
    idp: FakeIdP, store: Store, http: Http
) -> None:
    idp.mode = "hang"
    cache = jwks_cache(idp, store, http, timeout=1.5, failure_backoff_seconds=4.0)
    started = time.monotonic()
    with pytest.raises(errors.DependencyUnavailable, match="timed out"):
        cache.get_key("k1", algorithm="RS256")
    ended = time.monotonic()
    assert ended - started >= 1.4

    # Past start + backoff (4 s), still well before end + backoff (5.5 s): backing off.
    time.sleep(max(0.0, started + 4.5 - time.monotonic()))
    with pytest.raises(errors.DependencyUnavailable) as info:
        cache.get_key("k1", algorithm="RS256")
    assert info.value.retry_after is not None
    assert idp.jwks_hits == 1

    # After end + backoff the IdP is asked again.
    idp.mode = "ok"
    time.sleep(max(0.0, ended + 4.0 + 0.5 - time.monotonic()))
    assert cache.get_key("k1", algorithm="RS256").key_id == "k1"
    assert idp.jwks_hits == 2


def test_a_healthy_cold_start_still_serves_everyone_from_one_fetch(
    idp: FakeIdP, store: Store, http: Http
) -> None:
    cache = jwks_cache(idp, store, http)
    results = concurrently(16, lambda _: cache.get_key("k1", algorithm="RS256").key_id)
    assert [outcome for _, outcome in results] == ["k1"] * 16
    assert idp.jwks_hits == 1


# --------------------------------------------------------------------------- providers

BUDGET = 2.0
TIMEOUT = 1.5


@pytest.fixture(scope="module")
def lwa_server() -> Iterator[FakeLoginWithAmazon]:
    served = start_amazon_server()
    served.hang_seconds = 10.0
    yield served
    served.stop()


@pytest.fixture(scope="module")
def graph_server() -> Iterator[FakeFacebook]:
    served = start_facebook_server()
    served.hang_seconds = 10.0
    yield served
    served.stop()


@pytest.fixture
def budget_http() -> Iterator[Http]:
    client = Http(retries=2, backoff_seconds=0.05, budget_seconds=BUDGET)
    yield client
    client.close()


def amazon(lwa: FakeLoginWithAmazon, http: Http, store: Store) -> AmazonProvider:
    settings = AmazonProviderSettings(
        name="amazon",
        type="amazon",
        display_name="Login with Amazon",
        client_ids=(DEMO_AMAZON_CLIENT_ID,),
        api_url=lwa.url,
        timeout_seconds=TIMEOUT,
    )
    return AmazonProvider(settings=settings, http=http, store=store)


def facebook(graph: FakeFacebook, http: Http, store: Store) -> FacebookProvider:
    settings = FacebookProviderSettings(
        name="facebook",
        type="facebook",
        display_name="Facebook",
        app_id=DEMO_FACEBOOK_APP_ID,
        app_secret=DEMO_FACEBOOK_APP_SECRET,
        graph_url=graph.url,
        graph_version="v19.0",
        timeout_seconds=TIMEOUT,
        limited_login=False,
        limited_login_issuer="https://www.facebook.com",
        limited_login_jwks_url=graph.jwks_url,
        limited_login_sts_ready=False,
    )
    return FacebookProvider(settings=settings, http=http, store=store)


@pytest.mark.parametrize(
    ("provider", "endpoint"),
    [
        pytest.param("amazon", "tokeninfo", id="amazon-tokeninfo"),
        # tokeninfo answers, then the profile hangs: the two share one budget.
        pytest.param("amazon", "profile", id="amazon-profile"),
        pytest.param("facebook", "/oauth/access_token", id="facebook-app-token"),
        pytest.param("facebook", "/debug_token", id="facebook-debug-token"),
        pytest.param("facebook", "/me", id="facebook-me"),
        pytest.param("oidc-jwks", "", id="oidc-jwks"),
        pytest.param("oidc-discovery", "", id="oidc-discovery"),
    ],
)
def test_one_verification_spends_at_most_the_budget_on_a_hung_provider(
    *,
    provider: str,
    endpoint: str,
    lwa_server: FakeLoginWithAmazon,
    graph_server: FakeFacebook,
    idp: FakeIdP,
    budget_http: Http,
    store: Store,
) -> None:
    verify: Callable[[], Any]
    if provider == "amazon":
        lwa_server.reset()
        token = lwa_server.mint("alice")
        lwa_server.fail("hang", endpoint=endpoint)
        verify = lambda: amazon(lwa_server, budget_http, store).verify(token)  # noqa: E731
    elif provider == "facebook":
        graph_server.reset()
        token = graph_server.mint("alice")
        graph_server.fail("hang", endpoint=endpoint)
        verify = lambda: facebook(graph_server, budget_http, store).verify(token)  # noqa: E731
    else:
        idp.mode = "hang"
        settings = oidc_settings(idp, timeout_seconds=TIMEOUT)
        if provider == "oidc-discovery":
            settings = replace(settings, jwks_url=None, discovery_url=idp.discovery_url)
        token = sign(K1, claims())
        oidc = OIDCProvider(settings=settings, http=budget_http, store=store)
        verify = lambda: oidc.verify(token)  # noqa: E731
    seconds, outcome = elapsed(verify)
    assert isinstance(outcome, errors.DependencyUnavailable), outcome
    assert "timed out" in outcome.message
    assert outcome.retry_after is not None
    assert seconds <= BUDGET + MARGIN


def test_hung_amazon_makes_no_queue_of_per_token_calls(
    lwa_server: FakeLoginWithAmazon, budget_http: Http, store: Store
) -> None:
    lwa_server.reset()
    tokens = [lwa_server.mint("alice") for _ in range(6)]
    lwa_server.fail("hang", endpoint="tokeninfo")
    provider = amazon(lwa_server, budget_http, store)
    started = time.monotonic()
    results = concurrently(6, lambda i: provider.verify(tokens[i]))
    # Six callers, each bounded by the budget, in parallel: about one budget in all,
    # not six of them one behind another.
    assert time.monotonic() - started <= BUDGET + MARGIN + 1.0
    assert all(isinstance(o, errors.DependencyUnavailable) for _, o in results)
    assert all(seconds <= BUDGET + MARGIN for seconds, _ in results)


def test_hung_facebook_app_token_fetch_makes_no_queue(
    graph_server: FakeFacebook, budget_http: Http, store: Store
) -> None:
    graph_server.reset()
    tokens = [graph_server.mint("alice") for _ in range(6)]
    graph_server.fail("hang", endpoint="/oauth/access_token")
    provider = facebook(graph_server, budget_http, store)
    results = concurrently(6, lambda i: provider.verify(tokens[i]))
    times = sorted(seconds for seconds, _ in results)
    assert all(isinstance(o, errors.DependencyUnavailable) for _, o in results)
    assert all(o.retry_after is not None for _, o in results)
    # One caller fetched (within the budget); the others did not wait their turn.
    assert all(t <= FOLLOWER_WAIT_SECONDS + MARGIN for t in times[:-1]), times
    assert times[-1] <= BUDGET + MARGIN
    # At most the leader's attempts in its budget, not one fetch per caller.
    assert graph_server.hits("/oauth/access_token") <= 2


# --------------------------------------------------------------------------- rotation


def second_store(store: Store, redis_proc: ManagedProcess) -> tuple[Store, redis.Redis]:
    """Another "process": its own Redis connection, the same key prefix."""
    client = redis.Redis(port=redis_proc.port, socket_timeout=2, socket_connect_timeout=2)
    return Store(client=client, prefix=store.prefix, sealer=Sealer([b"x" * 32])), client


@pytest.mark.parametrize("earlier_refresh_by", ["this-process", "another-process"])
def test_a_newly_published_key_is_accepted_right_after_an_unrelated_refresh(
    *,
    idp: FakeIdP,
    store: Store,
    http: Http,
    redis_proc: ManagedProcess,
    earlier_refresh_by: str,
) -> None:
    other_store, client = second_store(store, redis_proc)
    try:
        here = OIDCProvider(settings=oidc_settings(idp), http=http, store=store)
        there = OIDCProvider(settings=oidc_settings(idp), http=http, store=other_store)
        assert here.verify(sign(K1, claims())).subject == "user-123"
        # Someone presents a token with a kid nobody publishes: one refresh is spent.
        junk = sign(rsa_key("junk"), claims())
        with pytest.raises(errors.InvalidToken, match="unknown signing key"):
            (here if earlier_refresh_by == "this-process" else there).verify(junk)
        # A moment later the IdP publishes a new key and signs with it.
        idp.keys = [K1, K2]
        assert here.verify(sign(K2, claims(sub="rotated"))).subject == "rotated"
    finally:
        client.close()


def test_a_kidless_token_is_accepted_when_the_provider_went_down_to_one_key(
    idp: FakeIdP, store: Store, http: Http
) -> None:
    idp.reset(K1, K2)
    provider = OIDCProvider(settings=oidc_settings(idp), http=http, store=store)
    assert provider.verify(sign(K1, claims())).subject == "user-123"
    idp.keys = [K2]
    token = sign(K2, claims(sub="one-key"), include_kid=False)
    assert provider.verify(token).subject == "one-key"


def test_a_flood_of_random_kids_from_two_processes_is_bounded_by_the_bucket(
    idp: FakeIdP, store: Store, http: Http, redis_proc: ManagedProcess
) -> None:
    other_store, client = second_store(store, redis_proc)
    try:
        processes = [
            OIDCProvider(settings=oidc_settings(idp), http=http, store=s)
            for s in (store, other_store)
        ]
        for provider in processes:
            provider.verify(sign(K1, claims()))
        assert idp.jwks_hits == 1  # the second found the keys in Redis
        forger = rsa_key("forger")
        for n in range(60):
            token = sign(replace(forger, kid=uuid.uuid4().hex), claims())
            with pytest.raises(errors.InvalidToken, match="unknown signing key"):
                processes[n % 2].verify(token)
        assert idp.jwks_hits == 1 + JWKS_REFRESH_BURST
        # Known keys keep working throughout, with no further fetch.
        assert processes[1].verify(sign(K1, claims(sub="still"))).subject == "still"
        assert idp.jwks_hits == 1 + JWKS_REFRESH_BURST
    finally:
        client.close()


@pytest.mark.parametrize(
    ("capacity", "refill", "takes", "granted"),
    [
        pytest.param(1, 30.0, 5, 1, id="burst-1"),
        pytest.param(3, 30.0, 10, 3, id="burst-3"),
        pytest.param(5, 30.0, 5, 5, id="exactly-the-burst"),
    ],
)
def test_token_bucket_is_shared_by_two_stores(
    *,
    store: Store,
    redis_proc: ManagedProcess,
    capacity: int,
    refill: float,
    takes: int,
    granted: int,
) -> None:
    other_store, client = second_store(store, redis_proc)
    try:
        key = store.key("bucket", uuid.uuid4().hex)
        stores = (store, other_store)
        results = [
            stores[n % 2].take_token(key, capacity=capacity, refill_seconds=refill)
            for n in range(takes)
        ]
        assert results.count(True) == granted
        assert results[:granted] == [True] * granted
        ttl = store.ttl_seconds(key)
        assert ttl is not None
        assert 0 < ttl <= capacity * refill + 1
    finally:
        client.close()


def test_token_bucket_earns_tokens_back_with_time(store: Store) -> None:
    key = store.key("bucket", uuid.uuid4().hex)
    assert store.take_token(key, capacity=2, refill_seconds=1.0)
    assert store.take_token(key, capacity=2, refill_seconds=1.0)
    assert not store.take_token(key, capacity=2, refill_seconds=1.0)
    time.sleep(1.3)
    assert store.take_token(key, capacity=2, refill_seconds=1.0)
    assert not store.take_token(key, capacity=2, refill_seconds=1.0)


def test_token_bucket_with_redis_down_is_a_503(redis_proc: ManagedProcess) -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    try:
        store = Store(client=dead, prefix="test:dead:", sealer=Sealer([b"k" * 32]))
        with pytest.raises(errors.DependencyUnavailable):
            store.take_token("test:dead:b", capacity=1, refill_seconds=1)
    finally:
        dead.close()


# --------------------------------------------------------------------------- settings

BASE_CONFIG: dict[str, Any] = {
    "security": {"identity_key": "k" * 24, "encryption_keys": ["a" * 43 + "="]},
    "providers": {
        "corp": {"type": "oidc", "issuer": "https://idp.example.test", "client_ids": ["c"]}
    },
    "rules": [
        {
            "name": "r",
            "providers": ["corp"],
            "conditions": [{"claim": "sub", "op": "equals", "value": "x"}],
            "roles": ["arn:aws:iam::123456789012:role/R"],
        }
    ],
}


def config(**sections: Any) -> dict[str, Any]:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE_CONFIG.items()}
    for name, value in sections.items():
        if name == "corp":
            raw["providers"] = {"corp": {**BASE_CONFIG["providers"]["corp"], **value}}
        else:
            raw[name] = value
    return raw


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        pytest.param({"upstream": {"budget_seconds": 0}}, "upstream.budget_seconds", id="zero"),
        pytest.param({"upstream": {"budget_seconds": 16}}, "upstream.budget_seconds", id="big"),
        pytest.param(
            {"upstream": {"budget_seconds": "10"}}, "upstream.budget_seconds", id="string"
        ),
        pytest.param({"upstream": {"budget": 10}}, "upstream.budget: unknown key", id="typo"),
        pytest.param(
            {"upstream": {"budget_seconds": 3}, "corp": {"timeout_seconds": 5}},
            "providers.corp.timeout_seconds: 5 is more than upstream.budget_seconds",
            id="timeout-above-budget",
        ),
        pytest.param(
            {"corp": {"jwks_refresh_burst": 0}}, "providers.corp.jwks_refresh_burst", id="burst-0"
        ),
        pytest.param(
            {"corp": {"jwks_refresh_burst": 21}}, "providers.corp.jwks_refresh_burst", id="burst"
        ),
    ],
)
def test_budget_and_bucket_settings_are_validated(overrides: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(config(**overrides), env={})
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_budget_defaults_and_bound_sit_well_under_the_worker_timeout() -> None:
    settings = settings_from_mapping(config(), env={})
    assert settings.upstream.budget_seconds == 10.0
    provider = settings.providers["corp"]
    assert getattr(provider, "jwks_refresh_burst", None) == JWKS_REFRESH_BURST
    assert gunicorn_options("127.0.0.1:0", 1, 4)["timeout"] == WORKER_TIMEOUT_SECONDS
    assert MAX_UPSTREAM_BUDGET_SECONDS <= WORKER_TIMEOUT_SECONDS / 2
    top = settings_from_mapping(config(upstream={"budget_seconds": 15}), env={})
    assert top.upstream.budget_seconds == MAX_UPSTREAM_BUDGET_SECONDS


# --------------------------------------------------------------------------- the API


def test_the_api_answers_a_hung_idp_with_a_quick_503_and_retry_after(
    idp: FakeIdP, redis_proc: ManagedProcess
) -> None:
    """Through create_app: every caller gets the JSON 503 with a Retry-After header, the
    first within the budget, the rest without queueing; a refused answer never says
    'unreachable' for a timeout."""
    from broker.app import create_app
    from broker.services import Services

    idp.mode = "hang"
    raw = config(
        redis={"url": f"redis://127.0.0.1:{redis_proc.port}/0", "key_prefix": f"t{uuid.uuid4()}:"},
        upstream={"budget_seconds": 2},
        corp={
            "issuer": "https://idp.example.test",
            "client_ids": ["broker-web"],
            "jwks_url": idp.jwks_url,
            "timeout_seconds": 1.5,
        },
        rate_limit={"per_ip_per_minute": 0, "per_identity_per_minute": 0},
    )
    services = Services.build(settings_from_mapping(raw, env={}))
    try:
        client = create_app(services=services).test_client()
        token = sign(K1, claims(audience="broker-web"))

        def call(_: int) -> Any:
            return client.post("/v1/credentials", json={"provider": "corp", "token": token})

        results = concurrently(6, call)
        times = sorted(seconds for seconds, _ in results)
        for _, response in results:
            assert response.status_code == 503
            assert response.is_json
            assert response.get_json()["error"] == "dependency_unavailable"
            assert int(response.headers["Retry-After"]) >= 1
            assert token not in response.get_data(as_text=True)
        messages = [response.get_json()["message"] for _, response in results]
        assert any("timed out after" in m for m in messages), messages
        assert not any("unreachable" in m for m in messages), messages
        assert all(t <= FOLLOWER_WAIT_SECONDS + MARGIN for t in times[:-1]), times
        assert times[-1] <= 2.0 + MARGIN
        # The leader's attempts within its budget (1.5 s, then the 0.5 s left), not one
        # fetch per caller.
        assert idp.jwks_hits <= 2
    finally:
        services.close()
