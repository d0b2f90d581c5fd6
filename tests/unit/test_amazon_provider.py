"""AmazonProvider.verify against the local Login with Amazon stand-in and a real Redis.

The stand-in is a real HTTP server speaking LWA's documented ``tokeninfo`` and
``user/profile`` shapes, error bodies included; it counts requests, so caching and
retries are asserted by what actually reached it. Every rejection is one row and must
fail for its stated reason without the token appearing in the message or the logs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import redis
import requests
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker import errors
from broker.devstack.processes import free_port
from broker.devstack.social_servers import (
    AMAZON_DEMO_USERS,
    DEMO_AMAZON_APP_ID,
    DEMO_AMAZON_CLIENT_ID,
    FakeLoginWithAmazon,
    start_amazon_server,
)
from broker.http import Http
from broker.providers.amazon import STS_PROVIDER_ID, AmazonProvider
from broker.providers.oauth_common import (
    MAX_ACCESS_TOKEN_LENGTH,
    VERIFICATION_CACHE_MAX_SECONDS,
    token_digest,
)
from broker.settings import AmazonProviderSettings
from broker.store import Sealer, Store
from tests.unit.oidc_fixtures import FakeClock

ALICE = AMAZON_DEMO_USERS[0]
OTHER_CLIENT_ID = "amzn1.application-oa2-client.someoneelse"
TIMEOUT = 0.5


@pytest.fixture(scope="module")
def lwa_server() -> Iterator[FakeLoginWithAmazon]:
    server = start_amazon_server()
    server.hang_seconds = 3 * TIMEOUT * 4  # longer than every attempt together
    yield server
    server.stop()


@pytest.fixture
def lwa(lwa_server: FakeLoginWithAmazon) -> FakeLoginWithAmazon:
    lwa_server.reset()
    return lwa_server


@pytest.fixture
def http(production_http: Http) -> Http:
    return production_http


def amazon_settings(lwa: FakeLoginWithAmazon, **overrides: Any) -> AmazonProviderSettings:
    base = AmazonProviderSettings(
        name="amazon",
        type="amazon",
        display_name="Login with Amazon",
        client_ids=(DEMO_AMAZON_CLIENT_ID,),
        api_url=lwa.url,
        timeout_seconds=TIMEOUT,
    )
    return replace(base, **overrides)


@pytest.fixture
def make_provider(
    lwa: FakeLoginWithAmazon, http: Http, store: Store
) -> Callable[..., AmazonProvider]:
    def make(*, clock: Callable[[], float] = time.time, **overrides: Any) -> AmazonProvider:
        return AmazonProvider(
            settings=amazon_settings(lwa, **overrides), http=http, store=store, clock=clock
        )

    return make


def assert_token_not_leaked(
    exc: BaseException, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Not in the message, nor in any exception a traceback would print, nor in logs
    (as is, or URL-encoded as it appears in a query string: ``Atza|`` -> ``Atza%7C``)."""
    forms = {token, quote(token, safe=""), quote_plus(token)}
    seen: BaseException | None = exc
    while seen is not None:
        for form in forms:
            assert form not in str(seen), f"token leaked via {type(seen).__name__}"
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    for form in forms:
        assert form not in caplog.text


# --------------------------------------------------------------------------- success


def test_valid_token_gives_the_profile_as_claims(
    make_provider: Callable[..., AmazonProvider], lwa: FakeLoginWithAmazon
) -> None:
    token = lwa.mint("alice")
    before = time.time()
    verified = make_provider().verify(token)

    assert verified.provider == "amazon"
    assert verified.subject == ALICE.user_id
    assert verified.token == token
    assert verified.sts_provider_id == STS_PROVIDER_ID == "www.amazon.com"
    # tokeninfo's exp is seconds remaining (3600), not a timestamp.
    assert before + 3590 <= verified.expires_at <= time.time() + 3600
    assert dict(verified.claims) == {
        "iss": "www.amazon.com",
        "aud": DEMO_AMAZON_CLIENT_ID,
        "app_id": DEMO_AMAZON_APP_ID,
        "sub": ALICE.user_id,
        "user_id": ALICE.user_id,
        "email": ALICE.email,
        "name": ALICE.name,
        "postal_code": ALICE.postal_code,
        "exp": verified.expires_at,
    }
    assert "token" not in repr(verified)
    assert token not in repr(verified)
    assert lwa.hits("/auth/o2/tokeninfo") == 1
    assert lwa.hits("/user/profile") == 1


def test_any_configured_client_id_is_accepted(
    make_provider: Callable[..., AmazonProvider], lwa: FakeLoginWithAmazon
) -> None:
    provider = make_provider(client_ids=("amzn1.application-oa2-client.web", OTHER_CLIENT_ID))
    verified = provider.verify(lwa.mint("bob", client_id=OTHER_CLIENT_ID))
    assert verified.claims["aud"] == OTHER_CLIENT_ID


