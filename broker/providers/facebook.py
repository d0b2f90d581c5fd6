"""Facebook Login: user access tokens verified by the Graph API, and Limited Login JWTs.

A classic Facebook user access token (``EAA...``) is opaque, so ``verify`` asks Graph:

1. ``GET {graph}/{version}/debug_token?input_token=...&access_token={app token}``. The
   app token comes from ``oauth/access_token`` with our app id and secret (client
   credentials grant), fetched once per process and kept. ``data`` must say
   ``is_valid``, name *our* ``app_id`` (a token any other app obtained from the same
   user must not sign in here: the confused deputy), be a ``USER`` token with a
   ``user_id``, and not be expired. ``expires_at`` of ``0`` means "never expires"; the
   separate ``data_access_expires_at`` (when the app loses access to the person's data,
   90 days after their last use) bounds it then, else ``NEVER_EXPIRES_HORIZON_SECONDS``.
2. ``GET {graph}/{version}/me?fields=id,name,email&appsecret_proof=...`` with the token
   as a bearer credential. ``appsecret_proof`` (HMAC-SHA256 of the token keyed with the
   app secret) proves the call comes from the app's server; apps with "Require App
   Secret" on refuse calls without it. ``id`` must be the ``user_id`` of step 1.

The subject is the app-scoped user id. STS receives the token unchanged with
``ProviderId=graph.facebook.com``; roles trust ``graph.facebook.com`` on the condition
``graph.facebook.com:app_id``. Verified tokens are cached until they expire (see
``oauth_common``). The Graph calls for one token share one upstream budget
(``Http.budget``), and a hung Graph never makes callers queue for the app token (see
``_AppAccessToken``). Facebook error 190 (invalid, expired, revoked token) is a 401;
Graph failing or answering nonsense a 502; unreachable or too slow a 503.

**Limited Login** (the iOS SDK's ``tracking: .limited`` mode) gives the app an OpenID
Connect ID token instead of an access token. With ``limited_login = true`` a token of
JWT shape is verified exactly like any OIDC ID token, by the same ``OIDCProvider``
(issuer ``limited_login_issuer``, keys from ``limited_login_jwks_url``, ``aud`` = our app
id, and a nonce is required: the app sets it in ``LoginConfiguration`` and sends it to
us). STS does not document Facebook Limited Login, so such a token can reach STS only
through an IAM OIDC identity provider for ``https://www.facebook.com`` that the
operator creates; until they say so with ``limited_login_sts_ready = true`` the request
fails with ``limited_login_not_enabled`` (400) naming what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from broker import errors, jws
from broker.http import Http, HttpResult, SingleFlight, Skipped
from broker.identity import VerifiedClaims, VerifiedToken
from broker.jwks import DocumentState
from broker.providers.introspection import Introspection, IntrospectionProvider, Profile
from broker.providers.oauth_common import (
    VERIFICATION_CACHE_MAX_SECONDS,
    integer,
    same_text,
    text,
)
from broker.providers.oidc import OIDCProvider
from broker.settings import DEFAULT_LEEWAY_SECONDS, FacebookProviderSettings, OIDCProviderSettings
from broker.store import Store

# The STS ProviderId for Facebook, and the issuer rules see in `iss` (IAM's condition
# key prefix, as in `graph.facebook.com:app_id`).
STS_PROVIDER_ID = "graph.facebook.com"

# A token with `expires_at: 0` never expires. We still need a date for sessions: 60 days,
# the lifetime of a long-lived user token, unless data access ends sooner.
NEVER_EXPIRES_HORIZON_SECONDS = 60 * 86400

# After Graph refuses our app token (error 190 on debug_token, e.g. the app secret was
# reset), fetch a new one at most this often: junk tokens must not make us hammer
# oauth/access_token.
APP_TOKEN_RENEW_COOLDOWN_SECONDS = 60.0

# Classic access tokens never contain a dot; anything with one is taken for a JWT (a
# Limited Login ID token) and read by the one strict JWT parser (``broker.jws``), so a
# re-spelt JWT (padding, stray characters, an unsigned "alg": "none" one) is refused
# there with a 401 and is never sent to Graph as if it were an access token.
_JWT_SEPARATOR = "."

# Graph error codes. 190: invalid OAuth access token (subcode 463: expired; 458, 460,
# 464, 467...: revoked, password changed, invalid). 102: session invalid. 4, 17, 32, 613:
# rate limits. 1 and 101 on oauth/access_token: bad client secret / app id.
_TOKEN_ERRORS = frozenset({190, 102})
_EXPIRED_SUBCODE = 463
_RATE_LIMITS = frozenset({4, 17, 32, 613})
_APP_CREDENTIAL_ERRORS = frozenset({1, 101})


class LimitedLoginNotEnabled(errors.BadRequest):
    """A Limited Login ID token where the broker cannot use one (400)."""

    code = "limited_login_not_enabled"
    default_message = "Facebook Limited Login tokens are not enabled"


@dataclasses.dataclass(frozen=True)
class _GraphError:
    code: int | None
    subcode: int | None


def appsecret_proof(token: str, app_secret: str) -> str:
    """HMAC-SHA256 of the access token keyed with the app secret, hex (Graph's format)."""
    return hmac.new(app_secret.encode(), token.encode(), hashlib.sha256).hexdigest()


def looks_like_jwt(token: str) -> bool:
    return _JWT_SEPARATOR in token


class FacebookProvider(IntrospectionProvider):
    sts_provider_id = STS_PROVIDER_ID

    def __init__(
        self,
        *,
        settings: FacebookProviderSettings,
        http: Http,
        store: Store,
        clock: Callable[[], float] = time.time,
        cache_max_seconds: float = VERIFICATION_CACHE_MAX_SECONDS,
        app_token_renew_cooldown: float = APP_TOKEN_RENEW_COOLDOWN_SECONDS,
    ) -> None:
        if not settings.app_id or not settings.app_secret:
            raise errors.ConfigurationError(
                f"provider {settings.name!r}: app_id and app_secret are required"
            )
        super().__init__(
            settings, http=http, store=store, clock=clock, cache_max_seconds=cache_max_seconds
        )
        self._settings = settings
        graph = f"{settings.graph_url}/{settings.graph_version}"
        self._debug_token_url = f"{graph}/debug_token"
        self._me_url = f"{graph}/me"
        self._app_token_url = f"{graph}/oauth/access_token"
        self._app_token = _AppAccessToken(
            fetch=self._fetch_app_token, cooldown=app_token_renew_cooldown
        )
        self._limited: OIDCProvider | None = None
        if settings.limited_login:
            self._limited = OIDCProvider(
                settings=limited_login_settings(settings), http=http, store=store, clock=clock
            )

    def key_state(self, *, check: bool) -> DocumentState:
        # Only Limited Login has key material (its JWKS); classic tokens go to Graph.
        if self._limited is None:
            return super().key_state(check=check)
        return self._limited.key_state(check=check)

    # ------------------------------------------------------------------------ verify

    def verify(self, token: str, *, nonce: str | None = None) -> VerifiedToken:
        if looks_like_jwt(token):
            return self._verify_limited_login(token, nonce)
        # The app token, debug_token and /me share the template's one upstream budget.
        return super().verify(token, nonce=nonce)

    def accepts_audience(self, audience: Any) -> bool:
        return same_text(audience, self._settings.app_id)

    def introspect(self, token: str, now: float) -> Introspection:
        data = self._debug_token(token)
        if data.get("is_valid") is not True:
            raise _token_error(_error_of(data.get("error"), subcode_key="subcode"), data, now)
        app_id = _id(data.get("app_id"))
        if app_id is None or not self.accepts_audience(app_id):
            raise errors.InvalidToken("the access token was issued to another Facebook app")
        kind = data.get("type")
        user_id = _id(data.get("user_id"))
        if (kind is not None and kind != "USER") or user_id is None:
            # App and Page tokens are valid for our app but belong to no person.
            raise errors.InvalidToken("not a Facebook user access token")
        return Introspection(
            subject=user_id, audience=app_id, expires_at=self._expiry(data, now), answer=data
        )

    def profile(self, token: str) -> Profile:
        me = self._me(token)
        me_id = _id(me.get("id"))
        if me_id is None:
            raise errors.UpstreamError("Facebook /me answered without id")
        return Profile(subject=me_id, answer=me)

    def claims(self, vouched: Introspection, profile: Profile) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "iss": STS_PROVIDER_ID,
            "aud": vouched.audience,
            "app_id": vouched.audience,
            "sub": vouched.subject,
            "id": vouched.subject,
            "exp": vouched.expires_at,
        }
        for name in ("email", "name"):
            value = text(profile.answer.get(name))
            if value is not None:
                claims[name] = value
        scopes = vouched.answer.get("scopes")
        if isinstance(scopes, list) and all(isinstance(s, str) for s in scopes):
            claims["scopes"] = list(scopes)
        return claims

    def _expiry(self, data: Mapping[str, Any], now: float) -> int:
        expires = integer(data.get("expires_at"))
        if expires is None:
            raise errors.UpstreamError("Facebook debug_token answered without expires_at")
        if expires != 0 and expires <= now:
            raise errors.ExpiredToken("the access token has expired")
        data_access = integer(data.get("data_access_expires_at")) or 0
        if data_access != 0 and data_access <= now:
            raise errors.ExpiredToken(
                "the app's access to this person's data has expired: sign in again"
            )
        # 0 means "never" for both; the earliest real date wins.
        bounds = [t for t in (expires, data_access) if t != 0]
        return min(bounds) if bounds else int(now + NEVER_EXPIRES_HORIZON_SECONDS)

    def _verify_limited_login(self, token: str, nonce: str | None) -> VerifiedToken:
        field = f"providers.{self.name}"
        if self._limited is None:
            # A malformed JWT is the caller's bad token (401) whatever is switched on.
            jws.parse(token)
            raise LimitedLoginNotEnabled(
                "this broker does not accept Facebook Limited Login tokens "
                f"({field}.limited_login is off): send a Facebook user access token"
            )
        # Every OIDC check (signature, alg allow-list, iss, aud, exp/iat, nonce) happens
        # in the shared OIDC verifier, so a bad token is a 401 whatever the STS set-up.
        verified = self._limited.verify(token, nonce=nonce)
        if not self._settings.limited_login_sts_ready:
            raise LimitedLoginNotEnabled(
                "Facebook Limited Login tokens cannot be exchanged with STS yet: the "
                "operator must create an IAM OIDC identity provider for "
                f"{self._settings.limited_login_issuer} (audience: the app id), trust it "
                f"in the role, and set {field}.limited_login_sts_ready = true"
            )
        claims = dict(verified.claims)
        # The same names rules see for classic tokens; `iss` stays the JWT's issuer so a
        # rule can still tell the two kinds apart.
        claims["app_id"] = self._settings.app_id
        claims["id"] = verified.subject
        # sts_provider_id stays None: STS gets an ID token for an IAM OIDC provider.
        return dataclasses.replace(verified, claims=VerifiedClaims(claims))

    # ------------------------------------------------------------------------ Graph calls

    def _debug_token(self, token: str) -> Mapping[str, Any]:
        app_token, fresh = self._app_token.get()
        result = self._call_debug_token(token, app_token)
        error = _top_level_error(result)
        if error is not None and error.code == 190:
            # Error 190 about the *request's* access token: ours may have been revoked
            # (app secret reset). Renew it once, within the cooldown, and ask again.
            renewed = self._app_token.renew(app_token)
            if renewed is not None:
                fresh = True
                result = self._call_debug_token(token, renewed)
                error = _top_level_error(result)
            if error is not None and error.code == 190:
                if fresh:
                    # Graph just issued that app token, so the complaint is about the input.
                    raise errors.InvalidToken("Facebook rejected the access token")
                raise errors.UpstreamError("Facebook refused the broker's app access token")
        if error is not None:
            raise _graph_failure(error, result.status, "debug_token")
        body = result.body
        data = body.get("data") if isinstance(body, dict) else None
        if result.status != 200 or not isinstance(data, dict):
            raise errors.UpstreamError("Facebook debug_token answered without a data object")
        return data

    def _call_debug_token(self, token: str, app_token: str) -> HttpResult:
        return self._http.get_json(
            self._debug_token_url,
            params={"input_token": token, "access_token": app_token},
            timeout=self._settings.timeout_seconds,
            what="Facebook debug_token",
        )

    def _me(self, token: str) -> Mapping[str, Any]:
        result = self._http.get_json(
            self._me_url,
            params={
                "fields": "id,name,email",
                "appsecret_proof": appsecret_proof(token, self._settings.app_secret),
            },
            # The bearer header, not `access_token=` in the query: out of access logs.
            headers={"Authorization": f"Bearer {token}"},
            timeout=self._settings.timeout_seconds,
            what="Facebook /me",
        )
        error = _top_level_error(result)
        if error is not None:
            if error.code in _TOKEN_ERRORS:
                raise _token_error(error, {}, self._clock())
            raise _graph_failure(error, result.status, "/me")
        if result.status != 200 or not isinstance(result.body, dict):
            raise errors.UpstreamError(f"Facebook /me failed with HTTP {result.status}")
        return result.body

    def _fetch_app_token(self) -> str:
        result = self._http.get_json(
            self._app_token_url,
            params={
                "client_id": self._settings.app_id,
                "client_secret": self._settings.app_secret,
                "grant_type": "client_credentials",
            },
            timeout=self._settings.timeout_seconds,
            what="Facebook oauth/access_token",
        )
        error = _top_level_error(result)
        if error is not None and error.code in _APP_CREDENTIAL_ERRORS:
            # 502, not the caller's fault: Facebook refused the operator's secret.
            raise errors.UpstreamError(
                f"Facebook refused the app_id/app_secret of provider {self.name!r} "
                f"(error code {error.code})"
            )
        if error is not None:
            raise _graph_failure(error, result.status, "oauth/access_token")
        body = result.body
        token = text(body.get("access_token")) if isinstance(body, dict) else None
        if result.status != 200 or token is None:
            raise errors.UpstreamError("Facebook oauth/access_token answered without a token")
        return token


