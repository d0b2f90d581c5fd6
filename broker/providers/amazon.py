"""Login with Amazon: OAuth 2.0 access tokens (``Atza|...``), verified by Amazon itself.

An LWA access token is opaque, so ``verify`` asks Amazon, in this order:

1. ``GET {api}/auth/o2/tokeninfo?access_token=...``: the token is valid, and its ``aud``
   is exactly one of our client ids. Without this check a token issued to *any* LWA app
   would be accepted: an app that tricked a user into signing in could replay the token
   here (the "confused deputy" every OAuth-as-login integration must close). ``exp`` is
   the number of *seconds remaining*, not a timestamp.
2. ``GET {api}/user/profile`` with the token as a bearer credential: the person's
   ``user_id``, ``email``, ``name`` (and ``postal_code`` when granted). The ``user_id``
   must be the one ``tokeninfo`` named.

The identity's subject is ``user_id``. STS receives the access token unchanged with
``ProviderId=www.amazon.com``; the IAM role trusts ``www.amazon.com`` with a condition
on ``www.amazon.com:app_id``.

The sequence (cache, budget, the cross-check, remembering) is
``broker.providers.introspection``'s, shared with Facebook: one token costs one pair of
round trips until it expires, and calls for different tokens never wait on each other
(no lock), so a hung Amazon costs each caller at most the budget, never a place in a
queue.

Errors: Amazon refusing the token is a 401
(``InvalidToken``/``ExpiredToken``); Amazon failing or answering nonsense is a 502;
Amazon unreachable or too slow is a 503. No message ever contains the token.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from broker import errors
from broker.http import Http, HttpResult
from broker.providers.introspection import Introspection, IntrospectionProvider, Profile
from broker.providers.oauth_common import (
    VERIFICATION_CACHE_MAX_SECONDS,
    integer,
    same_text,
    text,
)
from broker.settings import AmazonProviderSettings
from broker.store import Store

# The STS ProviderId for Login with Amazon, and the issuer rules see in `iss` (the same
# string IAM uses as the prefix of its condition keys, e.g. `www.amazon.com:app_id`).
STS_PROVIDER_ID = "www.amazon.com"

# RFC 6749 error codes are short ASCII words; anything else is not repeated to callers.
_ERROR_CODE_RE = re.compile(r"^[a-z_]{1,64}$")

# Profile fields passed on to rules when Amazon returns them.
PROFILE_FIELDS = ("email", "name", "postal_code")


class AmazonProvider(IntrospectionProvider):
    sts_provider_id = STS_PROVIDER_ID

    def __init__(
        self,
        *,
        settings: AmazonProviderSettings,
        http: Http,
        store: Store,
        clock: Callable[[], float] = time.time,
        cache_max_seconds: float = VERIFICATION_CACHE_MAX_SECONDS,
    ) -> None:
        if not settings.client_ids:
            raise errors.ConfigurationError(f"provider {settings.name!r}: client_ids is empty")
        super().__init__(
            settings, http=http, store=store, clock=clock, cache_max_seconds=cache_max_seconds
        )
        self._settings = settings
        self._tokeninfo_url = f"{settings.api_url}/auth/o2/tokeninfo"
        self._profile_url = f"{settings.api_url}/user/profile"

    def accepts_audience(self, audience: Any) -> bool:
        # Exact, constant-time comparison with every configured id (no prefix or
        # case-insensitive matching: another app's id must never pass).
        return any(same_text(audience, cid) for cid in self._settings.client_ids)

    def introspect(self, token: str, now: float) -> Introspection:
        info = self._tokeninfo(token)
        aud = text(info.get("aud"))
        if aud is None:
            raise errors.UpstreamError("Login with Amazon tokeninfo answered without aud")
        if not self.accepts_audience(aud):
            raise errors.InvalidToken("the access token was issued to another application")
        user_id = text(info.get("user_id"))
        if user_id is None:
            raise errors.UpstreamError("Login with Amazon tokeninfo answered without user_id")
        remaining = integer(info.get("exp"))
        if remaining is None:
            raise errors.UpstreamError("Login with Amazon tokeninfo answered without exp")
        # `exp` counts seconds from now (LWA tokens live an hour), unlike JWT's `exp`.
        if remaining <= 0:
            raise errors.ExpiredToken("the access token has expired")
        return Introspection(
            subject=user_id, audience=aud, expires_at=int(now + remaining), answer=info
        )

    def profile(self, token: str) -> Profile:
        profile = self._profile(token)
        profile_user = text(profile.get("user_id"))
        if profile_user is None:
            raise errors.UpstreamError("Login with Amazon profile answered without user_id")
        return Profile(subject=profile_user, answer=profile)

    def claims(self, vouched: Introspection, profile: Profile) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "iss": STS_PROVIDER_ID,
            "aud": vouched.audience,
            "sub": vouched.subject,
            "user_id": vouched.subject,
            "exp": vouched.expires_at,
        }
        app_id = text(vouched.answer.get("app_id"))
        if app_id is not None:
            claims["app_id"] = app_id
        for name in PROFILE_FIELDS:
            value = text(profile.answer.get(name))
            if value is not None:
                claims[name] = value
        return claims

    # ------------------------------------------------------------------------ upstream

    def _tokeninfo(self, token: str) -> Mapping[str, Any]:
        result = self._http.get_json(
            self._tokeninfo_url,
            params={"access_token": token},
            timeout=self._settings.timeout_seconds,
            what="Login with Amazon tokeninfo",
        )
        return _body_or_raise(result, "tokeninfo")

    def _profile(self, token: str) -> Mapping[str, Any]:
        result = self._http.get_json(
            self._profile_url,
            # The bearer header, not the query string: keeps the token out of access logs.
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=self._settings.timeout_seconds,
            what="Login with Amazon profile",
        )
        return _body_or_raise(result, "profile")


def _body_or_raise(result: HttpResult, endpoint: str) -> Mapping[str, Any]:
    """The JSON object of a 200, or the error LWA's answer means.

    LWA errors are ``{"error": code, "error_description": text}`` (RFC 6749/6750): 400
    ``invalid_request``/``invalid_token`` and 401 ``invalid_token`` mean the token is bad,
    403 ``insufficient_scope`` that the user did not grant the profile. LWA does not tell
    an expired token from a revoked or forged one (its description for all of them is
    one sentence naming every cause), so neither do we: ``ExpiredToken`` only when
    ``tokeninfo`` itself says no time is left. Amazon's text is never passed on.
    """
    body = result.body
    if result.status == 200:
        if not isinstance(body, dict):
            raise errors.UpstreamError(f"Login with Amazon {endpoint} answered a non-object")
        return body
    code = body.get("error") if isinstance(body, dict) else None
    if result.status in (400, 401) and code in ("invalid_token", "invalid_request"):
        raise errors.InvalidToken(
            "Login with Amazon rejected the access token (invalid, expired or revoked)"
        )
    if result.status == 403 and code == "insufficient_scope":
        raise errors.InvalidToken("the access token was not granted the profile scope")
    if result.status == 429:
        raise errors.UpstreamThrottled("Login with Amazon is throttling requests", retry_after=2)
    raise errors.UpstreamError(
        f"Login with Amazon {endpoint} failed with HTTP {result.status}"
        + (f" ({code})" if isinstance(code, str) and _ERROR_CODE_RE.match(code) else "")
    )
