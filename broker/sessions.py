"""Server-side browser sessions in Redis, and the API other web code uses to read them.

The cookie holds only a random id (``secrets.token_urlsafe(32)``: 256 bits). Redis holds
the session under ``sha256(id)``, sealed (AES-256-GCM, key name as associated data),
so neither a Redis dump nor a leaked backup yields a cookie value that works, and a
sealed session cannot be moved under another id. A session holds:

* who signed in (provider, subject, the claims the provider verified at sign-in);
* the upstream token STS needs (ID token or access token), its expiry and, where the
  provider issued one, a refresh token: credentials can be minted later in the session;
* a CSRF token for state-changing requests;
* its creation and last-use times, for the absolute and idle timeouts.

Timeouts are enforced twice: the Redis TTL is ``min(idle, absolute remaining)`` (so an
abandoned session disappears by itself) and the stored times are checked on every load
(so a TTL extended by accident, or a restored backup, cannot revive a session).

Fixation: a session id is only ever minted by ``begin_session`` after a successful
callback; any id the browser already had is destroyed then, and an id we did not mint
is never adopted.

Login binding: every sign-in start mints a fresh random value (``new_login_binding``),
stores it in the pending login and puts it first in the login cookie; the callback
must present it. A value the browser already had is never used to bind a login (an
attacker who planted one could otherwise finish the victim's callback in their own
browser); it is only carried along, with at most ``MAX_PENDING_LOGINS`` values in all,
so sign-ins started in other tabs still complete. A finished sign-in's value is removed.

Cookie names: with ``web.cookie_secure`` (the default) every broker cookie (session and
login binding) goes out as ``__Host-<name>``: Secure, ``Path=/``, no ``Domain``, so no
subdomain or plain-http page can set or overwrite it. Without it (plain-http
development only) the configured names are used as they are.

API for other web code (console sign-in, JSON clients), inside a request::

    ws = load_session()              # WebSession | None (no cookie, unknown, timed out)
    identity = session_identity(ws)  # Identity for services.issue(); refreshes the
                                     # upstream token if it can, else ExpiredToken (401)
    check_csrf(ws, submitted)        # AccessDenied (403) unless the token matches

    current_identity_or_none()       # Identity | None: load + session_identity in one
                                     # call; None also when the token expired for good
    check_csrf_current(submitted)    # check_csrf against the current request's session

Identity from a session is rebuilt from the claims verified at sign-in, not by
re-verifying the token on every request: the claims sit in the sealed session, which
only the broker can write, so they are as trustworthy as at sign-in; re-verifying would
cost Login with Amazon and Facebook an HTTP round trip per page. What can change is
time, so the upstream token's expiry is checked on every use (STS would refuse an
expired token anyway) and a refreshed token is fully verified again.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from flask import Flask, current_app, g, request
from werkzeug.wrappers import Response

from broker import errors
from broker.guards import same_secret
from broker.identity import Identity, VerifiedClaims, VerifiedToken
from broker.oauth_flow import OAuthFlow
from broker.services import Services, current_services
from broker.settings import WebSettings
from broker.store import Store

log = logging.getLogger(__name__)
audit_log = logging.getLogger("broker.audit")

EXTENSION_KEY = "broker.web_sso"
SESSION_ID_BYTES = 32  # 256 bits; the issue asks for at least 128
# The session's last-use time is written at most this often: a page with a few static
# requests should not rewrite the session each time. Idle timeouts are this precise.
TOUCH_INTERVAL_SECONDS = 15
# An upstream token this close to expiry is treated as expired: STS is called a moment
# after we look, and a token that dies in between would turn into a confusing 401.
TOKEN_EXPIRY_MARGIN_SECONDS = 30
# Only ids shaped like ours reach Redis: token_urlsafe(32) is 43 URL-safe characters.
_SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
LOGIN_COOKIE_SUFFIX = "_login"
# Secure cookies get this prefix: the browser then accepts them only with Secure,
# Path=/ and no Domain, from this very host, so a sibling subdomain (or a plain-http
# page on the same name) cannot plant or overwrite them (cookie tossing).
HOST_PREFIX = "__Host-"
# Sign-ins one browser may have under way at once (tabs): each has its own binding value
# in the login cookie; starting one more drops the oldest, whose callback then fails.
MAX_PENDING_LOGINS = 5
# Separates binding values in the login cookie; never part of a token_urlsafe value.
_BINDING_SEPARATOR = "."

# What a request that needs a session hears without one, wherever it comes in.
SIGNED_OUT = "you are not signed in, or your session has ended; sign in again"


@dataclass(frozen=True, kw_only=True)
class WebSession:
    session_id: str = field(repr=False)  # the cookie value; never stored in Redis
    provider: str
    subject: str
    claims: Mapping[str, Any] = field(repr=False)  # verified by the provider at sign-in
    token: str = field(repr=False)  # the upstream token STS receives
    sts_provider_id: str | None
    token_expires_at: int
    refresh_token: str | None = field(repr=False)
    csrf_token: str = field(repr=False)
    created_at: int
    last_seen: int

    @property
    def email(self) -> str | None:
        email = self.claims.get("email")
        return email if isinstance(email, str) else None

    def token_expired(self, now: float) -> bool:
        return self.token_expires_at - TOKEN_EXPIRY_MARGIN_SECONDS <= now

    def to_json(self) -> dict[str, Any]:
        return {
            "v": 1,
            "provider": self.provider,
            "subject": self.subject,
            "claims": dict(self.claims),
            "token": self.token,
            "sts_provider_id": self.sts_provider_id,
            "token_expires_at": self.token_expires_at,
            "refresh_token": self.refresh_token,
            "csrf_token": self.csrf_token,
            "created_at": self.created_at,
            "last_seen": self.last_seen,
        }

    def signed_in(self) -> dict[str, Any]:
        """Who signed in and the upstream token, without this session's own id, CSRF
        token or times (see ``SessionStore.create_from``)."""
        data = self.to_json()
        for own in ("v", "csrf_token", "created_at", "last_seen"):
            del data[own]
        return data

    @classmethod
    def from_json(cls, session_id: str, data: Mapping[str, Any]) -> WebSession:
        return cls(
            session_id=session_id,
            provider=str(data["provider"]),
            subject=str(data["subject"]),
            claims=dict(data["claims"]),
            token=str(data["token"]),
            sts_provider_id=data.get("sts_provider_id"),
            token_expires_at=int(data["token_expires_at"]),
            refresh_token=data.get("refresh_token"),
            csrf_token=str(data["csrf_token"]),
            created_at=int(data["created_at"]),
            last_seen=int(data["last_seen"]),
        )


class SessionStore:
    """Create, load, save and destroy sessions; timeouts enforced here.

    Browser sessions and CLI sessions (``broker login``) are the same record under
    different key namespaces with their own lifetimes: a CLI session id never opens a
    browser session or the other way round.
    """

    def __init__(
        self,
        *,
        store: Store,
        idle_seconds: int,
        absolute_seconds: int,
        namespace: str = "session",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.idle_seconds = idle_seconds
        self.absolute_seconds = absolute_seconds
        self._namespace = namespace
        self._clock = clock

    def key(self, session_id: str) -> str:
        return self._store.key(self._namespace, hashlib.sha256(session_id.encode()).hexdigest())

    def _ttl(self, ws: WebSession, now: float) -> float:
        absolute_left = ws.created_at + self.absolute_seconds - now
        return max(1.0, min(float(self.idle_seconds), absolute_left))

    def expires_at(self, ws: WebSession) -> int:
        """When the session ends if it is not used again."""
        return min(ws.created_at + self.absolute_seconds, ws.last_seen + self.idle_seconds)

    def create(self, verified: VerifiedToken, *, refresh_token: str | None) -> WebSession:
        return self._insert(
            provider=verified.provider,
            subject=verified.subject,
            claims=dict(verified.claims),
            token=verified.token,
            sts_provider_id=verified.sts_provider_id,
            token_expires_at=verified.expires_at,
            refresh_token=refresh_token,
        )

    def create_from(self, signed_in: Mapping[str, Any]) -> WebSession:
        """A new session (new id, CSRF token and lifetimes) for the person described by
        ``signed_in`` (``WebSession.signed_in()`` of another session): how a browser
        sign-in becomes a CLI session."""
        return self._insert(
            provider=str(signed_in["provider"]),
            subject=str(signed_in["subject"]),
            claims=dict(signed_in["claims"]),
            token=str(signed_in["token"]),
            sts_provider_id=signed_in.get("sts_provider_id"),
            token_expires_at=int(signed_in["token_expires_at"]),
            refresh_token=signed_in.get("refresh_token"),
        )

    def _insert(self, **identity: Any) -> WebSession:
        now = int(self._clock())
        ws = WebSession(
            session_id=secrets.token_urlsafe(SESSION_ID_BYTES),
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            last_seen=now,
            **identity,
        )
        # only_if_new: a collision of 256 random bits would otherwise hand one person
        # another's session; refuse instead.
        if not self._store.set_sealed(
            self.key(ws.session_id), ws.to_json(), ttl=self._ttl(ws, now), only_if_new=True
        ):
            raise errors.DependencyUnavailable("could not create a session; try again")
        return ws

    def load(self, session_id: str | None) -> WebSession | None:
        """The live session for a cookie value, or None. Touches it (idle timeout)."""
        if not session_id or not _SESSION_ID_RE.match(session_id):
            return None
        key = self.key(session_id)
        data = self._store.get_sealed(key)
        if not isinstance(data, Mapping):
            return None
        try:
            ws = WebSession.from_json(session_id, data)
        except (KeyError, TypeError, ValueError):
            log.warning("dropping a malformed session")
            self._store.delete(key)
            return None
        now = self._clock()
        if now - ws.last_seen > self.idle_seconds or now - ws.created_at > self.absolute_seconds:
            self._store.delete(key)
            return None
        if now - ws.last_seen >= TOUCH_INTERVAL_SECONDS:
            ws = replace(ws, last_seen=int(now))
            if not self.save(ws):
                return None  # signed out (or expired) since we read it
        return ws

    def save(self, ws: WebSession) -> bool:
        """Write back an existing session; False (and nothing written) when it is gone.

        Only-if-exists (SET XX): a request that loaded the session just before a sign-out
        in another tab must not bring it back to life by touching it afterwards.
        """
        now = self._clock()
        return self._store.set_sealed(
            self.key(ws.session_id), ws.to_json(), ttl=self._ttl(ws, now), only_if_exists=True
        )

    def destroy(self, session_id: str | None) -> None:
        if session_id and _SESSION_ID_RE.match(session_id):
            self._store.delete(self.key(session_id))


class WebSSO:
    """Per-app state of the browser flow: the session store and the OAuth client."""

    def __init__(self, services: Services, *, clock: Callable[[], float] = time.time) -> None:
        self.services = services
        self.settings = services.settings.web
        self.clock = clock
        self.sessions = SessionStore(
            store=services.store,
            idle_seconds=self.settings.session_idle_seconds,
            absolute_seconds=self.settings.session_absolute_seconds,
            clock=clock,
        )
        cli = services.settings.cli
        self.cli_sessions = SessionStore(
            store=services.store,
            idle_seconds=cli.session_idle_seconds,
            absolute_seconds=cli.session_absolute_seconds,
            namespace="cli-session",
            clock=clock,
        )
        self.flow = OAuthFlow(settings=services.settings, store=services.store, http=services.http)

    def identity(self, ws: WebSession) -> Identity:
        """The Identity as verified at sign-in (no freshness check; for display)."""
        # VerifiedClaims: these claims passed the provider's checks at sign-in and have
        # been sealed in Redis since (see the module docstring).
        verified = VerifiedToken(
            provider=ws.provider,
            subject=ws.subject,
            claims=VerifiedClaims(ws.claims),
            token=ws.token,
            sts_provider_id=ws.sts_provider_id,
            expires_at=ws.token_expires_at,
        )
        return self.services.identity_ids.identify(verified)

    def renew(self, ws: WebSession, *, sessions: SessionStore | None = None) -> WebSession:
        """A session whose upstream token is valid again, or ``ExpiredToken``.

        ``sessions`` is where ``ws`` lives: the browser sessions unless told otherwise."""
        sessions = sessions or self.sessions
        expired = errors.ExpiredToken(
            f"your sign-in at {self.display_name(ws.provider)} has expired; sign in again"
        )
        if not ws.refresh_token:
            raise expired
        key_digest = hashlib.sha256(ws.session_id.encode()).hexdigest()
        # One refresh per session at a time: providers that rotate refresh tokens
        # revoke the old one on use, so a second concurrent refresh would fail.
        with self.services.store.lock(
            f"session-refresh:{key_digest}", timeout=15, wait=15
        ) as acquired:
            current = sessions.load(ws.session_id)
            if current is None:
                raise errors.Unauthenticated(SIGNED_OUT)
            if not current.token_expired(self.clock()):
                return current  # another request refreshed it while we waited
            if not acquired or not current.refresh_token:
                raise expired
            try:
                tokens = self.flow.refresh(current.provider, current.refresh_token)
            except errors.ClientError:
                raise expired from None
            if tokens is None:
                raise expired
            try:
                verified = self.services.provider(current.provider).verify(tokens.token)
            except errors.ClientError:
                raise expired from None
            if verified.subject != current.subject:
                # Never let a refresh turn one person's session into another's.
                sessions.destroy(current.session_id)
                raise errors.InvalidToken("the refreshed token is for another account")
            renewed = replace(
                current,
                claims=dict(verified.claims),
                token=verified.token,
                sts_provider_id=verified.sts_provider_id,
                token_expires_at=verified.expires_at,
                refresh_token=tokens.refresh_token,
            )
            if not sessions.save(renewed):
                raise errors.Unauthenticated(SIGNED_OUT)
            log.info("refreshed the upstream token of a %s session", current.provider)
            return renewed

    def display_name(self, provider: str) -> str:
        p = self.services.providers.get(provider)
        return p.display_name if p is not None else provider

    @property
    def cookie_name(self) -> str:
        return cookie_name(self.settings)

    @property
    def login_cookie_name(self) -> str:
        return cookie_name(self.settings, LOGIN_COOKIE_SUFFIX)


def cookie_name(settings: WebSettings, suffix: str = "") -> str:
    """The name a broker cookie goes out under: ``web.session_cookie`` + ``suffix``, with
    the ``__Host-`` prefix whenever cookies are Secure (a configured ``__Host-`` or
    ``__Secure-`` prefix is not doubled)."""
    name = settings.session_cookie + suffix
    if not settings.cookie_secure:
        return name
    for prefix in (HOST_PREFIX, "__Secure-"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return HOST_PREFIX + name


_build_lock = threading.Lock()


def install(app: Flask) -> WebSSO:
    """The app's WebSSO, built once from its services."""
    with _build_lock:
        sso = app.extensions.get(EXTENSION_KEY)
        if sso is None:
            sso = WebSSO(app.extensions["broker"])
            app.extensions[EXTENSION_KEY] = sso
        assert isinstance(sso, WebSSO)
        return sso


