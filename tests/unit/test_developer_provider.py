"""Developer-authenticated identities: an app backend signs JWTs for its own users with a
key the operator lists in a JWKS file. Config mistakes (one row each, naming the key or
the rule), then tokens verified by the same OIDC code path, including the strict parser,
with nothing fetched."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from broker import errors
from broker.http import Http
from broker.providers.oidc import OIDCProvider
from broker.settings import ConfigError, OIDCProviderSettings, Settings
from broker.store import Store
from tests.unit.issuer_fixtures import BASE, load
from tests.unit.oidc_fixtures import (
    claims,
    ec_key,
    hmac_with_public_key,
    rsa_key,
    sign,
    sign_raw,
    unsigned_token,
)

BACKEND = "https://backend.example.com"
APP = "my-app"
KEY = rsa_key("backend-1")
EC = ec_key("backend-ec")
OTHER = rsa_key("backend-1", label="someone-else")  # same kid, another key


def developer_config(tmp_path: Path, **provider: Any) -> dict[str, Any]:
    jwks = tmp_path / "backend-jwks.json"
    jwks.write_text(json.dumps({"keys": [KEY.public_jwk(), EC.public_jwk()]}))
    raw = copy.deepcopy(BASE)
    raw["providers"]["app"] = {
        "type": "developer",
        "issuer": BACKEND,
        "client_ids": [APP],
        "algorithms": ["RS256", "ES256"],
        "jwks_file": str(jwks),
        **provider,
    }
    raw["rules"].insert(
        0,
        {
            "name": "app-users",
            "providers": ["app"],
            "conditions": [{"claim": "sub", "op": "starts_with", "value": "user-"}],
            "roles": ["arn:aws:iam::123456789012:role/AppUser"],
            "sts_token": "broker",
        },
    )
    return raw


def provider(settings: Settings, store: Store) -> OIDCProvider:
    p = settings.providers["app"]
    assert isinstance(p, OIDCProviderSettings)
    # An Http that can reach nothing: a developer provider must not fetch anything.
    return OIDCProvider(settings=p, http=Http(budget_seconds=1), store=store)


def test_a_backend_token_verifies_without_any_fetch(tmp_path: Path, store: Store) -> None:
    settings = load(developer_config(tmp_path))
    app = provider(settings, store)
    for key in (KEY, EC):
        verified = app.verify(sign(key, claims(issuer=BACKEND, audience=APP)))
        assert verified.subject == "user-123"
        assert verified.sts_provider_id is None


def test_browser_sign_in_is_not_offered(tmp_path: Path) -> None:
    from broker.oauth_flow import OAuthFlow

    settings = load(developer_config(tmp_path))
    flow = OAuthFlow(settings=settings, store=None, http=None)  # type: ignore[arg-type]
    assert flow.browser_ready("app") is False


TOKENS: list[tuple[str, Any, type[errors.BrokerError], str]] = [
    (
        "wrong issuer",
        lambda: sign(KEY, claims(issuer="https://evil", audience=APP)),
        errors.InvalidToken,
        "wrong issuer",
    ),
    (
        "wrong audience",
        lambda: sign(KEY, claims(issuer=BACKEND, audience="other")),
        errors.InvalidToken,
        "wrong audience",
    ),
    (
        "expired",
        lambda: sign(KEY, claims(issuer=BACKEND, audience=APP, exp=1000, iat=900)),
        errors.ExpiredToken,
        "expired",
    ),
    (
        "another key, same kid",
        lambda: sign(OTHER, claims(issuer=BACKEND, audience=APP)),
        errors.InvalidToken,
        "signature",
    ),
    (
        "unknown kid",
        lambda: sign(rsa_key("nope"), claims(issuer=BACKEND, audience=APP)),
        errors.InvalidToken,
        "unknown signing key",
    ),
    (
        "alg none",
        lambda: unsigned_token(claims(issuer=BACKEND, audience=APP), kid="backend-1"),
        errors.InvalidToken,
        "algorithm",
    ),
    (
        "HS256 with the public key",
        lambda: hmac_with_public_key(KEY, claims(issuer=BACKEND, audience=APP)),
        errors.InvalidToken,
        "algorithm",
    ),
    (
        "duplicate sub",
        lambda: sign_raw(
            KEY,
            '{"alg":"RS256","kid":"backend-1"}',
            json.dumps(claims(issuer=BACKEND, audience=APP))[:-1] + ',"sub":"user-admin"}',
        ),
        errors.InvalidToken,
        "duplicate",
    ),
    (
        "no subject",
        lambda: sign(KEY, claims(issuer=BACKEND, audience=APP, sub=None)),
        errors.InvalidToken,
        "sub",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "needle"), [t[1:] for t in TOKENS], ids=[t[0] for t in TOKENS]
)
def test_bad_backend_tokens_are_refused(
    tmp_path: Path, store: Store, make: Any, error: type[errors.BrokerError], needle: str
) -> None:
    app = provider(load(developer_config(tmp_path)), store)
    with pytest.raises(error) as caught:
        app.verify(make())
    assert needle in caught.value.message


def _private_jwks(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "private.json"
    jwk = json.loads(__import__("jwt").algorithms.RSAAlgorithm.to_jwk(KEY.private))
    path.write_text(json.dumps({"keys": [jwk]}))
    return {"jwks_file": str(path)}


def _junk_jwks(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "junk.json"
    path.write_text("{not json")
    return {"jwks_file": str(path)}


CONFIG_MISTAKES: list[tuple[str, Any, str]] = [
    (
        "no jwks file",
        lambda raw, _tmp: raw["providers"]["app"].pop("jwks_file"),
        "providers.app.jwks_file: a developer provider needs",
    ),
    (
        "missing file",
        lambda raw, _tmp: raw["providers"]["app"].update(jwks_file="/nonexistent.json"),
        "cannot read",
    ),
    (
        "not a JWKS",
        lambda raw, tmp: raw["providers"]["app"].update(_junk_jwks(tmp)),
        "not a usable JSON Web Key Set",
    ),
    (
        "private key in file",
        lambda raw, tmp: raw["providers"]["app"].update(_private_jwks(tmp)),
        "holds a private or symmetric key",
    ),
    (
        "jwks_url as well",
        lambda raw, _tmp: raw["providers"]["app"].update(jwks_url="https://x/jwks"),
        "providers.app.jwks_url: a developer provider",
    ),
    (
        "client secret",
        lambda raw, _tmp: raw["providers"]["app"].update(client_secret="s"),
        "providers.app.client_secret: a developer provider",
    ),
    (
        "provider token",
        lambda raw, _tmp: raw["rules"][0].update(sts_token="provider"),
        "rules[0].sts_token: provider 'app' is a developer provider",
    ),
    (
        "provider token by default",
        lambda raw, _tmp: raw["rules"][0].pop("sts_token"),
        "(in rule 'app-users')",
    ),
]


@pytest.mark.parametrize(
    ("mutation", "needle"), [c[1:] for c in CONFIG_MISTAKES], ids=[c[0] for c in CONFIG_MISTAKES]
)
def test_developer_config_mistakes(tmp_path: Path, mutation: Any, needle: str) -> None:
    raw = developer_config(tmp_path)
    mutation(raw, tmp_path)
    with pytest.raises(ConfigError) as caught:
        load(raw)
    assert any(needle in p for p in caught.value.problems), caught.value.problems
