"""The front half of the browser flow: authorization requests and code exchange.

One ``OAuthFlow`` per app. For each configured provider it knows the authorization and
token endpoints (OIDC: from the discovery document; Login with Amazon and Facebook: from
settings) and speaks the authorization code flow through authlib's requests client:

``begin``     a fresh ``state``, ``nonce`` (OIDC) and PKCE verifier, sealed in Redis for
              ``web.login_state_ttl_seconds``; returns the provider URL to redirect to.
``take``      the pending login for a ``state``, read and deleted in one Redis step, so a
              replayed or unknown ``state`` is refused (``BadRequest``).
``check_issuer``  RFC 9207: the response's ``iss`` is the provider's issuer, else refused
              before any token request.
``exchange``  the code (with the PKCE verifier) for the token the core verifies: the ID
              token for OIDC, the access token for Login with Amazon and Facebook.
``refresh``   a refresh token for a new upstream token, where the provider issued one.

Security choices, spelled out:

* PKCE S256 is sent to every provider, with or without a client secret: it binds the
  code to this login, so a code intercepted on the way back is useless without the
  verifier that never left Redis.
* ``state`` is a 256-bit random value and is also the Redis key (hashed, so a Redis dump
  holds no usable state); it carries nothing itself. The post-login path, nonce and
  verifier live in the sealed Redis value, never in the URL.
* The pending login is bound to the browser that started it (a random value in a
  short-lived cookie, compared in constant time): a victim cannot be made to complete an
  attacker's login (login CSRF), because the victim's browser lacks the binding cookie.
  The value is minted for each login (``broker.sessions.new_login_binding``), never
  taken from the browser: a value an attacker planted binds no login of the victim's,
  so the victim's callback URL is worthless in the attacker's browser.
* RFC 9207 mix-up defence: an authorization response naming another issuer (``iss``),
  or lacking ``iss`` from a provider that advertises it, is refused before the code is
  sent anywhere.
* Token endpoint errors never echo provider text that could hold tokens; they map onto
  our error tree (``invalid_grant`` is the caller's problem, 401; anything else 502/503).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import requests
import requests.auth
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session

from broker import errors
from broker.http import Http
from broker.jwk import MalformedDocument
from broker.jwks import RemoteDocument
from broker.settings import (
    AmazonProviderSettings,
    FacebookProviderSettings,
    OIDCProviderSettings,
    ProviderSettings,
    Settings,
)
from broker.store import Store

# state/nonce: 256 bits; the PKCE verifier: 64 random bytes -> 86 characters, inside the
# 43..128 RFC 7636 allows.
STATE_BYTES = 32
NONCE_BYTES = 32
VERIFIER_BYTES = 64
# What a state we issued looks like; anything else is refused before Redis is asked.
_STATE_RE = re.compile(r"^[A-Za-z0-9_-]{20,128}$")
# Provider error codes are RFC 6749 ASCII; anything else is not shown.
_ERROR_CODE_RE = re.compile(r"^[a-z_]{1,64}$")
MAX_ERROR_DESCRIPTION = 300

ClientAuth = Literal["client_secret_basic", "client_secret_post", "none"]

# Provider errors on the redirect back that mean "the person said no / must interact".
_USER_REFUSALS = frozenset(
    {"access_denied", "consent_required", "login_required", "interaction_required"}
)


@dataclass(frozen=True, kw_only=True)
class PendingLogin:
    """What we remember between the redirect to the provider and its callback."""

    provider: str
    code_verifier: str
    nonce: str | None  # OIDC only: Login with Amazon and Facebook access tokens have none
    next_path: str
    redirect_uri: str
    browser: str  # the login-binding cookie value of the browser that started it

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "code_verifier": self.code_verifier,
            "nonce": self.nonce,
            "next_path": self.next_path,
            "redirect_uri": self.redirect_uri,
            "browser": self.browser,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PendingLogin:
        return cls(
            provider=str(data["provider"]),
            code_verifier=str(data["code_verifier"]),
            nonce=None if data.get("nonce") is None else str(data["nonce"]),
            next_path=str(data["next_path"]),
            redirect_uri=str(data["redirect_uri"]),
            browser=str(data["browser"]),
        )


@dataclass(frozen=True, kw_only=True)
class ProviderTokens:
    """A token endpoint's answer, reduced to what the broker keeps."""

    token: str  # verified by the core and handed to STS: ID token or access token
    refresh_token: str | None

    def __repr__(self) -> str:  # never print tokens
        return f"ProviderTokens(refresh_token={'yes' if self.refresh_token else 'no'})"


