"""Local stand-ins for Login with Amazon and Facebook (the dev stack and the tests).

Two small Flask apps, each on its own port, speaking exactly the request and response
shapes the providers document, error bodies included, so the broker's real code talks
to them unchanged (only the base URLs differ):

Login with Amazon (``api_url`` = the server's URL)
    ``GET  /auth/o2/tokeninfo?access_token=``  ``{"iss", "user_id", "aud", "app_id",
          "exp" (seconds left), "iat"}``; a bad token: 400 ``{"error": "invalid_token",
          "error_description": ...}``
    ``GET  /user/profile`` (``Authorization: Bearer``, ``x-amz-access-token`` or
          ``?access_token=``)  ``{"user_id", "name", "email", "postal_code"}`` as the
          scopes allow; 401 ``invalid_token``, 403 ``insufficient_scope``
    ``GET  /ap/oa``, ``POST /auth/o2/token``  authorization code grant (PKCE S256) and
          refresh, for the browser flow (``authorize_url`` = ``{url}/ap/oa``)

Facebook Graph API (``graph_url`` = the server's URL, any ``vNN.N`` version)
    ``GET  /{v}/oauth/access_token``  ``grant_type=client_credentials`` gives the app
          token; with ``code`` it is the code exchange (PKCE S256)
    ``GET  /{v}/debug_token?input_token=&access_token={app token}``  ``{"data": {...}}``
          with ``is_valid``, ``app_id``, ``type``, ``user_id``, ``expires_at`` (0:
          never), ``data_access_expires_at``, ``scopes`` and, for a bad token,
          ``error: {code: 190, subcode, message}``
    ``GET  /{v}/me?fields=id,name,email&appsecret_proof=``  the user; the proof is
          checked ("Require App Secret" on). Errors are Graph's
          ``{"error": {"message", "type": "OAuthException", "code": 190, ...}}`` with 400
    ``GET  /{v}/dialog/oauth``  the login dialog (``dialog_url``)
    ``GET  /.well-known/oauth/openid/jwks/``  Limited Login signing keys

Demo tokens (not a real provider API; what a phone would get from the provider's SDK):
``POST /_demo/token`` with ``{"user": "alice"}`` (optional ``client_id``/``app_id``,
``expires_in``, ``scopes``), and on Facebook ``POST /_demo/limited_login_token`` with
``{"user", "nonce"}``. The same from Python: ``server.mint(...)``.

Knobs for tests, per server: ``fail("error" | "hang" | "malformed", endpoint=...,
times=...)`` (500 / no answer for ``hang_seconds`` / a body that is not JSON),
``tamper`` (rewrite a 200 JSON body), ``revoke(token)``, ``hits(endpoint)``.

Request lines are never logged: their query strings carry tokens and the app secret.

    with start_social_servers() as social:
        config["providers"].update(social.provider_config())
        token = social.amazon.mint("alice")
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import string
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, request
from markupsafe import escape
from werkzeug.routing import BaseConverter, Map

from broker.devstack.processes import ThreadedServer, serve_in_thread

# --------------------------------------------------------------------------- demo data

DEMO_AMAZON_CLIENT_ID = "amzn1.application-oa2-client.brokerdemo0000000000000000001"
DEMO_AMAZON_CLIENT_SECRET = "demo-amazon-client-secret"  # noqa: S105 - a local stand-in's
DEMO_AMAZON_APP_ID = "amzn1.application.brokerdemo000000000000000000001"
DEMO_FACEBOOK_APP_ID = "1234567890123456"
DEMO_FACEBOOK_APP_SECRET = "demo-facebook-app-secret"  # noqa: S105 - a local stand-in's
GRAPH_VERSION = "v19.0"
LIMITED_LOGIN_ISSUER = "https://www.facebook.com"
LIMITED_LOGIN_JWKS_PATH = "/.well-known/oauth/openid/jwks/"

LWA_TOKEN_SECONDS = 3600  # LWA access tokens live an hour
FACEBOOK_TOKEN_SECONDS = 2 * 3600  # a short-lived Facebook user token: one to two hours
FACEBOOK_DATA_ACCESS_SECONDS = 90 * 86400  # data access expires 90 days after last use
CODE_SECONDS = 300

Fault = Literal["error", "hang", "malformed"]


@dataclass(frozen=True, kw_only=True)
class DemoUser:
    key: str  # the short name used on the command line: alice, bob, ...
    user_id: str
    name: str
    email: str | None
    postal_code: str | None = None


AMAZON_DEMO_USERS = (
    DemoUser(
        key="alice",
        user_id="amzn1.account.AEBROKERDEMOALICE0000000000001",
        name="Alice Example",
        email="alice@example.com",
        postal_code="98109",
    ),
    DemoUser(
        key="bob",
        user_id="amzn1.account.AEBROKERDEMOBOB00000000000002",
        name="Bob Example",
        email="bob@example.com",
        postal_code="10001",
    ),
    DemoUser(
        key="mallory",
        user_id="amzn1.account.AEBROKERDEMOMALLORY00000000003",
        name="Mallory Outsider",
        email="mallory@outsider.example",
    ),
)

FACEBOOK_DEMO_USERS = (
    DemoUser(
        key="alice", user_id="10000000000000001", name="Alice Example", email="alice@example.com"
    ),
    DemoUser(key="bob", user_id="10000000000000002", name="Bob Example", email="bob@example.com"),
    # Facebook returns no e-mail for people who signed up with a phone number.
    DemoUser(key="mallory", user_id="10000000000000003", name="Mallory Outsider", email=None),
)


@dataclass(kw_only=True)
class IssuedToken:
    """One access token the stand-in issued, and everything it knows about it."""

    token: str = field(repr=False)
    user: DemoUser
    audience: str  # LWA: the client id (`aud`); Facebook: the app id
    scopes: tuple[str, ...]
    issued_at: int
    expires_at: int  # unix time; Facebook: 0 never expires
    data_access_expires_at: int = 0  # Facebook only
    revoked: bool = False


@dataclass(kw_only=True)
class _Code:
    user: DemoUser
    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    challenge: str | None
    expires_at: float


# --------------------------------------------------------------------------- shared state


class FakeProvider:
    """What both stand-ins share: issued tokens, request counts and fault knobs."""

    what = "provider"

    def __init__(self, *, users: Sequence[DemoUser], clock: Callable[[], float]) -> None:
        self.users = {u.key: u for u in users}
        self.clock = clock
        self.lock = threading.Lock()
        self.tokens: dict[str, IssuedToken] = {}
        self.refresh_tokens: dict[str, IssuedToken] = {}
        self.codes: dict[str, _Code] = {}
        self.requests: Counter[str] = Counter()
        self.hang_seconds = 5.0
        # Rewrites the JSON body of every 200 answer: (path, body) -> body.
        self.tamper: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
        self._fault: Fault | None = None
        self._fault_endpoint: str | None = None
        self._fault_times: int | None = None
        self._released = threading.Event()
        self._served: ThreadedServer | None = None

    # -- knobs ------------------------------------------------------------------------

    def fail(self, mode: Fault, *, endpoint: str | None = None, times: int | None = None) -> None:
        """Make requests (to paths ending in ``endpoint``, else all) fail: ``error`` is
        a 500, ``hang`` answers only after ``hang_seconds``, ``malformed`` a body that
        is not JSON. ``times``: only the next that many requests, then heal."""
        with self.lock:
            self._fault, self._fault_endpoint, self._fault_times = mode, endpoint, times

    def heal(self) -> None:
        with self.lock:
            self._fault = self._fault_endpoint = self._fault_times = None
            self.tamper = None

    def reset(self) -> None:
        """Heal and forget request counts (issued tokens stay valid)."""
        self.heal()
        with self.lock:
            self.requests.clear()

    def hits(self, endpoint: str | None = None) -> int:
        """Requests received for paths ending in ``endpoint`` (all when None)."""
        with self.lock:
            return sum(
                n
                for path, n in self.requests.items()
                if endpoint is None or path.endswith(endpoint)
            )

    def revoke(self, token: str) -> None:
        with self.lock:
            self.tokens[token].revoked = True

    def user(self, key: str) -> DemoUser:
        try:
            return self.users[key]
        except KeyError:
            raise KeyError(
                f"unknown demo user {key!r}; try one of {', '.join(self.users)}"
            ) from None

    def lookup(self, token: str | None) -> IssuedToken | None:
        if not token:
            return None
        with self.lock:
            return self.tokens.get(token)

    # -- serving ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._served is not None, "not started"
        return self._served.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, app: Flask, *, port: int = 0) -> None:
        self._served = serve_in_thread(app, name=f"{self.what}-stand-in", port=port)

    def stop(self) -> None:
        self._released.set()  # let hanging requests finish now
        if self._served is not None:
            self._served.stop()

    def _before(self) -> Response | None:
        """Count the request; answer with the configured fault if one applies."""
        path = request.path
        with self.lock:
            self.requests[path] += 1
            fault = self._fault
            applies = fault is not None and (
                self._fault_endpoint is None or path.endswith(self._fault_endpoint)
            )
            if applies and self._fault_times is not None:
                self._fault_times -= 1
                if self._fault_times <= 0:
                    self._fault = self._fault_endpoint = self._fault_times = None
        if not applies:
            return None
        if fault == "hang":
            # Longer than any client timeout in the tests; cut short when the server stops.
            self._released.wait(self.hang_seconds)
            return None
        if fault == "error":
            return Response("Internal Server Error", status=500, content_type="text/plain")
        return Response('{"truncated": ', status=200, content_type="application/json")

    def _after(self, response: Response) -> Response:
        tamper = self.tamper
        if tamper is not None and response.status_code == 200 and response.is_json:
            body = response.get_json(silent=True)
            if isinstance(body, dict):
                response.set_data(json.dumps(tamper(request.path, body)))
        return response

    def _app(self, name: str) -> Flask:
        app = Flask(name)
        app.before_request(self._before)
        app.after_request(self._after)
        return app

    # -- authorization code flow (shared by both) --------------------------------------

    def _login_page(self, title: str) -> Response:
        """The consent screen: pick a demo user (no password: it is a stand-in)."""

        def link(user: DemoUser) -> str:
            query = urlencode({**request.args, "user": user.key})
            return f'<a href="{escape(request.path)}?{escape(query)}">{escape(user.name)}</a>'

        items = "".join(
            f"<li>{link(u)} ({escape(u.email or 'no e-mail')})</li>" for u in self.users.values()
        )
        return Response(
            "<!doctype html><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{escape(title)}</title><h1>{escape(title)}</h1>"
            f"<p>Local stand-in: choose a demo user.</p><ul>{items}</ul>",
            content_type="text/html; charset=utf-8",
        )

    def _issue_code(
        self, *, user: DemoUser, client_id: str, redirect_uri: str, scopes: tuple[str, ...]
    ) -> Response:
        challenge = request.args.get("code_challenge")
        if challenge is not None and request.args.get("code_challenge_method", "plain") != "S256":
            return _redirect_error(redirect_uri, "invalid_request", "only S256 PKCE is supported")
        code = secrets.token_urlsafe(24)
        with self.lock:
            self.codes[code] = _Code(
                user=user,
                client_id=client_id,
                redirect_uri=redirect_uri,
                scopes=scopes,
                challenge=challenge,
                expires_at=self.clock() + CODE_SECONDS,
            )
        params = {"code": code, "scope": " ".join(scopes)}
        if "state" in request.args:
            params["state"] = request.args["state"]
        return _redirect(redirect_uri, params)

    def _take_code(
        self, code: str, *, client_id: str, redirect_uri: str | None, verifier: str | None
    ) -> _Code | str:
        """The pending code, or the reason it is refused (one use only, like the real ones)."""
        with self.lock:
            pending = self.codes.pop(code, None)
        if pending is None or pending.expires_at <= self.clock():
            return "the authorization code is unknown, expired or already used"
        if pending.client_id != client_id:
            return "the authorization code was issued to another client"
        if redirect_uri is not None and redirect_uri != pending.redirect_uri:
            return "redirect_uri does not match the authorization request"
        if pending.challenge is not None:
            expected = _b64(hashlib.sha256((verifier or "").encode()).digest())
            if not hmac.compare_digest(expected, pending.challenge):
                return "the code_verifier does not match the code_challenge"
        return pending


# --------------------------------------------------------------------------- Login with Amazon


class FakeLoginWithAmazon(FakeProvider):
    what = "login-with-amazon"

    def __init__(
        self,
        *,
        clients: Mapping[str, str],
        app_id: str = DEMO_AMAZON_APP_ID,
        users: Sequence[DemoUser] = AMAZON_DEMO_USERS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(users=users, clock=clock)
        self.clients = dict(clients)  # client id -> client secret
        self.app_id = app_id

    def mint(
        self,
        user: str,
        *,
        client_id: str | None = None,
        expires_in: int = LWA_TOKEN_SECONDS,
        scopes: Sequence[str] = ("profile", "postal_code"),
    ) -> str:
        """An access token as LWA would issue it (``Atza|...``), for any client id
        (tokens for other apps are how tests prove the ``aud`` check)."""
        return self._mint(
            self.user(user), client_id or next(iter(self.clients)), expires_in, tuple(scopes)
        ).token

    def _mint(
        self, user: DemoUser, client_id: str, expires_in: int, scopes: tuple[str, ...]
    ) -> IssuedToken:
        now = int(self.clock())
        issued = IssuedToken(
            token="Atza|" + secrets.token_urlsafe(96),
            user=user,
            audience=client_id,
            scopes=scopes,
            issued_at=now,
            expires_at=now + expires_in,
        )
        with self.lock:
            self.tokens[issued.token] = issued
        return issued

    def create_app(self) -> Flask:
        app = self._app("login-with-amazon-stand-in")

        app.add_url_rule("/auth/o2/tokeninfo", view_func=self._tokeninfo, methods=["GET"])
        app.add_url_rule("/user/profile", view_func=self._profile, methods=["GET"])
        app.add_url_rule("/ap/oa", view_func=self._authorize, methods=["GET"])
        app.add_url_rule("/auth/o2/token", view_func=self._token, methods=["POST"])
        app.add_url_rule("/_demo/token", view_func=self._demo_token, methods=["POST"])
        app.add_url_rule("/_demo/users", view_func=self._demo_users, methods=["GET"])
        return app

    def _tokeninfo(self) -> Response:
        issued = self._valid(request.args.get("access_token"))
        if issued is None:
            return _json(
                {
                    "error": "invalid_token",
                    "error_description": "The request has an invalid parameter : access_token",
                },
                400,
            )
        return _json(
            {
                "iss": "https://www.amazon.com",
                "user_id": issued.user.user_id,
                "aud": issued.audience,
                "app_id": self.app_id,
                # Seconds left, not a timestamp.
                "exp": issued.expires_at - int(self.clock()),
                "iat": issued.issued_at,
            }
        )

    def _profile(self) -> Response:
        header = request.headers.get("Authorization", "")
        token = (
            header[len("Bearer ") :]
            if header.startswith("Bearer ")
            else request.headers.get("x-amz-access-token") or request.args.get("access_token")
        )
        issued = self._valid(token)
        if issued is None:
            return _json(
                {
                    "error": "invalid_token",
                    "error_description": "The access token provided is expired, revoked, "
                    "malformed, or invalid for other reasons.",
                },
                401,
            )
        body: dict[str, Any] = {"user_id": issued.user.user_id}
        if "profile" in issued.scopes:
            body["name"] = issued.user.name
            if issued.user.email:
                body["email"] = issued.user.email
        elif "profile:user_id" not in issued.scopes:
            return _json(
                {
                    "error": "insufficient_scope",
                    "error_description": "The access token does not have the required scope.",
                },
                403,
            )
        if "postal_code" in issued.scopes and issued.user.postal_code:
            body["postal_code"] = issued.user.postal_code
        return _json(body)

    def _authorize(self) -> Response:
        client_id = request.args.get("client_id", "")
        redirect_uri = request.args.get("redirect_uri", "")
        if client_id not in self.clients or not _is_http_url(redirect_uri):
            # LWA shows an error page rather than redirecting to an unchecked URI.
            return Response("unknown client_id or bad redirect_uri", status=400)
        if request.args.get("response_type") != "code":
            return _redirect_error(
                redirect_uri, "unsupported_response_type", "use response_type=code"
            )
        key = request.args.get("user")
        if key is None:
            return self._login_page("Login with Amazon (local stand-in)")
        if key not in self.users:
            return Response("unknown demo user", status=400)
        scopes = tuple(request.args.get("scope", "profile").split())
        return self._issue_code(
            user=self.users[key], client_id=client_id, redirect_uri=redirect_uri, scopes=scopes
        )

    def _token(self) -> Response:
        form = request.form
        client_id = form.get("client_id", "")
        secret = form.get("client_secret", "")
        if request.authorization and request.authorization.type == "basic":
            client_id = request.authorization.username or ""
            secret = request.authorization.password or ""
        expected = self.clients.get(client_id)
        if expected is None or not hmac.compare_digest(expected, secret):
            return _json(
                {
                    "error": "invalid_client",
                    "error_description": "Client authentication failed",
                },
                401,
            )
        grant = form.get("grant_type")
        if grant == "authorization_code":
            pending = self._take_code(
                form.get("code", ""),
                client_id=client_id,
                redirect_uri=form.get("redirect_uri"),
                verifier=form.get("code_verifier"),
            )
            if isinstance(pending, str):
                return _json({"error": "invalid_grant", "error_description": pending}, 400)
            issued = self._mint(pending.user, client_id, LWA_TOKEN_SECONDS, pending.scopes)
        elif grant == "refresh_token":
            with self.lock:
                previous = self.refresh_tokens.get(form.get("refresh_token", ""))
            if previous is None or previous.audience != client_id:
                return _json(
                    {"error": "invalid_grant", "error_description": "Invalid refresh token"},
                    400,
                )
            issued = self._mint(previous.user, client_id, LWA_TOKEN_SECONDS, previous.scopes)
        else:
            return _json(
                {
                    "error": "unsupported_grant_type",
                    "error_description": "Unsupported grant type",
                },
                400,
            )
        refresh = "Atzr|" + secrets.token_urlsafe(96)
        with self.lock:
            self.refresh_tokens[refresh] = issued
        return _json(
            {
                "access_token": issued.token,
                "refresh_token": refresh,
                "token_type": "bearer",
                "expires_in": issued.expires_at - issued.issued_at,
            }
        )

    def _demo_token(self) -> Response:
        body = request.get_json(silent=True) or {}
        try:
            issued = self._mint(
                self.user(str(body.get("user", ""))),
                str(body.get("client_id") or next(iter(self.clients))),
                int(body.get("expires_in", LWA_TOKEN_SECONDS)),
                tuple(body.get("scopes") or ("profile", "postal_code")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            return _json({"error": "invalid_request", "error_description": str(exc)}, 400)
        return _json(
            {
                "access_token": issued.token,
                "token_type": "bearer",
                "expires_in": issued.expires_at - issued.issued_at,
            }
        )

    def _demo_users(self) -> Response:
        return _json({"users": [u.key for u in self.users.values()]})

    def _valid(self, token: str | None) -> IssuedToken | None:
        issued = self.lookup(token)
        if issued is None or issued.revoked or issued.expires_at <= self.clock():
            return None
        return issued


# --------------------------------------------------------------------------- Facebook


class FakeFacebook(FakeProvider):
    what = "facebook"

    def __init__(
        self,
        *,
        app_id: str = DEMO_FACEBOOK_APP_ID,
        app_secret: str = DEMO_FACEBOOK_APP_SECRET,
        app_name: str = "Broker Demo",
        users: Sequence[DemoUser] = FACEBOOK_DEMO_USERS,
        require_appsecret_proof: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(users=users, clock=clock)
        self.app_id = app_id
        self.app_secret = app_secret
        self.app_name = app_name
        self.require_appsecret_proof = require_appsecret_proof
        self.app_tokens: set[str] = set()
        self.limited_login_issuer = LIMITED_LOGIN_ISSUER
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.signing_kid = secrets.token_hex(8)

    @property
    def jwks_url(self) -> str:
        return self.url + LIMITED_LOGIN_JWKS_PATH

    def mint(
        self,
        user: str,
        *,
        app_id: str | None = None,
        expires_in: int | None = FACEBOOK_TOKEN_SECONDS,
        data_access_expires_in: int | None = FACEBOOK_DATA_ACCESS_SECONDS,
        scopes: Sequence[str] = ("public_profile", "email"),
    ) -> str:
        """A user access token (``EAA...``). ``expires_in=None``: never expires
        (``expires_at`` 0); negative values make expired tokens."""
        return self._mint(
            self.user(user),
            app_id or self.app_id,
            expires_in,
            data_access_expires_in,
            tuple(scopes),
        ).token

    def _mint(
        self,
        user: DemoUser,
        app_id: str,
        expires_in: int | None,
        data_access_expires_in: int | None,
        scopes: tuple[str, ...],
    ) -> IssuedToken:
        now = int(self.clock())
        alphabet = string.ascii_letters + string.digits
        issued = IssuedToken(
            token="EAA" + "".join(secrets.choice(alphabet) for _ in range(180)),
            user=user,
            audience=app_id,
            scopes=scopes,
            issued_at=now,
            expires_at=0 if expires_in is None else now + expires_in,
            data_access_expires_at=0
            if data_access_expires_in is None
            else now + data_access_expires_in,
        )
        with self.lock:
            self.tokens[issued.token] = issued
        return issued

    def mint_limited_login(
        self,
        user: str,
        *,
        nonce: str,
        audience: str | None = None,
        issuer: str | None = None,
        expires_in: int = 3600,
        **extra: Any,
    ) -> str:
        """A Limited Login OIDC ID token (RS256, signed with this server's key)."""
        person = self.user(user)
        now = int(self.clock())
        given, _, family = person.name.partition(" ")
        claims: dict[str, Any] = {
            "iss": issuer or self.limited_login_issuer,
            "aud": audience or self.app_id,
            "sub": person.user_id,
            "iat": now,
            "exp": now + expires_in,
            "jti": secrets.token_hex(16),
            "nonce": nonce,
            "name": person.name,
            "given_name": given,
            "family_name": family,
        }
        if person.email:
            claims["email"] = person.email
        claims.update(extra)
        return jwt.encode(
            claims, self._signing_key, algorithm="RS256", headers={"kid": self.signing_kid}
        )

    def revoke_app_tokens(self) -> None:
        """What resetting the app secret does: every app token issued so far dies."""
        with self.lock:
            self.app_tokens.clear()

    def appsecret_proof(self, token: str) -> str:
        return hmac.new(self.app_secret.encode(), token.encode(), hashlib.sha256).hexdigest()

    def create_app(self) -> Flask:
        app = self._app("facebook-stand-in")
        version = "/<regex('v[0-9]+\\.[0-9]+'):version>"
        app.url_map.converters["regex"] = _RegexConverter

        # Any Graph version is served alike; the views do not need to see it.
        app.url_value_preprocessor(lambda _endpoint, values: (values or {}).pop("version", None))
        app.add_url_rule(
            f"{version}/oauth/access_token", view_func=self._access_token, methods=["GET"]
        )
        app.add_url_rule(f"{version}/debug_token", view_func=self._debug_token, methods=["GET"])
        app.add_url_rule(f"{version}/me", view_func=self._me, methods=["GET"])
        app.add_url_rule(f"{version}/dialog/oauth", view_func=self._dialog, methods=["GET"])
        app.add_url_rule(LIMITED_LOGIN_JWKS_PATH, view_func=self._jwks, methods=["GET"])
        app.add_url_rule("/_demo/token", view_func=self._demo_token, methods=["POST"])
        app.add_url_rule(
            "/_demo/limited_login_token", view_func=self._demo_limited_login_token, methods=["POST"]
        )
        app.add_url_rule("/_demo/users", view_func=self._demo_users, methods=["GET"])
        return app

    def _access_token(self) -> Response:
        args = request.args
        if args.get("client_id") != self.app_id:
            return _graph_error("Error validating application. Invalid application ID.", 101)
        if not hmac.compare_digest(args.get("client_secret", ""), self.app_secret):
            return _graph_error("Error validating client secret.", 1)
        if args.get("grant_type") == "client_credentials":
            app_token = f"{self.app_id}|{secrets.token_urlsafe(27)}"
            with self.lock:
                self.app_tokens.add(app_token)
            return _json({"access_token": app_token, "token_type": "bearer"})
        if "code" in args:
            pending = self._take_code(
                args["code"],
                client_id=self.app_id,
                redirect_uri=args.get("redirect_uri", ""),
                verifier=args.get("code_verifier"),
            )
            if isinstance(pending, str):
                return _graph_error(
                    f"Invalid verification code format. ({pending})",
                    100,
                    error_type="OAuthException",
                )
            issued = self._mint(
                pending.user,
                self.app_id,
                FACEBOOK_TOKEN_SECONDS,
                FACEBOOK_DATA_ACCESS_SECONDS,
                pending.scopes,
            )
            return _json(
                {
                    "access_token": issued.token,
                    "token_type": "bearer",
                    "expires_in": FACEBOOK_TOKEN_SECONDS,
                }
            )
        return _graph_error(
            "Missing grant_type or code parameter.", 100, error_type="OAuthException"
        )

    def _debug_token(self) -> Response:
        if not self._is_app_token(request.args.get("access_token", "")):
            return _graph_error("Invalid OAuth access token - Cannot parse access token", 190)
        issued = self.lookup(request.args.get("input_token"))
        if issued is None:
            return _json(
                {
                    "data": {
                        "error": {
                            "code": 190,
                            "message": "Invalid OAuth access token - Cannot parse access token",
                        },
                        "is_valid": False,
                        "scopes": [],
                    }
                }
            )
        data: dict[str, Any] = {
            "app_id": issued.audience,
            "type": "USER",
            "application": self.app_name,
            "data_access_expires_at": issued.data_access_expires_at,
            "expires_at": issued.expires_at,
            "is_valid": True,
            "scopes": list(issued.scopes),
            "granular_scopes": [{"scope": s} for s in issued.scopes],
            "user_id": issued.user.user_id,
        }
        problem = self._problem(issued)
        if problem is not None:
            data["is_valid"] = False
            data["error"] = {"code": 190, "message": problem[0], "subcode": problem[1]}
        return _json({"data": data})

    def _me(self) -> Response:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        # Graph takes the token as a bearer header or as ?access_token=.
        bearer = credential if scheme in ("Bearer", "OAuth") else None
        token = bearer or request.args.get("access_token")
        issued = self.lookup(token)
        if issued is None:
            return _graph_error("Invalid OAuth access token - Cannot parse access token", 190)
        problem = self._problem(issued)
        if problem is not None:
            return _graph_error(problem[0], 190, subcode=problem[1])
        proof = request.args.get("appsecret_proof")
        if proof is None and self.require_appsecret_proof:
            return _graph_error(
                "API calls from the server require an appsecret_proof argument",
                100,
                error_type="GraphMethodException",
            )
        if proof is not None and not hmac.compare_digest(proof, self.appsecret_proof(token or "")):
            return _graph_error(
                "Invalid appsecret_proof provided in the API argument",
                100,
                error_type="GraphMethodException",
            )
        fields = request.args.get("fields", "id,name").split(",")
        body: dict[str, Any] = {"id": issued.user.user_id}
        if "name" in fields:
            body["name"] = issued.user.name
        if "email" in fields and "email" in issued.scopes and issued.user.email:
            body["email"] = issued.user.email
        return _json(body)

    def _dialog(self) -> Response:
        redirect_uri = request.args.get("redirect_uri", "")
        if request.args.get("client_id") != self.app_id or not _is_http_url(redirect_uri):
            return Response("Invalid App ID or redirect_uri", status=400)
        key = request.args.get("user")
        if key is None:
            return self._login_page("Facebook Login (local stand-in)")
        if key not in self.users:
            return Response("unknown demo user", status=400)
        scopes = tuple(
            s for s in request.args.get("scope", "public_profile").replace(",", " ").split() if s
        )
        return self._issue_code(
            user=self.users[key],
            client_id=self.app_id,
            redirect_uri=redirect_uri,
            scopes=scopes,
        )

    def _jwks(self) -> Response:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._signing_key.public_key()))
        public.update({"kid": self.signing_kid, "alg": "RS256", "use": "sig"})
        return _json({"keys": [public]})

    def _demo_token(self) -> Response:
        body = request.get_json(silent=True) or {}
        try:
            expires_in = body.get("expires_in", FACEBOOK_TOKEN_SECONDS)
            issued = self._mint(
                self.user(str(body.get("user", ""))),
                str(body.get("app_id") or self.app_id),
                None if expires_in is None else int(expires_in),
                FACEBOOK_DATA_ACCESS_SECONDS,
                tuple(body.get("scopes") or ("public_profile", "email")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            return _graph_error(str(exc), 100, error_type="OAuthException")
        expires = issued.expires_at - issued.issued_at if issued.expires_at else None
        return _json({"access_token": issued.token, "token_type": "bearer", "expires_in": expires})

    def _demo_limited_login_token(self) -> Response:
        body = request.get_json(silent=True) or {}
        nonce = body.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            return _graph_error("nonce is required", 100, error_type="OAuthException")
        try:
            token = self.mint_limited_login(str(body.get("user", "")), nonce=nonce)
        except KeyError as exc:
            return _graph_error(str(exc), 100, error_type="OAuthException")
        return _json({"authentication_token": token})

    def _demo_users(self) -> Response:
        return _json({"users": [u.key for u in self.users.values()]})

    def _is_app_token(self, value: str) -> bool:
        with self.lock:
            issued = any(hmac.compare_digest(value, t) for t in self.app_tokens)
        # Graph also takes "{app-id}|{app-secret}" as an app access token.
        return issued or hmac.compare_digest(value, f"{self.app_id}|{self.app_secret}")

    def _problem(self, issued: IssuedToken) -> tuple[str, int] | None:
        """Why Graph would refuse this token: (message, error subcode), or None."""
        now = self.clock()
        if issued.revoked:
            return (
                "Error validating access token: The session has been invalidated because the "
                "user changed their password or Facebook has changed the session for security "
                "reasons.",
                460,
            )
        if issued.expires_at and issued.expires_at <= now:
            return (
                "Error validating access token: Session has expired on "
                f"{_fb_time(issued.expires_at)}. The current time is {_fb_time(now)}.",
                463,
            )
        return None


# --------------------------------------------------------------------------- both


@dataclass(kw_only=True)
class SocialServers:
    amazon: FakeLoginWithAmazon
    facebook: FakeFacebook

    def provider_config(
        self,
        *,
        amazon: str = "amazon",
        facebook: str = "facebook",
        limited_login: bool = False,
        limited_login_sts_ready: bool = False,
        timeout_seconds: float = 5.0,
    ) -> dict[str, dict[str, Any]]:
        """``[providers.*]`` tables pointing the broker at these servers."""
        return {
            amazon: {
                "type": "amazon",
                "display_name": "Login with Amazon (local)",
                "client_ids": list(self.amazon.clients),
                "client_secret": next(iter(self.amazon.clients.values())),
                "api_url": self.amazon.url,
                "authorize_url": f"{self.amazon.url}/ap/oa",
                "timeout_seconds": timeout_seconds,
            },
            facebook: {
                "type": "facebook",
                "display_name": "Facebook (local)",
                "app_id": self.facebook.app_id,
                "app_secret": self.facebook.app_secret,
                "graph_url": self.facebook.url,
                "graph_version": GRAPH_VERSION,
                "dialog_url": f"{self.facebook.url}/{GRAPH_VERSION}/dialog/oauth",
                "timeout_seconds": timeout_seconds,
                "limited_login": limited_login,
                "limited_login_jwks_url": self.facebook.jwks_url,
                "limited_login_sts_ready": limited_login_sts_ready,
            },
        }

    def reset(self) -> None:
        self.amazon.reset()
        self.facebook.reset()

    def stop(self) -> None:
        self.amazon.stop()
        self.facebook.stop()

    def __enter__(self) -> SocialServers:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_amazon_server(
    *,
    clients: Mapping[str, str] | None = None,
    port: int = 0,
    clock: Callable[[], float] = time.time,
) -> FakeLoginWithAmazon:
    server = FakeLoginWithAmazon(
        clients=clients or {DEMO_AMAZON_CLIENT_ID: DEMO_AMAZON_CLIENT_SECRET}, clock=clock
    )
    server.serve(server.create_app(), port=port)
    return server


def start_facebook_server(
    *,
    app_id: str = DEMO_FACEBOOK_APP_ID,
    app_secret: str = DEMO_FACEBOOK_APP_SECRET,
    port: int = 0,
    clock: Callable[[], float] = time.time,
) -> FakeFacebook:
    server = FakeFacebook(app_id=app_id, app_secret=app_secret, clock=clock)
    server.serve(server.create_app(), port=port)
    return server


def start_social_servers(
    *,
    amazon_clients: Mapping[str, str] | None = None,
    facebook_app_id: str = DEMO_FACEBOOK_APP_ID,
    facebook_app_secret: str = DEMO_FACEBOOK_APP_SECRET,
    amazon_port: int = 0,
    facebook_port: int = 0,
    clock: Callable[[], float] = time.time,
) -> SocialServers:
    """Both stand-ins on 127.0.0.1 (free ports unless given), each served by a daemon
    thread; ``stop()`` (or leaving the ``with`` block) shuts both down."""
    amazon = start_amazon_server(clients=amazon_clients, port=amazon_port, clock=clock)
    try:
        facebook = start_facebook_server(
            app_id=facebook_app_id, app_secret=facebook_app_secret, port=facebook_port, clock=clock
        )
    except BaseException:
        amazon.stop()
        raise
    return SocialServers(amazon=amazon, facebook=facebook)


# --------------------------------------------------------------------------- helpers


class _RegexConverter(BaseConverter):
    """``<regex('v[0-9]+\\.[0-9]+'):version>``: Graph's version path segment."""

    def __init__(self, url_map: Map, pattern: str) -> None:
        super().__init__(url_map)
        self.regex = pattern


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _graph_error(
    message: str, code: int, *, subcode: int | None = None, error_type: str = "OAuthException"
) -> Response:
    """Graph's error shape; HTTP 400, as Graph answers OAuthException."""
    error: dict[str, Any] = {
        "message": message,
        "type": error_type,
        "code": code,
        "fbtrace_id": secrets.token_urlsafe(8),
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    return _json({"error": error}, 400)


def _redirect(uri: str, params: Mapping[str, str]) -> Response:
    separator = "&" if urlsplit(uri).query else "?"
    return Response(status=302, headers={"Location": f"{uri}{separator}{urlencode(params)}"})


def _redirect_error(uri: str, error: str, description: str) -> Response:
    params = {"error": error, "error_description": description}
    if "state" in request.args:
        params["state"] = request.args["state"]
    return _redirect(uri, params)


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in {"http", "https"} and bool(parts.netloc)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _fb_time(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%A, %d-%b-%y %H:%M:%S UTC")


def mint_demo_token(url: str, user: str, *, timeout: float = 10.0) -> str:
    """A demo access token from a running stand-in over HTTP (``broker demo-login``)."""
    import requests

    try:
        response = requests.post(f"{url}/_demo/token", json={"user": user}, timeout=timeout)
        answer = response.json()
    except (requests.RequestException, ValueError) as exc:
        raise RuntimeError(f"the stand-in at {url} did not answer: {type(exc).__name__}") from None
    if response.status_code != 200 or not isinstance(answer, dict):
        raise RuntimeError(f"the stand-in refused demo user {user!r}: {answer}")
    token = answer.get("access_token")
    if not isinstance(token, str):
        raise RuntimeError("the stand-in answered without a token")
    return token
