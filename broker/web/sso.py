"""Web sign-in: the browser redirect flow, the pages, and the session's JSON API.

Routes::

    GET  /login                  the configured providers
    GET  /login/<provider>       302 to the provider (code flow, PKCE S256, state, nonce)
    GET  /callback/<provider>    code -> token -> verified identity -> new session -> next
    POST /logout                 (CSRF) session and its cached credentials deleted
    GET  /                       who you are, the roles your rules allow
    GET  /credentials            choose a role
    POST /credentials            (CSRF) the credentials page, never cached
    GET  /v1/session             the session as JSON (includes the CSRF token)
    POST /v1/session/credentials (X-CSRF-Token) credentials as JSON, like /v1/credentials

Errors on browser routes render an HTML page with the error's status (never a stack
trace); errors on ``/v1/session*`` keep the broker's JSON shape.

CSRF: HTML forms carry the session's CSRF token in a hidden field. The JSON endpoint
requires it in an ``X-CSRF-Token`` header rather than relying on an Origin check: a
cross-site page cannot set a custom header without a CORS preflight (which the broker
never grants), browsers omit ``Origin`` in some cases, and a header works the same for
non-browser clients holding the cookie. The token comes from ``GET /v1/session``, which
other origins cannot read.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping
from contextlib import suppress
from typing import Any
from urllib.parse import urlencode

from flask import (
    Blueprint,
    Flask,
    current_app,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from broker import errors
from broker.errors import BrokerError
from broker.guards import local_sts_endpoint
from broker.oauth_flow import callback_error
from broker.safe_redirect import safe_next
from broker.services import Issued, current_services
from broker.sessions import (
    WebSession,
    begin_session,
    broker_token_suffices,
    check_csrf,
    check_csrf_current,
    current_identity_or_none,
    drop_login_binding,
    end_session,
    load_session,
    login_bindings,
    new_login_binding,
    require_session,
    require_session_and_csrf,
    session_ended,
    session_identity,
    set_login_binding,
    web_sso,
)
from broker.sts import iso_utc
from broker.web import console
from broker.web import errors as json_errors
from broker.web.api import issued_json, json_body
from broker.web.pages import error_heading
from broker.web.security_headers import no_store

log = logging.getLogger(__name__)
audit_log = logging.getLogger("broker.audit")

blueprint = Blueprint("sso", __name__)

# The console blueprint's sign-in view, when that part is installed.
CONSOLE_ENDPOINT = "console.signin"


@blueprint.record_once
def _connect_console(state: BlueprintSetupState) -> None:
    """Let the console sign-in part see this part's sessions (its documented seam)."""

    assert isinstance(state.app, Flask)
    console.install_session_lookup(
        state.app,
        console.SessionLookup(identity=current_identity_or_none, check_csrf=check_csrf_current),
    )


def _is_json_route() -> bool:
    return request.path.startswith("/v1/")


# ---------------------------------------------------------------------- hooks


@blueprint.before_request
def _per_ip_limit() -> None:
    # Every sign-in start writes a pending login to Redis: bound it per client address.
    current_services().limit_address(request.remote_addr)


# Every page here is about one signed-in person (identity, CSRF token, credentials):
# no browser history, proxy or CDN may keep a copy.
blueprint.after_request(no_store)


def pages_and_json_errors(bp: Blueprint) -> None:
    """Errors on ``bp``'s browser routes render the HTML error page; on its ``/v1/``
    routes they keep the broker's JSON shape (the app's handlers). Used by every
    blueprint that serves people pages."""

    def broker_error(exc: BrokerError) -> Response:
        if _is_json_route():
            return json_errors.broker_error(exc)
        json_errors.report(exc)
        return error_page(exc.status, exc.code, exc.message, exc=exc)

    def http_error(exc: HTTPException) -> Response:
        if _is_json_route():
            return json_errors.http_error(exc)
        message = (exc.description or exc.name).rstrip(".")
        return error_page(exc.code or 500, "http_error", message)

    def unexpected(exc: Exception) -> Response:
        if _is_json_route():
            return json_errors.unexpected(exc)
        log.exception("unhandled error on a web page")
        return error_page(500, "internal_error", "internal error")

    bp.register_error_handler(BrokerError, broker_error)
    bp.register_error_handler(HTTPException, http_error)
    bp.register_error_handler(Exception, unexpected)


pages_and_json_errors(blueprint)


# The routes of signing in: an error there is not about the roles page.
_SIGN_IN_ENDPOINTS = frozenset({"sso.login_start", "sso.callback"})


