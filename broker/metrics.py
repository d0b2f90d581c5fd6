"""Prometheus metrics: every metric's name, help text and labels live here, and only here.

Conventions (prometheus-client's and Prometheus's own): names start with ``broker_``,
durations are in seconds, counters end in ``_total``. Other modules never touch a
metric object; they call the small functions below, which bound every label value:

* label values come only from fixed sets (routes of the app, HTTP methods, error codes,
  STS error codes, upstream kinds, cache results) or from the configuration (provider
  names, rule names, role ARNs);
* anything else, whatever the caller sent, is counted as ``"other"``. So no label can
  ever carry a token, an e-mail, an identity id, a raw path or a URL, and a client
  cannot grow the number of series.

Multiprocess mode: under gunicorn every worker is a process with its own counters.
``broker serve`` (``broker.server``) points ``PROMETHEUS_MULTIPROC_DIR`` at a directory
before any worker forks; each worker then writes its values to files there, and a
scrape (``exposition``) adds up every worker's files, including those of workers that
have exited. prometheus-client decides the mode when it is first imported, which is
why ``broker.server`` must set the variable before anything imports this module.
Without the variable (tests, the dev server) the values live in this process's memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from botocore.exceptions import ClientError, HTTPClientError, ParamValidationError
from botocore.exceptions import ConnectionError as BotocoreConnectionError
from botocore.parsers import ResponseParserError
from flask import request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from broker.errors import BrokerError, DependencyUnavailable

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

P = ParamSpec("P")
R = TypeVar("R")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"
# The WSGI environ key where the request's route (the Flask URL rule) is left for
# RequestMetrics; requests no route matched are counted under UNMATCHED.
ROUTE_KEY = "broker.metrics.route"
UNMATCHED = "unmatched"

# Every metric is registered here, never in prometheus-client's global registry: tests
# build many apps in one process, and the multiprocess collector must not see them twice.
REGISTRY = CollectorRegistry(auto_describe=True)

# Buckets for calls to other services: STS and IdPs answer in tens to hundreds of ms;
# the top buckets catch timeouts (5 s by default).
_UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "broker_http_requests_total",
    "HTTP requests answered, by route (the URL rule, not the path), method and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_REQUEST_DURATION = Histogram(
    "broker_http_request_duration_seconds",
    "Time to answer an HTTP request, by route and method.",
    ["route", "method"],
    buckets=_REQUEST_BUCKETS,
    registry=REGISTRY,
)
AUTHENTICATIONS = Counter(
    "broker_authentications_total",
    "Provider tokens checked, by provider and outcome (ok or the error code).",
    ["provider", "outcome"],
    registry=REGISTRY,
)
CREDENTIALS = Counter(
    "broker_credentials_total",
    "Credential requests of verified identities, by provider, rule, role and outcome "
    "(issued, or the error code of the denial or failure).",
    ["provider", "rule", "role", "outcome"],
    registry=REGISTRY,
)
REPLAY_HITS = Counter(
    "broker_replay_hits_total",
    "Identical POST /v1/credentials requests answered from a worker's replay memory "
    "(also counted in broker_credentials_total).",
    registry=REGISTRY,
)
STS_REQUEST_DURATION = Histogram(
    "broker_sts_request_duration_seconds",
    "Duration of each AssumeRoleWithWebIdentity attempt, successful or not.",
    buckets=_UPSTREAM_BUCKETS,
    registry=REGISTRY,
)
STS_ERRORS = Counter(
    "broker_sts_errors_total",
    "Failed AssumeRoleWithWebIdentity attempts, by STS error code (or unreachable, "
    "invalid_parameters, unparseable_response).",
    ["code"],
    registry=REGISTRY,
)
CREDENTIAL_CACHE = Counter(
    "broker_credential_cache_total",
    "Credential cache lookups by result: memory (this worker), redis, miss, disabled.",
    ["result"],
    registry=REGISTRY,
)
SINGLEFLIGHT_WAITS = Counter(
    "broker_singleflight_waits_total",
    "Requests that waited for another request's STS call for the same credentials, by "
    "outcome: filled (the leader's result), took_over (became the leader), timeout.",
    ["outcome"],
    registry=REGISTRY,
)
SINGLEFLIGHT_WAIT_DURATION = Histogram(
    "broker_singleflight_wait_seconds",
    "How long a request waited for another request's STS call.",
    buckets=_UPSTREAM_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_REQUEST_DURATION = Histogram(
    "broker_upstream_request_duration_seconds",
    "Duration of calls to identity providers (retries included), by kind.",
    ["kind"],
    buckets=_UPSTREAM_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_FAILURES = Counter(
    "broker_upstream_failures_total",
    "Failed calls to identity providers, by kind and reason (unavailable: unreachable "
    "or timed out; bad_response: 5xx or unparseable).",
    ["kind", "reason"],
    registry=REGISTRY,
)
KEY_REFRESHES = Counter(
    "broker_jwks_refreshes_total",
    "Key set refetches asked for by a token with an unknown key id, by result "
    "(refetched, or cooldown: the refresh bucket all processes share was empty).",
    ["result"],
    registry=REGISTRY,
)
REDIS_ERRORS = Counter(
    "broker_redis_errors_total",
    "Redis operations that failed (connection, timeout or server error), by operation.",
    ["operation"],
    registry=REGISTRY,
)
REDIS_REFUSALS = Counter(
    "broker_redis_refusals_total",
    "Redis operations refused without asking Redis, because it failed moments ago "
    "(the store's breaker is open, or an earlier call of the same request failed), by "
    "operation.",
    ["operation"],
    registry=REGISTRY,
)
CONSOLE_SIGNINS = Counter(
    "broker_console_signins_total",
    "AWS console sign-in URLs asked for after credentials were issued, by provider, "
    "role and outcome (ok or the error code).",
    ["provider", "role", "outcome"],
    registry=REGISTRY,
)

# -- bounded label values --------------------------------------------------------------

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# What AssumeRoleWithWebIdentity documents, plus our own names for failures without one.
STS_ERROR_CODES = frozenset(
    {
        "AccessDenied",
        "ExpiredTokenException",
        "IDPCommunicationError",
        "IDPRejectedClaim",
        "InvalidIdentityToken",
        "MalformedPolicyDocument",
        "PackedPolicyTooLarge",
        "RegionDisabledException",
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "ValidationError",
        "InternalFailure",
        "ServiceUnavailable",
        "unreachable",
        "invalid_parameters",
        "unparseable_response",
    }
)
CACHE_RESULTS = frozenset({"memory", "redis", "miss", "disabled"})
WAIT_OUTCOMES = frozenset({"filled", "took_over", "timeout"})
REFRESH_RESULTS = frozenset({"refetched", "cooldown"})


# One child per (metric, label values) seen, found with one dict lookup: prometheus-client's
# labels() validates and locks on every call, a measurable share of a cached request. The
# label values are bounded (see the module docstring), so this dict is too.
# A forked worker starts with none of the parent's: its values are its own files.
_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}
os.register_at_fork(after_in_child=_CHILDREN.clear)


def _child(metric: Any, *values: str) -> Any:
    key = (id(metric), values)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*values)
    return child


def _error_code(exc: BaseException) -> str:
    # Error codes are class attributes of the broker's error tree: a fixed set.
    return exc.code if isinstance(exc, BrokerError) else "internal_error"


def bounded(value: object, allowed: Iterable[str]) -> str:
    """``value`` when it is one of ``allowed``, else ``"other"``."""
    return value if isinstance(value, str) and value in allowed else OTHER


@dataclass(frozen=True)
class Labels:
    """The values the provider, rule and role labels may take: the configured ones, so
    no caller can make up a series. Built once from the settings (``Services.labels``),
    not per request."""

    providers: frozenset[str] = frozenset()
    rules: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()

    def provider(self, value: object) -> str:
        return bounded(value, self.providers)

    def rule(self, value: object) -> str:
        return "none" if value is None else bounded(value, self.rules)

    def role(self, value: object) -> str:
        return "none" if value is None else bounded(value, self.roles)


def route_label(route: object) -> str:
    # A URL rule as written in the code ("/login/<provider>"), never the raw path.
    return route if isinstance(route, str) and route.startswith("/") else UNMATCHED


def method_label(method: object) -> str:
    return bounded(method, _METHODS)


def status_label(status: object) -> str:
    code = str(status).split(" ", 1)[0]
    return code if code.isdigit() and 100 <= int(code) <= 599 else OTHER


def upstream_kind(what: str) -> str:
    """The kind of upstream call from its description (``Http.request_json(what=...)``,
    e.g. "corp JWKS endpoint", "Login with Amazon tokeninfo", "Facebook /me")."""
    lowered = what.lower()
    if "jwks" in lowered:
        return "jwks"
    if "discovery" in lowered:
        return "discovery"
    if "login with amazon" in lowered:
        return "lwa"
    if "facebook" in lowered or "graph" in lowered:
        return "graph"
    return OTHER


# -- what the rest of the broker calls ----------------------------------------------------


def authentication(labels: Labels, provider: object, error: BaseException | None) -> None:
    outcome = "ok" if error is None else _error_code(error)
    _child(AUTHENTICATIONS, labels.provider(provider), outcome).inc()


def credentials(
    labels: Labels,
    *,
    provider: object,
    rule: object,
    role: object,
    error: BaseException | None = None,
) -> None:
    """One credential request of a verified identity: issued (``error`` None) or not."""
    outcome = "issued" if error is None else _error_code(error)
    _child(
        CREDENTIALS, labels.provider(provider), labels.rule(rule), labels.role(role), outcome
    ).inc()


def replay_hit(
    labels: Labels, environ: WSGIEnvironment, *, route: str, audit: Mapping[str, Any]
) -> None:
    """A replayed answer: counted as a request to ``route`` and as an issuance."""
    environ[ROUTE_KEY] = route
    REPLAY_HITS.inc()
    credentials(
        labels,
        provider=audit.get("provider"),
        rule=audit.get("rule"),
        role=audit.get("role_arn"),
    )


def console_signin(
    labels: Labels, *, provider: object, role: object, error: BaseException | None
) -> None:
    outcome = "ok" if error is None else _error_code(error)
    _child(CONSOLE_SIGNINS, labels.provider(provider), labels.role(role), outcome).inc()


@contextmanager
def sts_call() -> Iterator[None]:
    """Time one AssumeRoleWithWebIdentity attempt and count its error, if any."""
    started = time.perf_counter()
    try:
        yield
    except ClientError as exc:
        _child(
            STS_ERRORS, bounded(str(exc.response.get("Error", {}).get("Code", "")), STS_ERROR_CODES)
        ).inc()
        raise
    except (BotocoreConnectionError, HTTPClientError):
        _child(STS_ERRORS, "unreachable").inc()
        raise
    except ParamValidationError:
        _child(STS_ERRORS, "invalid_parameters").inc()
        raise
    except ResponseParserError:
        _child(STS_ERRORS, "unparseable_response").inc()
        raise
    except Exception:
        _child(STS_ERRORS, OTHER).inc()
        raise
    finally:
        STS_REQUEST_DURATION.observe(time.perf_counter() - started)


def cache_result(result: str) -> None:
    _child(CREDENTIAL_CACHE, bounded(result, CACHE_RESULTS)).inc()


def singleflight_wait(outcome: str, seconds: float) -> None:
    _child(SINGLEFLIGHT_WAITS, bounded(outcome, WAIT_OUTCOMES)).inc()
    SINGLEFLIGHT_WAIT_DURATION.observe(seconds)


def upstream_call(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorates ``Http.request_json``: times the call and counts its failures under the
    kind named by its ``what`` argument."""

    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        kind = upstream_kind(str(kwargs.get("what", "")))
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except DependencyUnavailable:
            _child(UPSTREAM_FAILURES, kind, "unavailable").inc()
            raise
        except BrokerError:
            _child(UPSTREAM_FAILURES, kind, "bad_response").inc()
            raise
        finally:
            _child(UPSTREAM_REQUEST_DURATION, kind).observe(time.perf_counter() - started)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def key_refresh(result: str) -> None:
    _child(KEY_REFRESHES, bounded(result, REFRESH_RESULTS)).inc()


