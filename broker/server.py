"""Running the app under gunicorn: its options, its worker class and its logger.

``gunicorn_options`` is the one set of gunicorn settings; ``broker serve`` runs it from
Python and ``deploy/gunicorn.conf.py`` (the Procfile's) hands the same dict to plain
gunicorn. Two of those settings are classes defined here, so that everything gunicorn
itself answers or logs takes the broker's shape too:

* ``ThreadWorker`` (gunicorn's ``gthread`` plus ``BrokerWorker``): a request gunicorn's
  parser refuses (malformed request line or method, NUL or bad characters in a header,
  a bad ``Content-Length`` or ``Transfer-Encoding``, an over-long line or header block,
  obsolete line folding, an ``Expect`` other than ``100-continue``, an HTTP/2 preface,
  a malformed chunked body) is answered with the broker's JSON error, ``{"error",
  "message", "request_id"}``, a 4xx status, ``Connection: close`` and a fresh
  ``X-Request-Id``, never gunicorn's HTML page, and nothing the client sent is echoed
  in the answer or the log line. A malformed chunked body the app is reading surfaces
  as a 400 (werkzeug ``BadRequest``) rather than an unhandled error, and the
  connection closes with it; so does any answer the app marks ``Connection: close``
  (the 413s), which gunicorn would otherwise drop as a hop-by-hop header.
* ``JsonLogger``: gunicorn's records (Starting, Listening, Booting worker, Handling
  signal, Worker exiting, WORKER TIMEOUT, Shutting down...) go through the broker's
  JSON writer (``broker.logs``) like every other record, in the master and in each
  worker; with an access log switched on (``accesslog``), each request is one JSON
  line without the query string.

``BrokerWorker`` only overrides ``load_wsgi`` and ``handle_error``, which every gunicorn
worker class shares, and relies on the worker calling the app with its response's
``start_response``, which gthread, sync and the async workers all do.

Two worker models, chosen by ``[server] worker_class``:

* ``gthread`` (``ThreadWorker``): one OS thread per request in flight, so at most
  ``threads`` requests per worker wait on STS, an IdP or Redis at once; the next ones
  queue for a thread.
* ``gevent`` (``GeventWorker``): one greenlet per connection (up to
  ``worker_connections``), so a burst of new identities waiting on STS is bounded by
  connections, not threads. gunicorn's gevent worker monkey-patches the standard
  library (sockets, ``threading``, ``time.sleep``, ``queue``) in the worker, right
  after the fork and before the app is built, so every socket, lock and timer the app
  makes (redis-py's and botocore's connections, ``RedisGuard`` and ``SingleFlight``
  locks, ``http._Watch`` timers) is gevent's, and every network call keeps its timeout
  (a socket timeout is a gevent timeout on a patched socket). Nothing the master
  imports holds a lock the requests take or has taken names from ``ssl`` or
  ``socket`` (urllib3, botocore, redis-py: ``ssl`` would then recurse after the patch):
  the app's modules are first imported in the worker (``load``/``broker.wsgi``), and
  the log writer (``broker.logs``) is stopped before the patch and started again after
  it, as a greenlet.

Metrics (``[metrics]``, see broker.metrics): when they are exposed at all, the master
gives the workers one ``PROMETHEUS_MULTIPROC_DIR`` before the first fork (the
operator's, emptied of old files, or a fresh temporary one it removes on exit), tells
prometheus-client when a worker dies, and with ``[metrics] listen`` serves the sum of
every worker's metrics on that separate address from a thread of its own
(``MetricsHooks``, gunicorn server hooks next to the worker and logger classes). Nothing
here imports prometheus-client before the directory is set: the library fixes its mode
on first import, and workers inherit the master's modules when they fork.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import ssl
import tempfile
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Flask
from gunicorn import glogging
from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.config import KNOWN_SETTINGS
from gunicorn.http import errors as http_errors
from gunicorn.workers.ggevent import GeventWorker as GGeventWorker
from gunicorn.workers.gthread import ThreadWorker as GThreadWorker
from werkzeug.exceptions import BadRequest

from broker import logs
from broker.settings import WORKER_TIMEOUT_SECONDS, MetricsSettings, Settings
from broker.web import request_id

log = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # broker.metrics.MULTIPROC_ENV, without the import

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# What gunicorn's parser refuses, as (status, code, message). The messages are ours and
# fixed: gunicorn's exception text quotes the client's bytes (a request line may carry
# a token in its query string), so it goes neither into the answer nor into the log.
# Most specific classes first: InvalidResponseHeader is an InvalidHeader, but it is
# the app's fault, not the client's.
_REFUSALS: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (http_errors.InvalidResponseHeader, 500, "internal_error", "internal error"),
    (http_errors.InvalidResponseHeaderName, 500, "internal_error", "internal error"),
    (http_errors.ConfigurationProblem, 500, "internal_error", "internal error"),
    (http_errors.InvalidRequestLine, 400, "invalid_request", "the request line is malformed"),
    (http_errors.InvalidRequestMethod, 400, "invalid_request", "the request method is invalid"),
    (http_errors.InvalidHTTPVersion, 400, "invalid_request", "the HTTP version is not supported"),
    (http_errors.ObsoleteFolding, 400, "invalid_request", "a header uses obsolete line folding"),
    (http_errors.InvalidHeaderName, 400, "invalid_request", "a request header name is invalid"),
    (http_errors.InvalidHeader, 400, "invalid_request", "a request header is invalid"),
    # RFC 9112 suggests 501 for a transfer coding the server does not know; it is still
    # the client's request that cannot be served, and the broker answers those with 4xx.
    (
        http_errors.UnsupportedTransferCoding,
        400,
        "invalid_request",
        "the transfer coding is not supported",
    ),
    (
        http_errors.InvalidChunkSize,
        400,
        "invalid_request",
        "the chunked request body is malformed",
    ),
    (
        http_errors.ChunkMissingTerminator,
        400,
        "invalid_request",
        "the chunked request body is malformed",
    ),
    (
        http_errors.InvalidChunkExtension,
        400,
        "invalid_request",
        "the chunked request body is malformed",
    ),
    (http_errors.LimitRequestLine, 414, "uri_too_long", "the request line is too long"),
    (
        http_errors.LimitRequestHeaders,
        431,
        "headers_too_large",
        "the request headers are too large or too many",
    ),
    (
        http_errors.ExpectationFailed,
        417,
        "expectation_failed",
        "only Expect: 100-continue is supported",
    ),
    (http_errors.InvalidProxyLine, 400, "invalid_request", "the PROXY protocol line is invalid"),
    (
        http_errors.InvalidProxyHeader,
        400,
        "invalid_request",
        "the PROXY protocol header is invalid",
    ),
    (
        http_errors.ForbiddenProxyRequest,
        403,
        "access_denied",
        "the PROXY protocol is not accepted from this address",
    ),
    (http_errors.InvalidSchemeHeaders, 400, "invalid_request", "the scheme headers contradict"),
    (http_errors.InvalidH2CPreface, 400, "invalid_request", "HTTP/2 is not served here"),
    (ssl.SSLError, 400, "invalid_request", "the TLS handshake failed"),
)
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


def refusal(exc: BaseException) -> tuple[int, str, str]:
    """(status, code, message) for an exception gunicorn's worker caught."""
    for kind, status, code, message in _REFUSALS:
        if isinstance(exc, kind):
            return status, code, message
    return 500, "internal_error", "internal error"


