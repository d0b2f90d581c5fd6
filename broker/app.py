"""create_app(): wiring only. Nothing happens at import time."""

from __future__ import annotations

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from broker.services import EXTENSION_KEY, Services
from broker.settings import Settings, load_settings
from broker.web import api, console, errors, health, pages, replay, security_headers, sso


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> Flask:
    """Build a broker app. Tests build as many as they like, each with its own settings."""
    if services is None:
        services = Services.build(settings or load_settings())
    settings = services.settings

    app = Flask("broker")
    app.config.update(MAX_CONTENT_LENGTH=settings.server.max_body_bytes)
    # Inside ProxyFix (below), so a replay sees the client address the proxy reported.
    app.wsgi_app = replay.ReplayMiddleware(app.wsgi_app, services)  # type: ignore[method-assign]
    if settings.server.trusted_proxies:
        # Only behind a known number of proxies may X-Forwarded-* be believed; otherwise a
        # client could pick its own address and dodge per-IP rate limits.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app,
            x_for=settings.server.trusted_proxies,
            x_proto=settings.server.trusted_proxies,
            x_host=settings.server.trusted_proxies,
        )
    app.extensions[EXTENSION_KEY] = services

    errors.register(app)
    app.register_blueprint(health.blueprint)
    app.register_blueprint(api.blueprint)
    app.register_blueprint(sso.blueprint)
    app.register_blueprint(console.blueprint)
    app.register_blueprint(pages.blueprint)
    security_headers.install(app)
    return app
