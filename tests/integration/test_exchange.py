"""POST /v1/credentials is answered in front of Flask (broker.web.exchange) when it has
a Content-Length and a JSON content type, else by the Flask view. A chunked body always
reaches the view, so each case below sends the same request both ways: the answers
must be the same, success or failure, headers included."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from broker.devstack.processes import free_port
from broker.devstack.stack import DEV_PROVIDER, Stack
from tests.conftest import LiveBroker, make_settings, serve

pytestmark = pytest.mark.integration

CREDENTIALS = "/v1/credentials"
# Differ per response or per transfer, by design.
_PER_RESPONSE = {"content-length", "transfer-encoding", "x-request-id", "date", "server"}


def _both_ways(
    broker: LiveBroker, body: bytes, content_type: str = "application/json"
) -> tuple[requests.Response, requests.Response]:
    def chunked() -> Iterator[bytes]:
        yield body  # a generator: requests sends it chunked, with no Content-Length

    url = f"{broker.url}{CREDENTIALS}"
    headers = {"Content-Type": content_type}
    fast = requests.post(url, data=body, headers=headers, timeout=30)
    viewed = requests.post(url, data=chunked(), headers=headers, timeout=30)
    return fast, viewed


def _headers(response: requests.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in response.headers.items() if k.lower() not in _PER_RESPONSE}


def _without_request_id(response: requests.Response) -> Any:
    body = response.json()
    assert (
        body.pop("request_id", response.headers["X-Request-Id"]) == response.headers["X-Request-Id"]
    )
    return body


def _token_body(broker: LiveBroker, **extra: Any) -> bytes:
    nonce = secrets.token_urlsafe(8)
    token = broker.id_token("alice", nonce=nonce)
    return json.dumps({"provider": DEV_PROVIDER, "token": token, "nonce": nonce, **extra}).encode()


def test_credentials_are_the_same_answer_either_way(broker: LiveBroker) -> None:
    fast, viewed = _both_ways(broker, _token_body(broker))

    assert fast.status_code == viewed.status_code == 200
    assert fast.content == viewed.content  # the same cached credentials, byte for byte
    assert _headers(fast) == _headers(viewed)
    assert _headers(fast)["cache-control"] == "no-store"
    assert _headers(fast)["content-type"] == "application/json"
    assert int(fast.headers["Content-Length"]) == len(fast.content)


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("unknown-provider", 400, "unknown_provider"),
        ("bad-token", 401, "invalid_token"),
        ("unknown-field", 400, "invalid_request"),
        ("not-an-object", 400, "invalid_request"),
        ("not-json", 400, "invalid_request"),
        ("too-deep", 400, "invalid_request"),
        ("role-not-allowed", 403, "role_not_allowed"),
        ("bad-duration", 400, "invalid_request"),
    ],
)
def test_a_refusal_is_the_same_answer_either_way(
    broker: LiveBroker, case: str, status: int, code: str
) -> None:
    bodies = {
        "unknown-provider": json.dumps({"provider": "nope", "token": "x"}).encode(),
        "bad-token": json.dumps({"provider": DEV_PROVIDER, "token": "a.b.c"}).encode(),
        "unknown-field": json.dumps(
            {"provider": DEV_PROVIDER, "token": "x", "rolearn": 1}
        ).encode(),
        "not-an-object": b"[1, 2]",
        "not-json": b'{"provider": ',
        "too-deep": b"[" * 100_000 + b"]" * 100_000,
        "role-not-allowed": _token_body(broker, role_arn="arn:aws:iam::123456789012:role/Other"),
        "bad-duration": _token_body(broker, duration_seconds=True),
    }
    body = bodies[case]
    if len(body) > broker.settings.server.max_body_bytes:
        body = b"[" * 5000 + b"]" * 5000
    fast, viewed = _both_ways(broker, body)

    assert fast.status_code == viewed.status_code == status
    assert _without_request_id(fast) == _without_request_id(viewed)
    assert _without_request_id(fast)["error"] == code
    assert _headers(fast) == _headers(viewed)
    assert "Traceback" not in fast.text


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
        ("application/vnd.api+json", 200),
        ("text/plain", 400),
        ("application/x-www-form-urlencoded", 400),
        ("", 400),
    ],
)
def test_content_types_are_judged_alike_either_way(
    broker: LiveBroker, content_type: str, status: int
) -> None:
    fast, viewed = _both_ways(broker, _token_body(broker), content_type)

    assert fast.status_code == viewed.status_code == status
    assert _headers(fast) == _headers(viewed)


@pytest.fixture
def behind_proxy(stack: Stack) -> Iterator[LiveBroker]:
    port = free_port()
    settings = make_settings(stack, f"http://127.0.0.1:{port}", server={"trusted_proxies": 1})
    with serve(settings, stack, port) as live:
        yield live


@pytest.mark.parametrize("proto", ["https", "http"])
def test_hsts_is_sent_alike_either_way_when_the_proxy_says_https(
    behind_proxy: LiveBroker, proto: str
) -> None:
    body = _token_body(behind_proxy)
    url = f"{behind_proxy.url}{CREDENTIALS}"
    headers = {"Content-Type": "application/json", "X-Forwarded-Proto": proto}

    def chunked() -> Iterator[bytes]:
        yield body

    fast = requests.post(url, data=body, headers=headers, timeout=30)
    viewed = requests.post(url, data=chunked(), headers=headers, timeout=30)

    assert fast.status_code == viewed.status_code == 200
    assert _headers(fast) == _headers(viewed)
    hsts = fast.headers.get("Strict-Transport-Security")
    assert hsts == ("max-age=31536000" if proto == "https" else None)