@dataclass(frozen=True, kw_only=True)
class Endpoints:
    authorization: str
    token: str
    # RFC 9207: the issuer identifier an authorization response's `iss` must equal (the
    # discovery document's `issuer`); None for providers without one (LWA, Facebook).
    issuer: str | None = None
    # Discovery says `authorization_response_iss_parameter_supported: true`: a response
    # without `iss` did not come from this provider as it says it answers.
    iss_required: bool = False


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """How to talk OAuth to one provider."""

    provider: str
    kind: Literal["oidc", "amazon", "facebook"]
    client_id: str
    client_secret: str | None
    scopes: tuple[str, ...]
    client_auth: ClientAuth
    exchange_method: Literal["GET", "POST"]
    timeout: float


class OAuthFlow:
    def __init__(self, *, settings: Settings, store: Store, http: Http) -> None:
        self._settings = settings
        self._store = store
        self._http = http
        self._lock = threading.Lock()
        self._discovery: dict[str, RemoteDocument[Endpoints]] = {}

    # ---------------------------------------------------------------- configuration

    def redirect_uri(self, provider: str) -> str:
        return f"{self._settings.server.public_url}/callback/{provider}"

    def _provider(self, name: str) -> ProviderSettings:
        try:
            return self._settings.providers[name]
        except KeyError:
            raise errors.UnknownProvider(
                f"unknown provider; configured: {', '.join(sorted(self._settings.providers))}"
            ) from None

    def client(self, name: str) -> ClientConfig:
        p = self._provider(name)
        if isinstance(p, OIDCProviderSettings) and p.type == "developer":
            # The operator's backend signs these tokens for its own users: there is no
            # sign-in page to send a browser to.
            raise errors.BadRequest(
                f"provider {name!r} has no browser sign-in: its tokens come from the "
                "operator's backend (API only)"
            )
        if isinstance(p, OIDCProviderSettings):
            return ClientConfig(
                provider=name,
                kind="oidc",
                # The first configured client id is the web client; the others are
                # accepted audiences for tokens minted by apps (see settings).
                client_id=p.client_ids[0],
                client_secret=p.client_secret,
                scopes=p.scopes,
                # A client without a secret is a public client: PKCE alone protects it.
                client_auth="client_secret_basic" if p.client_secret else "none",
                exchange_method="POST",
                timeout=p.timeout_seconds,
            )
        if isinstance(p, AmazonProviderSettings):
            if not p.client_secret:
                raise errors.BadRequest(
                    f"provider {name!r} has no browser sign-in: it is set up for app "
                    "tokens only (no client_secret)"
                )
            return ClientConfig(
                provider=name,
                kind="amazon",
                client_id=p.client_ids[0],
                client_secret=p.client_secret,
                scopes=p.scopes,
                # LWA documents client_id/client_secret in the form body.
                client_auth="client_secret_post",
                exchange_method="POST",
                timeout=p.timeout_seconds,
            )
        assert isinstance(p, FacebookProviderSettings)
        return ClientConfig(
            provider=name,
            kind="facebook",
            client_id=p.app_id,
            client_secret=p.app_secret,
            scopes=p.scopes,
            # Facebook's manual login flow documents a GET with the secret as a parameter.
            client_auth="client_secret_post",
            exchange_method="GET",
            timeout=p.timeout_seconds,
        )

    def browser_ready(self, name: str) -> bool:
        """Whether the provider is configured for browser sign-in (the login page lists
        only those; an API-only Login with Amazon client has no secret)."""
        try:
            self.client(name)
        except errors.BrokerError:
            return False
        return True

    def endpoints(self, name: str) -> Endpoints:
        p = self._provider(name)
        if isinstance(p, AmazonProviderSettings):
            return Endpoints(authorization=p.authorize_url, token=f"{p.api_url}/auth/o2/token")
        if isinstance(p, FacebookProviderSettings):
            return Endpoints(
                authorization=p.dialog_url,
                token=f"{p.graph_url}/{p.graph_version}/oauth/access_token",
            )
        assert isinstance(p, OIDCProviderSettings)
        return self._discovery_for(p).get()

    def _discovery_for(self, p: OIDCProviderSettings) -> RemoteDocument[Endpoints]:
        with self._lock:
            document = self._discovery.get(p.name)
            if document is None:
                # Providers configured with a jwks_url have no discovery_url in settings;
                # the issuer's well-known document still names the browser endpoints.
                url = p.discovery_url or (
                    p.issuers[0].rstrip("/") + "/.well-known/openid-configuration"
                )
                issuers = p.issuers

                def parse(doc: Any) -> Endpoints:
                    return _endpoints_from_discovery(doc, issuers)

                # Same namespace as the ID token verifier's discovery cache: the raw
                # document is shared through Redis, so one fetch serves both.
                document = RemoteDocument(
                    url=url,
                    http=self._http,
                    store=self._store,
                    namespace="oidc-discovery",
                    parse=parse,
                    cache_seconds=p.jwks_cache_seconds,
                    timeout=p.timeout_seconds,
                    what=f"{p.name} discovery document",
                )
                self._discovery[p.name] = document
            return document

    # ---------------------------------------------------------------- the flow

    def _state_key(self, state: str) -> str:
        # Hashed: whoever reads a Redis dump learns nothing that works as a state.
        return self._store.key("login", hashlib.sha256(state.encode()).hexdigest())

    def begin(self, provider: str, *, next_path: str, browser: str) -> str:
        """The provider URL to send the browser to; the pending login is in Redis."""
        client = self.client(provider)
        endpoints = self.endpoints(provider)
        state = secrets.token_urlsafe(STATE_BYTES)
        pending = PendingLogin(
            provider=provider,
            code_verifier=secrets.token_urlsafe(VERIFIER_BYTES),
            nonce=secrets.token_urlsafe(NONCE_BYTES) if client.kind == "oidc" else None,
            next_path=next_path,
            redirect_uri=self.redirect_uri(provider),
            browser=browser,
        )
        stored = self._store.set_sealed(
            self._state_key(state),
            pending.to_json(),
            ttl=self._settings.web.login_state_ttl_seconds,
            only_if_new=True,
        )
        # 256 random bits do not collide: a refusal means the store did not do its part.
        if not stored:
            raise errors.DependencyUnavailable("could not start the sign-in; try again")
        extra: dict[str, str] = {}
        if pending.nonce is not None:
            extra["nonce"] = pending.nonce
        with self._session(client, redirect_uri=pending.redirect_uri) as oauth:
            url, _ = oauth.create_authorization_url(
                endpoints.authorization,
                state=state,
                code_verifier=pending.code_verifier,
                **extra,
            )
        return str(url)

    def take(self, provider: str, state: str | None, *, browser: Sequence[str]) -> PendingLogin:
        """The pending login for ``state``, deleted as it is read (one use only).

        ``browser`` is every login-binding value the callback's browser presented (one
        per sign-in it has under way); the pending login's own must be among them."""
        if not state or not _STATE_RE.match(state):
            raise errors.BadRequest("the sign-in response has no valid state; start again")
        data = self._store.take_sealed(self._state_key(state))
        if data is None:
            raise errors.BadRequest(
                "this sign-in attempt is unknown, expired or was already used; start again"
            )
        pending = PendingLogin.from_json(data)
        if pending.provider != provider:
            raise errors.BadRequest("the sign-in response came back for another provider")
        # Every value compared, in constant time, whatever matches first.
        matches = [hmac.compare_digest(pending.browser.encode(), b.encode()) for b in browser]
        if not any(matches):
            # The callback arrived in a browser that did not start this login: either
            # cookies are blocked or someone is trying to sign the victim in as themselves.
            raise errors.BadRequest(
                "this sign-in was started in another browser (or cookies are blocked); start again"
            )
        return pending

    def check_issuer(self, provider: str, iss: str | None) -> None:
        """RFC 9207: the authorization response's ``iss`` names the provider we sent the
        browser to, or the response is refused before any token request.

        * ``iss`` present: it must equal the provider's issuer identifier exactly (simple
          string comparison, RFC 9207 section 2.4). Login with Amazon and Facebook have
          no issuer identifier and send no ``iss``, so one arriving on their callback
          came from somewhere else (a mix-up or a crafted link) and is refused too.
        * ``iss`` absent: refused when the provider's discovery document says it always
          sends one (``authorization_response_iss_parameter_supported: true``); accepted
          otherwise, since most providers do not send it yet.
        """
        endpoints = self.endpoints(provider)
        if iss is None:
            if endpoints.iss_required:
                raise errors.BadRequest(
                    "the sign-in response does not say which provider issued it (no iss), "
                    "although this provider always does; start again"
                )
            return
        # The value is never echoed: it is whatever the link's author wrote.
        if endpoints.issuer is None:
            raise errors.BadRequest(
                "the sign-in response names an issuer (iss), but this provider never "
                "sends one: it did not come from this provider; start again"
            )
        if iss != endpoints.issuer:
            raise errors.BadRequest(
                "the sign-in response was issued by another provider than the one this "
                "sign-in went to (iss mismatch); start again"
            )

    def exchange(self, pending: PendingLogin, code: str | None) -> ProviderTokens:
        """The authorization code, with its PKCE verifier, for the provider's tokens."""
        if not code or len(code) > 2048:
            raise errors.BadRequest("the sign-in response has no authorization code")
        client = self.client(pending.provider)
        endpoints = self.endpoints(pending.provider)
        extra: dict[str, Any] = {}
        if client.exchange_method == "GET":
            # authlib applies client authentication to the request body, which a GET
            # does not have: put client_id and secret in the query, as Facebook documents.
            extra = {
                "auth": _NO_AUTH,
                "client_id": client.client_id,
                "client_secret": client.client_secret,
            }
        with self._session(client, redirect_uri=pending.redirect_uri) as oauth:
            token = self._call(
                client,
                lambda: oauth.fetch_token(
                    endpoints.token,
                    method=client.exchange_method,
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=pending.code_verifier,
                    redirect_uri=pending.redirect_uri,
                    timeout=client.timeout,
                    **extra,
                ),
            )
        return _tokens(client, token)

    def refresh(self, provider: str, refresh_token: str) -> ProviderTokens | None:
        """New upstream tokens from a refresh token; None when the answer has no token STS
        could use (an OIDC refresh without a new ID token)."""
        client = self.client(provider)
        endpoints = self.endpoints(provider)
        with self._session(client, redirect_uri=self.redirect_uri(provider)) as oauth:
            token = self._call(
                client,
                lambda: oauth.refresh_token(
                    endpoints.token, refresh_token=refresh_token, timeout=client.timeout
                ),
            )
        try:
            tokens = _tokens(client, token)
        except errors.UpstreamError:
            return None
        # Providers that do not rotate refresh tokens omit them from the answer.
        return ProviderTokens(
            token=tokens.token, refresh_token=tokens.refresh_token or refresh_token
        )

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _session(client: ClientConfig, *, redirect_uri: str) -> OAuth2Session:
        return OAuth2Session(
            client_id=client.client_id,
            client_secret=client.client_secret,
            token_endpoint_auth_method=client.client_auth,
            scope=" ".join(client.scopes),
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
            # Every request has a timeout: a slow IdP must not hang a worker.
            default_timeout=client.timeout,
        )

    @staticmethod
    def _call(client: ClientConfig, fn: Any) -> Mapping[str, Any]:
        host = f"{client.provider} token endpoint"
        try:
            token = fn()
        except OAuthError as exc:
            code = exc.error if isinstance(exc.error, str) else ""
            if code in {"invalid_grant", ""}:
                # Expired, reused or forged code, or a PKCE verifier that does not match
                # the challenge. (Facebook reports errors as an object: same meaning.)
                raise errors.InvalidToken(
                    f"{client.provider} refused the authorization code "
                    "(expired, already used, or not issued to this sign-in)"
                ) from None
            if code in {"invalid_client", "unauthorized_client"}:
                raise errors.UpstreamError(
                    f"{client.provider} refused the broker's client credentials"
                ) from None
            raise errors.UpstreamError(f"{host} answered {_clean_code(code)}") from None
        # Not chained: the requests exception quotes the URL, and Facebook's exchange is
        # a GET with the app secret and the code in its query string (as in broker.http).
        except requests.Timeout:
            raise errors.DependencyUnavailable(f"{host} timed out") from None
        except requests.HTTPError:
            raise errors.UpstreamError(f"{host} failed") from None
        except requests.RequestException:
            raise errors.DependencyUnavailable(f"{host} is unreachable") from None
        except ValueError as exc:  # not a JSON object
            raise errors.UpstreamError(f"{host} returned a malformed response") from exc
        if not isinstance(token, Mapping):
            raise errors.UpstreamError(f"{host} returned a malformed response")
        return token


