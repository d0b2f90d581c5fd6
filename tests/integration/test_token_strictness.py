"""Hostile ID tokens against a live broker: refused with 401, never sent to STS.

The broker here trusts an OIDC provider whose keys the test holds (the local JWKS
server of tests/unit/oidc_fixtures.py on a real socket), so each hostile token carries a
valid signature, issuer, audience and lifetime, and matches a rule; real redis-server,
moto's STS behind a counting proxy. The control row, built the same way but canonical,
gets credentials from moto with exactly one STS call: the hostile rows' zero calls are
the strict parser's doing, not a broken setup.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from broker.devstack.stack import DEV_PROVIDER, USER_ROLE, Stack
from broker.sts import BotocoreSTS
from tests.conftest import make_settings
from tests.integration.test_api import Counted, assert_error, running
from tests.unit.oidc_fixtures import CLIENT_ID, ISSUER, FakeIdP, claims, rsa_key, sign, sign_raw

pytestmark = pytest.mark.integration

KEY = rsa_key("strict-k1")
HEADER = '{"alg":"RS256","typ":"JWT","kid":"strict-k1"}'
ENDPOINTS = ["/v1/credentials", "/v1/roles", "/v1/console-url"]


def _claims_json(**overrides: object) -> str:
    # bob@example.com with a verified address matches the dev config's example-users rule.
    return json.dumps(claims(sub="bob", email="bob@example.com", **overrides))


def _canonical() -> str:
    return sign_raw(KEY, HEADER, _claims_json())


def _duplicate_sub() -> str:
    # The rules would see "admin" (Python keeps the last member); a first-wins parser
    # at STS would see "bob".
    return sign_raw(KEY, HEADER, _claims_json()[:-1] + ',"sub":"admin"}')


def _trailing_bits() -> str:
    token = _canonical()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return token[:-1] + alphabet[alphabet.index(token[-1]) | 1]


HOSTILE: list[tuple[str, Callable[[], str], str]] = [
    ("duplicate-sub", _duplicate_sub, 'the payload has "sub" twice'),
    ("padded-signature", lambda: _canonical() + "==", "not canonical base64url"),
    ("signature-trailing-bits", _trailing_bits, "non-zero trailing bits"),
    ("whitespace", lambda: _canonical().replace(".", ".\n", 1), "not canonical base64url"),
    (
        "access-token-at+jwt",
        lambda: sign(KEY, claims(sub="bob", email="bob@example.com"), headers={"typ": "at+jwt"}),
        "an OAuth access token (typ at+jwt): an ID token is expected",
    ),
]


@pytest.fixture(scope="module")
def idp() -> Iterator[FakeIdP]:
    server = FakeIdP()
    server.reset(KEY)
    yield server
    server.close()


@pytest.fixture(scope="module")
def real_sts(stack: Stack) -> Iterator[BotocoreSTS]:
    client = BotocoreSTS(make_settings(stack, "http://127.0.0.1:1").sts)
    yield client
    client.close()


@pytest.fixture
def broker(stack: Stack, real_sts: BotocoreSTS, idp: FakeIdP) -> Iterator[Counted]:
    provider = {
        "type": "oidc",
        "issuer": ISSUER,
        "jwks_url": idp.jwks_url,
        "client_ids": [CLIENT_ID],
    }
    with running(stack, real_sts, providers={DEV_PROVIDER: provider}) as live:
        yield live


def _body(path: str, token: str) -> dict[str, object]:
    body: dict[str, object] = {"provider": DEV_PROVIDER, "token": token}
    if path == "/v1/console-url":
        body["role_arn"] = USER_ROLE
    return body


def test_control_the_canonical_token_reaches_sts(broker: Counted) -> None:
    response = broker.live.post("/v1/credentials", _body("/v1/credentials", _canonical()))
    assert response.status_code == 200, response.text
    assert response.json()["role_arn"] == USER_ROLE
    assert broker.sts.calls == 1


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(("build", "message"), [pytest.param(b, m, id=i) for i, b, m in HOSTILE])
def test_hostile_token_is_refused_before_sts(
    broker: Counted, path: str, build: Callable[[], str], message: str
) -> None:
    token = build()
    response = broker.live.post(path, _body(path, token))
    text = assert_error(response, 401, "invalid_token")
    assert message in text
    assert token not in response.text
    assert token.split(".")[2][:40] not in response.text
    assert broker.sts.calls == 0
