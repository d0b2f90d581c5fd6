"""gunicorn entry point: ``gunicorn 'broker.wsgi:create_app()'`` (config from BROKER_CONFIG)."""

from broker.app import create_app

__all__ = ["create_app"]