def error_bytes(status: int, code: str, message: str, rid: str) -> bytes:
    """A whole HTTP/1.1 response in the broker's JSON error shape, closing the
    connection (after a parse error, where the next request starts is unknown)."""
    # Imported here: security_headers pulls in the app's modules and prometheus-client
    # with them, which must not load in the master before MetricsHooks.on_starting has
    # set PROMETHEUS_MULTIPROC_DIR (see the module docstring). Only workers get here.
    from broker.web.security_headers import NON_HTML_POLICY  # noqa: PLC0415

    body = json.dumps({"error": code, "message": message, "request_id": rid}).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        f"Content-Security-Policy: {NON_HTML_POLICY}\r\n"
        f"{request_id.HEADER}: {rid}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


class _Input:
    """``wsgi.input`` whose parse failures are the client's (werkzeug ``BadRequest``,
    400). gunicorn raises its own ``ParseException`` for a malformed chunked body, which
    the app would otherwise treat as an unexpected error (500)."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except http_errors.ParseException as exc:
            _status, _code, message = refusal(exc)
            raise BadRequest(message) from None

    def read(self, size: int | None = None) -> bytes:
        data: bytes = self._guard(self._body.read, size)
        return data

    def readline(self, size: int | None = None) -> bytes:
        data: bytes = self._guard(self._body.readline, size)
        return data

    def readlines(self, hint: int | None = None) -> list[bytes]:
        lines: list[bytes] = self._guard(self._body.readlines, hint)
        return lines

    def __iter__(self) -> _Input:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class _ServerSide:
    """Wraps the app in the worker: what only the server can do for it."""

    def __init__(self, app: WSGIApplication) -> None:
        self._app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body = environ.get("wsgi.input")
        if body is not None:
            environ["wsgi.input"] = _Input(body)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            closing = any(
                name.lower() == "connection" and value.strip().lower() == "close"
                for name, value in headers
            )
            # A body that failed to parse leaves the connection's framing unknown.
            if closing or getattr(body, "failed", False) is True:
                # gunicorn passes its Response's bound start_response; force_close makes
                # it send "Connection: close" and end the connection after this answer.
                force_close = getattr(
                    getattr(start_response, "__self__", None), "force_close", None
                )
                if callable(force_close):
                    force_close()
            return start_response(status, headers, exc_info)

        return self._app(environ, start)


class BrokerWorker:
    """Mixin for a gunicorn worker class (see the module docstring)."""

    wsgi: WSGIApplication
    log: Any

    def load_wsgi(self) -> None:
        super().load_wsgi()  # type: ignore[misc]
        self.wsgi = _ServerSide(self.wsgi)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        status, code, message = refusal(exc)
        rid = request_id.mint()
        token = logs.request_id.set(rid)
        try:
            ip = addr[0] if isinstance(addr, tuple) and addr else None
            if status >= 500:
                method = getattr(req, "method", None)
                path = getattr(req, "path", None)  # no query string: it may hold a token
                self.log.exception("error handling request %s %s", method, path)
            else:
                self.log.warning(
                    "refused a malformed request from %s: %s (%s)",
                    ip,
                    type(exc).__name__,
                    status,
                )
        finally:
            logs.request_id.reset(token)
        try:
            gunicorn_util.write_nonblock(client, error_bytes(status, code, message, rid))
        except Exception:  # the client may be gone: nothing left to tell it
            self.log.debug("could not send the error answer")


class ThreadWorker(BrokerWorker, GThreadWorker):  # type: ignore[misc]
    pass


class GeventWorker(BrokerWorker, GGeventWorker):  # type: ignore[misc]
    def patch(self) -> None:
        # The log writer thread the fork hook started is a real thread; after the patch
        # it would be a stranger to gevent's threading (an error at exit). Drain it
        # before, start it again after, as a greenlet.
        running = logs.configured()
        logs.stop()
        super().patch()
        if running:
            logs.start_again()


# ``[server] worker_class`` -> the gunicorn worker class.
WORKER_CLASS_PATHS = {
    "gthread": "broker.server.ThreadWorker",
    "gevent": "broker.server.GeventWorker",
}
# Greenlets per gevent worker: each holds one connection, so this bounds the requests
# a worker has in flight (gunicorn's default).
GEVENT_CONNECTIONS = 1000


class JsonLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's logger, writing through the broker's JSON writer (``broker.logs``).

    gunicorn's own format needs ``%(process)d``, which the broker's log setup turns off
    (it costs time on every record), so its stock handlers failed on every record.
    Here its two loggers have no handlers of their own and propagate to the root
    logger's JSON writer, which this starts in the master when nothing has yet (plain
    gunicorn: the app configures logging only in the workers).
    """

    def setup(self, cfg: Any) -> None:
        self.cfg = cfg
        self.loglevel = self.LOG_LEVELS.get(cfg.loglevel.lower(), logging.INFO)
        if not logs.configured():
            logs.configure(cfg.loglevel.lower())
        for logger in (self.error_log, self.access_log):
            logger.handlers[:] = []
            logger.propagate = True
        self.error_log.setLevel(self.loglevel)
        self.access_log.setLevel(logging.INFO)
        self._access_log_enabled = cfg.accesslog is not None

    def access(self, resp: Any, _req: Any, environ: Any, request_time: timedelta) -> None:
        if not self._access_log_enabled:
            return
        status = str(getattr(resp, "status", "") or "").split(" ", 1)[0]
        self.access_log.info(
            "request",
            extra={
                # Set here: the request's id is no longer current when gunicorn logs.
                "request_id": environ.get(request_id.ENVIRON_KEY),
                "fields": {
                    "event": "request",
                    "method": environ.get("REQUEST_METHOD"),
                    # PATH_INFO only: query strings can carry tokens and codes.
                    "path": environ.get("PATH_INFO"),
                    "status": int(status) if status.isdigit() else None,
                    "bytes": getattr(resp, "sent", None),
                    "duration_ms": round(request_time.total_seconds() * 1000, 1),
                    "client": environ.get("REMOTE_ADDR"),
                },
            },
        )


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self._settings = settings
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        from broker.app import create_app  # noqa: PLC0415 - in the worker, after forking

        # Built in each worker after fork, so no Redis or HTTP connection is shared
        # across processes.
        return create_app(self._settings)