def error_page(status: int, code: str, message: str, *, exc: BrokerError | None = None) -> Response:
    ws: WebSession | None = None
    # The error may be Redis itself: the page renders without a session then, and does
    # not make the person wait for a second Redis timeout to find that out.
    if not isinstance(exc, errors.DependencyUnavailable):
        with suppress(BrokerError):
            ws = load_session()
    provider = ws.provider if ws is not None and isinstance(exc, errors.ExpiredToken) else None
    response = make_response(
        render_template(
            "error.html",
            ws=ws,
            status=status,
            code=code,
            heading=error_heading(status, code),
            message=message,
            signing_in=request.endpoint in _SIGN_IN_ENDPOINTS,
            sign_in_again=isinstance(exc, errors.ExpiredToken | errors.Unauthenticated),
            provider=provider,
            retry_after=exc.retry_after if exc is not None else None,
        ),
        status,
    )
    if exc is not None and exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


# ---------------------------------------------------------------------- helpers


def _login_redirect(next_path: str) -> Response:
    query = "" if next_path == "/" else "?" + urlencode({"next": next_path})
    return redirect(url_for("sso.login_page") + query, 303)


def _current_path() -> str:
    return safe_next(request.full_path.rstrip("?"))


def identity_view(ws: WebSession) -> dict[str, Any]:
    sso = web_sso()
    now = sso.clock()
    return {
        "provider": ws.provider,
        "provider_name": sso.display_name(ws.provider),
        "subject": ws.subject,
        "email": ws.email,
        "name": ws.claims.get("name") if isinstance(ws.claims.get("name"), str) else None,
        "identity_id": sso.services.identity_ids.derive(ws.provider, ws.subject),
        # Expired with no refresh token: the page offers a new sign-in up front.
        # (With the broker's token, the provider's expiry does not matter.)
        "token_expired": ws.token_expired(now)
        and not ws.refresh_token
        and not broker_token_suffices(ws),
        "token_expires_at": iso_utc(ws.token_expires_at),
        "session_expires_at": iso_utc(
            min(
                ws.created_at + sso.settings.session_absolute_seconds,
                ws.last_seen + sso.settings.session_idle_seconds,
            )
        ),
    }


def _roles(ws: WebSession) -> tuple[tuple[str, ...], str | None]:
    """The roles the rules allow, or none and the reason (shown, not raised)."""
    services = current_services()
    try:
        return services.allowed_roles(web_sso().identity(ws)), None
    except errors.AccessDenied as exc:
        return (), exc.message


def _console_available() -> bool:
    return CONSOLE_ENDPOINT in current_app.view_functions


def _duration(value: str | None) -> int | None:
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise errors.BadRequest("duration_seconds must be a whole number of seconds") from None


# ---------------------------------------------------------------------- sign-in


@blueprint.get("/v1/providers")
def providers_json() -> Response:
    """The configured providers, and which of them a browser can sign in with (the
    login page's list): what a client checks before sending a person to sign in."""
    services = current_services()
    return jsonify(
        {
            "providers": [
                {
                    "name": name,
                    "display_name": provider.display_name,
                    "browser_sign_in": web_sso().flow.browser_ready(name),
                }
                for name, provider in services.providers.items()
            ]
        }
    )


@blueprint.get("/login")
def login_page() -> Response:
    services = current_services()
    ws = load_session()
    next_path = safe_next(request.args.get("next"))
    providers = [
        {
            "name": name,
            "display_name": provider.display_name,
            "url": url_for("sso.login_start", provider=name)
            + ("" if next_path == "/" else "?" + urlencode({"next": next_path})),
        }
        for name, provider in services.providers.items()
        if web_sso().flow.browser_ready(name)
    ]
    return make_response(
        render_template(
            "login.html",
            providers=providers,
            ws=ws,
            identity=identity_view(ws) if ws is not None else None,
            ended=session_ended(),
            signed_out=request.args.get("signed_out") == "1",
        )
    )


@blueprint.get("/login/<provider>")
def login_start(provider: str) -> Response:
    services = current_services()
    services.provider(provider)  # UnknownProvider (400) before any state is written
    sso = web_sso()
    # Minted for this login, whatever the browser sent (see new_login_binding).
    browser = new_login_binding()
    url = sso.flow.begin(provider, next_path=safe_next(request.args.get("next")), browser=browser)
    response = redirect(url, 302)
    set_login_binding(response, browser)
    return response


# Authorization-response parameters a provider sends at most once; a repeated one is a
# crafted URL, and which copy each reader takes must never be a question.
_SINGLE_CALLBACK_PARAMETERS = ("state", "code", "iss", "error", "error_description")


