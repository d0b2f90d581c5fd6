"""broker.metrics: names, bounded labels, the /metrics token guard, [metrics] settings,
and the readiness verdict. Requests go through the real app (Flask's test client) on a
real redis-server; upstream calls go to real closed ports.

The promise under test: no label value is ever something a caller sent (a token, an
e-mail, an identity id, a path) - it is a configured name, a fixed code, or "other".
"""

from __future__ import annotations

import base64
import copy
import json
import secrets
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask import Flask

from broker import metrics
from broker.app import create_app
from broker.devstack.processes import ManagedProcess, free_port
from broker.errors import (
    BrokerError,
    DependencyUnavailable,
    InvalidToken,
    NoMatchingRule,
    RateLimited,
    RoleNotAllowed,
    StoreUnavailable,
)
from broker.http import Http
from broker.jwks import DocumentState
from broker.services import Services, metric_labels
from broker.settings import ConfigError, Settings, settings_from_mapping
from broker.store import RedisGuard, Sealer, Store, request_scope
from broker.web.health import readiness

KEY = base64.b64encode(b"k" * 32).decode()
ROLE = "arn:aws:iam::123456789012:role/Reader"
TOKEN = "m" * 40
EMAIL = "alice@example.com"
JWT_LIKE = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"

RAW: dict[str, Any] = {
    "security": {"identity_key": KEY, "encryption_keys": [KEY]},
    "providers": {
        "corp": {
            "type": "oidc",
            "issuer": "https://idp.example",
            "client_ids": ["app"],
            "jwks_url": "https://idp.example/jwks",
        }
    },
    "rules": [
        {
            "name": "readers",
            "providers": ["corp"],
            "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
            "roles": [ROLE],
        }
    ],
}


def make_settings(**metrics_section: Any) -> Settings:
    raw = copy.deepcopy(RAW)
    if metrics_section:
        raw["metrics"] = metrics_section
    return settings_from_mapping(raw, env={}, source="test")


LABELS = metric_labels(make_settings())


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def all_label_values() -> set[str]:
    return {
        value
        for family in metrics.REGISTRY.collect()
        for s in family.samples
        for value in s.labels.values()
    }


@pytest.fixture
def app(redis_proc: ManagedProcess) -> Iterator[Flask]:
    client = redis.Redis(port=redis_proc.port, socket_timeout=2)
    services = Services.build(make_settings(token=TOKEN), redis_client=client)
    services.store.prefix = f"test:{uuid.uuid4().hex[:8]}:"
    yield create_app(services=services)
    services.close()


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("provider", "rule", "role", "error", "expected"),
    [
        ("corp", "readers", ROLE, None, ("corp", "readers", ROLE, "issued")),
        # Whatever a caller may put in a request becomes "other", never a label value.
        (EMAIL, "readers", ROLE, None, ("other", "readers", ROLE, "issued")),
        ("corp", "readers", f"arn:aws:iam::123456789012:role/{EMAIL}", RoleNotAllowed(),
         ("corp", "readers", "other", "role_not_allowed")),
        ("corp", None, None, NoMatchingRule(), ("corp", "none", "none", "no_matching_rule")),
        ("corp", JWT_LIKE, ROLE, RateLimited(), ("corp", "other", ROLE, "rate_limited")),
        ("corp", "readers", ROLE, ValueError(EMAIL), ("corp", "readers", ROLE, "internal_error")),
    ],
)  # fmt: skip
def test_credential_outcomes_have_bounded_labels(
    provider: str,
    rule: str | None,
    role: str | None,
    error: Exception | None,
    expected: tuple[str, str, str, str],
) -> None:
    labels = dict(zip(("provider", "rule", "role", "outcome"), expected, strict=True))
    before = sample("broker_credentials_total", **labels)

    metrics.credentials(LABELS, provider=provider, rule=rule, role=role, error=error)

    assert sample("broker_credentials_total", **labels) == before + 1
    assert not {EMAIL, JWT_LIKE, f"arn:aws:iam::123456789012:role/{EMAIL}"} & all_label_values()


