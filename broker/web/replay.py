"""Replay of identical ``POST /v1/credentials`` requests, per worker.

A mobile backend presents the same provider token, with the same body, again and again
for as long as the token lives. The answer cannot differ while the token, the rules
(fixed for the life of the process) and the cached credentials are all still valid, so
each worker keeps the finished response for a short time (``Services.replay_until``:
at most ``cache.local_seconds``) keyed by SHA-256 of the exact request body and content
type, and answers a byte-identical request with it before Flask routing, JSON parsing,
token verification, rules and the cache lookup run again.

What still happens on a replay: both rate limits (a refused request goes on to the
normal path, which answers 429, or 503 when Redis cannot count, without counting it
twice) and the audit line. Sign-out
(``Services.forget``) clears this worker's replays; other workers drop theirs within
``local_seconds``, as for the in-memory credentials.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flask import request

from broker import metrics
from broker.errors import BrokerError
from broker.services import Issued, Replay, Services

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

audit_log = logging.getLogger("broker.audit")

PATH = "/v1/credentials"
_ISSUED = "broker.replay_issued"
_REFUSED = "broker.replay_rate_limited"


def remember(issued: Issued) -> None:
    """Called by the view: this request's answer may be replayed once it is finished."""
    request.environ[_ISSUED] = issued


def refused_by_replay() -> BrokerError | None:
    """Why a replay attempt's rate-limit check refused the request (the limit was
    exceeded, or Redis could not count it), so the normal path answers with exactly
    that error instead of counting the request a second time."""
    refused = request.environ.get(_REFUSED)
    return refused if isinstance(refused, BrokerError) else None


class ReplayMiddleware:
    def __init__(self, app: WSGIApplication, services: Services) -> None:
        self._app = app
        self._services = services
        self._max_body = services.settings.server.max_body_bytes

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if (
            environ.get("REQUEST_METHOD") != "POST"
            or environ.get("PATH_INFO") != PATH
            or not self._services.replays.enabled
        ):
            return self._app(environ, start_response)
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return self._app(environ, start_response)
        if not 0 < length <= self._max_body:
            return self._app(environ, start_response)  # chunked or too large: Flask decides
        body = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(body)  # the normal path reads it again
        key = hashlib.sha256(environ.get("CONTENT_TYPE", "").encode() + b"\n" + body).digest()
        replay = self._services.replays.get(key)
        if replay is not None:
            try:
                self._limit(environ, replay)
            except BrokerError as exc:  # 429, or 503 when Redis is down
                environ[_REFUSED] = exc
                return self._app(environ, start_response)
            audit_log.info(
                "credentials issued", extra={"audit": {**replay.audit, "replayed": True}}
            )
            metrics.replay_hit(self._services.settings, environ, route=PATH, audit=replay.audit)
            start_response(replay.status, list(replay.headers))
            return [replay.body]
        return self._record(environ, start_response, key)

    def _limit(self, environ: WSGIEnvironment, replay: Replay) -> None:
        self._services.limit_address(environ.get("REMOTE_ADDR"))
        self._services.limit_identity(replay.identity_id)

    def _record(
        self, environ: WSGIEnvironment, start_response: StartResponse, key: bytes
    ) -> Iterable[bytes]:
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured["status"], captured["headers"] = status, headers
            return start_response(status, headers, exc_info)

        result = self._app(environ, capture)
        issued = environ.get(_ISSUED)
        headers: list[tuple[str, str]] = captured.get("headers", [])
        if (
            not isinstance(issued, Issued)
            or not str(captured.get("status", "")).startswith("200")
            # Never hand one caller's cookie to another.
            or any(name.lower() == "set-cookie" for name, _ in headers)
        ):
            return result
        try:
            body = b"".join(result)
        finally:
            close: Callable[[], None] | None = getattr(result, "close", None)
            if close is not None:
                close()
        self._services.replays.put(
            key,
            Replay(
                status=captured["status"],
                headers=tuple(headers),
                body=body,
                identity_id=issued.identity.identity_id,
                audit=issued.audit,
            ),
            expires_at=self._services.replay_until(issued),
        )
        return [body]
