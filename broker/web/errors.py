"""One place that turns every failure into the broker's JSON error shape.

A client never sees HTML, a stack trace or an exception message we did not write. A
503 always carries ``Retry-After``: the error's own figure, else the dependency default.
Every body is ``{"error": code, "message": text, "request_id": id}``.

The error path is also where refusals are audited (``report``), so every door that
renders its errors here (the JSON API, console sign-in, the browser pages) writes the
same event: ``authentication_failed`` for a token that failed verification (or was
refused by STS) and an unknown provider, ``access_denied`` for a denial (no matching
rule, a role the rules do not allow, STS ``AccessDenied``, a wrong CSRF token) and a
rate limit. The event names the reason code, the provider and identity id when the
pipeline knew them (``BrokerError.about``), the client address, the path and the
request id; never the token.

A 413 closes the connection (``Connection: close``): the body it refused is still on
the way, and a server that discards it and then keeps the connection may drop the
client's next request with it (gunicorn's worker honours the header: broker.server).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from broker import logs
from broker.errors import (
    UNAVAILABLE_RETRY_AFTER,
    AccessDenied,
    BrokerError,
    InvalidToken,
    RateLimited,
    UnknownProvider,
)

log = logging.getLogger("broker.errors")
audit_log = logging.getLogger("broker.audit")

# Werkzeug's HTTP errors (404 route, 405 method, 413 body too large...) get stable codes.
_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def error_response(
    code: str,
    message: str,
    status: int,
    retry_after: int | None = None,
    details: Mapping[str, Any] | None = None,
) -> Response:
    body: dict[str, Any] = {**(details or {}), "error": code, "message": message}
    rid = logs.request_id.get()
    if rid is not None:
        body["request_id"] = rid
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    if retry_after is None and status == 503:
        retry_after = UNAVAILABLE_RETRY_AFTER
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def report(exc: BrokerError) -> None:
    """Log a server-side failure, or write the audit event for a refusal. Every handler
    that renders a ``BrokerError`` (JSON or HTML) calls this once."""
    # A Redis outage is logged by the store, once and then in summaries: logging it
    # here too would write a traceback per request for as long as the outage lasts.
    if exc.status >= 500 and not exc.logged_at_source:
        # The cause chain may name hosts or codes useful to operators; it never holds a
        # token because no token is ever put in an exception message.
        log.warning("%s: %s", exc.code, exc.message, exc_info=exc.__cause__ is not None)
        return
    if isinstance(exc, InvalidToken | UnknownProvider):
        event, message = "authentication_failed", "authentication failed"
    elif isinstance(exc, AccessDenied | RateLimited):
        event, message = "access_denied", "access denied"
    else:
        return
    audit_log.info(
        message,
        extra={
            "audit": {
                "event": event,
                "reason": exc.code,
                "status": exc.status,
                # The message is written for the caller: it holds no token.
                "detail": exc.message,
                "provider": exc.provider,
                "identity_id": exc.identity_id,
                "client": request.remote_addr,
                "method": request.method,
                "path": request.path,
            }
        },
    )


# The JSON handlers, public so a blueprint with its own (HTML) handlers can hand its
# JSON routes back to them: Flask lets a blueprint's handler shadow the app's.


def broker_error(exc: BrokerError) -> Response:
    report(exc)
    return error_response(exc.code, exc.message, exc.status, exc.retry_after, exc.details)


def http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = _HTTP_CODES.get(status, "http_error")
    response = error_response(code, (exc.description or exc.name).rstrip("."), status)
    # Keep the headers werkzeug attached, e.g. the Allow header a 405 must carry.
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def unexpected(_exc: Exception) -> Response:
    log.exception("unhandled error")
    return error_response("internal_error", "internal error", 500)


def close_after_413(response: Response) -> Response:
    if response.status_code == 413:
        response.headers["Connection"] = "close"
    return response


def register(app: Flask) -> None:
    # For every 413, JSON or HTML page alike (after_request sees handled errors too).
    app.after_request(close_after_413)
    app.register_error_handler(BrokerError, broker_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)
