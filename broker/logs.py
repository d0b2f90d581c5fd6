"""Structured (JSON lines) logging, so operators can ship and query the audit trail.

Every record is one JSON object on one line: ``time`` (UTC, milliseconds), ``level``,
``logger``, ``message``, then ``request_id`` when the record was made while a request
was being handled (``request_id`` below, set by ``broker.web.request_id``), the fields
of an audit event (``extra={"audit": {...}}``) and ``exception`` (a traceback) when
there is one. gunicorn's own records take the same shape (``broker.server``).

Records are formatted and written by one background thread per process
(``QueueHandler`` + ``QueueListener``, the standard library's recipe for web
applications): request threads only enqueue, so they never queue up behind each
other on the stream's lock and a slow log sink never slows a request down.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import os
import queue
import time
from contextvars import ContextVar
from typing import Any, TextIO

# The id of the request the current thread (or task) is handling, if any.
request_id: ContextVar[str | None] = ContextVar("broker_request_id", default=None)

# One encoder for every record: json.dumps(..., default=str) would build a new one
# each call.
_ENCODER = json.JSONEncoder(default=str)


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._stamp = (-1, "")  # (second, its formatted date): one tuple, swapped atomically

    def _time(self, created: float) -> str:
        # Records come in bursts within one second: format the date part once per second.
        second = int(created)
        cached_second, stamp = self._stamp
        if second != cached_second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._stamp = (second, stamp)
        return f"{stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid is not None:
            entry["request_id"] = rid
        # Named fields: an audit event's (extra={"audit": ...}) or any other record's
        # (extra={"fields": ...}, e.g. gunicorn's access lines).
        for name in ("audit", "fields"):
            fields = getattr(record, name, None)
            if isinstance(fields, dict):
                entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


class _RequestIdFilter(logging.Filter):
    """Stamps each record with the current request's id. It runs in the thread that
    logs (the writer thread formats later, outside the request's context)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


class _FormattedQueueHandler(logging.handlers.QueueHandler):
    """Enqueue the record as it is: the listener's handler formats it. (The base class
    formats here, in the request thread, and drops exc_info on the way.)"""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _Writer:
    """The process's one listener thread, and what it needs to restart after fork."""

    def __init__(self) -> None:
        self.listener: logging.handlers.QueueListener | None = None
        self.level = "info"
        self.stream: TextIO | None = None
        self.fork_hook_installed = False


_writer = _Writer()


def configure(level: str = "info", *, stream: TextIO | None = None) -> None:
    """Start this process's JSON writer, to ``stream`` (default: stderr)."""
    _writer.level = level
    _writer.stream = stream
    # The formatter writes none of these, and looking them up is a large part of the
    # cost of a log call on the hot path (one audit line per request); see
    # "Optimization" in the logging HOWTO.
    logging._srcfile = None  # skip the caller's stack frame
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False

    stop()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = logging.StreamHandler(stream)
    writer.setFormatter(JsonFormatter())
    _writer.listener = logging.handlers.QueueListener(records, writer)
    _writer.listener.start()
    root = logging.getLogger()
    handler = _FormattedQueueHandler(records)
    handler.addFilter(_RequestIdFilter())
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Request lines from werkzeug/urllib3 can carry tokens in query strings
    # (tokeninfo?access_token=...): keep them at WARNING.
    for noisy in ("urllib3", "werkzeug", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not _writer.fork_hook_installed:
        # A forked child (a gunicorn worker of `broker serve`) has no listener thread:
        # give it its own, or its records would pile up unwritten.
        os.register_at_fork(after_in_child=_restart_in_child)
        atexit.register(stop)
        _writer.fork_hook_installed = True


def configured() -> bool:
    """Whether this process's JSON writer is running."""
    return _writer.listener is not None


def _restart_in_child() -> None:
    if _writer.listener is not None:
        _writer.listener = None  # its thread did not survive the fork; nothing to stop
        configure(_writer.level, stream=_writer.stream)


def start_again() -> None:
    """Start a writer with the level and stream of the last ``configure``. gunicorn's
    gevent worker stops the writer before its monkey-patching and calls this after it:
    a thread started before the patch trips over gevent's ``threading`` at exit, one
    started after it is a greenlet reading gevent's queue."""
    configure(_writer.level, stream=_writer.stream)


def stop() -> None:
    """Write out everything queued, then stop the writer thread."""
    if _writer.listener is not None:
        _writer.listener.stop()
        for handler in _writer.listener.handlers:
            handler.close()
        _writer.listener = None