def limited_login_settings(settings: FacebookProviderSettings) -> OIDCProviderSettings:
    """The OIDC verifier settings for Limited Login ID tokens of this Facebook app."""
    return OIDCProviderSettings(
        name=settings.name,
        type="oidc",
        display_name=f"{settings.display_name} (Limited Login)",
        issuers=(settings.limited_login_issuer,),
        client_ids=(settings.app_id,),
        discovery_url=None,
        jwks_url=settings.limited_login_jwks_url,
        # Facebook signs Limited Login tokens with RS256 only.
        algorithms=("RS256",),
        leeway_seconds=DEFAULT_LEEWAY_SECONDS,
        jwks_cache_seconds=3600,
        jwks_refresh_cooldown_seconds=30,
        timeout_seconds=settings.timeout_seconds,
        # The SDK puts the app's nonce in every Limited Login token; without checking
        # it, a token lifted from another sign-in could be replayed here.
        require_nonce=True,
    )


class _AppAccessToken:
    """The app access token: fetched on first use, kept, renewed when Graph refuses it.

    It does not expire (it dies only when the app secret is reset), so one fetch serves
    the process. Fetches go through one ``SingleFlight``: a burst of first requests
    fetches it once, and while Graph hangs the others do not queue behind the fetch
    (they get a 503 with ``Retry-After`` after a short wait), nor ask again during the
    failure backoff. No lock is held while Graph is asked.
    """

    def __init__(self, *, fetch: Callable[[], str], cooldown: float) -> None:
        self._fetch = fetch
        self._cooldown = cooldown
        self._lock = threading.Lock()
        self._value: str | None = None
        self._renewed_at = float("-inf")  # time.monotonic() of the last renewal
        self._flight: SingleFlight[str] = SingleFlight(what="Facebook oauth/access_token")

    def get(self) -> tuple[str, bool]:
        """The token, and whether it was fetched for this call."""
        value = self._value
        if value is not None:
            return value, False
        result = self._flight.run(self._fetch_and_keep)
        if isinstance(result, Skipped):
            raise result.error
        return result, True

    def renew(self, stale: str) -> str | None:
        """A new token in place of ``stale``; None while the cooldown forbids a fetch."""
        with self._lock:
            if self._value is not None and not hmac.compare_digest(self._value, stale):
                return self._value  # another thread renewed it already
            if time.monotonic() - self._renewed_at < self._cooldown:
                return None
            self._renewed_at = time.monotonic()
        result = self._flight.run(self._fetch_and_keep)
        return None if isinstance(result, Skipped) else result

    def _fetch_and_keep(self) -> str:
        value = self._fetch()
        with self._lock:
            self._value = value
        return value


