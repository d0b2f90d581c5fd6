"""FacebookProvider.verify against the local Graph API stand-in and a real Redis.

The stand-in speaks Graph's documented ``oauth/access_token``, ``debug_token`` and
``/me`` shapes (error bodies included), checks ``appsecret_proof`` like an app with
"Require App Secret" on, and counts requests. Limited Login ID tokens are real RS256
JWTs signed by the stand-in and checked against its JWKS by the shared OIDC verifier.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import requests

from broker import errors
from broker.devstack.processes import free_port
from broker.devstack.social_servers import (
    DEMO_FACEBOOK_APP_ID,
    DEMO_FACEBOOK_APP_SECRET,
    FACEBOOK_DEMO_USERS,
    GRAPH_VERSION,
    FakeFacebook,
    start_facebook_server,
)
from broker.http import Http
from broker.providers import build_providers
from broker.providers.amazon import AmazonProvider
from broker.providers.facebook import (
    NEVER_EXPIRES_HORIZON_SECONDS,
    STS_PROVIDER_ID,
    FacebookProvider,
    LimitedLoginNotEnabled,
    appsecret_proof,
)
from broker.providers.oauth_common import VERIFICATION_CACHE_MAX_SECONDS, token_digest
from broker.settings import FacebookProviderSettings, settings_from_mapping
from broker.store import Store
from tests.unit.oidc_fixtures import FakeClock

ALICE, BOB, MALLORY = FACEBOOK_DEMO_USERS
OTHER_APP_ID = "999999999999999"
TIMEOUT = 0.5


@pytest.fixture(scope="module")
def graph_server() -> Iterator[FakeFacebook]:
    server = start_facebook_server()
    server.hang_seconds = 3 * TIMEOUT * 4
    yield server
    server.stop()


@pytest.fixture
def graph(graph_server: FakeFacebook) -> Iterator[FakeFacebook]:
    graph_server.reset()
    yield graph_server
    graph_server.app_secret = DEMO_FACEBOOK_APP_SECRET


@pytest.fixture
def http(production_http: Http) -> Http:
    return production_http


def facebook_settings(graph: FakeFacebook, **overrides: Any) -> FacebookProviderSettings:
    base = FacebookProviderSettings(
        name="facebook",
        type="facebook",
        display_name="Facebook",
        app_id=DEMO_FACEBOOK_APP_ID,
        app_secret=DEMO_FACEBOOK_APP_SECRET,
        graph_url=graph.url,
        graph_version=GRAPH_VERSION,
        timeout_seconds=TIMEOUT,
        limited_login=False,
        limited_login_issuer="https://www.facebook.com",
        limited_login_jwks_url=graph.jwks_url,
        limited_login_sts_ready=False,
    )
    return replace(base, **overrides)


@pytest.fixture
def make_provider(graph: FakeFacebook, http: Http, store: Store) -> Callable[..., FacebookProvider]:
    def make(
        *,
        clock: Callable[[], float] = time.time,
        cooldown: float = 60.0,
        **overrides: Any,
    ) -> FacebookProvider:
        return FacebookProvider(
            settings=facebook_settings(graph, **overrides),
            http=http,
            store=store,
            clock=clock,
            app_token_renew_cooldown=cooldown,
        )

    return make


def assert_token_not_leaked(
    exc: BaseException, secrets: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """Not in the message, nor in any exception a traceback would print, nor in logs
    (as is, or URL-encoded as it appears in a query string)."""
    forms = {f(s) for s in secrets for f in (str, quote, quote_plus)}
    seen: BaseException | None = exc
    while seen is not None:
        for form in forms:
            assert form not in str(seen), f"secret leaked via {type(seen).__name__}"
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    for form in forms:
        assert form not in caplog.text


# --------------------------------------------------------------------------- success


def test_valid_token_gives_the_user_as_claims(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook
) -> None:
    token = graph.mint("alice")
    before = time.time()
    verified = make_provider().verify(token)

    assert verified.provider == "facebook"
    assert verified.subject == ALICE.user_id
    assert verified.token == token
    assert verified.sts_provider_id == STS_PROVIDER_ID == "graph.facebook.com"
    assert before + 7190 <= verified.expires_at <= time.time() + 7200
    assert dict(verified.claims) == {
        "iss": "graph.facebook.com",
        "aud": DEMO_FACEBOOK_APP_ID,
        "app_id": DEMO_FACEBOOK_APP_ID,
        "sub": ALICE.user_id,
        "id": ALICE.user_id,
        "email": ALICE.email,
        "name": ALICE.name,
        "scopes": ["public_profile", "email"],
        "exp": verified.expires_at,
    }
    # One app token, one debug_token, one /me (whose appsecret_proof the stand-in checked).
    assert graph.hits("/oauth/access_token") == 1
    assert graph.hits("/debug_token") == 1
    assert graph.hits("/me") == 1


def test_person_without_email_or_email_scope(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook
) -> None:
    provider = make_provider()
    assert "email" not in provider.verify(graph.mint("mallory")).claims
    assert "email" not in provider.verify(graph.mint("bob", scopes=("public_profile",))).claims


def test_never_expiring_token_is_bounded_by_data_access(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook, store: Store
) -> None:
    token = graph.mint("alice", expires_in=None, data_access_expires_in=3 * 86400)
    verified = make_provider().verify(token)
    assert abs(verified.expires_at - (time.time() + 3 * 86400)) < 5
    # ...and the cache still asks Graph again within the bound.
    ttl = store.ttl_seconds(store.key("verified", "facebook", token_digest(token)))
    assert ttl is not None
    assert ttl <= VERIFICATION_CACHE_MAX_SECONDS


def test_never_expiring_token_without_data_access_expiry_gets_a_horizon(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook
) -> None:
    token = graph.mint("alice", expires_in=None, data_access_expires_in=None)
    verified = make_provider().verify(token)
    assert abs(verified.expires_at - (time.time() + NEVER_EXPIRES_HORIZON_SECONDS)) < 5


def test_app_token_is_fetched_once(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook
) -> None:
    provider = make_provider()
    for user in ("alice", "bob", "mallory"):
        provider.verify(graph.mint(user))
    assert graph.hits("/oauth/access_token") == 1
    assert graph.hits("/debug_token") == 3


def test_revoked_app_token_is_renewed_once(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook
) -> None:
    provider = make_provider()
    provider.verify(graph.mint("alice"))
    graph.revoke_app_tokens()  # what resetting the app secret does
    assert provider.verify(graph.mint("bob")).subject == BOB.user_id
    assert graph.hits("/oauth/access_token") == 2


def test_app_token_renewal_is_rate_limited(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook
) -> None:
    provider = make_provider(cooldown=60.0)
    provider.verify(graph.mint("alice"))
    graph.revoke_app_tokens()
    provider.verify(graph.mint("bob"))
    graph.revoke_app_tokens()
    # Within the cooldown no third fetch: Graph keeps refusing our app token -> 502.
    with pytest.raises(errors.UpstreamError, match="app access token"):
        provider.verify(graph.mint("mallory"))
    assert graph.hits("/oauth/access_token") == 2


# --------------------------------------------------------------------------- rejections


def _drop_data(name: str) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    def tamper(path: str, body: dict[str, Any]) -> dict[str, Any]:
        if path.endswith("/debug_token"):
            return {"data": {k: v for k, v in body["data"].items() if k != name}}
        return body

    return tamper


def _set_data(name: str, value: Any) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    def tamper(path: str, body: dict[str, Any]) -> dict[str, Any]:
        if path.endswith("/debug_token"):
            return {"data": {**body["data"], name: value}}
        return body

    return tamper


def _set_me(name: str, value: Any) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    return lambda path, body: {**body, name: value} if path.endswith("/me") else body


def _drop_me(name: str) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    return lambda path, body: (
        {k: v for k, v in body.items() if k != name} if path.endswith("/me") else body
    )


def _revoked(graph: FakeFacebook) -> str:
    token = graph.mint("alice")
    graph.revoke(token)
    return token


@dataclass(frozen=True)
class Case:
    error: type[errors.BrokerError]
    message: str
    mint: Callable[[FakeFacebook], str] = lambda graph: graph.mint("alice")
    tamper: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
    nonce: str | None = None


REJECTIONS = [
    pytest.param(Case(errors.InvalidToken, "token is empty", mint=lambda _: ""), id="empty"),
    pytest.param(
        Case(errors.InvalidToken, "characters", mint=lambda _: "EAA abc"), id="space-in-token"
    ),
    pytest.param(
        Case(errors.BadRequest, "carry no nonce", nonce="n-1"), id="nonce-with-access-token"
    ),
    pytest.param(
        Case(errors.InvalidToken, "invalid or revoked", mint=lambda _: "EAAforged0000"),
        id="unknown-token",
    ),
    pytest.param(
        Case(
            errors.InvalidToken,
            "another Facebook app",
            mint=lambda graph: graph.mint("alice", app_id=OTHER_APP_ID),
        ),
        id="token-for-another-app",
    ),
    pytest.param(
        Case(
            errors.InvalidToken,
            "another Facebook app",
            mint=lambda graph: graph.mint("alice", app_id=DEMO_FACEBOOK_APP_ID + "0"),
        ),
        id="app-id-with-ours-as-prefix",
    ),
    pytest.param(
        Case(errors.ExpiredToken, "has expired", mint=lambda g: g.mint("alice", expires_in=-60)),
        id="expired",
    ),
    pytest.param(Case(errors.InvalidToken, "invalid or revoked", mint=_revoked), id="revoked"),
    pytest.param(
        Case(errors.InvalidToken, "not valid", tamper=_set_data("is_valid", False)),
        id="is_valid-false-without-error",
    ),
    pytest.param(
        Case(errors.InvalidToken, "not valid", tamper=_set_data("is_valid", "true")),
        id="is_valid-a-string",
    ),
    pytest.param(
        Case(errors.ExpiredToken, "has expired", tamper=_set_data("expires_at", 1_000_000_000)),
        id="valid-but-expires_at-past",
    ),
    pytest.param(
        Case(
            errors.ExpiredToken,
            "data has expired",
            tamper=_set_data("data_access_expires_at", 1_000_000_000),
        ),
        id="data-access-expired",
    ),
    pytest.param(
        Case(errors.InvalidToken, "not a Facebook user access token", tamper=_drop_data("user_id")),
        id="missing-user_id",
    ),
    pytest.param(
        Case(
            errors.InvalidToken,
            "not a Facebook user access token",
            tamper=_set_data("type", "PAGE"),
        ),
        id="page-token",
    ),
    pytest.param(
        Case(errors.InvalidToken, "name different users", tamper=_set_me("id", BOB.user_id)),
        id="me-is-another-user",
    ),
    pytest.param(
        Case(errors.UpstreamError, "/me answered without id", tamper=_drop_me("id")),
        id="me-missing-id",
    ),
    pytest.param(
        Case(errors.UpstreamError, "without expires_at", tamper=_drop_data("expires_at")),
        id="missing-expires_at",
    ),
    pytest.param(
        Case(
            errors.UpstreamError,
            "without a data object",
            tamper=lambda path, body: {} if path.endswith("/debug_token") else body,
        ),
        id="debug_token-without-data",
    ),
]


@pytest.mark.parametrize("case", REJECTIONS)
def test_rejections(
    case: Case,
    make_provider: Callable[..., FacebookProvider],
    graph: FakeFacebook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = case.mint(graph)
    graph.tamper = case.tamper
    with pytest.raises(errors.BrokerError) as exc:
        make_provider().verify(token, nonce=case.nonce)
    assert type(exc.value) is case.error
    assert case.message in exc.value.message
    if token:
        assert_token_not_leaked(exc.value, (token, DEMO_FACEBOOK_APP_SECRET), caplog)


def test_wrong_appsecret_proof_is_refused_by_graph(
    make_provider: Callable[..., FacebookProvider],
    graph: FakeFacebook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = make_provider()
    provider.verify(graph.mint("alice"))  # the app token is now cached
    # The app secret was rotated at Facebook but not here: our proofs no longer match.
    graph.app_secret = "rotated-secret"
    token = graph.mint("bob")
    with pytest.raises(errors.UpstreamError, match=r"/me failed \(error code 100\)") as exc:
        provider.verify(token)
    assert_token_not_leaked(exc.value, (token, DEMO_FACEBOOK_APP_SECRET), caplog)


def test_wrong_app_secret_is_an_upstream_error_without_the_secret(
    make_provider: Callable[..., FacebookProvider],
    graph: FakeFacebook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = graph.mint("alice")
    with pytest.raises(errors.UpstreamError, match="app_id/app_secret") as exc:
        make_provider(app_secret="not-the-secret").verify(token)
    assert exc.value.status == 502
    assert_token_not_leaked(exc.value, (token, "not-the-secret"), caplog)


# --------------------------------------------------------------------------- upstream faults


@pytest.mark.parametrize("endpoint", ["/oauth/access_token", "/debug_token", "/me"])
def test_upstream_500_is_retried_then_502(
    endpoint: str,
    make_provider: Callable[..., FacebookProvider],
    graph: FakeFacebook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = graph.mint("alice")
    graph.fail("error", endpoint=endpoint)
    with pytest.raises(errors.UpstreamError) as exc:
        make_provider().verify(token)
    assert graph.hits(endpoint) == 3
    assert_token_not_leaked(exc.value, (token, DEMO_FACEBOOK_APP_SECRET), caplog)


@pytest.mark.parametrize("endpoint", ["/oauth/access_token", "/debug_token", "/me"])
def test_malformed_json_is_502(
    endpoint: str,
    make_provider: Callable[..., FacebookProvider],
    graph: FakeFacebook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = graph.mint("alice")
    graph.fail("malformed", endpoint=endpoint)
    with pytest.raises(errors.UpstreamError, match="malformed") as exc:
        make_provider().verify(token)
    assert_token_not_leaked(exc.value, (token, DEMO_FACEBOOK_APP_SECRET), caplog)


def test_timeout_is_a_quick_503(
    make_provider: Callable[..., FacebookProvider],
    graph: FakeFacebook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = graph.mint("alice")
    graph.fail("hang", endpoint="/debug_token")
    started = time.monotonic()
    with pytest.raises(errors.DependencyUnavailable) as exc:
        make_provider().verify(token)
    assert time.monotonic() - started < 3 * TIMEOUT + 1.0
    assert_token_not_leaked(exc.value, (token, DEMO_FACEBOOK_APP_SECRET), caplog)


def test_unreachable_is_503_without_the_secret_in_the_chain(
    make_provider: Callable[..., FacebookProvider],
    graph: FakeFacebook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = graph.mint("alice")
    with pytest.raises(errors.DependencyUnavailable, match="unreachable") as exc:
        make_provider(graph_url=f"http://127.0.0.1:{free_port()}").verify(token)
    # oauth/access_token carries client_secret in its query string.
    assert exc.value.__cause__ is None
    assert_token_not_leaked(exc.value, (token, DEMO_FACEBOOK_APP_SECRET), caplog)


# --------------------------------------------------------------------------- cache


def test_second_verify_of_a_token_makes_no_upstream_request(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook
) -> None:
    token = graph.mint("alice")
    first = make_provider().verify(token)
    hits = graph.hits()
    second = make_provider().verify(token)  # another worker: shares only Redis
    assert second == first
    assert second.token == token
    assert graph.hits() == hits


def test_cache_entry_expires_with_the_token(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook, store: Store
) -> None:
    clock = FakeClock()
    provider = make_provider(clock=clock)
    token = graph.mint("alice", expires_in=300)
    provider.verify(token)
    ttl = store.ttl_seconds(store.key("verified", "facebook", token_digest(token)))
    assert ttl is not None
    assert 290 < ttl <= 300
    clock.advance(301)
    # Past the token's expiry the entry is ignored (even if Redis still has it): Graph is
    # asked again, and the answer's expires_at is in the past by our clock.
    with pytest.raises(errors.ExpiredToken):
        provider.verify(token)
    assert graph.hits("/debug_token") == 2


def test_changing_the_app_id_applies_to_cached_tokens(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook
) -> None:
    token = graph.mint("alice")
    make_provider().verify(token)
    with pytest.raises(errors.BrokerError):
        # Another app id: the cached verdict is not reused (and Graph refuses the app).
        make_provider(app_id=OTHER_APP_ID).verify(token)
    assert graph.hits("/debug_token") == 1  # the new app's app-token fetch failed first


# --------------------------------------------------------------------------- Limited Login


def test_limited_login_token_is_verified_as_an_oidc_id_token(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook
) -> None:
    provider = make_provider(limited_login=True, limited_login_sts_ready=True)
    token = graph.mint_limited_login("alice", nonce="nonce-1")
    verified = provider.verify(token, nonce="nonce-1")
    assert verified.provider == "facebook"
    assert verified.subject == ALICE.user_id  # the same person as with a classic token
    assert verified.sts_provider_id is None  # an ID token for an IAM OIDC provider
    assert verified.claims["iss"] == "https://www.facebook.com"
    assert verified.claims["aud"] == DEMO_FACEBOOK_APP_ID
    assert verified.claims["app_id"] == DEMO_FACEBOOK_APP_ID
    assert verified.claims["id"] == ALICE.user_id
    assert verified.claims["email"] == ALICE.email
    assert graph.hits(LIMITED_JWKS := "/jwks/") == 1
    assert graph.hits("/debug_token") == 0
    provider.verify(graph.mint_limited_login("bob", nonce="nonce-2"), nonce="nonce-2")
    assert graph.hits(LIMITED_JWKS) == 1  # keys cached


LIMITED_REJECTIONS = [
    pytest.param(
        lambda g: g.mint_limited_login("alice", nonce="n"), None, "nonce is required", id="no-nonce"
    ),
    pytest.param(
        lambda g: g.mint_limited_login("alice", nonce="n"), "other", "wrong nonce", id="wrong-nonce"
    ),
    pytest.param(
        lambda g: g.mint_limited_login("alice", nonce="n", audience=OTHER_APP_ID),
        "n",
        "wrong audience",
        id="other-app",
    ),
    pytest.param(
        lambda g: g.mint_limited_login("alice", nonce="n", issuer="https://evil.example"),
        "n",
        "wrong issuer",
        id="wrong-issuer",
    ),
    pytest.param(
        lambda g: g.mint_limited_login("alice", nonce="n", expires_in=-600),
        "n",
        "expired",
        id="expired",
    ),
    pytest.param(
        lambda g: g.mint_limited_login("alice", nonce="n")[:-4] + "AAAA",
        "n",
        "signature",
        id="bad-signature",
    ),
]


@pytest.mark.parametrize(("mint", "nonce", "message"), LIMITED_REJECTIONS)
def test_limited_login_rejections_are_401_even_before_sts_is_ready(
    *,
    mint: Callable[[FakeFacebook], str],
    nonce: str | None,
    message: str,
    make_provider: Callable[..., FacebookProvider],
    graph: FakeFacebook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = mint(graph)
    with pytest.raises(errors.InvalidToken, match=message) as exc:
        make_provider(limited_login=True).verify(token, nonce=nonce)
    assert exc.value.status == 401
    assert_token_not_leaked(exc.value, (token,), caplog)


def test_limited_login_without_iam_oidc_provider_says_what_to_do(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook
) -> None:
    token = graph.mint_limited_login("alice", nonce="n")
    with pytest.raises(LimitedLoginNotEnabled) as exc:
        make_provider(limited_login=True).verify(token, nonce="n")
    assert exc.value.status == 400
    assert exc.value.code == "limited_login_not_enabled"
    assert "IAM OIDC identity provider for https://www.facebook.com" in exc.value.message
    assert "providers.facebook.limited_login_sts_ready = true" in exc.value.message


def test_limited_login_token_when_switched_off(
    make_provider: Callable[..., FacebookProvider], graph: FakeFacebook
) -> None:
    token = graph.mint_limited_login("alice", nonce="n")
    with pytest.raises(LimitedLoginNotEnabled, match=r"limited_login is off") as exc:
        make_provider().verify(token, nonce="n")
    assert exc.value.status == 400
    assert graph.hits() == 0  # nothing was sent to Graph


@pytest.mark.parametrize("limited_login", [True, False], ids=["limited-on", "limited-off"])
@pytest.mark.parametrize(
    ("respell", "message"),
    [
        pytest.param(lambda t: t + "==", "not canonical base64url", id="padded-signature"),
        pytest.param(lambda t: t.replace(".", ". ", 1), "not canonical base64url", id="space"),
        pytest.param(lambda t: t + ".e30", "three dot-separated segments", id="four-segments"),
        pytest.param(lambda _t: "x.y", "three dot-separated segments", id="dotted-junk"),
    ],
)
def test_a_dotted_token_is_read_by_the_strict_jwt_parser_never_sent_to_graph(
    *,
    limited_login: bool,
    respell: Callable[[str], str],
    message: str,
    make_provider: Callable[..., FacebookProvider],
    graph: FakeFacebook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Classic access tokens have no dot: whatever has one is a JWT to us, so a re-spelt
    # Limited Login token is a 401 from the one JWT parser, not an access token for Graph.
    token = respell(graph.mint_limited_login("alice", nonce="n"))
    provider = make_provider(limited_login=limited_login, limited_login_sts_ready=True)
    with pytest.raises(errors.InvalidToken, match=message) as exc:
        provider.verify(token, nonce="n")
    assert (exc.value.status, exc.value.code) == (401, "invalid_token")
    assert_token_not_leaked(exc.value, (token,), caplog)
    assert graph.hits() == 0  # neither Graph nor the Limited Login keys were asked


# --------------------------------------------------------------------------- wiring


def test_build_providers_builds_amazon_and_facebook(
    graph: FakeFacebook, http: Http, store: Store
) -> None:
    settings = settings_from_mapping(
        {
            "server": {"public_url": "http://127.0.0.1:8000"},
            "redis": {"url": "redis://127.0.0.1:1/0"},
            "security": {"identity_key": "k" * 32, "encryption_keys": ["A" * 43 + "="]},
            "providers": {
                "amazon": {"client_ids": ["amzn1.application-oa2-client.x"]},
                "facebook": {
                    "app_id": DEMO_FACEBOOK_APP_ID,
                    "app_secret": DEMO_FACEBOOK_APP_SECRET,
                    "graph_url": graph.url,
                    "limited_login": True,
                },
            },
            "rules": [
                {
                    "providers": ["amazon", "facebook"],
                    "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
                    "roles": ["arn:aws:iam::123456789012:role/AppUser"],
                }
            ],
        },
        env={},
    )
    providers = build_providers(settings, http=http, store=store)
    assert isinstance(providers["amazon"], AmazonProvider)
    assert isinstance(providers["facebook"], FacebookProvider)
    assert providers["facebook"].display_name == "Facebook"


# --------------------------------------------------------------------------- the stand-in


def test_stand_in_speaks_graph_shapes(graph: FakeFacebook) -> None:
    base = f"{graph.url}/{GRAPH_VERSION}"
    bad_secret = requests.get(
        f"{base}/oauth/access_token",
        params={
            "client_id": DEMO_FACEBOOK_APP_ID,
            "client_secret": "wrong",
            "grant_type": "client_credentials",
        },
        timeout=5,
    )
    assert bad_secret.status_code == 400
    assert bad_secret.json()["error"]["type"] == "OAuthException"
    assert bad_secret.json()["error"]["code"] == 1
    assert "fbtrace_id" in bad_secret.json()["error"]

    app_token = f"{DEMO_FACEBOOK_APP_ID}|{DEMO_FACEBOOK_APP_SECRET}"  # Graph accepts this form
    junk = requests.get(
        f"{base}/debug_token", params={"input_token": "EAAx", "access_token": app_token}, timeout=5
    ).json()
    assert junk["data"]["is_valid"] is False
    assert junk["data"]["error"]["code"] == 190

    token = graph.mint("alice", expires_in=-1)
    expired = requests.get(
        f"{base}/me",
        params={"fields": "id", "appsecret_proof": appsecret_proof(token, graph.app_secret)},
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    assert expired.status_code == 400
    assert expired.json()["error"]["code"] == 190
    assert expired.json()["error"]["error_subcode"] == 463


@pytest.mark.parametrize(
    ("proof", "message"),
    [
        (None, "require an appsecret_proof"),
        ("0" * 64, "Invalid appsecret_proof"),
    ],
)
def test_stand_in_checks_appsecret_proof(
    graph: FakeFacebook, proof: str | None, message: str
) -> None:
    token = graph.mint("alice")
    params = {"fields": "id"} | ({"appsecret_proof": proof} if proof else {})
    response = requests.get(
        f"{graph.url}/{GRAPH_VERSION}/me",
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == 100
    assert error["type"] == "GraphMethodException"
    assert message in error["message"]


def test_stand_in_mints_demo_tokens_over_http(graph: FakeFacebook) -> None:
    minted = requests.post(f"{graph.url}/_demo/token", json={"user": "bob"}, timeout=5).json()
    assert minted["access_token"].startswith("EAA")
    limited = requests.post(
        f"{graph.url}/_demo/limited_login_token", json={"user": "bob", "nonce": "n"}, timeout=5
    ).json()
    assert limited["authentication_token"].count(".") == 2
