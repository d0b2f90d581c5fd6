"""The broker's one exception tree and its JSON shape.

Every failure a client can see is a ``BrokerError``; one Flask handler renders it as
``{"error": code, "message": text}`` with ``status``. Subclasses only set class
attributes. Caller mistakes (4xx) and upstream or dependency faults (5xx) are
different branches so code can tell them apart::

    BrokerError
    ├── ClientError                       4xx: the caller can fix it
    │   ├── BadRequest                    400 invalid_request
    │   │   ├── UnknownProvider           400 unknown_provider
    │   │   └── OAuthError                400 the CLI token endpoint's OAuth codes
    │   ├── InvalidToken                  401 invalid_token
    │   │   └── ExpiredToken              401 expired_token
    │   ├── Unauthenticated               401 unauthenticated (no/expired session)
    │   ├── AccessDenied                  403 access_denied
    │   │   ├── NoMatchingRule            403 no_matching_rule
    │   │   └── RoleNotAllowed            403 role_not_allowed
    │   ├── NotFound                      404 not_found
    │   └── RateLimited                   429 rate_limited
    └── ServerError                       5xx: not the caller's fault
        ├── ConfigurationError            500 configuration_error (start-up or reload only)
        ├── UpstreamError                 502 upstream_error (IdP or STS answered badly)
        ├── UpstreamThrottled             503 upstream_throttled
        └── DependencyUnavailable         503 dependency_unavailable (STS, IdP unreachable)
            └── StoreUnavailable          503 dependency_unavailable (Redis)

Messages are written for the caller and never contain tokens, secrets or credentials.

Each code has one meaning and one status, listed in ``CODES`` with what the caller
should do; a class whose code or status disagrees with the table fails at import.
``configuration_error`` and ``internal_error`` never describe a request: the first is
refused configuration at start-up or reload, the second a broken invariant (a bug).
The CLI token endpoint speaks OAuth instead (``OAUTH_CODES``, RFC 6749 section 5.2 and
RFC 8628 section 3.5): its codes are all 400 and some share a name with a broker code.

Every 503 tells the client when to come back: the 503 classes carry a default
``retry_after`` (rendered as ``Retry-After``), so no raise site can forget it.

A refusal also says, when the pipeline knew, whom it was about (``provider``,
``identity_id``: set with ``about()`` by ``Services`` and the session code), so the
error path can write the audit event for it (``broker.web.errors.report``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class ErrorCode:
    # None only for http_error, whose status is that of the HTTP refusal it names.
    status: int | None
    when: str
    action: str


_RETRY = "retry after the Retry-After seconds"
_OPERATOR = "tell the broker's operator; retrying will not help"

CODES: Mapping[str, ErrorCode] = {
    "invalid_request": ErrorCode(
        400,
        "the request is malformed: a parameter, body, header or value is wrong",
        "fix the request as the message says",
    ),
    "unknown_provider": ErrorCode(
        400,
        "the provider named is not configured on this broker",
        "use one of the providers the message lists",
    ),
    "limited_login_not_enabled": ErrorCode(
        400,
        "a Facebook Limited Login token where this broker does not accept one",
        "send a classic Facebook access token, or ask the operator to enable Limited Login",
    ),
    "invalid_token": ErrorCode(
        401,
        "the identity token failed verification (signature, issuer, audience, claims)",
        "get a new token from the provider; do not retry the same one",
    ),
    "expired_token": ErrorCode(
        401,
        "the identity token, or the provider token behind a session, has expired",
        "refresh it at the provider or sign in again",
    ),
    "unauthenticated": ErrorCode(
        401,
        "no session, or a session that has ended; or a wrong bearer token",
        "sign in again (broker login, or the sign-in page)",
    ),
    "access_denied": ErrorCode(
        403,
        "the identity is known but may not do this (STS or a check refused it)",
        "ask the operator for access; the message says what refused",
    ),
    "no_matching_rule": ErrorCode(
        403,
        "no role rule matches this identity",
        "ask the operator for a rule that matches",
    ),
    "role_not_allowed": ErrorCode(
        403,
        "the rules do not let this identity assume the role asked for",
        "pick one of the roles the answer lists",
    ),
    "not_found": ErrorCode(404, "no such route or resource here", "check the URL"),
    "method_not_allowed": ErrorCode(
        405, "the route exists but not for this method", "use a method the Allow header lists"
    ),
    "request_too_large": ErrorCode(
        413, "the body is larger than the broker accepts", "send a smaller body"
    ),
    "uri_too_long": ErrorCode(414, "the request line is too long", "send a shorter URL"),
    "unsupported_media_type": ErrorCode(
        415, "the body is not application/json", "send JSON with that Content-Type"
    ),
    "expectation_failed": ErrorCode(
        417, "an Expect header other than 100-continue", "drop the Expect header"
    ),
    "rate_limited": ErrorCode(429, "too many requests from this address or identity", _RETRY),
    "headers_too_large": ErrorCode(
        431, "a header, or all of them, is longer than the broker accepts", "send smaller headers"
    ),
    "http_error": ErrorCode(
        None,
        "an HTTP refusal below the API with no code of its own; the status names it",
        "fix the request as the status says",
    ),
    "internal_error": ErrorCode(
        500, "a broken invariant in the broker: a bug, logged with its cause", _OPERATOR
    ),
    "configuration_error": ErrorCode(
        500, "configuration refused at start-up or reload; never a request's answer", _OPERATOR
    ),
    "upstream_error": ErrorCode(
        502,
        "the identity provider or STS failed, answered nonsense, or refused a request "
        "the broker built (a session policy STS finds malformed)",
        "retry later; if it persists, tell the operator (the message names the service)",
    ),
    "upstream_throttled": ErrorCode(503, "the identity provider or STS is throttling", _RETRY),
    "dependency_unavailable": ErrorCode(
        503, "a service the broker needs (STS, the provider, Redis) is unreachable", _RETRY
    ),
}

# RFC 6749 section 5.2 and RFC 8628 section 3.5: what POST /v1/cli/token answers.
OAUTH_CODES: Mapping[str, ErrorCode] = {
    "authorization_pending": ErrorCode(
        400,
        "the person has not yet approved the sign-in in the browser",
        "poll again after the interval",
    ),
    "slow_down": ErrorCode(
        400, "polled sooner than the interval allows", "add 5 seconds to the interval, then poll"
    ),
    "access_denied": ErrorCode(
        400, "the person refused the sign-in in the browser", "stop polling"
    ),
    "expired_token": ErrorCode(400, "the device code has expired", "start a new sign-in"),
    "invalid_grant": ErrorCode(
        400, "the code is unknown, already used or expired", "start a new sign-in"
    ),
}


class BrokerError(Exception):
    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "internal error"
    # Seconds a client should wait before retrying (rendered as Retry-After), unless
    # the raise site knows better.
    default_retry_after: ClassVar[int | None] = None
    # True when whoever raises it has already logged the fault in its own way (the
    # store's outage log), so the error handler must not log each occurrence again.
    logged_at_source: ClassVar[bool] = False
    # Which table the code belongs to: the broker's own, or OAuth's on the token endpoint.
    vocabulary: ClassVar[Mapping[str, ErrorCode]] = CODES

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        entry = cls.vocabulary.get(cls.code)
        if entry is None or entry.status != cls.status:
            raise TypeError(
                f"{cls.__name__}: {cls.code!r} with status {cls.status} is not in its error table"
            )

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: int | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.message = message or self.default_message
        # Seconds a client should wait before retrying (rendered as Retry-After).
        self.retry_after = retry_after if retry_after is not None else self.default_retry_after
        # Whom the failure was about, when known: for the audit trail, never shown.
        self.provider: str | None = None
        self.identity_id: str | None = None
        # Extra JSON fields beside error and message (e.g. the roles a caller may pick),
        # written for the caller like the message.
        self.details: Mapping[str, Any] = details or {}
        super().__init__(self.message)

    def about(self, *, provider: str | None, identity_id: str | None = None) -> None:
        """Record whom this failure concerns. The first (innermost) caller that knew
        wins: an outer layer never overwrites what the code that raised it said."""
        if self.provider is None:
            self.provider = provider
        if self.identity_id is None:
            self.identity_id = identity_id

    def to_dict(self) -> dict[str, Any]:
        return {**self.details, "error": self.code, "message": self.message}


class ClientError(BrokerError):
    status = 400
    code = "invalid_request"
    default_message = "invalid request"


class BadRequest(ClientError):
    pass


class OAuthError(BadRequest):
    """An answer of the CLI token endpoint, in OAuth's vocabulary (all 400)."""

    vocabulary = OAUTH_CODES
    code = "invalid_grant"
    default_message = "the sign-in code is unknown, used or expired"


