"""RFC 9207 pieces of the browser flow that need no provider: how discovery's
``authorization_response_iss_parameter_supported`` is read, and ``check_issuer`` for the
providers that have no issuer identifier (Login with Amazon, Facebook). The whole flow,
with a provider that sends ``iss``, is in tests/integration/test_sso_mixup.py."""

from __future__ import annotations

import base64
import json
import os
from typing import Any, cast

import pytest

from broker.errors import BadRequest
from broker.jwk import MalformedDocument
from broker.oauth_flow import OAuthFlow, _endpoints_from_discovery
from broker.settings import settings_from_mapping
from tests.unit.oidc_fixtures import rsa_key

ISSUER = "https://idp.example.com"
DOCUMENT = {
    "issuer": ISSUER,
    "authorization_endpoint": f"{ISSUER}/authorize",
    "token_endpoint": f"{ISSUER}/token",
}


@pytest.mark.parametrize(
    ("flag", "required"),
    [
        (True, True),
        (False, False),
        ("true", False),  # only a JSON true counts (RFC 9207 section 3)
        (1, False),
        (None, False),
    ],
)
def test_only_a_json_true_makes_iss_required(flag: Any, required: bool) -> None:
    document = dict(DOCUMENT)
    if flag is not None:
        document["authorization_response_iss_parameter_supported"] = flag
    endpoints = _endpoints_from_discovery(document, (ISSUER,))
    assert endpoints.issuer == ISSUER  # what iss is compared with, exactly
    assert endpoints.iss_required is required


def test_a_discovery_document_for_another_issuer_is_refused() -> None:
    with pytest.raises(MalformedDocument, match="not a configured issuer"):
        _endpoints_from_discovery({**DOCUMENT, "issuer": "https://evil.example"}, (ISSUER,))


def _flow(**providers: dict[str, Any]) -> OAuthFlow:
    key = base64.b64encode(os.urandom(32)).decode()
    settings = settings_from_mapping(
        {
            "server": {"public_url": "https://broker.example.com"},
            "security": {"identity_key": key, "encryption_keys": [key]},
            "providers": {
                "amazon": {
                    "type": "amazon",
                    "client_ids": ["amzn1.application-oa2-client.x"],
                    "client_secret": "s",
                },
                "facebook": {"type": "facebook", "app_id": "1", "app_secret": "s"},
                **providers,
            },
            "rules": [
                {
                    "providers": ["amazon"],
                    "conditions": [{"claim": "email", "op": "equals", "value": "a@example.com"}],
                    "roles": ["arn:aws:iam::123456789012:role/R"],
                }
            ],
        },
        env={},
    )
    # No network and no Redis: these providers' endpoints come from settings.
    return OAuthFlow(settings=settings, store=cast(Any, None), http=cast(Any, None))


@pytest.mark.parametrize("provider", ["amazon", "facebook"])
def test_providers_without_an_issuer_accept_no_iss(provider: str) -> None:
    _flow().check_issuer(provider, None)


@pytest.mark.parametrize(
    "iss",
    ["https://www.amazon.com", "https://www.facebook.com", "https://evil.example", "", " "],
)
@pytest.mark.parametrize("provider", ["amazon", "facebook"])
def test_providers_without_an_issuer_refuse_any_iss(provider: str, iss: str) -> None:
    with pytest.raises(BadRequest, match="never sends one") as caught:
        _flow().check_issuer(provider, iss)
    assert caught.value.status == 400
    assert "evil" not in caught.value.message  # the value is never echoed


def test_a_provider_without_browser_sign_in_is_the_callers_400(tmp_path: Any) -> None:
    # The configuration is fine: these providers take app tokens only. Asking one for a
    # browser sign-in is the caller's mistake (400), not a broken broker (500).
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [rsa_key("backend-1").public_jwk()]}))
    flow = _flow(
        app_only={"type": "amazon", "client_ids": ["amzn1.application-oa2-client.y"]},
        backend={
            "type": "developer",
            "issuer": "https://backend.example",
            "client_ids": ["app"],
            "jwks_file": str(jwks),
        },
    )
    for name in ("app_only", "backend"):
        with pytest.raises(BadRequest, match="has no browser sign-in") as caught:
            flow.client(name)
        assert caught.value.code == "invalid_request"
        assert not flow.browser_ready(name)
    assert flow.browser_ready("amazon")
