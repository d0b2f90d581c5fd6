"""Every 503 the broker sends carries Retry-After, whatever raised it: the 503 classes
carry a default, and the one JSON error handler renders it."""

from __future__ import annotations

import pytest
from flask import Flask

from broker import errors
from broker.web import errors as web_errors


def app_raising(exc: Exception) -> Flask:
    app = Flask("test")
    web_errors.register(app)

    @app.get("/")
    def fail() -> str:
        raise exc

    return app


@pytest.mark.parametrize(
    ("exc", "code", "retry_after"),
    [
        (errors.StoreUnavailable(), "dependency_unavailable", "2"),
        (
            errors.DependencyUnavailable("STS is unreachable (ReadTimeoutError)"),
            "dependency_unavailable",
            "5",
        ),
        (errors.DependencyUnavailable("the IdP timed out"), "dependency_unavailable", "5"),
        (errors.DependencyUnavailable("STS is slow", retry_after=2), "dependency_unavailable", "2"),
        (errors.UpstreamThrottled(), "upstream_throttled", "2"),
        (errors.UpstreamThrottled(retry_after=7), "upstream_throttled", "7"),
    ],
)
def test_every_503_carries_retry_after(
    exc: errors.BrokerError, code: str, retry_after: str
) -> None:
    response = app_raising(exc).test_client().get("/")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == retry_after
    assert response.get_json() == {"error": code, "message": exc.message}


@pytest.mark.parametrize(
    "exc",
    [errors.BadRequest(), errors.InvalidToken(), errors.UpstreamError(), errors.ServerError()],
)
def test_other_errors_carry_no_retry_after(exc: errors.BrokerError) -> None:
    response = app_raising(exc).test_client().get("/")
    assert response.status_code == exc.status
    assert "Retry-After" not in response.headers


def test_a_bare_503_response_gets_the_dependency_default() -> None:
    with Flask("test").app_context():
        response = web_errors.error_response("dependency_unavailable", "down", 503)
    assert response.headers["Retry-After"] == str(errors.UNAVAILABLE_RETRY_AFTER)


def test_a_store_outage_is_not_logged_per_request(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise errors.StoreUnavailable() from ConnectionError("refused")
    except errors.StoreUnavailable as exc:
        store_exc = exc
    app_raising(store_exc).test_client().get("/")
    assert [r for r in caplog.records if r.name == "broker.errors"] == []
