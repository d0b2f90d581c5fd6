"""AssumeRoleWithWebIdentity: the only AWS call the broker makes, and its errors.

The interface (``STS`` and its request/response types) comes first; ``BotocoreSTS``, the
real implementation, follows below it. STS error codes map onto the broker's error tree:

===============================================  ==========================================
``InvalidIdentityToken``                         ``InvalidToken`` (401)
``ExpiredTokenException``                        ``ExpiredToken`` (401)
``IDPRejectedClaim``, ``AccessDenied``           ``AccessDenied`` (403)
``PackedPolicyTooLarge``                         ``AccessDenied`` (403): this identity's
                                                 tags and policy values are too long
``MalformedPolicyDocument``, ``ValidationError``  ``UpstreamError`` (502) with STS's reason:
``RegionDisabledException``                      STS refused what the rules built; the
                                                 operator must fix it, the caller cannot
``Throttling``, ``ThrottlingException``,         retried, then ``UpstreamThrottled`` (503)
``RequestLimitExceeded``
``IDPCommunicationError``                        retried, then ``UpstreamError`` (502)
any other STS error                              ``UpstreamError`` (502)
STS unreachable or timed out                     ``DependencyUnavailable`` (503)
===============================================  ==========================================
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Protocol

import botocore
import botocore.exceptions
import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, ParamValidationError
from botocore.parsers import ResponseParserError

from broker import metrics
from broker.errors import (
    THROTTLED_RETRY_AFTER,
    AccessDenied,
    BadRequest,
    BrokerError,
    DependencyUnavailable,
    ExpiredToken,
    InvalidToken,
    ServerError,
    UpstreamError,
    UpstreamThrottled,
)
from broker.limits import (
    STS_MAX_DURATION,
    STS_MAX_INLINE_POLICY_CHARS,
    STS_MAX_POLICY_ARNS,
    STS_MIN_DURATION,
)
from broker.settings import STSSettings


@dataclass(frozen=True, kw_only=True)
class AssumeRequest:
    role_arn: str
    session_name: str
    web_identity_token: str = field(repr=False)
    provider_id: str | None  # None for OIDC ID tokens
    duration_seconds: int
    policy: str | None  # minified JSON session policy
    policy_arns: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class IssuedCredentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime  # timezone-aware UTC
    assumed_role_arn: str
    assumed_role_id: str

    @cached_property
    def expiration_text(self) -> str:
        """``iso_utc(expiration)``, formatted once: cached credentials are handed out
        many times, and strftime was a measurable share of each."""
        return iso_utc(self.expiration)

    def credential_process(self) -> dict[str, Any]:
        """Exactly the AWS CLI/SDK ``credential_process`` object."""
        return {
            "Version": 1,
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "SessionToken": self.session_token,
            "Expiration": self.expiration_text,
        }


def iso_utc(moment: datetime | float) -> str:
    """AWS's timestamp form, as in credential_process's Expiration: UTC, whole seconds,
    a "Z". Used for every time the broker hands out, so they all read alike."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class STS(Protocol):
    def assume_role_with_web_identity(self, request: AssumeRequest) -> IssuedCredentials: ...


# --------------------------------------------------------------------------- botocore

# RoleSessionName as STS accepts it; ASCII only, since `\w` would otherwise admit any
# Unicode letter that STS then refuses.
SESSION_NAME_RE = re.compile(r"^[\w+=,.@-]{2,64}$", re.ASCII)

_RETRY_BASE_SECONDS = 0.1
# STS sends no Retry-After; this is what we tell clients when it throttles us.
_THROTTLED_RETRY_AFTER = THROTTLED_RETRY_AFTER
_THROTTLING = frozenset({"Throttling", "ThrottlingException", "RequestLimitExceeded"})
# Only these are worth another attempt: STS asked us to slow down, or could not reach
# the IdP. Every other STS error is a verdict on the request and would be the same again.
_RETRYABLE = _THROTTLING | {"IDPCommunicationError"}
_REFUSED_REQUEST = frozenset(
    {"MalformedPolicyDocument", "ValidationError", "RegionDisabledException"}
)


class BotocoreSTS:
    """``AssumeRoleWithWebIdentity`` through botocore, unsigned.

    The call is unsigned (the web identity token is the proof), so the broker needs no
    AWS keys and botocore never looks for any. botocore's own retries are off: we retry
    only the errors worth retrying, with our own small budget.
    """

    def __init__(
        self,
        settings: STSSettings,
        *,
        max_pool_connections: int = 32,
        retry_base_seconds: float = _RETRY_BASE_SECONDS,
    ) -> None:
        self._settings = settings
        self._retry_base = retry_base_seconds
        session = botocore.session.Session()
        # One client for the process: botocore clients are thread-safe and keep a
        # connection pool, sized for a threaded server.
        self._client: Any = session.create_client(
            "sts",
            region_name=settings.region,
            endpoint_url=settings.endpoint_url,
            config=Config(
                signature_version=botocore.UNSIGNED,
                connect_timeout=settings.timeout_seconds,
                read_timeout=settings.timeout_seconds,
                retries={"total_max_attempts": 1, "mode": "standard"},
                tcp_keepalive=True,
                max_pool_connections=max_pool_connections,
            ),
        )

    def close(self) -> None:
        self._client.close()

    def assume_role_with_web_identity(self, request: AssumeRequest) -> IssuedCredentials:
        params = _params(request)
        attempt = 1
        while True:
            try:
                with metrics.sts_call():
                    response = self._client.assume_role_with_web_identity(**params)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in _RETRYABLE and attempt < self._settings.max_attempts:
                    self._backoff(attempt)
                    attempt += 1
                    continue
                raise _map_client_error(exc, code, request) from None
            except (
                botocore.exceptions.ReadTimeoutError,
                botocore.exceptions.ConnectTimeoutError,
            ) as exc:
                # Not retried here: a worker must not wait several timeouts in a row.
                raise DependencyUnavailable(
                    f"STS timed out after {self._settings.timeout_seconds:g} s "
                    f"({type(exc).__name__})"
                ) from None
            except (botocore.exceptions.ConnectionError, HTTPClientError) as exc:
                # Refused or dropped connections.
                raise DependencyUnavailable(f"STS is unreachable ({type(exc).__name__})") from None
            except ParamValidationError as exc:
                raise _map_param_error(exc, request) from None
            except ResponseParserError:
                raise UpstreamError("STS answered with a response that cannot be parsed") from None
            return _credentials(response)

    def _backoff(self, attempt: int) -> None:
        # Exponential backoff with jitter, so a burst of callers does not retry in step.
        ceiling = self._retry_base * 2 ** (attempt - 1)
        time.sleep(ceiling / 2 + random.uniform(0, ceiling / 2))  # noqa: S311 - not crypto