def web_sso() -> WebSSO:
    sso = current_app.extensions.get(EXTENSION_KEY)
    if isinstance(sso, WebSSO):
        return sso
    current_services()  # fail clearly if the app has no services at all
    return install(current_app._get_current_object())  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- request API

_G_SESSION = "broker_web_session"
_G_ENDED = "broker_web_session_ended"


def load_session() -> WebSession | None:
    """The current request's session, or None. Cached for the request."""
    if _G_SESSION in g:
        cached: WebSession | None = g.get(_G_SESSION)
        return cached
    sso = web_sso()
    cookie = request.cookies.get(sso.cookie_name)
    ws = sso.sessions.load(cookie)
    setattr(g, _G_SESSION, ws)
    # A cookie that no longer names a session: it timed out or was signed out elsewhere.
    setattr(g, _G_ENDED, bool(cookie) and ws is None)
    return ws


def session_ended() -> bool:
    """True when the browser sent a session cookie that no longer works."""
    load_session()
    return bool(g.get(_G_ENDED, False))


def session_identity(ws: WebSession) -> Identity:
    """The Identity for ``services.issue``; its upstream token is valid for STS.

    Refreshes the upstream token when it has expired and the provider gave a refresh
    token; otherwise raises ``ExpiredToken`` (401) so the page can offer a new sign-in.
    """
    sso = web_sso()
    if ws.token_expired(sso.clock()) and not broker_token_suffices(ws):
        try:
            ws = sso.renew(ws)
        except errors.BrokerError as exc:
            exc.about(provider=ws.provider, identity_id=_identity_id(ws))
            raise
        setattr(g, _G_SESSION, ws)
    return sso.identity(ws)


