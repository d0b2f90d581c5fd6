"""``POST /v1/credentials``, the token exchange, answered in front of Flask.

The exchange is nearly all of a busy broker's traffic, and with the token verified and
the credentials cached its own work is small: Flask's machinery around it (request and
response objects, the request context, the hooks, ``jsonify``, werkzeug's header
handling) cost more than the exchange itself (``python3 run.py bench --profile``; see
the README's "Where the time goes"). So the common request is answered here, at the
WSGI level, by the same pipeline the Flask view runs (``api.exchange``: verify ->
identity -> rules -> credentials), after the same checks (``api.checked_body``), with
the same headers (``security_headers.json_headers`` and ``NO_STORE``) and the same
JSON encoder. One error path: an exception is handed to the app's own error handling
in a request context for this request, so refusals are rendered and audited exactly
where every other door's are.

Answered here: ``POST`` with a ``Content-Length`` of at most ``server.max_body_bytes``
and ``Content-Type: application/json``. Anything else (a chunked body, another type,
another method) goes on to the Flask view, whose answer is the same.

Replay (``cache.replay``). A mobile backend presents the same provider token, with the
same body, again and again for as long as the token lives. The answer cannot differ
while the token, the rules (fixed for the life of the process) and the cached
credentials are all still valid, so each worker keeps the finished response for a short
time (``Services.replay_until``: at most ``cache.local_seconds``) keyed by SHA-256 of
the exact request body and content type, and answers a byte-identical request with it
before token verification, rules and the cache lookup run again. Only a body that comes
a second time is kept (``ExpiringCache`` second sight). What still happens on a replay:
both rate limits (a refused request goes on to the normal path, which answers 429, or
503 when Redis cannot count, without counting it twice) and the audit line. Sign-out
(``Services.forget``) clears this worker's replays; other workers drop theirs within
``local_seconds``, as for the in-memory credentials.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flask import Flask

from broker import metrics
from broker.errors import BrokerError
from broker.services import Replay, Services
from broker.web import api
from broker.web.security_headers import NO_STORE, json_headers, public_https

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

audit_log = logging.getLogger("broker.audit")

PATH = "/v1/credentials"


class CredentialsExchange:
    """WSGI middleware just outside Flask (inside ProxyFix, so addresses are the
    client's); ``app`` is the Flask app whose error handling renders failures."""

    def __init__(self, wsgi: WSGIApplication, app: Flask, services: Services) -> None:
        self._next = wsgi
        self._app = app
        self._services = services
        self._max_body = services.settings.server.max_body_bytes
        self._headers = {
            secure: (("Content-Type", "application/json"), *json_headers(secure=secure), *NO_STORE)
            for secure in (False, True)
        }
        self._https = public_https(services.settings)
        # What jsonify passes to the app's JSON provider (flask.json.provider), so both
        # doors' bodies are byte for byte the same.
        compact = getattr(app.json, "compact", None)
        pretty = (compact is None and app.debug) or compact is False
        self._dump: dict[str, Any] = {"indent": 2} if pretty else {"separators": (",", ":")}

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") != PATH:
            return self._next(environ, start_response)
        declared = environ.get("CONTENT_LENGTH") or ""
        # Digits only: int() would also take " 5", "+5" and "5_0".
        if not (declared.isascii() and declared.isdigit()):
            return self._next(environ, start_response)
        length = int(declared)
        if not 0 < length <= self._max_body:
            return self._next(environ, start_response)  # chunked or too large: Flask decides
        body = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(body)  # a request handed on is read again
        replays = self._services.replays
        key = b""
        if replays.enabled:
            key = hashlib.sha256(environ.get("CONTENT_TYPE", "").encode() + b"\n" + body).digest()
            replay = replays.get(key)
            if replay is not None:
                try:
                    self._limit(environ, replay)
                except BrokerError as exc:  # 429, or 503 when Redis is down
                    environ[api.REFUSED_KEY] = exc
                    return self._next(environ, start_response)
                audit_log.info(
                    "credentials issued", extra={"audit": {**replay.audit, "replayed": True}}
                )
                metrics.replay_hit(self._services.labels, environ, route=PATH, audit=replay.audit)
                start_response(replay.status, list(replay.headers))
                return [replay.body]
        if not _is_json(environ.get("CONTENT_TYPE", "")) or len(body) != length:
            return self._next(environ, start_response)  # the view refuses it, in its words
        environ[metrics.ROUTE_KEY] = PATH
        try:
            self._services.limit_address(environ.get("REMOTE_ADDR"))
            parsed = api.checked_body(
                api.parse_body(body), api.CREDENTIALS_FIELDS, api.CREDENTIALS_REQUIRED
            )
            issued = api.exchange(self._services, parsed)
        except Exception as exc:
            return self._error(environ, start_response, exc)
        payload = (self._app.json.dumps(api.issued_json(issued), **self._dump) + "\n").encode()
        secure = self._https or environ.get("wsgi.url_scheme") == "https"
        headers = [*self._headers[secure], ("Content-Length", str(len(payload)))]
        if key:
            replays.put(
                key,
                Replay(
                    status="200 OK",
                    headers=tuple(headers),
                    body=payload,
                    identity_id=issued.identity.identity_id,
                    audit=issued.audit,
                ),
                expires_at=self._services.replay_until(issued),
            )
        start_response("200 OK", headers)
        return [payload]

    def _limit(self, environ: WSGIEnvironment, replay: Replay) -> None:
        self._services.limit_address(environ.get("REMOTE_ADDR"))
        self._services.limit_identity(replay.identity_id)

    def _error(
        self, environ: WSGIEnvironment, start_response: StartResponse, exc: Exception
    ) -> Iterable[bytes]:
        """The answer Flask gives when the view raises ``exc``: its handlers, its
        after-request hooks (security headers, no-store), in a context for this request."""
        app = self._app
        with app.request_context(environ):
            try:
                response = app.make_response(app.handle_user_exception(exc))
            except Exception as unhandled:
                response = app.make_response(app.handle_exception(unhandled))
            response = app.process_response(response)
            return response(environ, start_response)


def _is_json(content_type: str) -> bool:
    """What ``request.is_json`` takes: application/json or application/*+json."""
    mimetype = content_type.partition(";")[0].strip().lower()
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )
