"""A real OpenID Connect provider on a free port, with demo users (dev stack and tests).

It runs ``oidc-provider-mock`` (Flask + authlib) in its own process: ID tokens are real
RS256 JWTs signed with a key generated at start-up and published at ``/jwks``; the
authorization endpoint is a one-click form (``POST sub=<subject>``) instead of a password
page. The launcher changes five things about the mock (six with ``iss_parameter``), each
for a reason given where it is done:

* the werkzeug debugger the mock wraps around its app is removed;
* the issuer is always ``http://127.0.0.1:PORT``, whatever Host a client used, and
  requests with any other Host are refused;
* PKCE (RFC 7636, authlib's ``CodeChallenge``) is enforced at the token endpoint, and
  public clients (no secret, ``token_endpoint_auth_method=none``) are accepted, as
  Google accepts them from installed apps;
* ID tokens carry the signing key's ``kid`` in their header, as real providers' do;
* user claims may not override the JWT's own claims (``iss``, ``aud``, ``exp``, ...);
* with ``iss_parameter`` (``--iss-parameter``) it speaks RFC 9207: discovery says
  ``authorization_response_iss_parameter_supported: true`` and every redirect back from
  the authorization endpoint (code or error) carries ``iss``, as Google's does.

Run as ``python -m broker.devstack.oidc_server --port N --users-json '[...]'``, or from
Python with :func:`start_oidc_provider`.

Behaviour worth knowing when writing tests against it:

* Standard claims are filtered by scope (``email``/``email_verified`` need ``email``,
  ``name`` & co. need ``profile``); other claims (``amr``, ``groups``, ``acr``) are
  always in the ID token and the userinfo response.
* Any subject can log in: an unknown ``sub`` is created on the spot with the single
  claim ``email = sub`` and no ``email_verified`` (the broker must treat it as
  unverified). Anyone who can reach the port can also rewrite a user's claims with
  ``PUT /users/<sub>``: this is a local test double, bound to 127.0.0.1 only.
* Any ``client_id`` and any secret are accepted; ``redirect_uri`` is not restricted.
* A nonce is echoed into the ID token but not checked for reuse.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import flask
import werkzeug.debug
import werkzeug.serving
from werkzeug.wrappers import Response

from broker.devstack.oidc_login import discover
from broker.devstack.processes import ManagedProcess, free_port

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

HOST: Final = "127.0.0.1"

#: The demo people. ``sub`` doubles as the button label on the provider's login page.
#: alice is an MFA-authenticated admin, bob a verified user without MFA, carol an admin
#: by group who did not use MFA, mallory has an address at the right domain that the
#: provider never verified.
DEMO_USERS: Final[Sequence[Mapping[str, Any]]] = (
    {
        "sub": "alice",
        "email": "alice@example.com",
        "email_verified": True,
        "name": "Alice Admin",
        "given_name": "Alice",
        "family_name": "Admin",
        "preferred_username": "alice",
        "amr": ["pwd", "mfa"],
        "groups": ["admins"],
    },
    {
        "sub": "bob",
        "email": "bob@example.com",
        "email_verified": True,
        "name": "Bob Builder",
        "given_name": "Bob",
        "family_name": "Builder",
        "preferred_username": "bob",
        "amr": ["pwd"],
        "groups": ["developers"],
    },
    {
        "sub": "carol",
        "email": "carol@example.com",
        "email_verified": True,
        "name": "Carol Careless",
        "given_name": "Carol",
        "family_name": "Careless",
        "preferred_username": "carol",
        "amr": ["pwd"],
        "groups": ["admins"],
    },
    {
        "sub": "mallory",
        "email": "mallory@example.com",
        "email_verified": False,
        "name": "Mallory Unverified",
        "preferred_username": "mallory",
        "amr": ["pwd"],
    },
)

# authlib builds the ID token as {iss, aud, exp, ..., nonce} and then *updates* it with
# the user's claims, so a user claim named "iss" or "nonce" would silently replace the
# real one. Demo users must not be able to forge those.
RESERVED_CLAIMS: Final = frozenset(
    {"iss", "aud", "exp", "iat", "nbf", "jti", "nonce", "auth_time", "at_hash", "c_hash", "azp"}
)

_logger = logging.getLogger("broker.devstack.oidc_server")


# -- users ------------------------------------------------------------------------------


def validate_users(users: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check the users' shape; returns plain JSON-ready dicts (``sub`` plus claims)."""
    checked: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, user in enumerate(users):
        if not isinstance(user, Mapping):
            raise ValueError(f"user #{index} is not an object")
        sub = user.get("sub")
        if not isinstance(sub, str) or not sub:
            raise ValueError(f"user #{index} needs a non-empty string 'sub'")
        if sub in seen:
            raise ValueError(f"user {sub!r} is listed twice")
        seen.add(sub)
        reserved = sorted(RESERVED_CLAIMS.intersection(user))
        if reserved:
            raise ValueError(f"user {sub!r} sets reserved JWT claims: {', '.join(reserved)}")
        plain = dict(user)
        json.dumps(plain)  # TypeError now rather than in the child process
        checked.append(plain)
    return checked