class _NoAuth(requests.auth.AuthBase):
    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        return request


_NO_AUTH = _NoAuth()


def _tokens(client: ClientConfig, token: Mapping[str, Any]) -> ProviderTokens:
    field = "id_token" if client.kind == "oidc" else "access_token"
    value = token.get(field)
    if not isinstance(value, str) or not value:
        hint = " (is 'openid' among the scopes?)" if client.kind == "oidc" else ""
        raise errors.UpstreamError(f"{client.provider} returned no {field}{hint}")
    refresh = token.get("refresh_token")
    return ProviderTokens(
        token=value, refresh_token=refresh if isinstance(refresh, str) and refresh else None
    )


def _endpoints_from_discovery(document: Any, issuers: tuple[str, ...]) -> Endpoints:
    if not isinstance(document, Mapping):
        raise MalformedDocument("not a JSON object")
    issuer = document.get("issuer")
    # Discovery 4.3: a document for another issuer could send our users anywhere.
    if not isinstance(issuer, str) or issuer not in issuers:
        raise MalformedDocument(f"issuer {issuer!r} is not a configured issuer")
    found: dict[str, str] = {}
    for name in ("authorization_endpoint", "token_endpoint"):
        value = document.get(name)
        if not isinstance(value, str) or urlsplit(value).scheme not in {"http", "https"}:
            raise MalformedDocument(f"{name} is missing or not an http(s) URL")
        found[name] = value
    return Endpoints(
        authorization=found["authorization_endpoint"],
        token=found["token_endpoint"],
        issuer=issuer,
        # Only a JSON true counts (RFC 9207 section 3); anything else is "not supported".
        iss_required=document.get("authorization_response_iss_parameter_supported") is True,
    )


def _clean_code(code: str) -> str:
    return code if _ERROR_CODE_RE.match(code) else "an error"


# ------------------------------------------------------------------ provider errors


def callback_error(code: str, description: str | None, provider: str) -> errors.BrokerError:
    """The error for ``?error=...`` on the way back from a provider.

    The provider's text is untrusted input: the code is shown only when it looks like an
    RFC 6749 code, the description is cut short (and autoescaped when rendered).
    """
    clean = _clean_code(code)
    detail = (description or "").strip()[:MAX_ERROR_DESCRIPTION]
    suffix = f": {detail}" if detail else ""
    if clean in _USER_REFUSALS:
        return errors.AccessDenied(f"sign-in at {provider} was cancelled or refused ({clean})")
    if clean == "temporarily_unavailable":
        return errors.DependencyUnavailable(f"{provider} is temporarily unavailable{suffix}")
    return errors.UpstreamError(f"{provider} could not complete the sign-in ({clean}){suffix}")
