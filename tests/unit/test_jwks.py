"""JWKSCache against a real local JWKS server and a real redis-server."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from typing import Any

import jwt
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import rsa
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker import errors, metrics
from broker.devstack.processes import free_port
from broker.http import FAILED_FETCH_BACKOFF_SECONDS, Http
from broker.jwk import key_for_algorithm
from broker.jwks import JWKS_REFRESH_BURST, JWKSCache
from broker.store import Sealer, Store
from tests.unit.oidc_fixtures import FakeClock, FakeIdP, ec_key, rsa_key

K1 = rsa_key("k1")
K2 = rsa_key("k2")


@pytest.fixture
def idp(idp_server: FakeIdP) -> FakeIdP:
    idp_server.reset(K1)
    return idp_server


def make_cache(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock, **overrides: Any
) -> JWKSCache:
    options: dict[str, Any] = {
        "url": idp.jwks_url,
        "http": http,
        "store": store,
        "cache_seconds": 3600,
        "refresh_cooldown_seconds": 30,
        "timeout": 0.3,
        "clock": clock,
    }
    options.update(overrides)
    return JWKSCache(**options)


def unknown_kid(cache: JWKSCache, kid: str) -> None:
    with pytest.raises(errors.InvalidToken, match="unknown signing key"):
        cache.get_key(kid, algorithm="RS256")


# --------------------------------------------------------------------------- caching


def test_keys_are_cached_in_process(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock
) -> None:
    cache = make_cache(idp, http, store, clock)
    first = cache.get_key("k1", algorithm="RS256")
    second = cache.get_key("k1", algorithm="RS256")
    assert isinstance(first, jwt.PyJWK)
    assert first.algorithm_name == "RS256"
    assert second is first
    assert idp.jwks_hits == 1


def test_redis_entry_uses_the_url_digest_key_and_cache_ttl(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock
) -> None:
    make_cache(idp, http, store, clock, cache_seconds=120).get_key("k1", algorithm="RS256")
    key = store.key("jwks", hashlib.sha256(idp.jwks_url.encode()).hexdigest()[:32])
    entry = store.get_json(key)
    assert entry is not None
    assert entry["document"] == idp.jwks_document()
    ttl = store.ttl_seconds(key)
    assert ttl is not None
    assert 0 < ttl <= 120


def test_expired_cache_is_refetched(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock
) -> None:
    cache = make_cache(idp, http, store, clock)
    cache.get_key("k1", algorithm="RS256")
    clock.advance(3599)
    cache.get_key("k1", algorithm="RS256")
    assert idp.jwks_hits == 1
    clock.advance(2)
    cache.get_key("k1", algorithm="RS256")
    assert idp.jwks_hits == 2


def test_second_instance_reads_the_key_set_from_redis_without_http(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock
) -> None:
    make_cache(idp, http, store, clock).get_key("k1", algorithm="RS256")
    # A fresh instance has an empty in-process cache, like another worker or node.
    other = make_cache(idp, http, store, clock)
    assert other.get_key("k1", algorithm="RS256").key_id == "k1"
    assert idp.jwks_hits == 1


def test_concurrent_cold_start_makes_one_request(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock
) -> None:
    cache = make_cache(idp, http, store, clock)
    barrier = threading.Barrier(16)
    found: list[str | None] = []

    def worker() -> None:
        barrier.wait()
        found.append(cache.get_key("k1", algorithm="RS256").key_id)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == ["k1"] * 16
    assert idp.jwks_hits == 1


# --------------------------------------------------------------------------- unknown kid


def test_unknown_kid_refetches_and_finds_a_rotated_key(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock
) -> None:
    cache = make_cache(idp, http, store, clock)
    cache.get_key("k1", algorithm="RS256")
    idp.keys = [K2]  # the IdP rotated
    assert cache.get_key("k2", algorithm="RS256").key_id == "k2"
    assert idp.jwks_hits == 2


def test_flood_of_unknown_kids_refetches_at_most_the_bucket(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock
) -> None:
    cache = make_cache(idp, http, store, clock, refresh_cooldown_seconds=2)
    cache.get_key("k1", algorithm="RS256")
    for _ in range(50):
        unknown_kid(cache, uuid.uuid4().hex)
    assert idp.jwks_hits == 1 + JWKS_REFRESH_BURST  # the first load plus the bucket

    # The bucket earns one refresh back per refresh_cooldown_seconds (Redis's clock).
    time.sleep(2.3)  # one refresh earned, and 1.7 s before the next
    for _ in range(20):
        unknown_kid(cache, uuid.uuid4().hex)
    assert idp.jwks_hits == 2 + JWKS_REFRESH_BURST
    cache.get_key("k1", algorithm="RS256")  # known keys are unaffected throughout
    assert idp.jwks_hits == 2 + JWKS_REFRESH_BURST


def test_refresh_bucket_is_shared_between_processes(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock
) -> None:
    workers = [make_cache(idp, http, store, clock) for _ in range(4)]
    for cache in workers:
        cache.get_key("k1", algorithm="RS256")
    assert idp.jwks_hits == 1  # the others found it in Redis
    for _ in range(10):
        for cache in workers:
            unknown_kid(cache, uuid.uuid4().hex)
    assert idp.jwks_hits == 1 + JWKS_REFRESH_BURST
    bucket = store.key("jwks-refresh", hashlib.sha256(idp.jwks_url.encode()).hexdigest()[:32])
    ttl = store.ttl_seconds(bucket)
    # The bucket key lives until it would be full again (3 x 30 s), plus a second.
    assert ttl is not None
    assert 0 < ttl <= JWKS_REFRESH_BURST * 30 + 1


def test_rotation_seen_by_one_process_reaches_the_others_through_redis(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock
) -> None:
    a = make_cache(idp, http, store, clock, refresh_burst=1)
    b = make_cache(idp, http, store, clock, refresh_burst=1)
    a.get_key("k1", algorithm="RS256")
    b.get_key("k1", algorithm="RS256")
    idp.keys = [K1, K2]
    clock.advance(5)
    a.get_key("k2", algorithm="RS256")  # a refetches and takes the only refresh
    assert idp.jwks_hits == 2
    # b may not refetch (bucket empty) but adopts the newer set a stored in Redis.
    assert b.get_key("k2", algorithm="RS256").key_id == "k2"
    assert idp.jwks_hits == 2


# --------------------------------------------------------------------------- failures


FAILURES = [
    pytest.param("error", errors.UpstreamError, id="http-500"),
    pytest.param("hang", errors.DependencyUnavailable, id="timeout"),
    pytest.param("malformed", errors.UpstreamError, id="malformed-json"),
    pytest.param("no_keys", errors.UpstreamError, id="json-without-keys"),
    pytest.param("not_found", errors.UpstreamError, id="http-404"),
]


@pytest.mark.parametrize(("mode", "error"), FAILURES)
def test_last_good_key_set_is_kept_when_the_endpoint_fails(
    *,
    idp: FakeIdP,
    http: Http,
    store: Store,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    mode: Any,
    error: type[errors.BrokerError],
) -> None:
    cache = make_cache(idp, http, store, clock)
    cache.get_key("k1", algorithm="RS256")
    idp.mode = mode
    clock.advance(3601)
    with caplog.at_level(logging.WARNING, logger="broker.jwks"):
        assert cache.get_key("k1", algorithm="RS256").key_id == "k1"
    assert idp.jwks_hits == 2
    assert "still using the copy fetched" in caplog.text
    # Backing off: the sick endpoint is not asked again on every request.
    cache.get_key("k1", algorithm="RS256")
    unknown_kid(cache, "k-new")
    assert idp.jwks_hits == 2
    # ...and asked again after the backoff, picking up the recovery.
    idp.mode = "ok"
    clock.advance(FAILED_FETCH_BACKOFF_SECONDS + 1)
    cache.get_key("k1", algorithm="RS256")
    assert idp.jwks_hits == 3


@pytest.mark.parametrize(("mode", "error"), FAILURES)
def test_last_good_key_set_from_redis_is_kept_when_the_endpoint_fails(
    *,
    idp: FakeIdP,
    http: Http,
    store: Store,
    clock: FakeClock,
    mode: Any,
    error: type[errors.BrokerError],
) -> None:
    make_cache(idp, http, store, clock).get_key("k1", algorithm="RS256")
    idp.mode = mode
    clock.advance(3601)  # the Redis copy is stale now, but still the last good one
    fresh_process = make_cache(idp, http, store, clock)
    assert fresh_process.get_key("k1", algorithm="RS256").key_id == "k1"
    assert idp.jwks_hits == 2


@pytest.mark.parametrize(("mode", "error"), FAILURES)
def test_no_key_set_at_all_raises_the_http_error(
    *,
    idp: FakeIdP,
    http: Http,
    store: Store,
    clock: FakeClock,
    mode: Any,
    error: type[errors.BrokerError],
) -> None:
    idp.mode = mode
    cache = make_cache(idp, http, store, clock)
    with pytest.raises(error) as info:
        cache.get_key("k1", algorithm="RS256")
    assert info.value.code == error.code
    assert "127.0.0.1" in info.value.message
    assert info.value.retry_after is not None
    assert idp.jwks_hits == 1
    # Failing fast during the backoff, with a 503 + Retry-After: no request per caller
    # while the IdP is down.
    with pytest.raises(errors.DependencyUnavailable) as again:
        cache.get_key("k1", algorithm="RS256")
    assert again.value.retry_after is not None
    assert 1 <= again.value.retry_after <= FAILED_FETCH_BACKOFF_SECONDS
    assert idp.jwks_hits == 1
    idp.mode = "ok"
    clock.advance(FAILED_FETCH_BACKOFF_SECONDS + 1)
    assert cache.get_key("k1", algorithm="RS256").key_id == "k1"
    assert idp.jwks_hits == 2


def test_redis_down_degrades_to_the_in_process_cache(
    idp: FakeIdP, http: Http, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Public keys can always be refetched: Redis is an optimisation for them, not a 503.
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    store = Store(client=dead, prefix="test:dead:", sealer=Sealer([b"k" * 32]))
    try:
        cache = make_cache(idp, http, store, clock)
        with caplog.at_level(logging.WARNING, logger="broker.jwks"):
            cache.get_key("k1", algorithm="RS256")
            cache.get_key("k1", algorithm="RS256")
            for n in range(20):
                unknown_kid(cache, f"k-new-{n}")  # the in-process bucket still holds
        assert idp.jwks_hits == 1 + JWKS_REFRESH_BURST
        assert "Redis" in caplog.text
    finally:
        dead.close()


# --------------------------------------------------------------------------- key hygiene


def test_unusable_keys_are_skipped_and_logged(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    assert isinstance(K2.private, rsa.RSAPrivateKey)
    leaked = jwt.algorithms.RSAAlgorithm.to_jwk(K2.private, as_dict=True)
    idp.extra_jwks = [
        {**K2.public_jwk(), "kid": "enc", "use": "enc"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        {**leaked, "kid": "leaked"},
        {**K2.public_jwk(), "kid": "hs", "alg": "HS256"},
        {**K2.public_jwk(), "kid": "wrap", "key_ops": ["wrapKey"]},
        {**K2.public_jwk(), "kid": 7},
        {"kty": "EC", "kid": "bad-curve", "crv": "P-999", "x": "AA", "y": "AA"},
        "not-a-key",
        {**K1.public_jwk()},  # duplicate kid: the first one wins
    ]
    cache = make_cache(idp, http, store, clock)
    with caplog.at_level(logging.WARNING, logger="broker.jwks"):
        assert cache.get_key("k1", algorithm="RS256").key_id == "k1"
    skipped = [r for r in caplog.records if "skipping JWKS key" in r.getMessage()]
    assert len(skipped) == 10
    for kid in ("enc", "hmac", "broken", "leaked", "hs", "wrap", "bad-curve"):
        unknown_kid(cache, kid)


def test_absent_kid_is_accepted_only_with_exactly_one_published_key(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock
) -> None:
    cache = make_cache(idp, http, store, clock)
    assert cache.get_key(None, algorithm="RS256").key_id == "k1"
    idp.reset(K1, K2)
    other = make_cache(idp, http, store, clock, url=idp.jwks_url + "?two")
    for _ in range(10):
        with pytest.raises(errors.InvalidToken, match="no key id"):
            other.get_key(None, algorithm="RS256")
    # Several keys: a kid-less token earns the same bounded refresh as an unknown kid.
    assert idp.jwks_hits == 1 + JWKS_REFRESH_BURST


@pytest.mark.parametrize(
    ("jwk", "algorithm", "message"),
    [
        pytest.param(K1.public_jwk(), "RS384", "another algorithm", id="declared-alg-differs"),
        pytest.param(
            rsa_key("k1", publish_alg=False).public_jwk(), "ES256", "does not fit", id="rsa-for-es"
        ),
        pytest.param(ec_key("e1").public_jwk(), "RS256", "another algorithm", id="es-key-for-rs"),
        pytest.param(
            ec_key("e1", publish_alg=False).public_jwk(), "ES384", "does not fit", id="wrong-curve"
        ),
        pytest.param(K1.public_jwk(), "HS256", "algorithm not allowed", id="hmac"),
        pytest.param(K1.public_jwk(), "none", "algorithm not allowed", id="none"),
        pytest.param({"kty": "RSA", "n": "AQAB", "e": "!!"}, "RS256", "unusable", id="unparseable"),
    ],
)
def test_key_must_fit_the_algorithm(jwk: dict[str, Any], algorithm: str, message: str) -> None:
    with pytest.raises(errors.InvalidToken, match=message) as info:
        key_for_algorithm(jwk, algorithm)
    assert info.value.code == "invalid_token"


def test_key_without_alg_is_bound_to_the_requested_algorithm() -> None:
    jwk = rsa_key("k1", publish_alg=False).public_jwk()
    assert key_for_algorithm(jwk, "PS256").algorithm_name == "PS256"
    assert key_for_algorithm(jwk, "RS512").algorithm_name == "RS512"


def test_refreshes_and_cooldown_refusals_are_counted(
    idp: FakeIdP, http: Http, store: Store, clock: FakeClock
) -> None:
    def count(result: str) -> float:
        value = metrics.REGISTRY.get_sample_value("broker_jwks_refreshes_total", {"result": result})
        return value or 0.0

    cache = make_cache(idp, http, store, clock)
    cache.get_key("k1", algorithm="RS256")
    refetched, cooldown = count("refetched"), count("cooldown")
    for _ in range(JWKS_REFRESH_BURST + 4):
        unknown_kid(cache, uuid.uuid4().hex)
    # The shared bucket allows JWKS_REFRESH_BURST refetches; the rest find it empty.
    assert count("refetched") == refetched + JWKS_REFRESH_BURST
    assert count("cooldown") == cooldown + 4
    assert idp.jwks_hits == 1 + JWKS_REFRESH_BURST
