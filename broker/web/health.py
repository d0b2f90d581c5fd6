"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from broker.errors import StoreUnavailable
from broker.services import current_services

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    """The process is up. Deliberately checks nothing else, so a Redis outage does not
    make an orchestrator restart every broker at once."""
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz() -> Response:
    services = current_services()
    try:
        services.store.ping()
    except StoreUnavailable as exc:
        # The broker's error shape, plus what the probe found.
        response = jsonify({**exc.to_dict(), "status": "unavailable", "redis": "unreachable"})
        response.status_code = 503
        # Like every 503 of the broker: when to ask again.
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    return jsonify(
        {"status": "ready", "redis": "ok", "config_version": services.settings.config_version}
    )