class UnknownProvider(BadRequest):
    code = "unknown_provider"
    default_message = "unknown identity provider"


class InvalidToken(ClientError):
    status = 401
    code = "invalid_token"
    default_message = "the identity token is not valid"


class ExpiredToken(InvalidToken):
    code = "expired_token"
    default_message = "the identity token has expired"


class Unauthenticated(ClientError):
    status = 401
    code = "unauthenticated"
    default_message = "sign in first"


class AccessDenied(ClientError):
    status = 403
    code = "access_denied"
    default_message = "access denied"


class NoMatchingRule(AccessDenied):
    code = "no_matching_rule"
    default_message = "no role rule matches this identity"


class RoleNotAllowed(AccessDenied):
    code = "role_not_allowed"
    default_message = "this identity may not assume the requested role"


class NotFound(ClientError):
    status = 404
    code = "not_found"
    default_message = "not found"


class RateLimited(ClientError):
    status = 429
    code = "rate_limited"
    default_message = "too many requests"


class ServerError(BrokerError):
    status = 500
    code = "internal_error"
    default_message = "internal error"


class ConfigurationError(ServerError):
    code = "configuration_error"
    default_message = "the broker's configuration is invalid for this request"


class UpstreamError(ServerError):
    status = 502
    code = "upstream_error"
    default_message = "an upstream service failed"


# What a 503 says when the raise site has no better figure: long enough that a retry
# does not land inside the same outage at once, short enough for a client to wait.
THROTTLED_RETRY_AFTER = 2
UNAVAILABLE_RETRY_AFTER = 5
# Redis: the store fails fast for about a second after a fault, then probes again.
STORE_RETRY_AFTER = 2


class UpstreamThrottled(ServerError):
    status = 503
    code = "upstream_throttled"
    default_message = "an upstream service is throttling requests"
    default_retry_after = THROTTLED_RETRY_AFTER


class DependencyUnavailable(ServerError):
    status = 503
    code = "dependency_unavailable"
    default_message = "a service the broker depends on is unavailable"
    default_retry_after = UNAVAILABLE_RETRY_AFTER


class StoreUnavailable(DependencyUnavailable):
    """Redis failed. Clients see the same code as any dependency; the store logs the
    outage once and then in summaries (``broker.store``), never per request."""

    default_message = "the broker's state store (Redis) is unavailable"
    default_retry_after = STORE_RETRY_AFTER
    logged_at_source = True
