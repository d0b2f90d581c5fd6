"""The ``broker`` command line tool's door: its sign-in, session and credentials.

Routes::

    GET  /cli/authorize          (browser) loopback sign-in: approve the CLI on this computer
    POST /cli/authorize          (browser, CSRF) the answer: 303 to the loopback redirect
    GET  /device                 (browser) device sign-in: enter or confirm a user code
    POST /device                 (browser, CSRF) the answer
    POST /v1/cli/device          start a device sign-in (RFC 8628 device authorization)
    POST /v1/cli/token           a loopback code or a device code -> a CLI session
    GET  /v1/cli/session         (Bearer) who the CLI session is, the roles it may use
    POST /v1/cli/credentials     (Bearer) credentials, like /v1/credentials
    POST /v1/cli/logout          (Bearer) end the CLI session

The browser pages need the person signed in to the broker (the ordinary web sign-in);
the CLI never sees a provider token, only its own session secret. Credentials go
through the same ``Services.issue`` as every other door. See broker.cli_auth.
"""

from __future__ import annotations

import logging
from urllib.parse import urlencode, urlsplit

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
from werkzeug.wrappers import Response

from broker import errors
from broker.cli_auth import (
    CODE_GRANT,
    DEVICE_GRANT,
    CLIAuth,
    check_challenge,
    check_loopback_redirect,
    check_state,
    format_user_code,
    normalize_user_code,
)
from broker.guards import bearer_token, local_sts_endpoint
from broker.identity import Identity
from broker.safe_redirect import safe_next
from broker.services import current_services
from broker.sessions import (
    WebSession,
    load_session,
    require_session_and_csrf,
    session_identity,
    web_sso,
)
from broker.sts import iso_utc
from broker.web.api import issued_json, json_body, require_admin
from broker.web.security_headers import content_security_policy, no_store
from broker.web.sso import identity_view, pages_and_json_errors

log = logging.getLogger(__name__)
audit_log = logging.getLogger("broker.audit")

blueprint = Blueprint("cli", __name__)

EXTENSION_KEY = "broker.cli_auth"


def cli_auth() -> CLIAuth:
    auth = current_app.extensions.get(EXTENSION_KEY)
    if isinstance(auth, CLIAuth):
        return auth
    sso = web_sso()
    auth = CLIAuth(
        store=sso.services.store,
        settings=sso.services.settings.cli,
        sessions=sso.cli_sessions,
        identity_ids=sso.services.identity_ids,
        clock=sso.clock,
    )
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    app.extensions[EXTENSION_KEY] = auth
    return auth


@blueprint.before_request
def _guard() -> None:
    if not current_services().settings.cli.enabled:
        raise errors.NotFound("the CLI sign-in is turned off on this broker")
    current_services().limit_address(request.remote_addr)


blueprint.after_request(no_store)


pages_and_json_errors(blueprint)


def _provider_arg(value: str | None) -> str | None:
    """A ``provider`` the CLI asked for: a configured one, or ``UnknownProvider``."""
    if not value:
        return None
    current_services().provider(value)
    return value


def _sign_in_first(provider: str | None) -> Response:
    """Send the browser through the web sign-in and back to this very page."""
    here = safe_next(request.full_path.rstrip("?"))
    if provider:
        target = url_for("sso.login_start", provider=provider)
    else:
        target = url_for("sso.login_page")
    return redirect(target + "?" + urlencode({"next": here}), 303)


def _usable_session(provider: str | None) -> WebSession | None:
    """The browser session a CLI session may be made from: None (sign in first) when
    there is none, or when its provider token has expired and cannot be renewed: a CLI
    session made from it would be dead on arrival."""
    ws = load_session()
    if ws is None or (provider and ws.provider != provider):
        return None
    if ws.token_expired(web_sso().clock()):
        try:
            session_identity(ws)
        except (errors.ExpiredToken, errors.Unauthenticated):
            return None
        ws = load_session() or ws
    return ws


def _loopback_form_action(response: Response, redirect_uri: str) -> Response:
    """Let this page's form redirect to the CLI's loopback listener: Chromium applies
    ``form-action`` to the redirect that answers a form, and the app-wide policy allows
    only the broker itself (and the AWS sign-in) as targets."""
    origin = "http://" + urlsplit(redirect_uri).netloc
    policy = content_security_policy(current_services().settings)
    response.headers["Content-Security-Policy"] = policy.replace(
        "form-action 'self'", f"form-action 'self' {origin}", 1
    )
    return response


