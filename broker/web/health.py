"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from broker.errors import DependencyUnavailable
from broker.services import current_services

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    """The process is up. Deliberately checks nothing else, so a Redis outage does not
    make an orchestrator restart every broker at once."""
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz() -> tuple[Response, int]:
    services = current_services()
    try:
        services.store.ping()
    except DependencyUnavailable:
        return jsonify({"status": "unavailable", "redis": "unreachable"}), 503
    return jsonify(
        {"status": "ready", "redis": "ok", "config_version": services.settings.config_version}
    ), 200