def test_user_id_scope_only_gives_a_subject_without_profile_fields(
    make_provider: Callable[..., AmazonProvider], lwa: FakeLoginWithAmazon
) -> None:
    verified = make_provider().verify(lwa.mint("alice", scopes=("profile:user_id",)))
    assert verified.subject == ALICE.user_id
    assert "email" not in verified.claims
    assert "name" not in verified.claims


# --------------------------------------------------------------------------- rejections


def _drop(endpoint: str, name: str) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    return lambda path, body: {
        k: v for k, v in body.items() if not (path.endswith(endpoint) and k == name)
    }


def _set(endpoint: str, name: str, value: Any) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    return lambda path, body: {**body, name: value} if path.endswith(endpoint) else body


@dataclass(frozen=True)
class Case:
    error: type[errors.BrokerError]
    message: str
    mint: Callable[[FakeLoginWithAmazon], str] = lambda lwa: lwa.mint("alice")
    tamper: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
    nonce: str | None = None


def _revoked(lwa: FakeLoginWithAmazon) -> str:
    token = lwa.mint("alice")
    lwa.revoke(token)
    return token


REJECTIONS = [
    # -- the token itself, refused before any request
    pytest.param(Case(errors.InvalidToken, "token is empty", mint=lambda _: ""), id="empty"),
    pytest.param(
        Case(
            errors.InvalidToken, "too large", mint=lambda _: "Atza|" + "x" * MAX_ACCESS_TOKEN_LENGTH
        ),
        id="too-large",
    ),
    pytest.param(
        Case(errors.InvalidToken, "characters", mint=lambda _: "Atza|abc def"), id="space"
    ),
    pytest.param(
        Case(errors.InvalidToken, "characters", mint=lambda _: "Atza|abc\ndef"), id="newline"
    ),
    pytest.param(
        Case(errors.BadRequest, "carry no nonce", nonce="n-123"), id="nonce-sent-with-access-token"
    ),
    # -- what Amazon says about it
    pytest.param(
        Case(errors.InvalidToken, "rejected the access token", mint=lambda _: "Atza|forged"),
        id="unknown-token",
    ),
    pytest.param(
        Case(
            errors.InvalidToken,
            "issued to another application",
            mint=lambda lwa: lwa.mint("alice", client_id=OTHER_CLIENT_ID),
        ),
        id="token-for-another-app",
    ),
    pytest.param(
        Case(
            errors.InvalidToken,
            "issued to another application",
            mint=lambda lwa: lwa.mint("alice", client_id=DEMO_AMAZON_CLIENT_ID.upper()),
        ),
        id="aud-differs-only-in-case",
    ),
    pytest.param(
        Case(
            errors.InvalidToken,
            "issued to another application",
            mint=lambda lwa: lwa.mint("alice", client_id=DEMO_AMAZON_CLIENT_ID + "x"),
        ),
        id="aud-with-our-id-as-prefix",
    ),
    pytest.param(
        Case(
            errors.InvalidToken,
            "rejected the access token",
            mint=lambda lwa: lwa.mint("alice", expires_in=-10),
        ),
        id="expired",
    ),
    pytest.param(
        Case(errors.InvalidToken, "rejected the access token", mint=_revoked), id="revoked"
    ),
    pytest.param(
        Case(errors.ExpiredToken, "has expired", tamper=_set("tokeninfo", "exp", 0)),
        id="tokeninfo-no-time-left",
    ),
    pytest.param(
        Case(
            errors.InvalidToken,
            "not granted the profile scope",
            mint=lambda lwa: lwa.mint("alice", scopes=("alexa::ask_skills:readwrite",)),
        ),
        id="no-profile-scope",
    ),
    pytest.param(
        Case(
            errors.InvalidToken,
            "name different users",
            tamper=_set("profile", "user_id", AMAZON_DEMO_USERS[1].user_id),
        ),
        id="profile-for-another-user",
    ),
    # -- Amazon answering nonsense: our problem to report, not the caller's (502)
    pytest.param(
        Case(errors.UpstreamError, "without user_id", tamper=_drop("tokeninfo", "user_id")),
        id="tokeninfo-missing-user_id",
    ),
    pytest.param(
        Case(
            errors.UpstreamError,
            "profile answered without user_id",
            tamper=_drop("profile", "user_id"),
        ),
        id="profile-missing-user_id",
    ),
    pytest.param(
        Case(errors.UpstreamError, "without aud", tamper=_drop("tokeninfo", "aud")),
        id="tokeninfo-missing-aud",
    ),
    pytest.param(
        Case(errors.UpstreamError, "without exp", tamper=_set("tokeninfo", "exp", "3600")),
        id="tokeninfo-exp-not-a-number",
    ),
    pytest.param(
        Case(errors.UpstreamError, "without exp", tamper=_set("tokeninfo", "exp", True)),
        id="tokeninfo-exp-boolean",
    ),
]


