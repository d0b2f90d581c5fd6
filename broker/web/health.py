"""Liveness, readiness and metrics for load balancers, orchestrators and Prometheus.

``/readyz`` names what is down and never waits on an identity provider:

* Redis is pinged (bounded by the store's guard: one socket timeout at most, at once
  while it is failing fast). Redis down: 503.
* Each provider reports its key material from what the process already knows
  (``IdentityProvider.key_state``): ``ok``, ``stale`` (a refetch failed, the last good
  keys are in use), ``pending`` (not fetched yet) or ``unavailable`` (no keys at all,
  the last fetch failed). A provider whose keys are missing or due for a refresh gets
  one background fetch, so the next probe knows more; fetches keep their own backoff,
  so probes cannot make the broker hammer an IdP.
* Some providers unavailable: 200 ``degraded`` (the broker still serves the others);
  every provider unavailable: 503.
* Every answer names ``status``, ``redis``, each provider and ``config_version``. A 503
  is also the broker's error shape (``error``, ``message``, ``request_id``) with
  ``Retry-After``, like every other 503: the store's figure when Redis is down.

``/metrics`` exists only when ``[metrics] token`` is set, and answers only a request
with ``Authorization: Bearer <token>`` (401 otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import Blueprint, Response, jsonify

from broker import metrics
from broker.errors import DependencyUnavailable, StoreUnavailable
from broker.jwks import DocumentState
from broker.services import current_services
from broker.web.errors import error_response
from broker.web.guards import require_bearer

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    """The process is up. Deliberately checks nothing else, so a Redis outage does not
    make an orchestrator restart every broker at once."""
    return jsonify({"status": "ok"})


def readiness(*, redis_ok: bool, providers: Mapping[str, DocumentState]) -> tuple[str, int]:
    """The overall answer: Redis is needed for everything; a provider only for its users."""
    if not redis_ok:
        return "unavailable", 503
    usable = [state.usable for state in providers.values()]
    if usable and not any(usable):
        return "unavailable", 503
    if not all(usable):
        return "degraded", 200
    return "ready", 200


@blueprint.get("/readyz")
def readyz() -> Response:
    services = current_services()
    down: DependencyUnavailable | None = None
    try:
        services.store.ping()
        redis = "ok"
    except StoreUnavailable as exc:
        down = exc
        redis = f"unavailable at {services.settings.redis.target()}: {exc.message}"
    # Without Redis, no shared copy is read and nothing is fetched: the answer is 503
    # anyway, and every Redis read would wait out the socket timeout.
    states = {
        name: provider.key_state(check=down is None)
        for name, provider in services.providers.items()
    }
    status, code = readiness(redis_ok=down is None, providers=states)
    found = {
        "status": status,
        "redis": redis,
        "providers": {name: state.describe() for name, state in states.items()},
        "config_version": services.settings.config_version,
    }
    if code == 200:
        return jsonify(found)
    if down is None:
        down = DependencyUnavailable("no identity provider's keys can be had")
    # The broker's error shape and Retry-After, plus what the probe found.
    return error_response(down.code, down.message, 503, down.retry_after, found)


@blueprint.get("/metrics")
def metrics_endpoint() -> Response:
    require_bearer(current_services().settings.metrics.token, what="metrics token")
    body, content_type = metrics.exposition()
    response = Response(body, content_type=content_type)
    response.headers["Cache-Control"] = "no-store"
    return response
