"""Property-based fuzzing of the JSON API (issue #8 section 9), in the normal test run.

Hypothesis generates request bodies for ``POST /v1/credentials``, ``/v1/roles`` and
``/v1/console-url``: arbitrary JSON values under the real field names and junk ones,
bytes that are not JSON or not UTF-8, JWT-shaped strings, and mutations of a real ID
token from the local OIDC provider. The properties, for every example:

* never a 5xx: a body is the caller's input, so anything wrong with it is a 4xx;
* always the broker's JSON error shape (``{"error", "message"}``, JSON content type,
  ``Cache-Control: no-store``), never HTML or a traceback;
* never a token echoed: the token sent (and its signature) appears nowhere in the
  answer.

The broker runs on the real stack (redis-server, moto, the OIDC provider). Most
examples go through Flask's test client, which runs the same WSGI app, middleware and
error handlers without a socket per request; one property sends raw bytes over a real
socket to a live broker. Example counts are bounded (tests/conftest.py, profile "ci",
derandomized) so the whole file stays well under 30 s; ``HYPOTHESIS_PROFILE=deep``
runs thousands.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.app import create_app
from broker.devstack.oidc_login import login
from broker.devstack.processes import free_port
from broker.devstack.stack import DEV_CLIENT_ID, DEV_PROVIDER, USER_ROLE, Stack
from broker.services import Services
from tests.conftest import LiveBroker, make_settings, serve

pytestmark = pytest.mark.integration

ENDPOINTS = ["/v1/credentials", "/v1/roles", "/v1/console-url"]
FIELDS = [
    "provider",
    "token",
    "nonce",
    "role_arn",
    "duration_seconds",
    "destination",
    "region",
    "session_duration",
]
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Rate limits off: thousands of requests a minute from one address are the point here.
NO_LIMITS = {"rate_limit": {"per_ip_per_minute": 0, "per_identity_per_minute": 0}}


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[FlaskClient]:
    services = Services.build(make_settings(stack, "http://127.0.0.1:8000", **NO_LIMITS))
    try:
        yield create_app(services=services).test_client()
    finally:
        services.close()


@pytest.fixture(scope="module")
def live(stack: Stack) -> Iterator[LiveBroker]:
    port = free_port()
    with serve(make_settings(stack, f"http://127.0.0.1:{port}", **NO_LIMITS), stack, port) as live:
        yield live


@pytest.fixture(scope="module")
def id_token(stack: Stack) -> str:
    """A real ID token for bob (who may get credentials) from the local OIDC provider."""
    return login(stack.oidc.url, subject="bob", client_id=DEV_CLIENT_ID).id_token


# --------------------------------------------------------------------------- properties


def examples(under_ci: int) -> int:
    """``under_ci`` examples with the default profile ("ci", 100 per property), as many
    more as the loaded profile asks for ("deep": 50 times as many)."""
    return max(1, under_ci * settings().max_examples // 100)


def assert_broker_error(
    status: int, content_type: str | None, cache_control: str | None, text: str, token: Any
) -> None:
    assert status < 500, text
    assert status >= 400, text  # no fuzzed body may succeed: none carries a valid token
    assert content_type == "application/json", text
    assert cache_control == "no-store"
    body = json.loads(text)
    assert isinstance(body, dict)
    # request_id: every error names its request (broker.web.request_id).
    assert set(body) == {"error", "message", "request_id"}, body
    assert isinstance(body["error"], str)
    assert body["error"]
    assert isinstance(body["message"], str)
    assert "Traceback" not in text
    assert "<html" not in text.lower()
    if isinstance(token, str) and len(token) >= 12:
        assert token not in text
        for part in token.split("."):
            if len(part) >= 24:
                assert part not in text


def token_body(path: str, token: Any, **fields: Any) -> dict[str, Any]:
    """A body each endpoint accepts the shape of (console-url needs a role)."""
    body = {"provider": DEV_PROVIDER, "token": token, **fields}
    if path == "/v1/console-url":
        body["role_arn"] = USER_ROLE
    return body


def post(client: FlaskClient, path: str, **kwargs: Any) -> None:
    token = kwargs.pop("token_sent", None)
    response = client.post(path, **kwargs)
    assert_broker_error(
        response.status_code,
        response.mimetype,
        response.headers.get("Cache-Control"),
        response.get_data(as_text=True),
        token,
    )


# --------------------------------------------------------------------------- strategies

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_SEGMENT = st.text(BASE64URL + "=+/ .", max_size=60)
_JWT_LIKE = st.lists(_SEGMENT, min_size=1, max_size=5).map(".".join)
_TOKENS = _JWT_LIKE | st.text(max_size=200) | _JSON
_PROVIDERS = st.sampled_from([DEV_PROVIDER, "google", "amazon", "facebook", ""]) | st.text(
    max_size=20
)
_FIELD_VALUES = {
    "provider": _PROVIDERS | _JSON,
    "token": _TOKENS,
    "nonce": st.text(max_size=40) | _JSON,
    "role_arn": st.sampled_from([USER_ROLE, "arn:aws:iam::1:role/x", ""]) | _JSON,
    "duration_seconds": st.integers() | _JSON,
    "destination": st.text(max_size=60) | _JSON,
    "region": st.sampled_from(["us-east-1", "eu-west-1", "xx"]) | _JSON,
    "session_duration": st.integers() | _JSON,
}
_BODIES = st.fixed_dictionaries({}, optional=_FIELD_VALUES) | st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=12), _JSON, max_size=5
)


@settings(max_examples=examples(120))
@given(path=st.sampled_from(ENDPOINTS), body=_BODIES)
def test_any_json_body_gets_a_json_4xx(client: FlaskClient, path: str, body: Any) -> None:
    post(client, path, json=body, token_sent=body.get("token"))


@settings(max_examples=examples(60))
@given(path=st.sampled_from(ENDPOINTS), body=_JSON)
def test_any_json_value_gets_a_json_4xx(client: FlaskClient, path: str, body: Any) -> None:
    post(client, path, json=body)


@settings(max_examples=examples(60))
@given(
    path=st.sampled_from(ENDPOINTS),
    raw=st.binary(max_size=300)
    | st.sampled_from([b"[" * 5000, b'{"a":' * 3000, b'{"token":"\xff"}', b"\xef\xbb\xbf{}"]),
    content_type=st.sampled_from(
        ["application/json", "application/json; charset=latin-1", "text/plain", ""]
    ),
)
def test_any_bytes_get_a_json_4xx(
    client: FlaskClient, path: str, raw: bytes, content_type: str
) -> None:
    post(client, path, data=raw, content_type=content_type)


@settings(max_examples=examples(120))
@given(path=st.sampled_from(ENDPOINTS), token=_JWT_LIKE, nonce=st.none() | st.text(max_size=10))
def test_jwt_shaped_junk_is_an_invalid_token(
    client: FlaskClient, path: str, token: str, nonce: str | None
) -> None:
    body = token_body(path, token) if nonce is None else token_body(path, token, nonce=nonce)
    post(client, path, json=body, token_sent=token)


@st.composite
def _mutations(draw: st.DrawFn, token: str) -> str:
    """A real token with one edit: a character inserted, deleted or replaced."""
    index = draw(st.integers(min_value=0, max_value=len(token) - 1))
    char = draw(st.sampled_from(list(BASE64URL + "=+/ \n.%\x00é")))
    kind = draw(st.sampled_from(["insert", "delete", "replace"]))
    if kind == "insert":
        mutated = token[:index] + char + token[index:]
    elif kind == "delete":
        mutated = token[:index] + token[index + 1 :]
    else:
        mutated = token[:index] + char + token[index + 1 :]
    return mutated if mutated != token else token + "="


@settings(max_examples=examples(80))
@given(data=st.data(), path=st.sampled_from(ENDPOINTS))
def test_any_edit_of_a_real_token_is_refused(
    client: FlaskClient, id_token: str, data: st.DataObject, path: str
) -> None:
    token = data.draw(_mutations(id_token))
    response = client.post(path, json=token_body(path, token))
    text = response.get_data(as_text=True)
    assert_broker_error(
        response.status_code, response.mimetype, response.headers.get("Cache-Control"), text, token
    )
    assert response.status_code == 401, text
    assert json.loads(text)["error"] in {"invalid_token", "expired_token"}


def test_control_the_unedited_token_gets_credentials(client: FlaskClient, id_token: str) -> None:
    # The edits above are refused because they are edits: the same body with the
    # token as issued succeeds, so the properties cannot pass on a broken setup.
    response = client.post("/v1/credentials", json={"provider": DEV_PROVIDER, "token": id_token})
    assert response.status_code == 200, response.get_data(as_text=True)


@settings(max_examples=examples(40))
@given(
    path=st.sampled_from(ENDPOINTS),
    raw=st.binary(max_size=200) | _BODIES.map(lambda body: json.dumps(body).encode()),
)
def test_a_live_broker_answers_raw_bodies_with_json_4xx(
    live: LiveBroker, path: str, raw: bytes
) -> None:
    response = requests.post(
        live.url + path,
        data=raw,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert_broker_error(
        response.status_code,
        response.headers.get("Content-Type"),
        response.headers.get("Cache-Control"),
        response.text,
        None,
    )