@pytest.mark.parametrize(
    ("provider", "error", "expected"),
    [
        ("corp", None, ("corp", "ok")),
        ("corp", InvalidToken(), ("corp", "invalid_token")),
        (EMAIL, InvalidToken(), ("other", "invalid_token")),
        (JWT_LIKE, DependencyUnavailable(), ("other", "dependency_unavailable")),
    ],
)
def test_authentications_have_bounded_labels(
    provider: str, error: BrokerError | None, expected: tuple[str, str]
) -> None:
    labels = {"provider": expected[0], "outcome": expected[1]}
    before = sample("broker_authentications_total", **labels)
    metrics.authentication(LABELS, provider, error)
    assert sample("broker_authentications_total", **labels) == before + 1
    assert EMAIL not in all_label_values()


@pytest.mark.parametrize(
    ("what", "kind"),
    [
        ("corp JWKS endpoint", "jwks"),
        ("JWKS endpoint", "jwks"),
        ("corp discovery document", "discovery"),
        ("Login with Amazon tokeninfo", "lwa"),
        ("Login with Amazon profile", "lwa"),
        ("Facebook debug_token", "graph"),
        ("Facebook /me", "graph"),
        ("Facebook oauth/access_token", "graph"),
        ("https://evil.example/?access_token=secret", "other"),
        ("", "other"),
    ],
)
def test_upstream_kinds(what: str, kind: str) -> None:
    assert metrics.upstream_kind(what) == kind


@pytest.mark.parametrize(
    ("value", "label"),
    [("200", "200"), ("404 NOT FOUND", "404"), (503, "503"), ("99", "other"), ("x", "other")],
)
def test_status_labels(value: object, label: str) -> None:
    assert metrics.status_label(value) == label


def test_a_failed_upstream_call_is_counted_by_kind() -> None:
    http = Http(retries=0)
    labels = {"kind": "jwks", "reason": "unavailable"}
    before = sample("broker_upstream_failures_total", **labels)
    timed = sample("broker_upstream_request_duration_seconds_count", kind="jwks")
    try:
        with pytest.raises(DependencyUnavailable):
            http.get_json(f"http://127.0.0.1:{free_port()}/jwks", what="corp JWKS endpoint")
    finally:
        http.close()
    assert sample("broker_upstream_failures_total", **labels) == before + 1
    assert sample("broker_upstream_request_duration_seconds_count", kind="jwks") == timed + 1


def test_redis_errors_are_counted_by_operation() -> None:
    client = redis.Redis(port=free_port(), socket_timeout=0.5, socket_connect_timeout=0.5)
    store = Store(client=client, prefix="x:", sealer=Sealer([b"k" * 32]))
    before = sample("broker_redis_errors_total", operation="get_json")
    with pytest.raises(DependencyUnavailable):
        store.get_json("x:key")
    assert sample("broker_redis_errors_total", operation="get_json") == before + 1
    client.close()


@pytest.mark.parametrize("operation", ["get_json", "lock"])
def test_calls_refused_while_redis_is_failing_fast_are_counted_apart(operation: str) -> None:
    # Refused calls never reach Redis: counting them as Redis errors would make an
    # outage look like a flood of faults, and not counting them would hide the 503s.
    client = redis.Redis(port=free_port(), socket_timeout=0.5, socket_connect_timeout=0.5)
    store = Store(
        client=client,
        prefix="x:",
        sealer=Sealer([b"k" * 32]),
        guard=RedisGuard(probe_interval_seconds=60),
    )

    def call() -> None:
        if operation == "lock":
            with store.lock("name", timeout=1, wait=0):
                pass
        else:
            store.get_json("x:key")

    errors_before = sample("broker_redis_errors_total", operation=operation)
    refused_before = sample("broker_redis_refusals_total", operation=operation)
    try:
        with pytest.raises(StoreUnavailable):
            call()  # asks Redis: a fault
        with pytest.raises(StoreUnavailable):
            call()  # failing fast: Redis is not asked
        with request_scope(), pytest.raises(StoreUnavailable):
            call()
    finally:
        client.close()
    assert sample("broker_redis_errors_total", operation=operation) == errors_before + 1
    assert sample("broker_redis_refusals_total", operation=operation) == refused_before + 2


# --------------------------------------------------------------------------- requests