def broker_token_suffices(ws: WebSession) -> bool:
    """Whether this session's credentials come with the broker's own token for STS
    (the matching rule has ``sts_token = "broker"``): then the provider's token is not
    sent to STS, and the session may mint until its absolute lifetime ends, whatever
    the provider token's expiry. The claims are the ones verified at sign-in."""
    sso = web_sso()
    try:
        rule = sso.services.matching_rule(sso.identity(ws))
    except errors.BrokerError:
        return False  # no rule: the refusal comes from decide, with its reasons
    return rule.broker_token


def _identity_id(ws: WebSession) -> str:
    return web_sso().services.identity_ids.derive(ws.provider, ws.subject)


def require_session() -> WebSession:
    """The current request's session, or ``Unauthenticated`` (401), with one message
    for the one condition on every route."""
    ws = load_session()
    if ws is None:
        raise errors.Unauthenticated(SIGNED_OUT)
    return ws


def require_session_and_csrf(submitted: str | None) -> WebSession:
    """``require_session``, then ``check_csrf``: the guard of every state-changing
    request a signed-in browser makes."""
    ws = require_session()
    check_csrf(ws, submitted)
    return ws


def check_csrf(ws: WebSession, submitted: str | None) -> None:
    """Refuse a state-changing request whose CSRF token is missing or wrong."""
    if not same_secret(submitted, ws.csrf_token):
        denied = errors.AccessDenied(
            "the request's CSRF token is missing or wrong; reload the page"
        )
        denied.about(provider=ws.provider, identity_id=_identity_id(ws))
        raise denied