def _single_parameters() -> None:
    for name in _SINGLE_CALLBACK_PARAMETERS:
        if len(request.args.getlist(name)) > 1:
            raise errors.BadRequest(f"the sign-in response has more than one {name}; start again")


@blueprint.get("/callback/<provider>")
def callback(provider: str) -> Response:
    services = current_services()
    services.provider(provider)
    sso = web_sso()
    if len(request.args.getlist("state")) > 1:
        raise errors.BadRequest("the sign-in response has more than one state; start again")
    browser = login_bindings()
    state = request.args.get("state")
    error = request.args.get("error")
    iss = request.args.get("iss")
    if error is not None:
        # Use up the state, if it is ours, so this response cannot be replayed later.
        ours = False
        with suppress(errors.BadRequest):
            sso.flow.take(provider, state, browser=browser)
            ours = True
        _single_parameters()
        # RFC 9207 covers error responses too: a mixed-up one is refused as such, and
        # its text never shown.
        sso.flow.check_issuer(provider, iss)
        # The provider's free text is shown only for a login this browser started: a
        # crafted link must not put an attacker's words on our page.
        description = request.args.get("error_description") if ours else None
        raise callback_error(error, description, sso.display_name(provider))
    pending = sso.flow.take(provider, state, browser=browser)
    # After the state is used up (a crafted response burns the attempt, it cannot be
    # retried) and before the code goes anywhere.
    _single_parameters()
    # RFC 9207: a code meant for (or from) another provider is never sent.
    sso.flow.check_issuer(provider, iss)
    tokens = sso.flow.exchange(pending, request.args.get("code"))
    # The same verification as the JSON API, plus the nonce we sent: an ID token minted
    # for another login (or replayed from one) fails here.
    identity = services.identify(provider, tokens.token, nonce=pending.nonce)
    # 303: the browser follows with a GET, whatever brought it here.
    response = redirect(safe_next(pending.next_path), 303)
    begin_session(response, identity.verified, refresh_token=tokens.refresh_token)
    drop_login_binding(response, pending.browser)
    audit_log.info(
        "web sign-in",
        extra={
            "audit": {
                "event": "web_sign_in",
                "identity_id": identity.identity_id,
                "provider": provider,
                "refresh_token": tokens.refresh_token is not None,
            }
        },
    )
    return response


@blueprint.post("/logout")
def logout() -> Response:
    services = current_services()
    sso = web_sso()
    ws = load_session()
    response = redirect(url_for("sso.login_page", signed_out="1"), 303)
    if ws is None:
        # Nothing to protect: just make sure no stale cookie is left behind.
        end_session(response)
        return response
    check_csrf(ws, request.form.get("csrf_token"))
    identity_id = sso.services.identity_ids.derive(ws.provider, ws.subject)
    end_session(response)
    # Cached credentials of this identity go too: signing out means no more handing out.
    forgotten = services.forget(identity_id)
    audit_log.info(
        "web sign-out",
        extra={
            "audit": {
                "event": "web_sign_out",
                "identity_id": identity_id,
                "provider": ws.provider,
                "cached_credentials_dropped": forgotten,
            }
        },
    )
    return response


# ---------------------------------------------------------------------- pages


@blueprint.get("/")
def home() -> Response:
    ws = load_session()
    if ws is None:
        return _login_redirect("/")
    roles, denied = _roles(ws)
    return make_response(
        render_template(
            "home.html",
            ws=ws,
            identity=identity_view(ws),
            roles=roles,
            denied=denied,
            console=_console_available(),
            console_endpoint=CONSOLE_ENDPOINT,
        )
    )


@blueprint.get("/credentials")
def credentials_form() -> Response:
    ws = load_session()
    if ws is None:
        return _login_redirect(_current_path())
    roles, denied = _roles(ws)
    return make_response(
        render_template(
            "choose_role.html",
            ws=ws,
            identity=identity_view(ws),
            roles=roles,
            denied=denied,
            selected=request.args.get("role_arn"),
        )
    )


@blueprint.post("/credentials")
def credentials_page() -> Response:
    ws = require_session_and_csrf(request.form.get("csrf_token"))
    identity = session_identity(ws)
    ws = load_session() or ws  # as renewed by session_identity, if its token had expired
    services = current_services()
    issued = services.issue(
        identity,
        role_arn=request.form.get("role_arn") or None,
        duration_seconds=_duration(request.form.get("duration_seconds")),
    )
    return make_response(
        render_template(
            "credentials.html",
            ws=ws,
            identity=identity_view(ws),
            issued=issued_json(issued),
            snippets=snippets(
                issued,
                region=services.settings.sts.region,
                broker_url=services.settings.server.public_url,
                sts_endpoint=services.settings.sts.endpoint_url,
            ),
            console=_console_available(),
            console_endpoint=CONSOLE_ENDPOINT,
        )
    )


