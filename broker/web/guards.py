"""The guards an operator endpoint puts in front of itself, written once.

The session guards (``require_session``, ``require_session_and_csrf``) live with the
sessions (``broker.sessions``); the comparisons underneath all of these are
``broker.guards``.
"""

from __future__ import annotations

from flask import abort, request

from broker.errors import Unauthenticated
from broker.guards import bearer_token, same_secret


def require_bearer(expected: str | None, *, what: str) -> None:
    """Let the request through only with ``Authorization: Bearer <expected>``.

    With no secret configured the endpoint is off: 404, the very answer an unknown path
    gets, so nothing hints that it could exist. A wrong or missing token is 401 naming
    ``what`` the caller should send, never the token.
    """
    if expected is None:
        abort(404)
    if not same_secret(bearer_token(request.headers.get("Authorization")), expected):
        raise Unauthenticated(f"send the {what} as Authorization: Bearer <token>")
