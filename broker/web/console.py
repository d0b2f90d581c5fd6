"""One click from the broker into the AWS Management Console.

Routes::

    GET  /console            browser: signed-in session -> 302 to the AWS sign-in URL
    POST /console            the same from a page's form (CSRF token in ``csrf_token``)
    POST /v1/console-url     API: provider token -> {"url", "expires_at", ...}

Both mint (or reuse from the cache) the role's credentials through the same
``Services.identify`` / ``Services.decide`` / ``Services.mint`` path as ``POST
/v1/credentials``, so the same rules decide the role, then exchange them at the
federation endpoint for a sign-in URL (``broker.console``). Every caller choice
(``role_arn``, ``region``, ``destination``, ``session_duration``) is checked before
anything is minted, on every door and whether or not a role is named: first by
``console.check_request`` (before the token or session is even looked at), then, when
the rules chose the role, its partition by ``console.plan`` between ``decide`` and
``mint``. A refused choice never costs an STS call.

The sign-in URL is a bearer secret for 15 minutes: it is never logged (the audit record
names the identity, role, access key id and destination, never the URL or token), and
every response here carries ``Cache-Control: no-store`` and ``Referrer-Policy:
no-referrer``.

Browser sessions are not this module's business: ``current_identity_or_none()`` asks
whatever the web sign-in part installed with ``install_session_lookup`` (until then:
nobody is signed in, and browsers are sent to ``/login?next=<this page>``).

A ``GET /console`` from another site (a link, a bookmark) is allowed on purpose: at worst
it signs the user into the console as their own allowed role, on a page of the AWS
console; it cannot choose a role the user's rules do not allow or a page elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Flask, current_app, jsonify, redirect, request
from werkzeug.wrappers import Response

from broker import console, metrics
from broker.errors import BadRequest, BrokerError, Unauthenticated
from broker.identity import Identity
from broker.safe_redirect import safe_next
from broker.services import Issued, Services, current_services
from broker.sts import iso_utc
from broker.web.api import json_body
from broker.web.security_headers import no_store

audit_log = logging.getLogger("broker.audit")

blueprint = Blueprint("console", __name__)

SESSION_LOOKUP_KEY = "broker.console.sessions"
LOGIN_PATH = "/login"
_QUERY_FIELDS = frozenset({"role_arn", "destination", "region", "session_duration"})
_MAX_FIELD_CHARS = 2048


# --------------------------------------------------------------------------- sessions seam


@dataclass(frozen=True, kw_only=True)
class SessionLookup:
    """What the web sign-in part provides, per request."""

    identity: Callable[[], Identity | None]  # the signed-in identity, or None
    check_csrf: Callable[[str | None], None]  # raises AccessDenied unless it matches


def install_session_lookup(app: Flask, lookup: SessionLookup) -> None:
    app.extensions[SESSION_LOOKUP_KEY] = lookup


def _lookup() -> SessionLookup | None:
    lookup: SessionLookup | None = current_app.extensions.get(SESSION_LOOKUP_KEY)
    return lookup


def current_identity_or_none() -> Identity | None:
    """The browser session's identity, or None when nobody is signed in (or no session
    support is installed yet)."""
    lookup = _lookup()
    return lookup.identity() if lookup else None


# --------------------------------------------------------------------------- hooks


@blueprint.before_request
def _per_ip_limit() -> None:
    current_services().limit_address(request.remote_addr)


@blueprint.after_request
def _no_store(response: Response) -> Response:
    # Responses and redirects here carry a sign-in URL: a secret nobody may keep a copy of,
    # and that must not leak onward in a Referer header either.
    return no_store(response, no_referrer=True)


# --------------------------------------------------------------------------- shared


def _prepare(choice: console.ConsoleRequest, services: Services) -> console.ConsoleTarget | None:
    """The checks every door runs first (``console.check_request``): before the token is
    verified, the session read, the rules asked or anything minted."""
    return console.check_request(choice, settings=services.settings.console)


def _signin(
    services: Services,
    identity: Identity,
    choice: console.ConsoleRequest,
    target: console.ConsoleTarget | None,
) -> tuple[Issued, console.ConsoleSignin]:
    """The rules' grant, the last check that needed it, then credentials and the URL.

    Nothing is minted until every choice has passed: the rules decide the grant first
    (``Services.decide`` mints nothing), and when they chose the role, its partition's
    destination and region checks run before ``Services.mint``.
    """
    settings = services.settings
    # A requested console session is also the credentials' duration, so the rule's
    # duration limits apply to it: a console session never outlasts what the rule allows.
    # Checked here first only to name the right field in the message.
    if choice.session_duration is not None:
        limit = services.matching_rule(identity).max_duration_seconds
        if choice.session_duration > limit:
            raise BadRequest(f"session_duration may be at most {limit} seconds for this identity")
    grant = services.decide(
        identity, role_arn=choice.role_arn, duration_seconds=choice.session_duration
    )
    if target is None:
        # No role named: the rules chose one, and only now is its partition known.
        target = console.plan(
            grant.role_arn,
            destination=choice.destination,
            region=choice.region,
            settings=settings.console,
        )
    issued = services.mint(identity, grant)
    try:
        signin = console.FederationClient(settings=settings.console).signin(
            target,
            issued.credentials,
            issuer=settings.server.public_url,
            session_duration=choice.session_duration,
        )
    except BrokerError as exc:
        metrics.console_signin(
            services.labels, provider=identity.provider, role=issued.grant.role_arn, error=exc
        )
        raise
    metrics.console_signin(
        services.labels, provider=identity.provider, role=issued.grant.role_arn, error=None
    )
    audit_log.info(
        "console sign-in URL issued",
        extra={
            "audit": {
                **issued.audit,
                "event": "console_signin",
                "partition": target.partition.name,
                "destination": signin.destination,
                "session_source": signin.session_source,
                "session_expires_at": iso_utc(signin.session_expires_at),
            }
        },
    )
    return issued, signin


def _text(values: Mapping[str, Any], name: str) -> str | None:
    value = values.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > _MAX_FIELD_CHARS:
        raise BadRequest(f"{name} must be a string of at most {_MAX_FIELD_CHARS} characters")
    return value


def _whole_seconds(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 6:
        raise BadRequest("session_duration must be a whole number of seconds")
    return int(value)


# --------------------------------------------------------------------------- browser


def _browser_choice(form: bool) -> console.ConsoleRequest:
    values = request.form if form else request.args
    allowed = _QUERY_FIELDS | {"csrf_token"} if form else _QUERY_FIELDS
    unknown = sorted(set(values) - allowed)
    if unknown:
        # A misspelt `destinaton` must be an error, not a silent landing on the home page.
        raise BadRequest(f"unknown parameter(s): {', '.join(unknown)}")
    for name in values:
        if len(values.getlist(name)) > 1:
            raise BadRequest(f"{name} given more than once")
    return console.ConsoleRequest(
        role_arn=_text(values, "role_arn"),
        destination=_text(values, "destination"),
        region=_text(values, "region"),
        session_duration=_whole_seconds(_text(values, "session_duration")),
    )


def _wants_json() -> bool:
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def _to_login() -> Response:
    # After signing in, come back to this very request when it can be replayed (a GET);
    # the path goes through the same same-origin check the login page applies to `next`.
    here = request.full_path.rstrip("?") if request.method == "GET" else "/"
    target = f"{LOGIN_PATH}?{urlencode({'next': safe_next(here)})}"
    return redirect(target, code=303 if request.method == "POST" else 302)


@blueprint.route("/console", methods=["GET", "POST"], endpoint="signin")
def signin() -> Response:
    form = request.method == "POST"
    choice = _browser_choice(form)
    services = current_services()
    # A broken link fails here with a clear 400, before a sign-in round trip.
    target = _prepare(choice, services)
    identity = current_identity_or_none()
    if identity is None:
        if _wants_json():
            raise Unauthenticated("sign in to the broker first")
        return _to_login()
    if form:
        lookup = _lookup()
        if lookup is not None:  # an identity implies a lookup; stated for the type checker
            lookup.check_csrf(request.form.get("csrf_token"))
    _, result = _signin(services, identity, choice, target)
    # 302 (303 after a form post): the browser goes straight to AWS, which is how AWS
    # recommends handing over the URL ("through a secure redirect ... 302").
    return redirect(result.url, code=303 if form else 302)


# --------------------------------------------------------------------------- API


@blueprint.post("/v1/console-url")
def console_url() -> Response:
    body = json_body(
        {
            "provider": str,
            "token": str,
            "nonce": str,
            "role_arn": str,
            "destination": str,
            "region": str,
            "session_duration": int,
        },
        required=("provider", "token"),
    )
    choice = console.ConsoleRequest(
        role_arn=_text(body, "role_arn"),
        destination=_text(body, "destination"),
        region=_text(body, "region"),
        session_duration=body.get("session_duration"),
    )
    services = current_services()
    # A bad destination, region or duration fails before the token is even verified.
    target = _prepare(choice, services)
    identity = services.identify(body["provider"], body["token"], nonce=body.get("nonce"))
    issued, result = _signin(services, identity, choice, target)
    return jsonify(
        {
            "url": result.url,
            "expires_at": iso_utc(result.expires_at),
            "identity_id": identity.identity_id,
            "role_arn": issued.grant.role_arn,
            "assumed_role_arn": issued.credentials.assumed_role_arn,
            "destination": result.destination,
            # How long the console session lasts, and what decides it: the requested
            # SessionDuration, or (when none was sent) the credentials' own lifetime.
            "session_duration_seconds": result.session_duration_seconds,
            "session_expires_at": iso_utc(result.session_expires_at),
            "session_source": result.session_source,
        }
    )
