"""A local stand-in for the AWS sign-in federation endpoint (``/federation``).

It speaks the two actions the console flow uses, exactly as the IAM User Guide documents
them ("Enable custom identity broker access to the AWS console"), and is strict where
AWS is, so a mistake in the broker fails here rather than in front of a real user:

``GET /federation?Action=getSigninToken&Session=<JSON>[&SessionDuration=N]``
    ``Session`` must be a JSON object with exactly ``sessionId``, ``sessionKey`` and
    ``sessionToken``, all non-empty strings, and they must be real credentials: the
    stand-in calls ``sts:GetCallerIdentity`` signed with them against the local STS
    (moto checks the key, the signature and the session token). ``SessionDuration`` is
    optional, a whole number from 900 to 43200, and refused with credentials from
    ``GetFederationToken`` (a ``federated-user`` principal), as AWS documents. Answers
    ``{"SigninToken": "..."}``; bad credentials get AWS's ``400`` HTML page
    "Invalid credentials parameter".

``GET /federation?Action=login&Issuer=...&Destination=...&SigninToken=...``
    The sign-in token must be one this server issued less than 15 minutes ago and the
    destination an https URL on an AWS console host. Answers a small HTML page naming who
    would be signed in and where they would land, so the dev stack's redirect ends
    somewhere sensible.

Unknown or repeated parameters are refused. Request lines are never logged: the
``getSigninToken`` query string holds a secret key and a session token.

Start it in-process (tests, ``broker dev``)::

    server = start_federation_server(sts_url=moto_url)    # on a free port
    settings: console.federation_url = server.url          # http://127.0.0.1:N/federation
    ...
    server.stop()
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, request
from markupsafe import escape

from broker.devstack.processes import ThreadedServer, serve_in_thread

SIGNIN_TOKEN_LIFETIME_SECONDS = 15 * 60  # "valid for 15 minutes after it is created"
SESSION_DURATION_MIN = 900
SESSION_DURATION_MAX = 43200
DEFAULT_REGION = "us-east-1"
SESSION_KEYS = frozenset({"sessionId", "sessionKey", "sessionToken"})
_CONSOLE_DOMAINS = (
    "console.aws.amazon.com",
    "console.amazonaws-us-gov.com",
    "console.amazonaws.cn",
)

# What AWS's federation endpoint answers for credentials it does not accept: a 400 with
# an HTML error page (reported by users as "400: Invalid Credentials Parameter. The
# request sent by the client was syntactically incorrect.").
_AWS_400_PAGE = (
    "<html><head><title>Error</title></head><body>"
    "<h1>HTTP Status 400 - {message}</h1>"
    "<p>The request sent by the client was syntactically incorrect.</p>"
    "</body></html>"
)


class InvalidCredentials(Exception):
    """The Session's credentials were refused by STS."""


# (access key id, secret access key, session token) -> the caller's ARN
Verifier = Callable[[str, str, str], str]


def sts_verifier(sts_url: str, *, region: str = DEFAULT_REGION) -> Verifier:
    """Checks credentials with ``sts:GetCallerIdentity`` signed with them, against the
    local STS (moto with IAM authentication on checks key, signature and session token)."""
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import ClientError

    session = botocore.session.Session()
    lock = threading.Lock()  # botocore sessions are not thread-safe; clients are

    def verify(access_key_id: str, secret_access_key: str, session_token: str) -> str:
        with lock:
            client: Any = session.create_client(
                "sts",
                region_name=region,
                endpoint_url=sts_url,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                aws_session_token=session_token,
                config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1}),
            )
        try:
            arn: str = client.get_caller_identity()["Arn"]
        except ClientError as exc:
            raise InvalidCredentials(str(exc.response.get("Error", {}).get("Code"))) from None
        finally:
            client.close()
        return arn

    return verify


@dataclass(frozen=True, kw_only=True)
class SigninRecord:
    """One sign-in token this server issued (no secret key or session token kept)."""

    signin_token: str = field(repr=False)
    caller_arn: str
    access_key_id: str
    session_duration: int | None
    issued_at: float