# ---------------------------------------------------------------------- JSON


@blueprint.get("/v1/session")
def session_json() -> Response:
    ws = require_session()
    roles, denied = _roles(ws)
    view = identity_view(ws)
    return jsonify(
        {
            "identity_id": view["identity_id"],
            "provider": ws.provider,
            "subject": ws.subject,
            "email": ws.email,
            "roles": list(roles),
            "denied": denied,
            "token_expired": view["token_expired"],
            "token_expires_at": view["token_expires_at"],
            "session_expires_at": view["session_expires_at"],
            # Readable only by this origin (no CORS): scripts and CLI clients holding the
            # cookie send it back in X-CSRF-Token.
            "csrf_token": ws.csrf_token,
        }
    )


@blueprint.post("/v1/session/credentials")
def session_credentials() -> Response:
    ws = require_session_and_csrf(request.headers.get("X-CSRF-Token"))
    body = json_body({"role_arn": str, "duration_seconds": int}, required=())
    identity = session_identity(ws)
    issued = current_services().issue(
        identity, role_arn=body.get("role_arn"), duration_seconds=body.get("duration_seconds")
    )
    return jsonify(issued_json(issued))


# ---------------------------------------------------------------------- snippets


def _profile_name(role_arn: str) -> str:
    name = role_arn.rsplit("/", 1)[-1]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "broker"


def snippets(
    issued: Issued,
    *,
    region: str,
    broker_url: str,
    sts_endpoint: str | None = None,
) -> Mapping[str, str]:
    """Ready-to-paste text for sh, PowerShell, an ``~/.aws/config`` profile, and the
    ``broker`` CLI way (credentials the AWS tools renew by themselves).

    Values are quoted for their shell even though AWS keys are plain base64: the page
    must never produce a command that does something other than set a variable.
    """
    c = issued.credentials
    pairs = [
        ("AWS_ACCESS_KEY_ID", c.access_key_id),
        ("AWS_SECRET_ACCESS_KEY", c.secret_access_key),
        ("AWS_SESSION_TOKEN", c.session_token),
        # Without a region the AWS CLI and SDKs refuse most calls: name the broker's.
        # AWS CLI v2 and the JS SDK read AWS_REGION; AWS CLI v1 and boto3 only the other.
        ("AWS_REGION", region),
        ("AWS_DEFAULT_REGION", region),
    ]
    # The dev stack's STS is moto on localhost: credentials only work against it, so
    # say so in the snippets. Never for a real endpoint (it would redirect every service).
    endpoint = local_sts_endpoint(sts_endpoint)
    sh = [f"export {k}={shlex.quote(v)}" for k, v in pairs]
    ps = [f"$Env:{k} = '{v.replace(chr(39), chr(39) * 2)}'" for k, v in pairs]
    profile_name = _profile_name(issued.grant.role_arn)
    # ~/.aws/config, not ~/.aws/credentials: only the config file holds region (and
    # endpoint_url), and it accepts static keys too.
    profile = [
        f"[profile {profile_name}]",
        f"aws_access_key_id = {c.access_key_id}",
        f"aws_secret_access_key = {c.secret_access_key}",
        f"aws_session_token = {c.session_token}",
        f"region = {region}",
    ]
    if endpoint:
        sh.append(f"export AWS_ENDPOINT_URL={shlex.quote(endpoint)}  # dev stack only")
        ps.append(f"$Env:AWS_ENDPOINT_URL = '{endpoint}'  # dev stack only")
        # On a line of its own: botocore keeps an inline comment as part of the value.
        profile.extend(("# dev stack only", f"endpoint_url = {endpoint}"))
    configure = [
        "broker",
        "configure",
        "--profile",
        profile_name,
        "--broker",
        broker_url,
        "--role-arn",
        issued.grant.role_arn,
        "--region",
        region,
    ]
    cli = [
        "# once per computer: pip install federation-broker",
        f"broker login --broker {shlex.quote(broker_url)}",
        shlex.join(configure),
        f"aws sts get-caller-identity --profile {profile_name}"
        + (f" --endpoint-url {endpoint}" if endpoint else ""),
    ]
    return {
        "sh": "\n".join(sh),
        "powershell": "\n".join(ps),
        "profile": "\n".join(profile),
        "cli": "\n".join(cli),
    }