class MetricsHooks:
    """gunicorn server hooks for multiprocess metrics; all run in the master."""

    def __init__(self, settings: MetricsSettings) -> None:
        self._listen = settings.listen
        self._created: Path | None = None
        self._server: Any = None

    def on_starting(self, _arbiter: Any) -> None:
        given = os.environ.get(MULTIPROC_ENV)
        if given:
            # Files of a previous run would be added to this run's counts.
            directory = Path(given)
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob("*.db"):
                stale.unlink()
        else:
            directory = self._created = Path(tempfile.mkdtemp(prefix="broker-metrics-"))
            os.environ[MULTIPROC_ENV] = str(directory)
        log.info("metrics: workers write to %s", directory)

    def when_ready(self, _arbiter: Any) -> None:
        if self._listen is None:
            return

        from prometheus_client import (  # noqa: PLC0415
            CollectorRegistry,
            multiprocess,
            start_http_server,
        )

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        host, port = self._listen
        self._server, _thread = start_http_server(port, addr=host, registry=registry)
        log.info("metrics: listening on http://%s:%d/metrics", host, port)

    def child_exit(self, _arbiter: Any, worker: Any) -> None:
        from prometheus_client import multiprocess  # noqa: PLC0415 - as in when_ready

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

    def on_exit(self, _arbiter: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)
            os.environ.pop(MULTIPROC_ENV, None)


