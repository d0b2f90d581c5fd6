"""Providers whose tokens only the provider can vouch for: opaque access tokens checked
by asking it (Login with Amazon, Facebook). The verification sequence is security
logic, so it is written once, here; a provider supplies only its three calls.

``IntrospectionProvider.verify``, in this order:

1. no nonce (an access token carries none) and the shape of an access token;
2. a cached verification, used only if its audience is still one the provider accepts
   (an app the operator removed stops working at once, not when the entry expires);
3. within one upstream budget (``Http.budget``): ``introspect``, the provider saying
   the token is live, issued to *our* app (the confused deputy), and whose it is;
   then ``profile``, the person behind the token asked with the token itself;
4. both answers must name the same person, or neither is trusted;
5. ``claims`` builds what rules see from the two answers, and the verification is
   remembered until the token expires (``oauth_common.VerificationCache``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from broker import errors
from broker.http import Http
from broker.identity import VerifiedToken
from broker.providers.base import IdentityProvider
from broker.providers.oauth_common import (
    VerificationCache,
    check_access_token_shape,
    redact_urllib3_urls,
    refuse_nonce,
    same_text,
)
from broker.store import Store


class Named(Protocol):
    """What the template needs of a provider's settings."""

    @property
    def name(self) -> str: ...

    @property
    def display_name(self) -> str: ...


@dataclass(frozen=True)
class Introspection:
    """What the provider vouched for: the token is live, for ``audience`` (one of ours),
    and belongs to ``subject`` until ``expires_at``; ``answer`` is its whole reply."""

    subject: str
    audience: str
    expires_at: int
    answer: Mapping[str, Any]


@dataclass(frozen=True)
class Profile:
    """The person behind the token, as the provider's profile endpoint names them."""

    subject: str
    answer: Mapping[str, Any]


class IntrospectionProvider(IdentityProvider):
    # The STS ProviderId, and the issuer rules see in ``iss``.
    sts_provider_id: ClassVar[str]

    def __init__(
        self,
        settings: Named,
        *,
        http: Http,
        store: Store,
        clock: Callable[[], float],
        cache_max_seconds: float,
    ) -> None:
        self.name = settings.name
        self.display_name = settings.display_name
        self._http = http
        self._clock = clock
        # Introspection endpoints take the token in the query string: out of the logs.
        redact_urllib3_urls()
        self._cache = VerificationCache(
            store=store, provider=self.name, max_seconds=cache_max_seconds, clock=clock
        )

    def verify(self, token: str, *, nonce: str | None = None) -> VerifiedToken:
        refuse_nonce(nonce, self.display_name)
        check_access_token_shape(token)
        cached = self._cache.get(token)
        if cached is not None and self.accepts_audience(cached.claims.get("aud")):
            return cached
        with self._http.budget():
            vouched = self.introspect(token, self._clock())
            profile = self.profile(token)
        if not same_text(profile.subject, vouched.subject):
            # Two answers from the provider about one token naming different people.
            raise errors.InvalidToken("the access token and the profile name different users")
        return self._cache.remember(
            token,
            subject=vouched.subject,
            claims=self.claims(vouched, profile),
            sts_provider_id=self.sts_provider_id,
            expires_at=vouched.expires_at,
        )

    @abstractmethod
    def accepts_audience(self, audience: Any) -> bool:
        """Whether a token issued to ``audience`` may sign in here (exact comparison)."""

    @abstractmethod
    def introspect(self, token: str, now: float) -> Introspection:
        """Ask the provider about ``token``; ``InvalidToken``/``ExpiredToken`` when it is
        not live or not ours, ``UpstreamError`` when the answer makes no sense."""

    @abstractmethod
    def profile(self, token: str) -> Profile:
        """Ask who is behind ``token``, with the token itself as the credential."""

    @abstractmethod
    def claims(self, vouched: Introspection, profile: Profile) -> dict[str, Any]:
        """The claims rules see, from the two answers."""