def current_identity_or_none() -> Identity | None:
    """The signed-in identity, ready for STS; None when nobody is signed in or the
    upstream token has expired and cannot be refreshed (callers then send the browser to
    sign in again). This is what the console sign-in part calls."""
    ws = load_session()
    if ws is None:
        return None
    try:
        return session_identity(ws)
    except (errors.ExpiredToken, errors.Unauthenticated):
        return None


def check_csrf_current(submitted: str | None) -> None:
    """``check_csrf`` against the current request's session (AccessDenied without one)."""
    ws = load_session()
    if ws is None:
        raise errors.AccessDenied("the request's CSRF token is missing or wrong; reload the page")
    check_csrf(ws, submitted)


def begin_session(
    response: Response, verified: VerifiedToken, *, refresh_token: str | None
) -> WebSession:
    """A fresh session for a completed sign-in, its cookie set on ``response``.

    Rotation: whatever session id the browser had is destroyed first, so an id planted
    before sign-in (fixation) or left from another account never carries over.
    """
    sso = web_sso()
    sso.sessions.destroy(request.cookies.get(sso.cookie_name))
    ws = sso.sessions.create(verified, refresh_token=refresh_token)
    _set_cookie(response, sso.cookie_name, ws.session_id, sso.settings.session_absolute_seconds)
    setattr(g, _G_SESSION, ws)
    return ws


