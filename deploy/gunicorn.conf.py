"""gunicorn settings for production.

    gunicorn -c deploy/gunicorn.conf.py 'broker.wsgi:create_app()'

The broker reads its configuration from the file named by BROKER_CONFIG. The settings
themselves are `broker.server.gunicorn_options`, the ones `broker serve` uses, so the
two ways to run the broker cannot drift apart; only where they come from differs here
(the environment, as platforms that read a Procfile set it).
"""

import os

from broker.server import gunicorn_options
from broker.settings import CONFIG_ENV, load_settings

settings = load_settings() if os.environ.get(CONFIG_ENV) else None

globals().update(
    gunicorn_options(
        bind=os.environ.get("BIND", f"0.0.0.0:{os.environ.get('PORT', '8000')}"),
        workers=int(os.environ["WEB_CONCURRENCY"]) if "WEB_CONCURRENCY" in os.environ else None,
        threads=int(os.environ.get("GUNICORN_THREADS", "8")),
        # [metrics] decides the master's metrics hooks (multiprocess files, listener).
        metrics=settings.metrics if settings else None,
        # [server] worker_class; without a config file (another WSGI app under the same
        # settings, as bench/ runs), the variable that would override it.
        worker_class=(
            settings.server.worker_class
            if settings
            else os.environ.get("BROKER_SERVER__WORKER_CLASS", "gthread")
        ),
    )
)
