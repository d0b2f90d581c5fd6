"""The broker's one exception tree and its JSON shape.

Every failure a client can see is a ``BrokerError``; one Flask handler renders it as
``{"error": code, "message": text}`` with ``status``. Subclasses only set class
attributes. Caller mistakes (4xx) and upstream or dependency faults (5xx) are
different branches so code can tell them apart::

    BrokerError
    ├── ClientError                       4xx: the caller can fix it
    │   ├── BadRequest                    400 invalid_request
    │   │   └── UnknownProvider           400 unknown_provider
    │   ├── InvalidToken                  401 invalid_token
    │   │   └── ExpiredToken              401 expired_token
    │   ├── Unauthenticated               401 unauthenticated (no/expired session)
    │   ├── AccessDenied                  403 access_denied
    │   │   ├── NoMatchingRule            403 no_matching_rule
    │   │   └── RoleNotAllowed            403 role_not_allowed
    │   ├── NotFound                      404 not_found
    │   └── RateLimited                   429 rate_limited
    └── ServerError                       5xx: not the caller's fault
        ├── ConfigurationError            500 configuration_error (a rule/policy is wrong)
        ├── UpstreamError                 502 upstream_error (IdP or STS answered badly)
        ├── UpstreamThrottled             503 upstream_throttled
        └── DependencyUnavailable         503 dependency_unavailable (STS, IdP unreachable)
            └── StoreUnavailable          503 dependency_unavailable (Redis)

Messages are written for the caller and never contain tokens, secrets or credentials.

Every 503 tells the client when to come back: the 503 classes carry a default
``retry_after`` (rendered as ``Retry-After``), so no raise site can forget it.

A refusal also says, when the pipeline knew, whom it was about (``provider``,
``identity_id``: set with ``about()`` by ``Services`` and the session code), so the
error path can write the audit event for it (``broker.web.errors.report``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


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
