"""Request ids: one per request, on the response, in every log line and error body.

A client (or the proxy in front) may send ``X-Request-Id``; it is kept when it is
well-formed (1 to 128 characters of ``A-Z a-z 0-9 . _ -``), so one id follows a call
through the proxy's log, ours and the client's. Anything else (too long, empty, other
characters: nothing a log reader or a header could be tricked by) is replaced by a
fresh random id, never echoed. The id is

* sent back as ``X-Request-Id`` on every response, including those the replay
  middleware answers before Flask and the errors the gunicorn worker renders
  (``broker.server``);
* in every log line written while the request is handled (``broker.logs.request_id``);
* ``"request_id"`` in every JSON error body (``broker.web.errors``).

This middleware is the outermost layer of the app, so every other layer sees the id.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from broker import logs

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

HEADER = "X-Request-Id"
ENVIRON_KEY = "broker.request_id"
_WELL_FORMED = re.compile(r"[A-Za-z0-9._-]{1,128}")


def accept_or_mint(sent: str | None) -> str:
    """The client's id when it is well-formed, else a fresh one."""
    if sent is not None and _WELL_FORMED.fullmatch(sent):
        return sent
    return mint()


class _Minter:
    """A random prefix per process and a counter: unique across processes and nodes
    (64 random bits each) without an ``os.urandom`` syscall per request, which under
    load was a measurable share of a cached request (the id is a label, not a secret)."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


mint = _Minter()
# A forked worker must not repeat its parent's (or a sibling's) ids.
os.register_at_fork(after_in_child=mint.reseed)


class RequestIdMiddleware:
    def __init__(self, app: WSGIApplication) -> None:
        self._app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        rid = accept_or_mint(environ.get("HTTP_X_REQUEST_ID"))
        environ[ENVIRON_KEY] = rid

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # A new list: the replay middleware keeps the one it was given, and a
            # replayed answer must carry its own request's id, not the first one's.
            ours = [(name, value) for name, value in headers if name.lower() != "x-request-id"]
            ours.append((HEADER, rid))
            return start_response(status, ours, exc_info)

        token = logs.request_id.set(rid)
        try:
            return self._app(environ, start)
        finally:
            # gthread reuses threads: the next record this thread writes between
            # requests must not carry this request's id.
            logs.request_id.reset(token)
