"""The identity provider interface. One module per provider implements it."""

from __future__ import annotations

from abc import ABC, abstractmethod

from broker.identity import VerifiedToken
from broker.jwks import DocumentState


class IdentityProvider(ABC):
    """Verifies an upstream token completely before STS ever sees it.

    STS is the last line of defence, not the only one: a provider must check signature,
    issuer, audience and lifetime itself (or ask the provider's introspection endpoint)
    and raise ``InvalidToken``/``ExpiredToken`` on any doubt.
    """

    name: str
    display_name: str

    @abstractmethod
    def verify(self, token: str, *, nonce: str | None = None) -> VerifiedToken:
        """Verified identity for ``token``, or raise a ``BrokerError``."""

    def key_state(self, *, check: bool) -> DocumentState:
        """Whether this provider's key material can be had, for ``/readyz``, from what
        the process already knows: never waits on the provider. With ``check``, a
        provider whose keys are missing or due for a refresh may start one background
        fetch (bounded by its own backoff) and may read the copy other processes left
        in Redis.

        Providers that check every token with the IdP (Login with Amazon, Facebook
        access tokens) hold no key material: always ``ok``."""
        del check
        return DocumentState("ok")
