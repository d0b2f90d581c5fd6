"""create_app(): wiring only. Nothing happens at import time."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from broker import metrics
from broker.services import EXTENSION_KEY, Services
from broker.settings import Settings, load_settings
from broker.store import request_scope
from broker.web import (
    api,
    cli,
    console,
    errors,
    exchange,
    guest,
    health,
    issuer,
    pages,
    request_id,
    security_headers,
    sso,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> Flask:
    """Build a broker app. Tests build as many as they like, each with its own settings."""
    if services is None:
        services = Services.build(settings or load_settings())
    settings = services.settings

    app = Flask("broker")
    app.config.update(MAX_CONTENT_LENGTH=settings.server.max_body_bytes)
    # First hook of all, so every request that reaches Flask has its route noted.
    app.before_request(metrics.note_route)
    # Inside ProxyFix (below), so the exchange sees the client address the proxy reported.
    app.wsgi_app = exchange.CredentialsExchange(app.wsgi_app, app, services)  # type: ignore[method-assign]
    # Outside the exchange, whose rate-limit checks talk to Redis too.
    app.wsgi_app = _redis_scope(app.wsgi_app)  # type: ignore[method-assign,assignment]
    if settings.server.trusted_proxies:
        # Only behind a known number of proxies may X-Forwarded-* be believed; otherwise a
        # client could pick its own address and dodge per-IP rate limits.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app,
            x_for=settings.server.trusted_proxies,
            x_proto=settings.server.trusted_proxies,
            x_host=settings.server.trusted_proxies,
        )
    # Outside everything but the request ids: counts every request, replays and
    # ProxyFix'd ones included (RequestIdMiddleware never answers by itself).
    app.wsgi_app = metrics.RequestMetrics(app.wsgi_app)  # type: ignore[method-assign]
    # Outermost, so the exchange's answers and every log line carry the id.
    app.wsgi_app = request_id.RequestIdMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    app.extensions[EXTENSION_KEY] = services

    errors.register(app)
    app.register_blueprint(health.blueprint)
    app.register_blueprint(issuer.blueprint)
    app.register_blueprint(guest.blueprint)
    app.register_blueprint(api.blueprint)
    app.register_blueprint(sso.blueprint)
    app.register_blueprint(console.blueprint)
    app.register_blueprint(pages.blueprint)
    app.register_blueprint(cli.blueprint)
    security_headers.install(app)
    return app


def _redis_scope(app: WSGIApplication) -> WSGIApplication:
    """Each request is one Redis scope: after one failed Redis call, the rest of the
    request does not wait on Redis again (see broker.store)."""

    def scoped(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        with request_scope():
            return app(environ, start_response)

    return scoped