@dataclass(kw_only=True)
class FederationState:
    verifier: Verifier
    clock: Callable[[], float] = time.time
    records: list[SigninRecord] = field(default_factory=list)
    # Fault injection for tests: answer every getSigninToken with (status, body).
    forced_response: tuple[int, str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def issue(self, record: SigninRecord) -> None:
        with self.lock:
            self.records.append(record)

    def find(self, signin_token: str) -> SigninRecord | None:
        with self.lock:
            for record in self.records:
                if secrets.compare_digest(record.signin_token, signin_token):
                    return record
        return None


class _Refused(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _params(allowed: frozenset[str], required: frozenset[str]) -> dict[str, str]:
    unknown = sorted(set(request.args) - allowed)
    if unknown:
        raise _Refused(f"Unknown parameter(s): {', '.join(unknown)}")
    values: dict[str, str] = {}
    for name in request.args:
        given = request.args.getlist(name)
        if len(given) != 1:
            raise _Refused(f"Parameter {name} given more than once")
        values[name] = given[0]
    missing = sorted(name for name in required if not values.get(name))
    if missing:
        raise _Refused(f"Missing parameter(s): {', '.join(missing)}")
    return values


def _session(raw: str) -> tuple[str, str, str]:
    try:
        session = json.loads(raw)
    except ValueError:
        raise _Refused("Invalid credentials parameter") from None
    if not isinstance(session, dict) or set(session) != SESSION_KEYS:
        raise _Refused("Invalid credentials parameter")
    values = [session[key] for key in ("sessionId", "sessionKey", "sessionToken")]
    if not all(isinstance(v, str) and v for v in values):
        raise _Refused("Invalid credentials parameter")
    return values[0], values[1], values[2]


def _session_duration(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6:
        raise _Refused("Invalid SessionDuration parameter")
    value = int(raw)
    if not SESSION_DURATION_MIN <= value <= SESSION_DURATION_MAX:
        raise _Refused("Invalid SessionDuration parameter")
    return value


def _is_console_url(url: str) -> bool:
    """An https URL on a console host (``console.aws.amazon.com`` or a one-label regional
    variant such as ``eu-west-1.console.aws.amazon.com``), no port or user name."""
    parts = urlsplit(url)
    host = parts.netloc
    if parts.scheme != "https" or host != parts.hostname:
        return False
    label, _, rest = host.partition(".")
    return host in _CONSOLE_DOMAINS or (rest in _CONSOLE_DOMAINS and bool(label))


def create_federation_app(state: FederationState) -> Flask:
    app = Flask("federation_stand_in")

    def get_signin_token() -> Response:
        params = _params(
            frozenset({"Action", "Session", "SessionDuration"}), frozenset({"Action", "Session"})
        )
        if state.forced_response is not None:
            status, body = state.forced_response
            return Response(body, status=status, content_type="text/html")
        access_key_id, secret_key, session_token = _session(params["Session"])
        duration = _session_duration(params.get("SessionDuration"))
        try:
            caller_arn = state.verifier(access_key_id, secret_key, session_token)
        except InvalidCredentials:
            raise _Refused("Invalid credentials parameter") from None
        if duration is not None and ":federated-user/" in caller_arn:
            # "Do not use the SessionDuration HTTP parameter if you got the temporary
            # credentials with GetFederationToken. Doing so will cause the operation to fail."
            raise _Refused("Invalid credentials parameter")
        record = SigninRecord(
            signin_token=secrets.token_urlsafe(48),
            caller_arn=caller_arn,
            access_key_id=access_key_id,
            session_duration=duration,
            issued_at=state.clock(),
        )
        state.issue(record)
        return Response(
            json.dumps({"SigninToken": record.signin_token}), content_type="application/json"
        )

    def login() -> Response:
        params = _params(
            frozenset({"Action", "Issuer", "Destination", "SigninToken"}),
            frozenset({"Action", "Destination", "SigninToken"}),
        )
        record = state.find(params["SigninToken"])
        if record is None or state.clock() - record.issued_at > SIGNIN_TOKEN_LIFETIME_SECONDS:
            raise _Refused("Invalid or expired SigninToken")
        destination = params["Destination"]
        if not _is_console_url(destination):
            raise _Refused("Destination must be an https URL on an AWS console host")
        duration = (
            f"{record.session_duration} seconds (SessionDuration)"
            if record.session_duration is not None
            else "the credentials' lifetime"
        )
        page = (
            "<!doctype html><html><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            "<title>AWS console (local stand-in)</title></head><body>"
            "<h1>AWS Management Console (local stand-in)</h1>"
            f"<p>Signed in as <code id='caller'>{escape(record.caller_arn)}</code>.</p>"
            f"<p>Destination: <code id='destination'>{escape(destination)}</code></p>"
            f"<p>Console session: <span id='duration'>{escape(duration)}</span>.</p>"
            f"<p>Issuer: <code id='issuer'>{escape(params.get('Issuer', ''))}</code></p>"
            "</body></html>"
        )
        return Response(page, content_type="text/html; charset=utf-8")

    @app.get("/federation")
    def federation() -> Response:
        action = request.args.get("Action")
        if action == "getSigninToken":
            response = get_signin_token()
        elif action == "login":
            response = login()
        else:
            raise _Refused("Unsupported Action")
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(_Refused)
    def refused(exc: _Refused) -> Response:
        return Response(
            _AWS_400_PAGE.format(message=escape(exc.message)),
            status=exc.status,
            content_type="text/html;charset=utf-8",
        )

    return app


@dataclass(kw_only=True)
class FederationServer:
    served: ThreadedServer
    state: FederationState

    @property
    def port(self) -> int:
        return self.served.port

    @property
    def url(self) -> str:
        """The federation endpoint URL, for ``console.federation_url``."""
        return f"http://127.0.0.1:{self.port}/federation"

    @property
    def records(self) -> list[SigninRecord]:
        with self.state.lock:
            return list(self.state.records)

    def stop(self) -> None:
        self.served.stop()

    def __enter__(self) -> FederationServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_federation_server(
    *,
    sts_url: str | None = None,
    verifier: Verifier | None = None,
    port: int = 0,
    region: str = DEFAULT_REGION,
    clock: Callable[[], float] = time.time,
) -> FederationServer:
    """The stand-in on 127.0.0.1 (a free port unless ``port`` is given), served by a
    daemon thread. Credentials are checked against ``sts_url`` unless a ``verifier`` is
    given (unit tests)."""
    if verifier is None:
        if sts_url is None:
            raise ValueError("pass sts_url (the local STS) or a verifier")
        verifier = sts_verifier(sts_url, region=region)
    state = FederationState(verifier=verifier, clock=clock)
    served = serve_in_thread(create_federation_app(state), name="federation-stand-in", port=port)
    return FederationServer(served=served, state=state)