def redis_error(operation: str) -> None:
    # Operation names are the Store's method names: a fixed set chosen in code.
    _child(REDIS_ERRORS, operation).inc()


def redis_refused(operation: str) -> None:
    _child(REDIS_REFUSALS, operation).inc()


# -- requests ---------------------------------------------------------------------------


class RequestMetrics:
    """WSGI middleware, outermost: counts and times every request, replays included.

    The route is what Flask matched (left in the environ by ``note_route``) or the path
    a replay answered; a request that matched no route is ``unmatched``.
    """

    def __init__(self, app: WSGIApplication) -> None:
        self._app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        status: list[str] = []

        def recording(
            status_line: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            status[:] = [status_line]
            return start_response(status_line, headers, exc_info)

        try:
            return self._app(environ, recording)
        finally:
            route = route_label(environ.get(ROUTE_KEY))
            method = method_label(environ.get("REQUEST_METHOD"))
            _child(HTTP_REQUESTS, route, method, status_label(status[0] if status else 500)).inc()
            _child(HTTP_REQUEST_DURATION, route, method).observe(time.perf_counter() - started)


def note_route() -> None:
    """Flask ``before_request`` hook: remember the matched URL rule for RequestMetrics."""

    if request.url_rule is not None:
        request.environ[ROUTE_KEY] = request.url_rule.rule


# -- exposition ---------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def collector_registry() -> CollectorRegistry:
    """What a scrape reads: every worker's files in multiprocess mode, else this process."""
    if multiprocess_dir() is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def exposition() -> tuple[bytes, str]:
    """The text exposition format and its content type."""
    return generate_latest(collector_registry()), CONTENT_TYPE_LATEST