def end_session(response: Response) -> None:
    """Destroy the current session (if any) and clear its cookie."""
    sso = web_sso()
    sso.sessions.destroy(request.cookies.get(sso.cookie_name))
    clear_cookie(response, sso.cookie_name)
    setattr(g, _G_SESSION, None)


def new_login_binding() -> str:
    """A fresh login-binding value for one sign-in start.

    Always minted here, never taken from the browser: a value an attacker planted in the
    victim's cookie (by cookie tossing, where cookies are not ``__Host-``) would otherwise
    bind the victim's login, and the attacker, holding the same value, could complete the
    victim's callback in their own browser.
    """
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def login_bindings() -> tuple[str, ...]:
    """The binding values this request's browser presented, newest first (well-formed
    ones only, at most ``MAX_PENDING_LOGINS``): the callback's pending login must be
    bound to one of them."""
    raw = request.cookies.get(web_sso().login_cookie_name) or ""
    values = [v for v in raw.split(_BINDING_SEPARATOR) if _SESSION_ID_RE.match(v)]
    return tuple(dict.fromkeys(values))[:MAX_PENDING_LOGINS]


def set_login_binding(response: Response, value: str) -> None:
    """Put a new sign-in's binding in the login cookie, in front of the ones still there.

    The earlier values stay only so that sign-ins started in other tabs still complete;
    no new login is ever bound to them. Set on every start: the cookie must outlive the
    newest pending login, which lives ``login_state_ttl_seconds`` from now.
    """
    sso = web_sso()
    kept = [v for v in login_bindings() if v != value][: MAX_PENDING_LOGINS - 1]
    _set_cookie(
        response,
        sso.login_cookie_name,
        _BINDING_SEPARATOR.join([value, *kept]),
        sso.settings.login_state_ttl_seconds,
    )


def drop_login_binding(response: Response, value: str) -> None:
    """Forget a finished sign-in's binding; the cookie goes when none is left."""
    sso = web_sso()
    rest = [v for v in login_bindings() if v != value]
    if rest:
        _set_cookie(
            response,
            sso.login_cookie_name,
            _BINDING_SEPARATOR.join(rest),
            sso.settings.login_state_ttl_seconds,
        )
    else:
        clear_cookie(response, sso.login_cookie_name)


def _set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
    settings = web_sso().settings
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        # Path=/ and no Domain: host-only, as the __Host- prefix requires.
        path="/",
        # HttpOnly: page scripts (ours or injected) never read the session id.
        httponly=True,
        # Lax: sent on the top-level GET back from the provider, never on cross-site
        # POSTs (a second line of defence behind the CSRF token).
        samesite="Lax",
        # Secure unless the operator turned it off for plain-http development.
        secure=settings.cookie_secure,
    )


def clear_cookie(response: Response, name: str) -> None:
    settings = web_sso().settings
    response.delete_cookie(
        name, path="/", httponly=True, samesite="Lax", secure=settings.cookie_secure
    )