def _params(request: AssumeRequest) -> dict[str, Any]:
    """The API parameters, after checking STS's limits: refused here, not by STS. Only
    the duration comes from the caller; settings and the policy renderer keep the rest
    within the limits, so the other checks are backstops."""
    if not STS_MIN_DURATION <= request.duration_seconds <= STS_MAX_DURATION:
        raise BadRequest(
            f"duration_seconds must be between {STS_MIN_DURATION} and {STS_MAX_DURATION}"
        )
    if not SESSION_NAME_RE.fullmatch(request.session_name):
        raise ServerError(f"the role session name for role {request.role_arn} is not valid for STS")
    if request.policy is not None and len(request.policy) > STS_MAX_INLINE_POLICY_CHARS:
        raise ServerError(
            f"the session policy for role {request.role_arn} is {len(request.policy)} "
            f"characters; STS accepts at most {STS_MAX_INLINE_POLICY_CHARS}"
        )
    if len(request.policy_arns) > STS_MAX_POLICY_ARNS:
        raise ServerError(
            f"{len(request.policy_arns)} managed policy ARNs for role {request.role_arn}; "
            f"STS accepts at most {STS_MAX_POLICY_ARNS}"
        )
    params: dict[str, Any] = {
        "RoleArn": request.role_arn,
        "RoleSessionName": request.session_name,
        "WebIdentityToken": request.web_identity_token,
        "DurationSeconds": request.duration_seconds,
    }
    if request.provider_id is not None:
        params["ProviderId"] = request.provider_id
    if request.policy is not None:
        params["Policy"] = request.policy
    if request.policy_arns:
        params["PolicyArns"] = [{"arn": arn} for arn in request.policy_arns]
    return params


def _map_client_error(exc: ClientError, code: str, request: AssumeRequest) -> BrokerError:
    # STS messages never quote the token, but scrub it anyway: these reach the caller.
    detail = exc.response.get("Error", {}).get("Message") or code or "no message"
    detail = str(detail).replace(request.web_identity_token, "[token]")
    role = request.role_arn
    if code == "ExpiredTokenException":
        return ExpiredToken(f"STS refused the identity token: {detail}")
    if code == "InvalidIdentityToken":
        return InvalidToken(f"STS refused the identity token: {detail}")
    if code in {"IDPRejectedClaim", "AccessDenied"}:
        return AccessDenied(f"STS refused to let this identity assume {role}: {detail}")
    if code == "PackedPolicyTooLarge":
        return AccessDenied(
            f"STS refused this identity's session tags and policy for {role} as too large: {detail}"
        )
    if code in _REFUSED_REQUEST:
        return UpstreamError(f"STS refused the request for role {role} ({code}): {detail}")
    if code in _THROTTLING:
        return UpstreamThrottled(
            "STS is throttling requests", retry_after=_retry_after(exc.response)
        )
    if code == "IDPCommunicationError":
        return UpstreamError(f"STS could not reach the identity provider: {detail}")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return UpstreamError(f"STS failed ({code or status or 'unknown error'})")


def _map_param_error(exc: ParamValidationError, request: AssumeRequest) -> BrokerError:
    # botocore checks the API model's bounds (e.g. a token of fewer than 4 characters)
    # before sending anything.
    detail = str(exc).replace(request.web_identity_token, "[token]")
    if "WebIdentityToken" in detail:
        return InvalidToken()
    # The other parameters come from settings and the renderer, which keep to the model:
    # reaching here is a bug.
    return ServerError(f"the STS request for role {request.role_arn} is invalid: {detail}")


def _retry_after(response: Mapping[str, Any]) -> int:
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    value = str(headers.get("retry-after", ""))
    return max(1, int(value)) if value.isdigit() else _THROTTLED_RETRY_AFTER


def _credentials(response: Mapping[str, Any]) -> IssuedCredentials:
    creds = response["Credentials"]
    user = response["AssumedRoleUser"]
    return IssuedCredentials(
        access_key_id=creds["AccessKeyId"],
        secret_access_key=creds["SecretAccessKey"],
        session_token=creds["SessionToken"],
        expiration=_utc(creds["Expiration"]),
        assumed_role_arn=user["Arn"],
        assumed_role_id=user["AssumedRoleId"],
    )


def _utc(value: datetime) -> datetime:
    # botocore parses timestamps as aware datetimes; a naive one would be UTC by the API.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