# --------------------------------------------------------------------------- helpers


def _id(value: Any) -> str | None:
    """Graph ids are strings; old API versions sent numbers."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return text(value)


def _error_of(value: Any, *, subcode_key: str) -> _GraphError | None:
    if not isinstance(value, dict):
        return None
    return _GraphError(integer(value.get("code")), integer(value.get(subcode_key)))


def _top_level_error(result: HttpResult) -> _GraphError | None:
    """Graph's ``{"error": {"code": ..., "error_subcode": ...}}``, on any status."""
    body = result.body
    if not isinstance(body, dict) or "error" not in body:
        if result.status != 200:
            return _GraphError(None, None)
        return None
    return _error_of(body["error"], subcode_key="error_subcode") or _GraphError(None, None)


def _token_error(
    error: _GraphError | None, data: Mapping[str, Any], now: float
) -> errors.InvalidToken:
    """The 401 for a token Graph refused. Graph's own message is not repeated: it is not
    ours to keep stable, and it may quote dates and ids of the person."""
    expires = integer(data.get("expires_at"))
    if (error is not None and error.subcode == _EXPIRED_SUBCODE) or (
        expires is not None and 0 < expires <= now
    ):
        return errors.ExpiredToken("the access token has expired")
    if error is not None and error.code in _TOKEN_ERRORS:
        return errors.InvalidToken("Facebook rejected the access token (invalid or revoked)")
    return errors.InvalidToken("Facebook says the access token is not valid")


def _graph_failure(error: _GraphError, status: int, endpoint: str) -> errors.BrokerError:
    if error.code in _RATE_LIMITS:
        return errors.UpstreamThrottled("Facebook is throttling requests", retry_after=2)
    code = f"error code {error.code}" if error.code is not None else f"HTTP {status}"
    return errors.UpstreamError(f"Facebook {endpoint} failed ({code})")
