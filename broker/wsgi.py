"""gunicorn entry point: ``gunicorn 'broker.wsgi:create_app()'`` (config from BROKER_CONFIG).

Logging is configured here because plain gunicorn does not: without it the audit
trail (INFO, JSON lines on stderr) would be silently dropped. The level is
``[server] log_level`` (``BROKER_SERVER__LOG_LEVEL``).
"""

from __future__ import annotations

from flask import Flask

from broker import app
from broker.logs import configure
from broker.settings import load_settings


def create_app() -> Flask:
    settings = load_settings()
    configure(settings.server.log_level)
    return app.create_app(settings)
