"""AWS Management Console sign-in: credentials -> federation ``getSigninToken`` -> login URL.

The custom identity broker flow AWS documents ("Enable custom identity broker access to
the AWS console", IAM User Guide), as ``aws-vault login`` and granted do it:

1. the role's temporary credentials (AssumeRoleWithWebIdentity, via the credential cache);
2. ``GET <federation endpoint>?Action=getSigninToken&Session=<JSON>[&SessionDuration=N]``
   where the JSON is exactly ``{"sessionId", "sessionKey", "sessionToken"}`` (access key
   id, secret key, session token); the answer is ``{"SigninToken": "..."}``;
3. ``<federation endpoint>?Action=login&Issuer=<our URL>&Destination=<console URL>
   &SigninToken=<token>``: the URL the browser is sent to. AWS: "The URL is valid for 15
   minutes after it is created" and "you should treat the URL as a secret". It is never
   logged, never stored, and only ever travels in ``Cache-Control: no-store`` responses.

Everything a caller chooses (role partition, region, destination) is checked here by
pure functions *before* any credentials are minted, so a hostile ``destination`` costs
nothing and can never turn the broker into an open redirect: the sign-in URL only ever
points at the partition's federation endpoint, and its ``Destination`` only ever at the
partition's own console host.

Partitions, chosen from the role ARN (``arn:aws:``, ``arn:aws-us-gov:``, ``arn:aws-cn:``):

===============  ==================================  =================================
partition        federation endpoint                 console host
===============  ==================================  =================================
``aws``          ``signin.aws.amazon.com``           ``console.aws.amazon.com``
                 (``<region>.signin.aws.amazon.com``  (``<region>.console.aws.amazon.com``)
                 for a region other than us-east-1)
``aws-us-gov``   ``signin.amazonaws-us-gov.com``     ``console.amazonaws-us-gov.com``
``aws-cn``       ``signin.amazonaws.cn``             ``console.amazonaws.cn``
===============  ==================================  =================================

``ConsoleSettings.federation_url`` replaces the endpoint (tests and the dev stack point
it at ``broker.devstack.federation_server``); the destination rules stay the same.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urlencode, urlsplit

import requests

from broker.errors import BadRequest, DependencyUnavailable, UpstreamError
from broker.limits import ROLE_ARN_RE
from broker.safe_redirect import is_safe_next
from broker.settings import ConsoleSettings
from broker.sts import IssuedCredentials

# AWS: "The URL that the federation endpoint provides is valid for 15 minutes after it is
# created." We report this as the sign-in URL's `expires_at`.
SIGNIN_URL_LIFETIME_SECONDS = 15 * 60
# getSigninToken's SessionDuration: "from 900 seconds (15 minutes) to 43200 seconds (12
# hours)" (same page).
SESSION_DURATION_MIN = 900
SESSION_DURATION_MAX = 43200

MAX_DESTINATION_CHARS = 1024  # as safe_redirect.MAX_LENGTH: console deep links fit easily
# Region codes: us-east-1, eu-central-2, us-gov-west-1, cn-northwest-1, ap-southeast-4.
REGION_RE = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d", re.ASCII)
MAX_REGION_CHARS = 32
# Service shortcuts as they appear in console paths: s3, ec2, cloudwatch, iam, vpc ...
SERVICE_RE = re.compile(r"[a-z0-9-]{1,40}", re.ASCII)
# The partition of a role ARN that broker.limits.ROLE_ARN_RE accepts.
_ROLE_ARN_PARTITION_RE = re.compile(r"arn:(aws|aws-us-gov|aws-cn):", re.ASCII)
# Printable ASCII without space: anything else in a destination is refused, not escaped.
_PRINTABLE_RE = re.compile(r"[\x21-\x7e]+", re.ASCII)
# The console session's duration comes from one of these (the response says which).
SessionSource = Literal["session_duration", "credentials"]
# Where temporary credentials came from, as far as getSigninToken cares.
CredentialOrigin = Literal["assume_role", "federation_token", "unknown"]


# --------------------------------------------------------------------------- partitions


@dataclass(frozen=True, kw_only=True)
class Partition:
    name: str
    signin_host: str
    console_host: str
    # The region whose endpoints are the partition's global ones (no region prefix).
    home_region: str
    # Only the commercial partition documents regional sign-in endpoints
    # (<region>.signin.aws.amazon.com, "AWS Sign-In endpoints and quotas").
    regional_signin: bool
    region_prefix: str  # regions of the partition start with this ("" = any other)

    def owns_region(self, region: str) -> bool:
        if self.region_prefix:
            return region.startswith(self.region_prefix)
        # The commercial partition: every region that is not another partition's.
        return not region.startswith(("us-gov-", "cn-", "us-iso"))

    def federation_url(self, region: str | None) -> str:
        host = self.signin_host
        if self.regional_signin and region and region != self.home_region:
            host = f"{region}.{host}"
        return f"https://{host}/federation"

    def console_host_for(self, region: str | None) -> str:
        if self.regional_signin and region and region != self.home_region:
            # The regional console host, to match the regional sign-in endpoint.
            return f"{region}.{self.console_host}"
        return self.console_host

    def is_console_host(self, host: str) -> bool:
        """Exactly the console host or ``<region>.`` + it, for a region of this partition.
        Exact string comparison: no port, userinfo, upper case, trailing dot or IDN."""
        if host == self.console_host:
            return True
        region, dot, rest = host.partition(".")
        return (
            bool(dot)
            and rest == self.console_host
            and len(region) <= MAX_REGION_CHARS
            and REGION_RE.fullmatch(region) is not None
            and self.owns_region(region)
        )


PARTITIONS: Mapping[str, Partition] = {
    p.name: p
    for p in (
        Partition(
            name="aws",
            signin_host="signin.aws.amazon.com",
            console_host="console.aws.amazon.com",
            home_region="us-east-1",
            regional_signin=True,
            region_prefix="",
        ),
        Partition(
            name="aws-us-gov",
            signin_host="signin.amazonaws-us-gov.com",
            console_host="console.amazonaws-us-gov.com",
            home_region="us-gov-west-1",
            regional_signin=False,
            region_prefix="us-gov-",
        ),
        Partition(
            name="aws-cn",
            signin_host="signin.amazonaws.cn",
            console_host="console.amazonaws.cn",
            home_region="cn-north-1",
            regional_signin=False,
            region_prefix="cn-",
        ),
    )
}


def partition_for_role(role_arn: str) -> Partition:
    match = _ROLE_ARN_PARTITION_RE.match(role_arn)
    if match is None or not ROLE_ARN_RE.fullmatch(role_arn):
        raise BadRequest("role_arn must be an IAM role ARN (arn:aws:iam::123456789012:role/...)")
    return PARTITIONS[match.group(1)]


def check_region(partition: Partition, region: str | None) -> str | None:
    if region is None or region == "":
        return None
    if len(region) > MAX_REGION_CHARS or not REGION_RE.fullmatch(region):
        raise BadRequest("region must be an AWS region code such as us-east-1")
    if not partition.owns_region(region):
        raise BadRequest(f"region {region} is not in the role's partition ({partition.name})")
    return region


# --------------------------------------------------------------------------- destination


def _checked_path(value: str) -> str:
    """A path (with query and fragment) on the console host, or BadRequest.

    The open-redirect rules of ``safe_redirect`` (one leading ``/``, no ``//`` or ``\\``,
    no control characters or non-ASCII, every percent-decoding layer checked), plus no
    ``@`` in any layer: it is harmless after a leading ``/`` to a conforming parser, but
    it is the one character that turns ``host/path`` into ``user@host`` for a sloppy one.
    """
    if not is_safe_next(value, forbid="@"):
        raise BadRequest(
            "destination must be a console path starting with a single '/', with no '//', "
            "'\\', '@', control or non-ASCII characters, even percent-encoded"
        )
    return value


def _absolute_destination(partitions: Sequence[Partition], value: str) -> str:
    # Exact, case-sensitive prefix: "HTTPS://", "https:/", "https:\\" and friends are
    # refused rather than normalised, so what we check is what the browser gets.
    if not value.startswith("https://"):
        raise BadRequest("destination URLs must start with https://")
    rest = value[len("https://") :]
    end = len(rest)
    for stop in "/?#":
        index = rest.find(stop)
        if index != -1:
            end = min(end, index)
    host, tail = rest[:end], rest[end:]
    if not any(p.is_console_host(host) for p in partitions):
        if len(partitions) == 1:
            where = "the AWS console host of the role's partition"
        else:
            where = "an AWS console host"
        hosts = ", ".join(f"{p.console_host} or <region>.{p.console_host}" for p in partitions)
        raise BadRequest(f"destination must be on {where} ({hosts}), with no port or user name")
    path = _checked_path("/" + tail if tail[:1] in {"", "?", "#"} else tail)
    url = f"https://{host}{path}"
    # Belt and braces: the standard parser must see exactly the host we checked.
    parts = urlsplit(url)
    if parts.scheme != "https" or parts.netloc != host or parts.hostname != host:
        raise BadRequest("destination is not a plain https URL on the console host")
    return url


def _checked_destination(
    partitions: Sequence[Partition], destination: str
) -> tuple[Literal["service", "path", "url"], str]:
    """What kind of destination this is, checked against the console hosts of
    ``partitions``; the value to use (a path, or the absolute URL as checked)."""
    if len(destination) > MAX_DESTINATION_CHARS:
        raise BadRequest(f"destination is longer than {MAX_DESTINATION_CHARS} characters")
    if not _PRINTABLE_RE.fullmatch(destination):
        raise BadRequest("destination must be printable ASCII with no spaces")
    if SERVICE_RE.fullmatch(destination):
        return "service", destination
    if destination.startswith("/"):
        return "path", _checked_path(destination)
    if destination.startswith("https://"):
        return "url", _absolute_destination(partitions, destination)
    hosts = " or ".join(p.console_host for p in partitions)
    raise BadRequest(
        "destination must be a service name (s3, ec2 ...), a console path starting with "
        f"'/', or an https URL on {hosts}"
    )


def resolve_destination(partition: Partition, destination: str | None, region: str | None) -> str:
    """The console URL to land on, on the partition's own console host only.

    * nothing: the console home page (in ``region`` if given);
    * a service shortcut (``s3``, ``ec2``, ``cloudwatch`` ...): that service's home page;
    * a path (``/ec2/home?region=eu-west-1#Instances:``): that path on the console host;
    * an absolute ``https://`` URL whose host is exactly the partition's console host or
      a regional variant of it;
    * anything else: BadRequest (400).
    """
    host = partition.console_host_for(region)
    query = f"?region={region}" if region else ""
    if destination is None or destination == "":
        return f"https://{host}/console/home{query}"
    kind, value = _checked_destination((partition,), destination)
    if kind == "service":
        return f"https://{host}/{value}/home{query}"
    if kind == "path":
        return f"https://{host}{value}"
    return value


# --------------------------------------------------------------------------- SessionDuration


def check_session_duration(requested: int | None) -> int | None:
    if requested is None:
        return None
    if not SESSION_DURATION_MIN <= requested <= SESSION_DURATION_MAX:
        raise BadRequest(
            f"session_duration must be between {SESSION_DURATION_MIN} and "
            f"{SESSION_DURATION_MAX} seconds"
        )
    return requested


def credential_origin(credentials: IssuedCredentials) -> CredentialOrigin:
    """Which STS call made the credentials, read from the principal STS returned:
    ``...:assumed-role/...`` for AssumeRole*, ``...:federated-user/...`` for
    GetFederationToken."""
    arn = credentials.assumed_role_arn
    if ":assumed-role/" in arn:
        return "assume_role"
    if ":federated-user/" in arn:
        return "federation_token"
    return "unknown"


def session_duration_param(origin: CredentialOrigin, requested: int | None) -> int | None:
    """The ``SessionDuration`` to send to getSigninToken, or None to leave it out.

    AWS ("Enable custom identity broker access to the AWS console", IAM User Guide): "If
    you use one of the AssumeRole* API operations ... you can include the SessionDuration
    HTTP parameter. This parameter specifies the duration of the console session, from 900
    seconds (15 minutes) to 43200 seconds (12 hours)", and "Do not use the SessionDuration
    HTTP parameter if you got the temporary credentials with GetFederationToken. Doing so
    will cause the operation to fail." Without it, "the session defaults to the duration
    of the credentials". (The same page says the AssumeRole* call must not itself be made
    with temporary credentials, i.e. no role chaining, "otherwise the call to the
    federation endpoint fails"; tools that chain roles, such as aws-sso-cli, drop
    SessionDuration for that reason.)

    The broker's credentials always come from AssumeRoleWithWebIdentity, an unsigned
    AssumeRole* call that involves no other credentials, so it may always send it; any
    credentials not positively from AssumeRole* go without it, and the console session
    then follows the credentials' lifetime.
    """
    if requested is None or origin != "assume_role":
        return None
    return requested


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True, kw_only=True)
class ConsoleTarget:
    """A console sign-in request with every caller choice checked."""

    partition: Partition
    region: str | None
    destination: str  # absolute console URL
    federation_url: str


@dataclass(frozen=True, kw_only=True)
class ConsoleRequest:
    """What the caller chose for a console sign-in, as every door parses it."""

    role_arn: str | None
    destination: str | None
    region: str | None
    session_duration: int | None


def check_request(request: ConsoleRequest, *, settings: ConsoleSettings) -> ConsoleTarget | None:
    """Every check of the caller's choices that needs neither the token nor the rules.

    Every console door calls this first, before the token is verified, the session read
    or anything minted. With a ``role_arn`` it checks everything (its ARN names the
    partition) and returns the target. Without one it checks the session duration, the
    region's form, and the destination against the region's partition (or, with no
    region, against every partition's console): whatever the rules then choose, only the
    role's partition is left to check (``plan``, still before credentials are minted), so
    a hostile destination or a malformed region never costs an STS call.
    """
    check_session_duration(request.session_duration)
    if request.role_arn is not None:
        return plan(
            request.role_arn,
            destination=request.destination,
            region=request.region,
            settings=settings,
        )
    partitions: Sequence[Partition] = tuple(PARTITIONS.values())
    region = request.region or None
    if region is not None:
        if len(region) > MAX_REGION_CHARS or not REGION_RE.fullmatch(region):
            raise BadRequest("region must be an AWS region code such as us-east-1")
        partitions = tuple(p for p in partitions if p.owns_region(region))
        if not partitions:
            raise BadRequest(f"region {region} is not in a partition the broker signs in to")
    if request.destination:
        _checked_destination(partitions, request.destination)
    return None


def plan(
    role_arn: str,
    *,
    destination: str | None,
    region: str | None,
    settings: ConsoleSettings,
) -> ConsoleTarget:
    partition = partition_for_role(role_arn)
    checked_region = check_region(partition, region)
    return ConsoleTarget(
        partition=partition,
        region=checked_region,
        destination=resolve_destination(partition, destination, checked_region),
        federation_url=settings.federation_url or partition.federation_url(checked_region),
    )


def login_url(federation_url: str, *, issuer: str, destination: str, signin_token: str) -> str:
    query = urlencode(
        {
            "Action": "login",
            "Issuer": issuer,
            "Destination": destination,
            "SigninToken": signin_token,
        }
    )
    return f"{federation_url}?{query}"


def session_json(credentials: IssuedCredentials) -> str:
    """The ``Session`` parameter, exactly the three documented keys."""
    return json.dumps(
        {
            "sessionId": credentials.access_key_id,
            "sessionKey": credentials.secret_access_key,
            "sessionToken": credentials.session_token,
        },
        separators=(",", ":"),
    )


# --------------------------------------------------------------------------- the endpoint


@dataclass(frozen=True, kw_only=True)
class ConsoleSignin:
    url: str = field(repr=False)  # a secret: it signs its holder in for 15 minutes
    expires_at: datetime  # when the URL stops working
    destination: str
    session_source: SessionSource  # what the console session's length follows
    session_expires_at: datetime  # when the console session ends
    session_duration_seconds: int  # its length from now


class FederationClient:
    """The AWS sign-in federation endpoint (``getSigninToken``).

    Not ``broker.http.Http``: that client retries read timeouts (a user would wait out
    three timeouts before seeing an error) and turns 4xx bodies that are not JSON into
    "malformed response", whereas this endpoint answers its errors as a 400 with an HTML
    body whose text matters ("Invalid credentials parameter"). A console sign-in is a
    human-speed event, so each call uses its own short-lived connection with no retries:
    the user's next click is the retry.

    Failures, all with messages naming only the host (the query string holds the secret
    key and session token):

    ============================================  ============================
    400 "Invalid credentials parameter"           ``UpstreamError`` (502)
    any other 4xx or 5xx, no/malformed token       ``UpstreamError`` (502)
    timed out (connect or read)                   ``UpstreamError`` (502)
    cannot connect at all                         ``DependencyUnavailable`` (503)
    ============================================  ============================
    """

    def __init__(
        self, *, settings: ConsoleSettings, clock: Callable[[], float] = time.time
    ) -> None:
        self._timeout = settings.timeout_seconds
        self._clock = clock

    def signin_token(
        self, federation_url: str, credentials: IssuedCredentials, session_duration: int | None
    ) -> str:
        host = urlsplit(federation_url).netloc
        what = f"the AWS sign-in federation endpoint ({host})"
        params = {"Action": "getSigninToken", "Session": session_json(credentials)}
        if session_duration is not None:
            params["SessionDuration"] = str(session_duration)
        try:
            with requests.Session() as session:
                response = session.get(
                    federation_url,
                    params=params,
                    timeout=self._timeout,
                    allow_redirects=False,
                    headers={"Accept": "application/json"},
                )
        except requests.Timeout:
            # The issue asks for a 502 here (the broker's general rule would be 503).
            raise UpstreamError(f"{what} timed out after {self._timeout:g}s") from None
        except requests.RequestException as exc:
            raise DependencyUnavailable(f"{what} is unreachable ({type(exc).__name__})") from None
        if response.status_code == 200:
            try:
                body = response.json()
            except ValueError:
                raise UpstreamError(f"{what} returned a malformed response") from None
            token = body.get("SigninToken") if isinstance(body, dict) else None
            if not isinstance(token, str) or not token:
                raise UpstreamError(f"{what} answered without a SigninToken")
            return token
        if response.status_code == 400 and "invalid credentials parameter" in response.text.lower():
            raise UpstreamError(
                f"{what} refused the role's credentials (Invalid credentials parameter): "
                "they may have expired or been revoked; try again"
            )
        if 400 <= response.status_code < 500:
            raise UpstreamError(f"{what} refused the request (HTTP {response.status_code})")
        raise UpstreamError(f"{what} failed with HTTP {response.status_code}")

    def signin(
        self,
        target: ConsoleTarget,
        credentials: IssuedCredentials,
        *,
        issuer: str,
        session_duration: int | None,
    ) -> ConsoleSignin:
        now = self._clock()
        sent = session_duration_param(credential_origin(credentials), session_duration)
        token = self.signin_token(target.federation_url, credentials, sent)
        if sent is not None:
            source: SessionSource = "session_duration"
            session_end = datetime.fromtimestamp(now + sent, UTC)
            seconds = sent
        else:
            source = "credentials"
            session_end = credentials.expiration
            seconds = max(0, int(session_end.timestamp() - now))
        return ConsoleSignin(
            url=login_url(
                target.federation_url,
                issuer=issuer,
                destination=target.destination,
                signin_token=token,
            ),
            expires_at=datetime.fromtimestamp(now + SIGNIN_URL_LIFETIME_SECONDS, UTC),
            destination=target.destination,
            session_source=source,
            session_expires_at=session_end,
            session_duration_seconds=seconds,
        )