# ---------------------------------------------------------------------- loopback


@blueprint.get("/cli/authorize")
def authorize_page() -> Response:
    args = request.args
    redirect_uri = check_loopback_redirect(args.get("redirect_uri"))
    challenge = check_challenge(args.get("code_challenge"), args.get("code_challenge_method"))
    state = check_state(args.get("state"))
    provider = _provider_arg(args.get("provider"))
    ws = _usable_session(provider)
    if ws is None:
        return _sign_in_first(provider)
    page = make_response(
        render_template(
            "cli_authorize.html",
            ws=ws,
            identity=identity_view(ws),
            redirect_uri=redirect_uri,
            code_challenge=challenge,
            state=state,
        )
    )
    return _loopback_form_action(page, redirect_uri)


@blueprint.post("/cli/authorize")
def authorize_answer() -> Response:
    form = request.form
    redirect_uri = check_loopback_redirect(form.get("redirect_uri"))
    challenge = check_challenge(form.get("code_challenge"), form.get("code_challenge_method"))
    state = check_state(form.get("state"))
    ws = require_session_and_csrf(form.get("csrf_token"))
    if form.get("decision") != "approve":
        query = urlencode({"error": "access_denied", "state": state})
        return redirect(f"{redirect_uri}?{query}", 303)
    code = cli_auth().authorize(ws, redirect_uri=redirect_uri, code_challenge=challenge)
    return redirect(f"{redirect_uri}?{urlencode({'code': code, 'state': state})}", 303)


# ---------------------------------------------------------------------- device


@blueprint.get("/device")
def device_page() -> Response:
    provider = _provider_arg(request.args.get("provider"))
    ws = _usable_session(provider)
    if ws is None:
        return _sign_in_first(provider)
    typed = request.args.get("user_code")
    user_code = None
    if typed:
        user_code = format_user_code(normalize_user_code(typed))
        cli_auth().pending_device(user_code)  # a clear error now, not after "Approve"
    return make_response(
        render_template(
            "device.html", ws=ws, identity=identity_view(ws), user_code=user_code, done=None
        )
    )


@blueprint.post("/device")
def device_answer() -> Response:
    ws = require_session_and_csrf(request.form.get("csrf_token"))
    approve = request.form.get("decision") == "approve"
    cli_auth().decide_device(ws, user_code=request.form.get("user_code", ""), approve=approve)
    done = "approved" if approve else "denied"
    return make_response(
        render_template("device.html", ws=ws, identity=identity_view(ws), user_code=None, done=done)
    )


@blueprint.post("/v1/cli/device")
def device_start() -> Response:
    # The body is optional: {"provider": NAME} only picks the sign-in page to go to.
    body = json_body({"provider": str}, required=()) if request.get_data(cache=True) else {}
    _provider_arg(body.get("provider"))
    started = cli_auth().start_device()
    public = current_services().settings.server.public_url.rstrip("/")
    extra = {"provider": body["provider"]} if body.get("provider") else {}
    return jsonify(
        {
            "device_code": started.device_code,
            "user_code": started.user_code,
            "verification_uri": f"{public}/device",
            "verification_uri_complete": f"{public}/device?"
            + urlencode({"user_code": started.user_code, **extra}),
            "expires_in": started.expires_in,
            "interval": started.interval,
        }
    )


# ---------------------------------------------------------------------- sessions


