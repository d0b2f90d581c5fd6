"""The identity provider interface. One module per provider implements it."""

from __future__ import annotations

from abc import ABC, abstractmethod

from broker.identity import VerifiedToken


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
