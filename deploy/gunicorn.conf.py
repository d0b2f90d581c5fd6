"""gunicorn settings for production.

    gunicorn -c deploy/gunicorn.conf.py 'broker.wsgi:create_app()'

The broker reads its configuration from the file named by BROKER_CONFIG.
"""

import multiprocessing
import os

bind = os.environ.get("BIND", f"0.0.0.0:{os.environ.get('PORT', '8000')}")
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * multiprocessing.cpu_count()))
# gthread: requests spend their time waiting on STS, the IdP and Redis, not on CPU.
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
timeout = 30
graceful_timeout = 20
keepalive = 5
# No access log: request lines may hold query strings; the broker writes its own audit log.
accesslog = None
errorlog = "-"
# Fail a worker at start, not at first request, if the config is wrong.
preload_app = False