@blueprint.post("/v1/cli/token")
def token() -> Response:
    body = json_body(
        {
            "grant_type": str,
            "code": str,
            "code_verifier": str,
            "redirect_uri": str,
            "device_code": str,
        },
        required=("grant_type",),
    )
    auth = cli_auth()
    grant = body["grant_type"]
    if grant == CODE_GRANT:
        ws = auth.exchange_code(
            code=body.get("code"),
            code_verifier=body.get("code_verifier"),
            redirect_uri=body.get("redirect_uri"),
        )
    elif grant == DEVICE_GRANT:
        ws = auth.poll_device(body.get("device_code"))
    else:
        raise errors.BadRequest(f"grant_type must be {CODE_GRANT} or {DEVICE_GRANT}")
    identity_id = web_sso().services.identity_ids.derive(ws.provider, ws.subject)
    audit_log.info(
        "cli sign-in",
        extra={
            "audit": {
                "event": "cli_sign_in",
                "identity_id": identity_id,
                "provider": ws.provider,
                "grant": "device" if grant == DEVICE_GRANT else "loopback",
            }
        },
    )
    return jsonify(
        {
            "session_token": ws.session_id,
            "token_type": "Bearer",
            "expires_at": iso_utc(auth.sessions.expires_at(ws)),
            "absolute_expires_at": iso_utc(ws.created_at + auth.sessions.absolute_seconds),
            "identity_id": identity_id,
            "provider": ws.provider,
        }
    )


def _bearer_session() -> WebSession:
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise errors.Unauthenticated(
            "send the CLI session as 'Authorization: Bearer ...'; sign in with broker login"
        )
    ws = cli_auth().sessions.load(token)
    if ws is None:
        raise errors.Unauthenticated(
            "this CLI session has ended or was revoked; sign in again with broker login"
        )
    return ws


def _bearer_identity(ws: WebSession) -> Identity:
    sso = web_sso()
    if ws.token_expired(sso.clock()):
        ws = sso.renew(ws, sessions=cli_auth().sessions)
    return sso.identity(ws)


@blueprint.get("/v1/cli/session")
def session_info() -> Response:
    ws = _bearer_session()
    sso = web_sso()
    try:
        roles: list[str] = list(current_services().allowed_roles(sso.identity(ws)))
        denied = None
    except errors.AccessDenied as exc:
        roles, denied = [], exc.message
    return jsonify(
        {
            "identity_id": sso.services.identity_ids.derive(ws.provider, ws.subject),
            "provider": ws.provider,
            "subject": ws.subject,
            "email": ws.email,
            "roles": roles,
            "denied": denied,
            "expires_at": iso_utc(cli_auth().sessions.expires_at(ws)),
            # Only a local STS (the dev stack's): the AWS tools must be sent there, as
            # the credentials page's snippets do. A real endpoint is never named.
            "sts_endpoint": local_sts_endpoint(current_services().settings.sts.endpoint_url),
        }
    )


@blueprint.post("/v1/cli/credentials")
def session_credentials() -> Response:
    ws = _bearer_session()
    body = json_body({"role_arn": str, "duration_seconds": int}, required=())
    issued = current_services().issue(
        _bearer_identity(ws),
        role_arn=body.get("role_arn"),
        duration_seconds=body.get("duration_seconds"),
        self_renewing=True,
    )
    return jsonify(issued_json(issued))


@blueprint.post("/v1/cli/revoke")
def revoke() -> Response:
    """(admin token) End every CLI session of an identity, and drop its cached
    credentials: for a lost laptop, or a person who left."""
    require_admin()
    body = json_body({"identity_id": str}, required=("identity_id",))
    identity_id = body["identity_id"]
    if len(identity_id) > 128:
        raise errors.BadRequest("identity_id is too long")
    services = current_services()
    revoked = cli_auth().revoke(identity_id)
    forgotten = services.forget(identity_id)
    audit_log.info(
        "cli sessions revoked",
        extra={
            "audit": {
                "event": "cli_sessions_revoked",
                "identity_id": identity_id,
                "sessions": revoked,
                "cached_credentials_dropped": forgotten,
            }
        },
    )
    return jsonify({"identity_id": identity_id, "revoked_sessions": revoked})


@blueprint.post("/v1/cli/logout")
def logout() -> Response:
    ws = _bearer_session()
    services = current_services()
    cli_auth().sessions.destroy(ws.session_id)
    identity_id = services.identity_ids.derive(ws.provider, ws.subject)
    forgotten = services.forget(identity_id)
    audit_log.info(
        "cli sign-out",
        extra={
            "audit": {
                "event": "cli_sign_out",
                "identity_id": identity_id,
                "provider": ws.provider,
                "cached_credentials_dropped": forgotten,
            }
        },
    )
    return make_response(jsonify({"signed_out": True}))