# -- the app ----------------------------------------------------------------------------


class CanonicalHost:
    """WSGI middleware pinning the Host every request is handled under.

    The mock takes its issuer (discovery ``issuer``, ID token ``iss``, endpoint URLs) from
    the request's Host, so a client that said ``localhost`` would get tokens with another
    ``iss`` than one that said ``127.0.0.1``, and the broker would (rightly) refuse one of
    them. Requests naming this server by either loopback name are rewritten to the one
    public issuer; any other Host (e.g. a DNS-rebinding web page) is refused.
    """

    def __init__(self, app: WSGIApplication, port: int) -> None:
        self._app = app
        self._port = port
        self.canonical = f"{HOST}:{port}"
        self._allowed = frozenset({self.canonical, f"localhost:{port}"})

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        host = str(environ.get("HTTP_HOST", "")).lower()
        if host not in self._allowed:
            refused = Response(
                f"unexpected Host header; this provider is http://{self.canonical}\n",
                status=400,
                mimetype="text/plain",
            )
            return refused(environ, start_response)
        environ["HTTP_HOST"] = self.canonical
        environ["SERVER_NAME"] = HOST
        environ["SERVER_PORT"] = str(self._port)
        return self._app(environ, start_response)


def _strip_debugger(app: flask.Flask) -> None:
    """Undo the mock's ``app.wsgi_app = DebuggedApplication(app.wsgi_app)``.

    The werkzeug debugger renders tracebacks with source and serves its own assets and
    PIN-auth endpoints (``?__debugger__=yes``) to anyone who can reach the port; with
    ``evalex`` turned on (a one-word change in a future mock) it is an interactive Python
    console, i.e. remote code execution. None of it belongs in a server that tests and the dev
    stack run, so the inner app is put back and Flask's debug mode is switched off (no
    traceback pages, errors are logged instead).
    """
    wrapped = app.wsgi_app
    if isinstance(wrapped, werkzeug.debug.DebuggedApplication):
        app.wsgi_app = wrapped.app  # type: ignore[method-assign,assignment]
    if isinstance(app.wsgi_app, werkzeug.debug.DebuggedApplication):  # pragma: no cover
        raise RuntimeError("oidc_provider_mock wraps its app twice in the werkzeug debugger")
    app.debug = False


@dataclass(frozen=True)
class _Challenge:
    challenge: str
    method: str | None


