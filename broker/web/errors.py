"""One place that turns every failure into the broker's JSON error shape.

A client never sees HTML, a stack trace or an exception message we did not write.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from broker.errors import BrokerError

log = logging.getLogger("broker.errors")

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
    response = jsonify({**(details or {}), "error": code, "message": message})
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def log_server_error(exc: BrokerError) -> None:
    if exc.status >= 500:
        # The cause chain may name hosts or codes useful to operators; it never holds a
        # token because no token is ever put in an exception message.
        log.warning("%s: %s", exc.code, exc.message, exc_info=exc.__cause__ is not None)


# The JSON handlers, public so a blueprint with its own (HTML) handlers can hand its
# JSON routes back to them: Flask lets a blueprint's handler shadow the app's.


def broker_error(exc: BrokerError) -> Response:
    log_server_error(exc)
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


def register(app: Flask) -> None:
    app.register_error_handler(BrokerError, broker_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)
