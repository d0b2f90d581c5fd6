"""Guest identities: credentials for people who have not signed in (off by default).

``POST /v1/guest`` answers with a guest identity id, a guest token the device keeps and
credentials for ``guest.role_arn`` (scoped by ``guest.session_policy``); presenting the
guest token later gives the same identity id back. What the broker promises (each held
by tests/unit/test_guest.py or tests/integration/test_issuer.py):

* A guest token is ``g1.<subject>.<expiry>.<mac>``: HMAC-SHA256 under a key derived from
  ``security.identity_key``, compared in constant time; any change, an expired one
  (``guest.token_days``) or one made under another key is a 401, and the token never
  appears in a log. Each answer carries a renewed token (the lifetime slides).
* Guest subjects are 128 random bits; identity ids come from the same keyed derivation
  as every other identity (provider ``guest``), so they are stable and private.
* STS always receives the broker's own token for guests, with ``amr`` =
  ``["unauthenticated"]`` (as Cognito's guest identities): the guest role's trust policy
  can require it, and every other role's can refuse it (``broker iam-setup``).
* Strict per-address limits shared by every process: at most
  ``guest.new_per_ip_per_hour`` new guests and ``guest.per_ip_per_minute`` requests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable

from broker import errors, policy
from broker.identity import Identity, IdentityIds, VerifiedClaims, VerifiedToken
from broker.rules import Grant
from broker.settings import GuestSettings

GUEST_PROVIDER = "guest"
GUEST_AMR = "unauthenticated"
GUEST_RULE = "guest"
_VERSION = "g1"
_TOKEN_RE = re.compile(r"g1\.([0-9a-f]{32})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})", re.ASCII)
_KEY_LABEL = b"broker guest token v1"


class GuestTokens:
    """Makes and checks guest tokens; see the module docstring."""

    def __init__(
        self, *, identity_key: bytes, lifetime_seconds: int, clock: Callable[[], float] = time.time
    ) -> None:
        # A key of its own, derived so guest tokens and identity ids never share one.
        self._key = hmac.new(identity_key, _KEY_LABEL, hashlib.sha256).digest()
        self._lifetime = lifetime_seconds
        self._clock = clock

    def issue(self, subject: str) -> tuple[str, int]:
        expires = int(self._clock()) + self._lifetime
        body = f"{_VERSION}.{subject}.{expires}"
        return f"{body}.{self._mac(body)}", expires

    def open(self, token: str) -> str:
        """The guest subject; InvalidToken or ExpiredToken (401) otherwise."""
        match = _TOKEN_RE.fullmatch(token)
        if match is None:
            raise errors.InvalidToken("not a guest token")
        subject, expires, mac = match.groups()
        body = f"{_VERSION}.{subject}.{expires}"
        if not hmac.compare_digest(self._mac(body).encode(), mac.encode()):
            raise errors.InvalidToken("the guest token is not valid")
        if int(expires) <= self._clock():
            raise errors.ExpiredToken("the guest token has expired; ask for a new guest")
        return subject

    @staticmethod
    def new_subject() -> str:
        return secrets.token_hex(16)

    def _mac(self, body: str) -> str:
        digest = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def guest_identity(ids: IdentityIds, subject: str, *, expires_at: int) -> Identity:
    # No upstream token: only the broker's own token can reach STS for a guest.
    return ids.identify(
        VerifiedToken(
            provider=GUEST_PROVIDER,
            subject=subject,
            claims=VerifiedClaims({"sub": subject, "amr": [GUEST_AMR]}),
            token="",
            sts_provider_id=None,
            expires_at=expires_at,
        )
    )


def guest_grant(settings: GuestSettings, identity: Identity) -> Grant:
    if settings.role_arn is None:  # settings refuses enabled without a role
        raise errors.ServerError("guest access has no role")
    return Grant(
        rule=GUEST_RULE,
        role_arn=settings.role_arn,
        duration_seconds=settings.duration_seconds,
        session_policy=policy.render(settings.session_policy, identity)
        if settings.session_policy is not None
        else None,
        policy_arns=(),
        sts_token="broker",  # noqa: S106 - a kind of token, not a secret
    )