def metrics_hooks(settings: MetricsSettings | None) -> dict[str, Any]:
    """The gunicorn hooks metrics need; none when metrics are not exposed at all."""
    if settings is None or (settings.token is None and settings.listen is None):
        return {}
    hooks = MetricsHooks(settings)
    return {
        "on_starting": hooks.on_starting,
        "when_ready": hooks.when_ready,
        "child_exit": hooks.child_exit,
        "on_exit": hooks.on_exit,
    }


# After SIGTERM, workers get this long to finish the requests they hold before they are
# killed. Orchestrators must wait longer than this before SIGKILL (deploy/:
# terminationGracePeriodSeconds, TimeoutStopSec, stop_grace_period).
GRACEFUL_TIMEOUT_SECONDS = 20


def _worker_class_path(name: str) -> str:
    try:
        return WORKER_CLASS_PATHS[name]
    except KeyError:
        known = ", ".join(sorted(WORKER_CLASS_PATHS))
        raise ValueError(f"server.worker_class must be one of {known}, not {name!r}") from None


def gunicorn_options(
    bind: str,
    workers: int | None,
    threads: int,
    worker_tmp_dir: str | None = None,
    *,
    metrics: MetricsSettings | None = None,
    worker_class: str = "gthread",
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bind": bind,
        "workers": workers or 2 * multiprocessing.cpu_count(),
        # Threads or greenlets, because nearly all time is spent waiting on STS, the IdP
        # or Redis.
        "worker_class": _worker_class_path(worker_class),
        "threads": threads,
        "worker_connections": GEVENT_CONNECTIONS,
        # Upstream budgets (settings: upstream.budget_seconds) are validated against it.
        "timeout": WORKER_TIMEOUT_SECONDS,
        "graceful_timeout": GRACEFUL_TIMEOUT_SECONDS,
        "keepalive": 5,
        "accesslog": None,  # the app logs audit events; JsonLogger if switched on
        "errorlog": "-",
        "logger_class": "broker.server.JsonLogger",
        # Heartbeat files; None is gunicorn's default ($TMPDIR or /tmp). With a read-only
        # root filesystem it must be a tmpfs: /dev/shm also keeps heartbeats off disk.
        "worker_tmp_dir": worker_tmp_dir,
        **metrics_hooks(metrics),
    }
    if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS):
        # gunicorn >= 25.1 opens a control socket by default in $XDG_RUNTIME_DIR or
        # ~/.gunicorn: a write outside /tmp (fails on a read-only root), one path shared
        # by every gunicorn of the user, and a second door to resize or stop the server.
        # The broker is managed with signals only.
        options["control_socket_disable"] = True
    return options


def serve(
    settings: Settings,
    *,
    bind: str,
    workers: int | None,
    threads: int,
    worker_tmp_dir: str | None = None,
) -> None:
    options = gunicorn_options(
        bind,
        workers,
        threads,
        worker_tmp_dir,
        metrics=settings.metrics,
        worker_class=settings.server.worker_class,
    )
    _Gunicorn(settings, options).run()
