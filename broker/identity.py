"""Who the caller is, after a provider has verified their token.

``VerifiedToken`` is what a provider hands back; only provider code may build one, after
every check passed, with one exception: ``hypothetical_token`` builds one from claims an
operator typed, for ``explain``, and carries no token, so it can never reach STS.
``Identity`` adds the broker's stable, private identity id.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NewType

from broker.errors import BadRequest

# Claims that passed signature, issuer, audience and time checks (or the provider's
# token-introspection endpoint). Nothing unverified is ever typed as this.
VerifiedClaims = NewType("VerifiedClaims", Mapping[str, Any])

# Identity ids remembered per process (IdentityIds.derive): about 150 bytes each.
DERIVED_IDS = 4_096


@dataclass(frozen=True, kw_only=True)
class VerifiedToken:
    provider: str  # the configured provider name, e.g. "google"
    subject: str  # the provider's stable user id ("sub", LWA user_id, Facebook id)
    claims: VerifiedClaims
    # The upstream token as STS must receive it. Kept out of repr so it cannot leak
    # into logs or tracebacks by accident.
    token: str = field(repr=False)
    # STS ProviderId: None for OIDC ID tokens, "www.amazon.com" / "graph.facebook.com"
    # for OAuth access tokens.
    sts_provider_id: str | None
    expires_at: int  # unix time the upstream token stops being valid


@dataclass(frozen=True, kw_only=True)
class Identity:
    identity_id: str
    verified: VerifiedToken

    @property
    def provider(self) -> str:
        return self.verified.provider

    @property
    def subject(self) -> str:
        return self.verified.subject

    @property
    def claims(self) -> VerifiedClaims:
        return self.verified.claims


class IdentityIds:
    """Derives stable, private identity ids from (provider, subject).

    A keyed hash (HMAC-SHA256) rather than a lookup table: every broker process and
    node derives the same id with no shared state, and without the key nobody can map
    an id back to a provider account or forge one for another account. Formatted like
    Cognito's ``region:uuid`` so it drops into the same places.
    """

    def __init__(self, *, key: bytes, region: str) -> None:
        if len(key) < 16:
            raise ValueError("identity key must be at least 16 bytes")
        self._key = key
        self._region = region
        # The same people ask again and again (fresh tokens, same subject): an HMAC and a
        # UUID formatted per request were a few percent of a cached request. Pure, so a
        # bounded memo cannot go stale.
        self._remembered = functools.lru_cache(maxsize=DERIVED_IDS)(self._derive)

    def derive(self, provider: str, subject: str) -> str:
        """The identity id of ``subject`` at ``provider`` (the same on every node)."""
        return self._remembered(provider, subject)

    def _derive(self, provider: str, subject: str) -> str:
        # Length-prefix both parts so ("ab", "c") and ("a", "bc") can never collide.
        message = b"".join(
            len(part).to_bytes(4, "big") + part for part in (provider.encode(), subject.encode())
        )
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return f"{self._region}:{uuid.UUID(bytes=digest[:16], version=4)}"

    def identify(self, verified: VerifiedToken) -> Identity:
        return Identity(
            identity_id=self.derive(verified.provider, verified.subject), verified=verified
        )


def hypothetical_token(provider: str, claims: Mapping[str, Any]) -> VerifiedToken:
    """Claims an operator supplies to see what the rules would do (``broker explain``).

    Never verified, so never minted from: the token is empty (STS would refuse it) and
    explain never calls the credential path. ``sub`` names the subject, as every
    provider in the broker puts it there.
    """
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise BadRequest("the claims need a non-empty string 'sub'")
    return VerifiedToken(
        provider=provider,
        subject=subject,
        claims=VerifiedClaims(dict(claims)),
        token="",
        sts_provider_id=None,
        expires_at=0,
    )
