"""OIDCProvider.verify against real signed JWTs, a local JWKS server and real Redis.

Every rejection is one row: each must fail for its stated reason (error class, code
and message), and the token must never appear in the message or the logs.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest

from broker import errors
from broker.http import Http
from broker.providers import build_providers
from broker.providers.oidc import MAX_TOKEN_LENGTH, OIDCProvider
from broker.settings import (
    GOOGLE_ISSUERS,
    GOOGLE_JWKS_URL,
    OIDCProviderSettings,
    Settings,
    settings_from_mapping,
)
from broker.store import Store
from tests.unit.oidc_fixtures import (
    CLIENT_ID,
    ISSUER,
    OTHER_CLIENT_ID,
    FakeClock,
    FakeIdP,
    KeyPair,
    _rsa_private,
    claims,
    ec_key,
    hmac_with_public_key,
    oidc_settings,
    rsa_key,
    sign,
    unsigned_token,
)

KEY = rsa_key("k1")
SECOND = rsa_key("k2")
IMPOSTOR = rsa_key("k1", label="impostor")  # same kid, different key pair
EC_KEY = ec_key("e1")


@pytest.fixture
def idp(idp_server: FakeIdP) -> FakeIdP:
    idp_server.reset(KEY)
    return idp_server


@pytest.fixture
def make_provider(idp: FakeIdP, http: Http, store: Store) -> Callable[..., OIDCProvider]:
    def make(**overrides: Any) -> OIDCProvider:
        return OIDCProvider(settings=oidc_settings(idp, **overrides), http=http, store=store)

    return make


def _now() -> int:
    return int(time.time())


def _tampered() -> str:
    header, _, signature = sign(KEY, claims()).split(".")
    other_payload = sign(KEY, claims(sub="admin")).split(".")[1]
    return f"{header}.{other_payload}.{signature}"


def _signed_without(claim: str) -> Callable[[], str]:
    return lambda: sign(KEY, claims(**{claim: None}))


def _constant(token: str) -> Callable[[], str]:
    return lambda: token


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


# --------------------------------------------------------------------------- rejections


@dataclass(frozen=True)
class Case:
    token: Callable[[], str]
    message: str
    error: type[errors.InvalidToken] = errors.InvalidToken
    nonce: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    published: tuple[KeyPair, ...] = (KEY,)


TWO_CLIENTS = {"client_ids": (CLIENT_ID, OTHER_CLIENT_ID)}
# Published by a careless IdP: verifies mathematically, too short to trust.
SHORT_KEY = KeyPair(kid="short", private=_rsa_private("short", 1024))


def _signed_with(name: str, value: Any) -> Callable[[], str]:
    return lambda: sign(KEY, claims(**{name: value}))


def _signed_with_short_key() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return sign(SHORT_KEY, claims())


REJECTIONS = [
    # -- signature and key
    pytest.param(
        Case(lambda: sign(IMPOSTOR, claims()), "signature verification failed"),
        id="wrong-signature-same-kid",
    ),
    pytest.param(Case(_tampered, "signature verification failed"), id="tampered-payload"),
    pytest.param(
        Case(lambda: sign(rsa_key("k-unknown"), claims()), "unknown signing key"),
        id="unknown-kid",
    ),
    pytest.param(
        Case(
            lambda: sign(KEY, claims(), include_kid=False),
            "token has no key id",
            published=(KEY, SECOND),
        ),
        id="absent-kid-with-several-keys",
    ),
    pytest.param(
        Case(
            lambda: sign(SECOND, claims(), include_kid=False),
            "signature verification failed",
        ),
        id="absent-kid-signed-by-another-key",
    ),
    # -- algorithm
    pytest.param(
        Case(lambda: unsigned_token(claims(), kid="k1"), "algorithm not allowed"),
        id="alg-none",
    ),
    pytest.param(
        Case(
            lambda: unsigned_token(claims(), kid="k1"),
            "algorithm not allowed",
            settings={"algorithms": ("RS256", "none")},
        ),
        id="alg-none-even-if-configured",
    ),
    pytest.param(
        Case(lambda: hmac_with_public_key(KEY, claims()), "algorithm not allowed"),
        id="hs256-keyed-with-public-key",
    ),
    pytest.param(
        Case(
            lambda: hmac_with_public_key(KEY, claims()),
            "algorithm not allowed",
            settings={"algorithms": ("RS256", "HS256")},
        ),
        id="hs256-even-if-configured",
    ),
    pytest.param(
        Case(lambda: sign(KEY, claims(), alg="RS512"), "algorithm not allowed"),
        id="alg-not-in-allow-list",
    ),
    pytest.param(
        Case(
            lambda: sign(KEY, claims(), alg="RS384"),
            "published for another algorithm",
            settings={"algorithms": ("RS256", "RS384")},
        ),
        id="key-published-for-another-alg",
    ),
    pytest.param(
        Case(
            lambda: sign(ec_key("k1", label="ec-k1"), claims()),
            "does not fit the algorithm",
            settings={"algorithms": ("RS256", "ES256")},
            published=(rsa_key("k1", publish_alg=False),),
        ),
        id="ec-alg-with-rsa-key",
    ),
    # -- issuer
    pytest.param(
        Case(lambda: sign(KEY, claims(issuer="https://evil.example.test")), "wrong issuer"),
        id="wrong-issuer",
    ),
    pytest.param(
        Case(lambda: sign(KEY, claims(issuer=ISSUER + "/")), "wrong issuer"),
        id="issuer-trailing-slash",
    ),
    pytest.param(
        Case(
            lambda: sign(KEY, claims(issuer=ISSUER.replace("https://", "http://"))),
            "wrong issuer",
        ),
        id="issuer-other-scheme",
    ),
    pytest.param(
        Case(lambda: sign(KEY, claims(issuer=ISSUER.upper())), "wrong issuer"),
        id="issuer-other-case",
    ),
    # -- audience and azp
    pytest.param(
        Case(lambda: sign(KEY, claims(audience="someone-else")), "wrong audience"),
        id="wrong-audience",
    ),
    pytest.param(
        Case(
            lambda: sign(KEY, claims(audience=[CLIENT_ID, "stranger"], azp=CLIENT_ID)),
            "wrong audience",
        ),
        id="untrusted-extra-audience",
    ),
    pytest.param(
        Case(
            lambda: sign(KEY, claims(audience=[CLIENT_ID, OTHER_CLIENT_ID])),
            "several audiences but no azp",
            settings=TWO_CLIENTS,
        ),
        id="multiple-audiences-without-azp",
    ),
    pytest.param(
        Case(lambda: sign(KEY, claims(azp="stranger")), "wrong authorized party"),
        id="azp-not-a-client-id",
    ),
    pytest.param(
        Case(
            lambda: sign(KEY, claims(audience=[CLIENT_ID, OTHER_CLIENT_ID], azp="stranger")),
            "wrong authorized party",
            settings=TWO_CLIENTS,
        ),
        id="multiple-audiences-azp-not-a-client-id",
    ),
    # -- lifetime
    pytest.param(
        Case(
            lambda: sign(KEY, claims(iat=_now() - 7200, exp=_now() - 3600)),
            "token has expired",
            error=errors.ExpiredToken,
        ),
        id="expired",
    ),
    pytest.param(
        Case(
            lambda: sign(KEY, claims(iat=_now() - 7200, exp=_now() - 90)),
            "token has expired",
            error=errors.ExpiredToken,
        ),
        id="expired-beyond-leeway",
    ),
    pytest.param(
        Case(lambda: sign(KEY, claims(nbf=_now() + 600)), "not yet valid (nbf)"),
        id="nbf-in-the-future",
    ),
    pytest.param(
        Case(lambda: sign(KEY, claims(iat=_now() + 600)), "issued in the future"),
        id="iat-in-the-future",
    ),
    pytest.param(
        Case(lambda: sign(KEY, claims(exp=str(_now() + 600))), "non-numeric exp"),
        id="exp-as-string",
    ),
    *[
        pytest.param(Case(_signed_with(name, value), message), id=ident)
        for ident, name, value, message in [
            ("iat-as-string", "iat", str(_now()), "non-numeric iat"),
            ("nbf-as-boolean", "nbf", True, "non-numeric nbf"),
            ("exp-as-boolean", "exp", True, "non-numeric exp"),
            ("aud-a-number", "aud", 7, "wrong audience"),
            ("aud-a-list-with-a-number", "aud", [CLIENT_ID, 7], "wrong audience"),
            ("aud-an-empty-list", "aud", [], "wrong audience"),
            ("aud-an-object", "aud", {CLIENT_ID: True}, "wrong audience"),
            ("jti-a-number", "jti", 12, "non-string jti"),
        ]
    ],
    pytest.param(
        Case(
            _signed_with_short_key,
            "signing key is unusable",
            published=(SHORT_KEY,),
        ),
        id="rsa-key-shorter-than-2048-bits",
    ),
    # -- required claims
    *[
        pytest.param(
            Case(_signed_without(name), f"no {name} claim"),
            id=f"missing-{name}",
        )
        for name in ("sub", "exp", "iat", "iss", "aud")
    ],
    pytest.param(Case(lambda: sign(KEY, claims(sub="")), "empty subject"), id="empty-sub"),
    pytest.param(Case(lambda: sign(KEY, claims(sub=42)), "non-string subject"), id="int-sub"),
    # -- nonce
    pytest.param(
        Case(lambda: sign(KEY, claims(nonce="nonce-1")), "wrong nonce", nonce="nonce-2"),
        id="wrong-nonce",
    ),
    pytest.param(
        Case(lambda: sign(KEY, claims()), "token has no nonce", nonce="nonce-1"),
        id="missing-nonce-when-expected",
    ),
    pytest.param(
        Case(
            lambda: sign(KEY, claims(nonce="nonce-1")),
            "a nonce is required",
            settings={"require_nonce": True},
        ),
        id="require-nonce-without-nonce",
    ),
    # -- shape
    pytest.param(
        Case(lambda: sign(KEY, claims(pad="x" * MAX_TOKEN_LENGTH)), "too large"),
        id="oversize-token",
    ),
    pytest.param(Case(lambda: "", "token is empty"), id="empty-string"),
    *[
        pytest.param(Case(_constant(garbage), "not a well-formed JWT"), id=name)
        for name, garbage in [
            ("two-segments", "a.b"),
            ("three-junk-segments", "a.b.c"),
            ("non-base64", "!!!.@@@.###"),
            ("plain-text", "not a token at all"),
            ("header-not-an-object", _b64("[1, 2]") + "." + _b64("{}") + ".c2ln"),
            ("kid-not-a-string", _b64('{"alg":"RS256","kid":7}') + "." + _b64("{}") + ".c2ln"),
            (
                "unsupported-crit",
                _b64('{"alg":"RS256","kid":"k1","crit":["exp"],"exp":1}') + ".e30.c2ln",
            ),
        ]
    ],
    pytest.param(
        Case(lambda: sign(KEY, claims()).rsplit(".", 1)[0] + ".!!", "not a well-formed JWT"),
        id="non-base64-signature",
    ),
    pytest.param(
        Case(
            lambda: jwt.api_jws.encode(b"[1, 2]", KEY.private, "RS256", headers={"kid": "k1"}),
            "the payload is not a JSON object",
        ),
        id="signed-payload-not-an-object",
    ),
]


@pytest.mark.parametrize("case", REJECTIONS)
def test_rejected(
    case: Case,
    idp: FakeIdP,
    make_provider: Callable[..., OIDCProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    idp.reset(*case.published)
    provider = make_provider(**case.settings)
    token = case.token()
    with caplog.at_level(logging.DEBUG), pytest.raises(errors.BrokerError) as info:
        provider.verify(token, nonce=case.nonce)
    assert type(info.value) is case.error
    assert info.value.code == case.error.code
    assert info.value.status == 401
    assert case.message in info.value.message
    if token:
        assert token not in info.value.message
        assert token not in caplog.text


def test_oversize_token_is_refused_before_any_key_fetch(
    idp: FakeIdP, make_provider: Callable[..., OIDCProvider]
) -> None:
    with pytest.raises(errors.InvalidToken, match="too large"):
        make_provider().verify("a" * (MAX_TOKEN_LENGTH + 1))
    assert idp.jwks_hits == 0


# --------------------------------------------------------------------------- acceptance


def test_valid_token(make_provider: Callable[..., OIDCProvider]) -> None:
    token = sign(KEY, claims(nonce="n-1"))
    verified = make_provider().verify(token, nonce="n-1")
    assert verified.provider == "corp"
    assert verified.subject == "user-123"
    assert verified.claims["email"] == "user@example.test"
    assert verified.token == token
    assert verified.sts_provider_id is None
    assert verified.expires_at == verified.claims["exp"]
    assert token not in repr(verified)


def test_expired_within_leeway_is_accepted(make_provider: Callable[..., OIDCProvider]) -> None:
    token = sign(KEY, claims(iat=_now() - 600, exp=_now() - 30))
    assert make_provider(leeway_seconds=60).verify(token).subject == "user-123"
    with pytest.raises(errors.ExpiredToken):
        make_provider(leeway_seconds=0).verify(token)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_clock_skew_within_leeway_is_accepted(
    make_provider: Callable[..., OIDCProvider], claim: str
) -> None:
    token = sign(KEY, claims(**{claim: _now() + 30}))
    assert make_provider(leeway_seconds=60).verify(token).subject == "user-123"
    with pytest.raises(errors.InvalidToken, match=r"future|not yet valid"):
        make_provider(leeway_seconds=0).verify(token)


def test_azp_multi_client(make_provider: Callable[..., OIDCProvider]) -> None:
    token = sign(KEY, claims(audience=[CLIENT_ID, OTHER_CLIENT_ID], azp=OTHER_CLIENT_ID))
    verified = make_provider(**TWO_CLIENTS).verify(token)
    assert verified.claims["azp"] == OTHER_CLIENT_ID


def test_absent_kid_accepted_while_one_key_is_published(
    make_provider: Callable[..., OIDCProvider],
) -> None:
    token = sign(KEY, claims(), include_kid=False)
    assert make_provider().verify(token).subject == "user-123"


@pytest.mark.parametrize(
    ("published", "alg"),
    [
        pytest.param(rsa_key("k1", publish_alg=False), "PS256", id="rsa-key-without-alg-ps256"),
        pytest.param(rsa_key("k1", alg="RS384"), "RS384", id="rsa-key-rs384"),
        pytest.param(EC_KEY, "ES256", id="ec-p256"),
    ],
)
def test_other_asymmetric_algorithms(
    idp: FakeIdP, make_provider: Callable[..., OIDCProvider], published: KeyPair, alg: str
) -> None:
    idp.reset(published)
    token = sign(published, claims(), alg=alg)
    assert make_provider(algorithms=(alg,)).verify(token).subject == "user-123"


def test_key_rotation_is_picked_up(
    idp: FakeIdP, make_provider: Callable[..., OIDCProvider]
) -> None:
    provider = make_provider()
    provider.verify(sign(KEY, claims()))
    idp.keys = [KEY, SECOND]
    assert provider.verify(sign(SECOND, claims(sub="rotated"))).subject == "rotated"
    assert idp.jwks_hits == 2


def test_verified_tokens_reuse_the_cached_keys(
    idp: FakeIdP, make_provider: Callable[..., OIDCProvider]
) -> None:
    provider = make_provider()
    for _ in range(5):
        provider.verify(sign(KEY, claims()))
    assert idp.jwks_hits == 1


# --------------------------------------------------------------------------- google preset


def _settings(providers: Mapping[str, Any]) -> Settings:
    key = base64.b64encode(os.urandom(32)).decode()
    return settings_from_mapping(
        {
            "security": {"identity_key": key, "encryption_keys": [key]},
            "providers": providers,
            "rules": [
                {
                    "providers": list(providers),
                    "conditions": [{"claim": "email", "op": "equals", "value": "a@b.test"}],
                    "roles": ["arn:aws:iam::123456789012:role/reader"],
                }
            ],
        },
        env={},
    )


@pytest.fixture
def google(idp: FakeIdP, http: Http, store: Store) -> OIDCProvider:
    preset = _settings({"google": {"client_ids": ["web.apps", "android.apps"]}}).providers["google"]
    assert isinstance(preset, OIDCProviderSettings)
    assert preset.type == "google"
    assert preset.issuers == GOOGLE_ISSUERS
    assert preset.jwks_url == GOOGLE_JWKS_URL
    # Same preset, pointed at the local JWKS server instead of googleapis.com.
    local = dataclasses.replace(preset, jwks_url=idp.jwks_url)
    return OIDCProvider(settings=local, http=http, store=store)


@pytest.mark.parametrize("issuer", GOOGLE_ISSUERS)
def test_google_preset_accepts_both_issuer_forms(google: OIDCProvider, issuer: str) -> None:
    token = sign(KEY, claims(issuer=issuer, audience="web.apps"))
    verified = google.verify(token)
    assert verified.provider == "google"
    assert verified.claims["iss"] == issuer


@pytest.mark.parametrize(
    "issuer",
    ["https://accounts.google.com/", "http://accounts.google.com", "accounts.google.com/"],
)
def test_google_preset_rejects_near_miss_issuers(google: OIDCProvider, issuer: str) -> None:
    with pytest.raises(errors.InvalidToken, match="wrong issuer"):
        google.verify(sign(KEY, claims(issuer=issuer, audience="web.apps")))


def test_google_android_token_with_web_audience(google: OIDCProvider) -> None:
    # Google: aud is the web (server) client id, azp the Android client that signed in.
    token = sign(KEY, claims(issuer="accounts.google.com", audience="web.apps", azp="android.apps"))
    assert google.verify(token).claims["azp"] == "android.apps"


# --------------------------------------------------------------------------- discovery


def test_discovery_based_configuration(
    idp: FakeIdP, make_provider: Callable[..., OIDCProvider], http: Http, store: Store
) -> None:
    provider = make_provider(jwks_url=None, discovery_url=idp.discovery_url)
    assert idp.discovery_hits == 0  # nothing happens at construction
    provider.verify(sign(KEY, claims()))
    provider.verify(sign(KEY, claims()))
    assert (idp.discovery_hits, idp.jwks_hits) == (1, 1)
    # Another process finds both documents in Redis.
    again = OIDCProvider(
        settings=oidc_settings(idp, jwks_url=None, discovery_url=idp.discovery_url),
        http=http,
        store=store,
    )
    again.verify(sign(KEY, claims()))
    assert (idp.discovery_hits, idp.jwks_hits) == (1, 1)


@pytest.mark.parametrize(
    "published_issuer",
    [ISSUER + "/", "https://evil.example.test", ISSUER.replace("https://", "http://")],
)
def test_discovery_document_must_name_the_configured_issuer(
    idp: FakeIdP, make_provider: Callable[..., OIDCProvider], published_issuer: str
) -> None:
    idp.discovery_issuer = published_issuer
    provider = make_provider(jwks_url=None, discovery_url=idp.discovery_url)
    with pytest.raises(errors.UpstreamError, match="not a configured issuer"):
        provider.verify(sign(KEY, claims()))
    assert idp.jwks_hits == 0


def test_discovery_unreachable_without_a_cached_copy(
    idp: FakeIdP, make_provider: Callable[..., OIDCProvider]
) -> None:
    idp.mode = "error"
    provider = make_provider(jwks_url=None, discovery_url=idp.discovery_url)
    with pytest.raises(errors.UpstreamError) as info:
        provider.verify(sign(KEY, claims()))
    assert info.value.status == 502


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"algorithms": ("HS256", "none")}, "no allowed asymmetric", id="only-hmac"),
        pytest.param({"jwks_url": None, "discovery_url": None}, "jwks_url", id="no-key-source"),
        pytest.param({"client_ids": ()}, "must not be empty", id="no-client-ids"),
        pytest.param({"issuers": ()}, "must not be empty", id="no-issuers"),
    ],
)
def test_misconfiguration_is_refused_at_construction(
    make_provider: Callable[..., OIDCProvider], overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(errors.ConfigurationError, match=message):
        make_provider(**overrides)


def test_build_providers_builds_every_oidc_provider(http: Http, store: Store) -> None:
    settings = _settings(
        {
            "google": {"client_ids": ["web.apps"]},
            "corp": {"issuer": ISSUER, "client_ids": [CLIENT_ID]},
        }
    )
    providers = build_providers(settings, http=http, store=store)
    assert set(providers) == {"google", "corp"}
    assert all(isinstance(p, OIDCProvider) for p in providers.values())
    assert providers["corp"].display_name == "corp"


@pytest.mark.parametrize(
    ("name", "config", "module"),
    [
        ("amazon", {"client_ids": ["amzn1.application-oa2-client.x"]}, "broker.providers.amazon"),
        ("facebook", {"app_id": "123", "app_secret": "s3cret"}, "broker.providers.facebook"),
    ],
)
def test_build_providers_names_a_provider_whose_module_is_missing(
    *,
    http: Http,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    config: dict[str, Any],
    module: str,
) -> None:
    # None in sys.modules makes the import fail, whether or not the module exists yet.
    monkeypatch.setitem(sys.modules, module, None)
    settings = _settings({name: config})
    with pytest.raises(errors.ConfigurationError, match=f"provider '{name}'"):
        build_providers(settings, http=http, store=store)


# --------------------------------------------------------------------------- verified-token cache


def test_a_remembered_token_still_has_its_nonce_checked(
    make_provider: Callable[..., OIDCProvider],
) -> None:
    provider = make_provider(require_nonce=True)
    token = sign(KEY, claims(nonce="n-1"))
    assert provider.verify(token, nonce="n-1").subject == "user-123"

    with pytest.raises(errors.InvalidToken, match="wrong nonce"):
        provider.verify(token, nonce="n-2")
    with pytest.raises(errors.InvalidToken, match="nonce is required"):
        provider.verify(token)
    assert provider.verify(token, nonce="n-1").subject == "user-123"


def test_a_remembered_token_is_refused_once_it_expires(
    make_provider: Callable[..., OIDCProvider],
) -> None:
    provider = make_provider(leeway_seconds=0)
    # exp is whole seconds: two of margin so a slow first verify still sees it valid
    # (with +1 the second boundary could pass before pyjwt checked it).
    exp = _now() + 2
    token = sign(KEY, claims(iat=_now() - 10, exp=exp))
    assert provider.verify(token).subject == "user-123"
    time.sleep(max(0.0, exp - time.time()) + 0.2)
    with pytest.raises(errors.ExpiredToken):
        provider.verify(token)


def test_a_remembered_token_outlives_no_key_withdrawal(
    idp: FakeIdP, http: Http, store: Store
) -> None:
    """Remembering a token must not keep a withdrawn key alive longer than the JWKS
    cache would: both end after jwks_cache_seconds."""
    clock = FakeClock()
    provider = OIDCProvider(
        settings=oidc_settings(idp, jwks_cache_seconds=300, jwks_refresh_cooldown_seconds=0),
        http=http,
        store=store,
        clock=clock,
    )
    token = sign(KEY, claims())
    provider.verify(token)  # the keys are fetched now: due again at 300 s
    clock.advance(200)
    provider.verify(token)  # seen again: remembered, until the keys are due (not 500 s)
    idp.keys = [SECOND]  # the provider withdraws KEY

    clock.advance(99)
    assert provider.verify(token).subject == "user-123"  # within both caches' lifetime
    clock.advance(2)
    with pytest.raises(errors.InvalidToken):
        provider.verify(token)


# --------------------------------------------------------------------------- key state (/readyz)


def _state_until(provider: OIDCProvider, wanted: str, *, seconds: float = 10) -> str:
    """Probe like /readyz does until the state is ``wanted``; every probe is instant."""
    deadline = time.monotonic() + seconds
    while True:
        started = time.monotonic()
        state = provider.key_state(check=True)
        assert time.monotonic() - started < 0.5, "a readiness probe must never wait on the IdP"
        if state.state == wanted or time.monotonic() > deadline:
            return state.describe()
        time.sleep(0.02)


def test_key_state_without_check_fetches_nothing(
    make_provider: Callable[..., OIDCProvider], idp: FakeIdP
) -> None:
    provider = make_provider(jwks_url=None, discovery_url=idp.discovery_url)
    assert provider.key_state(check=False).state == "pending"
    time.sleep(0.2)
    assert idp.discovery_hits == 0
    assert idp.jwks_hits == 0


def test_key_state_warms_discovery_then_keys_in_the_background(
    make_provider: Callable[..., OIDCProvider], idp: FakeIdP
) -> None:
    provider = make_provider(jwks_url=None, discovery_url=idp.discovery_url)
    assert _state_until(provider, "ok") == "ok"
    for _ in range(10):
        assert provider.key_state(check=True).state == "ok"
    # One fetch of each, however many probes: no storm.
    assert idp.discovery_hits == 1
    assert idp.jwks_hits == 1
    # The keys are the ones verification then uses: no further fetch.
    make_token = sign(KEY, claims())
    assert provider.verify(make_token).subject == "user-123"
    assert idp.jwks_hits == 1


def test_key_state_names_an_idp_that_hangs_without_waiting_for_it(
    make_provider: Callable[..., OIDCProvider], idp: FakeIdP
) -> None:
    idp.mode = "hang"
    provider = make_provider(timeout_seconds=0.3)
    described = _state_until(provider, "unavailable")
    assert described.startswith("unavailable: corp JWKS endpoint")
    hits = idp.jwks_hits
    for _ in range(20):
        assert provider.key_state(check=True).state == "unavailable"
    assert idp.jwks_hits == hits  # still backing off: probes cause no fetch


def test_key_state_is_stale_when_a_refetch_fails_and_old_keys_are_kept(
    idp: FakeIdP, http: Http, store: Store
) -> None:
    clock = FakeClock()
    provider = OIDCProvider(settings=oidc_settings(idp), http=http, store=store, clock=clock)
    assert provider.verify(sign(KEY, claims())).subject == "user-123"
    assert provider.key_state(check=True).state == "ok"

    idp.mode = "error"
    clock.advance(3601)  # past jwks_cache_seconds: the next use refetches, and fails
    described = _state_until(provider, "stale")
    assert described.startswith("stale: corp JWKS endpoint")
    assert "using the copy fetched 3601 s ago" in described