def test_requests_are_counted_by_route_never_by_path(app: Flask) -> None:
    client = app.test_client()
    path = f"/v1/{EMAIL}/{secrets.token_urlsafe(16)}"
    unmatched = sample("broker_http_requests_total", route="unmatched", method="GET", status="404")
    health = sample("broker_http_requests_total", route="/healthz", method="GET", status="200")
    odd = sample("broker_http_requests_total", route="unmatched", method="other", status="405")

    assert client.get(path).status_code == 404
    assert client.get("/healthz").status_code == 200
    assert client.open("/healthz", method="PROPFIND").status_code == 405

    assert (
        sample("broker_http_requests_total", route="unmatched", method="GET", status="404")
        == unmatched + 1
    )
    assert (
        sample("broker_http_requests_total", route="/healthz", method="GET", status="200")
        == health + 1
    )
    assert (
        sample("broker_http_requests_total", route="unmatched", method="other", status="405")
        == odd + 1
    )
    assert sample("broker_http_request_duration_seconds_count", route="/healthz", method="GET") > 0
    assert not any(EMAIL in v or v == path for v in all_label_values())


def test_a_rule_route_is_labelled_with_its_pattern(app: Flask) -> None:
    client = app.test_client()
    routes = {rule.rule for rule in app.url_map.iter_rules()}
    pattern = next(r for r in routes if "<" in r)  # e.g. /login/<provider>
    concrete = pattern.split("<", 1)[0] + EMAIL
    client.get(concrete)
    values = all_label_values()
    assert EMAIL not in " ".join(values)
    assert values & routes


# --------------------------------------------------------------------------- /metrics


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("", 401),
        (f"Bearer {TOKEN}x", 401),
        (f"Bearer {TOKEN[:-1]}", 401),
        (f"Basic {TOKEN}", 401),
        (TOKEN, 401),
        (f"bearer {TOKEN}", 200),
        (f"Bearer {TOKEN}", 200),
    ],
)
def test_metrics_token_guard(app: Flask, authorization: str | None, status: int) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = app.test_client().get("/metrics", headers=headers)
    assert response.status_code == status
    if status == 200:
        assert response.content_type.startswith("text/plain")
        assert b"broker_http_requests_total" in response.data
        assert TOKEN.encode() not in response.data
    else:
        assert response.get_json()["error"] == "unauthenticated"
        assert TOKEN not in response.get_data(as_text=True)


def test_without_a_token_there_is_no_metrics_route(redis_proc: ManagedProcess) -> None:
    client = redis.Redis(port=redis_proc.port, socket_timeout=2)
    services = Services.build(make_settings(), redis_client=client)
    try:
        app = create_app(services=services)
        response = app.test_client().get("/metrics", headers={"Authorization": "Bearer x"})
        unknown = app.test_client().get("/nothing-here")
        assert response.status_code == 404
        # The same answer as any unknown path, but for each request's own id.
        body, other = response.get_json(), unknown.get_json()
        del body["request_id"], other["request_id"]
        assert body == other
    finally:
        services.close()


# --------------------------------------------------------------------------- settings


def test_metrics_are_off_by_default() -> None:
    settings = make_settings()
    assert settings.metrics.token is None
    assert settings.metrics.listen is None


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        (9100, ("127.0.0.1", 9100)),  # no host: loopback only
        ("9100", ("127.0.0.1", 9100)),
        (":9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),  # the operator's explicit choice
        ("[::1]:9100", ("::1", 9100)),
        ("metrics.internal:9100", ("metrics.internal", 9100)),
    ],
)
def test_listen_addresses(listen: object, expected: tuple[str, int]) -> None:
    assert make_settings(listen=listen).metrics.listen == expected


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"token": "short"}, "metrics.token: must be at least 32 characters"),
        ({"token": 123}, "metrics.token: must be a string"),
        ({"listen": "127.0.0.1:0"}, "metrics.listen: must be host:port"),
        ({"listen": "127.0.0.1:65536"}, "metrics.listen: must be host:port"),
        ({"listen": "127.0.0.1"}, "metrics.listen: must be host:port"),
        ({"listen": "http://x/:9100"}, "metrics.listen: is not a host name"),
        ({"listen": True}, "metrics.listen: must be host:port or a port number"),
        ({"listen": [9100]}, "metrics.listen: must be host:port or a port number"),
        ({"path": "/metrics"}, "metrics.path: unknown key"),
    ],
)
def test_metrics_settings_are_validated(section: dict[str, Any], problem: str) -> None:
    raw = copy.deepcopy(RAW)
    raw["metrics"] = section
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(raw, env={}, source="test")
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_the_token_can_come_from_a_file(tmp_path: Any) -> None:
    (tmp_path / "metrics-token").write_text(TOKEN + "\n")
    raw = copy.deepcopy(RAW)
    raw["metrics"] = {"token_file": "metrics-token"}
    settings = settings_from_mapping(raw, env={}, base_dir=tmp_path, source="test")
    assert settings.metrics.token == TOKEN
    assert TOKEN not in repr(settings.metrics)


