"""Running the app under gunicorn from Python (``broker serve``)."""

from __future__ import annotations

import multiprocessing
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from broker.settings import WORKER_TIMEOUT_SECONDS, Settings


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self._settings = settings
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        from broker.app import create_app

        # Built in each worker after fork, so no Redis or HTTP connection is shared
        # across processes.
        return create_app(self._settings)


def gunicorn_options(bind: str, workers: int | None, threads: int) -> dict[str, Any]:
    return {
        "bind": bind,
        "workers": workers or 2 * multiprocessing.cpu_count(),
        # Threads, because nearly all time is spent waiting on STS, the IdP or Redis.
        "worker_class": "gthread",
        "threads": threads,
        # Upstream budgets (settings: upstream.budget_seconds) are validated against it.
        "timeout": WORKER_TIMEOUT_SECONDS,
        "graceful_timeout": 20,
        "keepalive": 5,
        "accesslog": None,  # access lines could include query strings; the app logs audit
        "errorlog": "-",
    }


def serve(settings: Settings, *, bind: str, workers: int | None, threads: int) -> None:
    _Gunicorn(settings, gunicorn_options(bind, workers, threads)).run()