class _ChallengeStore:
    """code -> PKCE challenge. The mock's AuthorizationCode has no field for it, so the
    launcher keeps its own table next to the mock's storage (one app per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the server is threaded
        self._by_code: dict[str, _Challenge] = {}

    def put(self, code: str, challenge: _Challenge) -> None:
        with self._lock:
            self._by_code[code] = challenge

    def get(self, code: str) -> _Challenge | None:
        with self._lock:
            return self._by_code.get(code)

    def pop(self, code: str) -> None:
        with self._lock:
            self._by_code.pop(code, None)


def _extend_code_grant(app: flask.Flask) -> tuple[str, ...]:
    """Add PKCE to the mock's authorization code grant, and a ``kid`` to its ID tokens.

    PKCE: without authlib's ``CodeChallenge`` extension the mock ignores
    ``code_challenge`` entirely, so a code stolen from the redirect could be redeemed
    with any (or no) verifier and the broker's PKCE handling would go untested.

    ``kid``: the mock signs with the key it publishes at ``/jwks`` (which has a ``kid``)
    but leaves ``kid`` out of the JWT header. Real providers (Google, Entra, Okta) always
    send it, and it is what a verifier uses to pick the key and notice rotation, so the
    stand-in sends it too.

    The mock registers ``AuthorizationCodeGrant`` (with its ``OpenIDCode`` extension) on a
    private authlib ``AuthorizationServer`` inside a blueprint setup hook, so the launcher
    fetches that server (by running the mock's before-request hook once) and swaps the
    grant's registration. Every assumption is checked: if a future mock changes shape,
    start-up fails loudly instead of PKCE silently not being enforced.

    Returns the supported ``code_challenge_method`` values (for discovery).
    """
    from authlib.oauth2.rfc7636 import CodeChallenge
    from oidc_provider_mock import _app as mock_app

    base_grant: Any = mock_app.AuthorizationCodeGrant
    store = _ChallengeStore()

    class PkceAuthorizationCodeGrant(base_grant):  # type: ignore[misc]
        # Public clients (mobile apps, SPAs) have no secret: allow "none" besides the
        # mock's secret-based methods. Secrets are not checked by the mock anyway.
        TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = [
            *base_grant.TOKEN_ENDPOINT_AUTH_METHODS,
            "none",
        ]

        def save_authorization_code(self, code: str, request: Any) -> None:
            super().save_authorization_code(code, request)
            data = request.payload.data
            challenge = data.get("code_challenge")
            if challenge:
                store.put(code, _Challenge(challenge, data.get("code_challenge_method")))

        def delete_authorization_code(self, authorization_code: Any) -> None:
            super().delete_authorization_code(authorization_code)
            store.pop(authorization_code.code)

    class StoredCodeChallenge(CodeChallenge):  # type: ignore[misc]
        def get_authorization_code_challenge(self, authorization_code: Any) -> str | None:
            found = store.get(authorization_code.code)
            return found.challenge if found else None

        def get_authorization_code_challenge_method(self, authorization_code: Any) -> str | None:
            found = store.get(authorization_code.code)
            return found.method if found else None

    # required=False: confidential clients may skip PKCE (as at Google); a client that
    # sent a challenge must send the matching verifier, and a verifier without a
    # challenge is refused (authlib, per RFC 9700 4.8).
    pkce = StoredCodeChallenge(required=False)

    with app.test_request_context("/"):
        app.preprocess_request()  # runs the mock's hook that puts its server on flask.g
        server: Any = mock_app.authorization._get_current_object()

    for registry_name in ("_authorization_grants", "_token_grants"):
        registry: list[tuple[Any, Any]] = getattr(server, registry_name)
        matches = [i for i, (cls, _) in enumerate(registry) if cls is base_grant]
        if len(matches) != 1:
            raise RuntimeError(
                f"oidc_provider_mock changed: expected its AuthorizationCodeGrant once in "
                f"{registry_name}, found {len(matches)}; cannot enable PKCE"
            )
        _, extensions = registry[matches[0]]
        openid = [e for e in extensions or () if isinstance(e, mock_app.OpenIDCode)]
        if len(openid) != 1:
            raise RuntimeError("oidc_provider_mock changed: no single OpenIDCode extension")
        _send_kid(openid[0])
        registry[matches[0]] = (PkceAuthorizationCodeGrant, [*extensions, pkce])
    return tuple(StoredCodeChallenge.SUPPORTED_CODE_CHALLENGE_METHOD)


def _send_kid(openid_code: Any) -> None:
    """Make the mock's ``OpenIDCode`` extension put the signing key's ``kid`` in the
    ID token header (see ``_extend_code_grant``). Idempotent: both grant registries
    share the one extension object."""
    original = openid_code.get_encode_header
    if getattr(original, "_sends_kid", False):
        return

    def get_encode_header(client: Any) -> dict[str, Any]:
        header = dict(original(client))
        key = openid_code.resolve_client_private_key(client)  # the mock's JWK as a dict
        kid = key.get("kid") if isinstance(key, Mapping) else None
        if not isinstance(kid, str) or not kid:
            raise RuntimeError("oidc_provider_mock's signing key has no kid")
        header["kid"] = kid
        return header

    get_encode_header._sends_kid = True  # type: ignore[attr-defined]
    # An instance attribute shadows the class's method for this one extension object.
    openid_code.get_encode_header = get_encode_header


def _advertise(app: flask.Flask, extra: Mapping[str, Any]) -> None:
    """Add metadata to the discovery document (PKCE methods, token auth methods), so a
    client that reads discovery knows what this provider enforces."""
    endpoint = "oidc-provider-mock.openid_config"
    original: Callable[[], Any] = app.view_functions[endpoint]

    def openid_config() -> flask.Response:
        document = flask.make_response(original()).get_json()
        if not isinstance(document, dict):  # pragma: no cover
            raise RuntimeError("the mock's discovery document is not a JSON object")
        return flask.jsonify({**document, **extra})

    app.view_functions[endpoint] = openid_config


def _send_iss(app: flask.Flask) -> None:
    """RFC 9207: add ``iss`` (this provider's issuer) to every authorization response.

    The mock answers the authorization endpoint with a 302 to the client's redirect URI
    carrying ``code`` and ``state`` (or ``error``); the issuer is appended to that query
    exactly as the discovery document spells it, so a client can tell which provider
    the response came from (mix-up defence)."""
    endpoint = "oidc-provider-mock.authorize"
    original: Callable[..., Any] = app.view_functions[endpoint]

    def authorize(*args: Any, **kwargs: Any) -> flask.Response:
        response = flask.make_response(original(*args, **kwargs))
        location = response.headers.get("Location")
        if response.status_code in {302, 303} and location:
            parts = urlsplit(location)
            params = parse_qsl(parts.query, keep_blank_values=True)
            if any(name in {"code", "error"} for name, _ in params):
                params.append(("iss", flask.request.host_url.rstrip("/")))
                response.headers["Location"] = urlunsplit(parts._replace(query=urlencode(params)))
        return response

    app.view_functions[endpoint] = authorize


def build_app(
    port: int,
    users: Sequence[Mapping[str, Any]],
    *,
    require_nonce: bool = False,
    iss_parameter: bool = False,
) -> flask.Flask:
    """The mock's Flask app with the launcher's changes (see the module docstring), for
    ``users`` as ``validate_users`` returned them.

    The returned app answers only requests whose Host is ``127.0.0.1:port`` or
    ``localhost:port``.
    """
    import oidc_provider_mock

    user_claims = [
        oidc_provider_mock.User(sub=u["sub"], claims={k: v for k, v in u.items() if k != "sub"})
        for u in users
    ]
    app: flask.Flask = oidc_provider_mock.app(user_claims=user_claims, require_nonce=require_nonce)
    _strip_debugger(app)
    methods = _extend_code_grant(app)
    _advertise(
        app,
        {
            "code_challenge_methods_supported": list(methods),
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "none",
            ],
            "claims_supported": sorted(
                {"sub", "iss", "aud", "exp", "iat", "auth_time", "nonce"}
                | {claim for u in user_claims for claim in u.claims}
            ),
            **({"authorization_response_iss_parameter_supported": True} if iss_parameter else {}),
        },
    )
    if iss_parameter:
        _send_iss(app)
    app.wsgi_app = CanonicalHost(app.wsgi_app, port)  # type: ignore[method-assign]
    return app


# -- the process --------------------------------------------------------------------------


def serve(
    port: int,
    users: Sequence[Mapping[str, Any]],
    *,
    require_nonce: bool = False,
    iss_parameter: bool = False,
) -> None:
    """Serve on 127.0.0.1:port until SIGTERM/SIGINT (threaded werkzeug server)."""
    # authlib refuses plain-http endpoints unless told; this server is loopback-only.
    os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"
    app = build_app(port, users, require_nonce=require_nonce, iss_parameter=iss_parameter)
    server = werkzeug.serving.make_server(HOST, port, app, threaded=True)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        # serve_forever runs in this (main) thread, so server.shutdown() here would wait
        # on itself; leaving the loop by exception closes the socket in `finally`.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _logger.info("OIDC provider listening on http://%s:%d", HOST, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        _logger.info("OIDC provider stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--users-json",
        default=None,
        help='JSON list of users: [{"sub": "...", "<claim>": ...}, ...] (default: demo users)',
    )
    parser.add_argument(
        "--require-nonce", action="store_true", help="refuse authorization requests without nonce"
    )
    parser.add_argument(
        "--iss-parameter",
        action="store_true",
        help="RFC 9207: advertise and send iss in authorization responses",
    )
    args = parser.parse_args(argv)
    users: Sequence[Mapping[str, Any]] = DEMO_USERS
    if args.users_json is not None:
        try:
            loaded = json.loads(args.users_json)
        except json.JSONDecodeError as exc:
            parser.error(f"--users-json is not JSON: {exc}")
        if not isinstance(loaded, list):
            parser.error("--users-json must be a JSON list")
        users = loaded
    try:
        checked = validate_users(users)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    serve(args.port, checked, require_nonce=args.require_nonce, iss_parameter=args.iss_parameter)
    return 0


def start_oidc_provider(
    workdir: Path,
    *,
    port: int | None = None,
    users: Sequence[Mapping[str, Any]] = DEMO_USERS,
    require_nonce: bool = False,
    iss_parameter: bool = False,
) -> ManagedProcess:
    """Start the provider in its own process; ``.url`` of the result is the issuer."""
    port = port or free_port()
    checked = validate_users(users)  # fail here, not in the child's log
    argv = [
        sys.executable,
        "-m",
        "broker.devstack.oidc_server",
        "--port",
        str(port),
        "--users-json",
        json.dumps(checked),
    ]
    if require_nonce:
        argv.append("--require-nonce")
    if iss_parameter:
        argv.append("--iss-parameter")
    issuer = f"http://{HOST}:{port}"

    def ready() -> None:
        # The port being open is not enough: make sure it is *this* provider, serving
        # discovery under the issuer we hand out.
        discover(issuer)

    return ManagedProcess(
        "oidc-provider",
        argv,
        port=port,
        log_path=workdir / f"oidc-{port}.log",
        env={"PYTHONUNBUFFERED": "1"},
        ready=ready,
    )


if __name__ == "__main__":
    raise SystemExit(main())