def test_loading_settings_does_not_import_prometheus_client() -> None:
    # broker serve loads settings, then sets PROMETHEUS_MULTIPROC_DIR: prometheus-client
    # fixes its mode at first import, so settings must not pull it in.
    import subprocess

    raw = copy.deepcopy(RAW)
    raw["metrics"] = {"token": TOKEN, "listen": 9100}
    # A session policy makes settings import broker.policy: that must not pull it in either.
    raw["rules"][0]["session_policy"] = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}],
    }
    code = (
        "import json, sys, broker.settings as s, broker.server, broker.cli;"
        "settings = s.settings_from_mapping(json.loads(sys.argv[1]), env={});"
        "broker.server.gunicorn_options('127.0.0.1:1', 1, 1, metrics=settings.metrics);"
        "sys.exit(10 if 'prometheus_client' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code, json.dumps(raw)], check=False)
    assert result.returncode == 0


# --------------------------------------------------------------------------- readiness

OK = DocumentState("ok")
DOWN = DocumentState("unavailable", "corp JWKS endpoint (idp) is unreachable")
STALE = DocumentState("stale", "refetch failed")
PENDING = DocumentState("pending", "not fetched yet")


@pytest.mark.parametrize(
    ("redis_ok", "providers", "expected"),
    [
        (True, {"a": OK, "b": OK}, ("ready", 200)),
        (True, {"a": OK, "b": STALE, "c": PENDING}, ("ready", 200)),
        (True, {"a": OK, "b": DOWN}, ("degraded", 200)),
        (True, {"a": PENDING, "b": DOWN}, ("degraded", 200)),
        (True, {"a": DOWN, "b": DOWN}, ("unavailable", 503)),
        (False, {"a": OK}, ("unavailable", 503)),
        (False, {"a": DOWN}, ("unavailable", 503)),
    ],
)
def test_readiness_verdict(
    redis_ok: bool, providers: dict[str, DocumentState], expected: tuple[str, int]
) -> None:
    assert readiness(redis_ok=redis_ok, providers=providers) == expected


def test_readyz_without_any_provider_keys_is_a_503_in_the_error_shape(
    redis_proc: ManagedProcess,
) -> None:
    raw = copy.deepcopy(RAW)
    raw["providers"]["corp"]["jwks_url"] = f"http://127.0.0.1:{free_port()}/jwks"  # closed
    client = redis.Redis(port=redis_proc.port, socket_timeout=2)
    services = Services.build(settings_from_mapping(raw, env={}), redis_client=client)
    services.store.prefix = f"test:{uuid.uuid4().hex[:8]}:"
    try:
        app = create_app(services=services).test_client()
        deadline = time.monotonic() + 20
        # The first probe starts a background fetch; a later one sees it failed.
        while (response := app.get("/readyz")).status_code == 200:
            assert time.monotonic() < deadline, response.get_json()
            time.sleep(0.1)
        body = response.get_json()
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert body["error"] == "dependency_unavailable"
        assert body["message"] == "no identity provider's keys can be had"
        assert body["request_id"]
        assert body["status"] == "unavailable"
        assert body["redis"] == "ok"
        assert body["providers"]["corp"].startswith("unavailable: corp JWKS endpoint")
    finally:
        services.close()


def test_the_metrics_section_does_not_change_the_config_version() -> None:
    # The version keys the credential cache: rotating the scrape token must not empty it.
    assert make_settings(token=TOKEN).config_version == make_settings().config_version
    assert make_settings(listen=9100).config_version == make_settings().config_version