@pytest.mark.parametrize("case", REJECTIONS)
def test_rejections(
    case: Case,
    make_provider: Callable[..., AmazonProvider],
    lwa: FakeLoginWithAmazon,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = case.mint(lwa)
    lwa.tamper = case.tamper
    with pytest.raises(errors.BrokerError) as exc:
        make_provider().verify(token, nonce=case.nonce)
    assert type(exc.value) is case.error
    assert case.message in exc.value.message
    if token:
        assert_token_not_leaked(exc.value, token, caplog)


def test_rejections_are_not_cached(
    make_provider: Callable[..., AmazonProvider], lwa: FakeLoginWithAmazon
) -> None:
    provider = make_provider()
    token = lwa.mint("alice", client_id=OTHER_CLIENT_ID)
    for _ in range(2):
        with pytest.raises(errors.InvalidToken):
            provider.verify(token)
    assert lwa.hits("/auth/o2/tokeninfo") == 2


# --------------------------------------------------------------------------- upstream faults


@pytest.mark.parametrize("endpoint", ["/auth/o2/tokeninfo", "/user/profile"])
def test_upstream_500_is_retried_then_502(
    endpoint: str,
    make_provider: Callable[..., AmazonProvider],
    lwa: FakeLoginWithAmazon,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = lwa.mint("alice")
    lwa.fail("error", endpoint=endpoint)
    with pytest.raises(errors.UpstreamError) as exc:
        make_provider().verify(token)
    assert exc.value.status == 502
    assert lwa.hits(endpoint) == 3  # one attempt and two retries, then give up
    assert_token_not_leaked(exc.value, token, caplog)


def test_one_upstream_500_is_absorbed_by_a_retry(
    make_provider: Callable[..., AmazonProvider], lwa: FakeLoginWithAmazon
) -> None:
    lwa.fail("error", endpoint="tokeninfo", times=1)
    verified = make_provider().verify(lwa.mint("alice"))
    assert verified.subject == ALICE.user_id
    assert lwa.hits("/auth/o2/tokeninfo") == 2


@pytest.mark.parametrize("endpoint", ["/auth/o2/tokeninfo", "/user/profile"])
def test_malformed_json_is_502(
    endpoint: str,
    make_provider: Callable[..., AmazonProvider],
    lwa: FakeLoginWithAmazon,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = lwa.mint("alice")
    lwa.fail("malformed", endpoint=endpoint)
    with pytest.raises(errors.UpstreamError, match="malformed") as exc:
        make_provider().verify(token)
    assert_token_not_leaked(exc.value, token, caplog)


def test_timeout_is_a_quick_503(
    make_provider: Callable[..., AmazonProvider],
    lwa: FakeLoginWithAmazon,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = lwa.mint("alice")
    lwa.fail("hang", endpoint="tokeninfo")
    started = time.monotonic()
    with pytest.raises(errors.DependencyUnavailable) as exc:
        make_provider().verify(token)
    # Three attempts of TIMEOUT each plus a little backoff: bounded, not a hung worker.
    assert time.monotonic() - started < 3 * TIMEOUT + 1.0
    assert exc.value.status == 503
    assert_token_not_leaked(exc.value, token, caplog)


def test_unreachable_is_503(
    make_provider: Callable[..., AmazonProvider],
    lwa: FakeLoginWithAmazon,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = lwa.mint("alice")
    provider = make_provider(api_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(errors.DependencyUnavailable, match="unreachable") as exc:
        provider.verify(token)
    # The requests/urllib3 exception quotes the URL (with ?access_token=): it must not
    # survive in the chain the error handler logs.
    assert exc.value.__cause__ is None
    assert_token_not_leaked(exc.value, token, caplog)


# --------------------------------------------------------------------------- cache


def test_second_verify_of_a_token_makes_no_upstream_request(
    make_provider: Callable[..., AmazonProvider], lwa: FakeLoginWithAmazon
) -> None:
    token = lwa.mint("alice")
    first = make_provider().verify(token)
    # A new provider object (another worker) shares the cache through Redis.
    second = make_provider().verify(token)
    assert second == first
    assert second.token == token
    assert lwa.hits() == 2  # tokeninfo + profile, once


def test_cache_holds_a_hash_not_the_token(
    make_provider: Callable[..., AmazonProvider], lwa: FakeLoginWithAmazon, store: Store
) -> None:
    token = lwa.mint("alice", expires_in=600)
    make_provider().verify(token)

    key = store.key("verified", "amazon", token_digest(token))
    assert token not in key
    raw = store.client.get(key)
    assert raw is not None
    # Sealed: neither the token nor the claims are readable in Redis.
    assert token.encode() not in raw
    assert ALICE.email is not None
    assert ALICE.email.encode() not in raw
    value = store.get_sealed(key)
    assert isinstance(value, dict)
    assert token not in json.dumps(value)
    assert value["subject"] == ALICE.user_id
    # Kept until the token expires, and no longer.
    ttl = store.ttl_seconds(key)
    assert ttl is not None
    assert 590 < ttl <= 600
    assert not [k for k in store.client.keys(store.prefix + "*") if token.encode() in k]


def test_cache_is_bounded_for_long_lived_tokens(
    make_provider: Callable[..., AmazonProvider], lwa: FakeLoginWithAmazon, store: Store
) -> None:
    token = lwa.mint("alice", expires_in=10 * 86400)
    make_provider().verify(token)
    ttl = store.ttl_seconds(store.key("verified", "amazon", token_digest(token)))
    assert ttl is not None
    assert ttl <= VERIFICATION_CACHE_MAX_SECONDS


def test_cached_entry_is_not_used_after_the_token_expires(
    make_provider: Callable[..., AmazonProvider], lwa: FakeLoginWithAmazon
) -> None:
    clock = FakeClock()
    provider = make_provider(clock=clock)
    token = lwa.mint("alice", expires_in=120)
    provider.verify(token)
    clock.advance(121)
    # Past its expiry the entry is ignored (even if Redis still has it): ask again.
    provider.verify(token)
    assert lwa.hits("/auth/o2/tokeninfo") == 2


def test_removing_a_client_id_applies_to_cached_tokens(
    make_provider: Callable[..., AmazonProvider], lwa: FakeLoginWithAmazon
) -> None:
    token = lwa.mint("alice", client_id=OTHER_CLIENT_ID)
    make_provider(client_ids=(DEMO_AMAZON_CLIENT_ID, OTHER_CLIENT_ID)).verify(token)
    with pytest.raises(errors.InvalidToken, match="another application"):
        make_provider().verify(token)


def test_redis_down_means_verifying_upstream_every_time(
    lwa: FakeLoginWithAmazon, http: Http, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens there; no retries, so each cache call fails at once.
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    dead_store = Store(client=client, prefix="test:", sealer=Sealer([os.urandom(32)]))
    try:
        provider = AmazonProvider(settings=amazon_settings(lwa), http=http, store=dead_store)
        token = lwa.mint("alice")
        assert provider.verify(token).subject == ALICE.user_id
        assert provider.verify(token).subject == ALICE.user_id
    finally:
        client.close()
    assert lwa.hits("/auth/o2/tokeninfo") == 2
    assert "Redis is unavailable" in caplog.text  # logged once, by the store
    assert token not in caplog.text


# --------------------------------------------------------------------------- the stand-in


def test_stand_in_speaks_lwa_shapes(lwa: FakeLoginWithAmazon) -> None:
    token = lwa.mint("alice")
    info = requests.get(f"{lwa.url}/auth/o2/tokeninfo", params={"access_token": token}, timeout=5)
    assert info.status_code == 200
    assert set(info.json()) == {"iss", "user_id", "aud", "app_id", "exp", "iat"}
    assert 0 < info.json()["exp"] <= 3600

    bad = requests.get(f"{lwa.url}/auth/o2/tokeninfo", params={"access_token": "x"}, timeout=5)
    assert bad.status_code == 400
    assert bad.json()["error"] == "invalid_token"
    assert "error_description" in bad.json()

    by_header = requests.get(
        f"{lwa.url}/user/profile", headers={"x-amz-access-token": token}, timeout=5
    )
    assert by_header.json()["user_id"] == ALICE.user_id
    denied = requests.get(
        f"{lwa.url}/user/profile", headers={"Authorization": "Bearer nope"}, timeout=5
    )
    assert denied.status_code == 401
    assert denied.json()["error"] == "invalid_token"


def test_stand_in_mints_demo_tokens_over_http(lwa: FakeLoginWithAmazon) -> None:
    minted = requests.post(f"{lwa.url}/_demo/token", json={"user": "bob"}, timeout=5).json()
    assert minted["access_token"].startswith("Atza|")
    assert minted["token_type"] == "bearer"
    unknown = requests.post(f"{lwa.url}/_demo/token", json={"user": "nobody"}, timeout=5)
    assert unknown.status_code == 400
