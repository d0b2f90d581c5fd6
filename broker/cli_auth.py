"""Signing the ``broker`` command line tool in: the OAuth ways for native apps.

Both grants end in a CLI session (``SessionStore`` namespace ``cli-session``): a
server-side record in Redis like a browser session, with its own idle and absolute
lifetimes, that the CLI holds as a bearer secret. The person always approves in the
browser, signed in to the broker's own web sign-in; the CLI never sees a provider token.

* **Loopback** (RFC 8252 section 7.3, PKCE per RFC 7636): the CLI listens on
  ``http://127.0.0.1:PORT/``, opens ``/cli/authorize`` with a ``code_challenge``; after
  approval the browser is sent back to the loopback with a one-time ``code`` (120 s),
  which the CLI exchanges at ``POST /v1/cli/token`` with its ``code_verifier``. The
  code is bound to the redirect URI and the challenge, so a code seen by another local
  process is useless without the verifier.
* **Device** (RFC 8628): ``POST /v1/cli/device`` returns a ``device_code`` for the CLI
  and a short ``user_code`` the person types at ``/device`` on any browser. The CLI
  polls ``POST /v1/cli/token``; too-fast polling gets ``slow_down``.

Every pending grant is sealed in Redis, one-time (taken with GETDEL) and expires with
``cli.login_ttl_seconds``. Nothing here is a token a provider issued.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from broker import errors
from broker.guards import is_loopback_host
from broker.identity import IdentityIds
from broker.sessions import SessionStore, WebSession
from broker.settings import CLISettings
from broker.store import Store

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CODE_GRANT = "authorization_code"
# A loopback code only has to survive the browser's redirect and one HTTP call.
CODE_TTL_SECONDS = 120
# RFC 8628 section 6.1: 20 consonants, no vowels (no words), no look-alikes; 8 of them
# are 34.6 bits, and guessing is bounded by the per-address rate limit and the TTL.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
# RFC 7636 section 4.1.
_VERIFIER_RE = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")
_CHALLENGE_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_STATE_MAX_CHARS = 512
_DEVICE_CODE_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


class AuthorizationPending(errors.OAuthError):
    code = "authorization_pending"
    default_message = "waiting for the sign-in to be approved in the browser"


class SlowDown(errors.OAuthError):
    code = "slow_down"
    default_message = "polling too fast; wait longer between requests"


class InvalidGrant(errors.OAuthError):
    code = "invalid_grant"
    default_message = "the sign-in code is unknown, used or expired; run broker login again"


class ExpiredDeviceCode(errors.OAuthError):
    code = "expired_token"
    default_message = "the device code has expired; run broker login again"


class LoginRefused(errors.OAuthError):
    code = "access_denied"
    default_message = "the sign-in was refused in the browser"


@dataclass(frozen=True, kw_only=True)
class DeviceStart:
    device_code: str
    user_code: str
    expires_in: int
    interval: int


def check_loopback_redirect(uri: str | None) -> str:
    """``uri`` if it is a loopback redirect a native app may use (RFC 8252 7.3), else
    ``BadRequest``. Only plain http to the local machine: any other target would hand
    the code to whoever runs that host."""
    if not uri or len(uri) > 2048:
        raise errors.BadRequest("redirect_uri is required")
    parts = urlsplit(uri)
    host = parts.hostname or ""
    loopback = is_loopback_host(host, allow_localhost=False)  # RFC 8252 section 8.3
    try:
        port = parts.port
    except ValueError:
        port = None
    if (
        parts.scheme != "http"
        or not loopback
        or port is None
        or parts.username is not None
        or parts.password is not None
        or parts.fragment
        or "\\" in uri
    ):
        raise errors.BadRequest(
            "redirect_uri must be http://127.0.0.1:PORT/... or http://[::1]:PORT/..."
        )
    return uri


def check_challenge(challenge: str | None, method: str | None) -> str:
    if method != "S256":
        raise errors.BadRequest("code_challenge_method must be S256")
    if not challenge or not _CHALLENGE_RE.match(challenge):
        raise errors.BadRequest("code_challenge must be a base64url SHA-256 (43 characters)")
    return challenge


def check_state(state: str | None) -> str:
    if not state or len(state) > _STATE_MAX_CHARS:
        raise errors.BadRequest("state is required (at most 512 characters)")
    return state


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def normalize_user_code(text: str | None) -> str:
    """What the person typed, as stored: case and dashes or spaces do not matter."""
    cleaned = "".join(c for c in (text or "").upper() if c not in "- ")
    if len(cleaned) != USER_CODE_LENGTH or any(c not in USER_CODE_ALPHABET for c in cleaned):
        raise errors.BadRequest(
            f"the code is {USER_CODE_LENGTH} letters, as shown by broker login (e.g. BCDF-GHJK)"
        )
    return cleaned


def format_user_code(code: str) -> str:
    half = USER_CODE_LENGTH // 2
    return f"{code[:half]}-{code[half:]}"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class CLIAuth:
    """The pending grants of the CLI sign-in and the CLI sessions they become."""

    def __init__(
        self,
        *,
        store: Store,
        settings: CLISettings,
        sessions: SessionStore,
        identity_ids: IdentityIds,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.settings = settings
        self.sessions = sessions
        self._identity_ids = identity_ids
        self._clock = clock

    # -- loopback ----------------------------------------------------------------------

    def authorize(self, ws: WebSession, *, redirect_uri: str, code_challenge: str) -> str:
        """A one-time code for the loopback redirect, after the person approved."""
        code = secrets.token_urlsafe(32)
        self._store.set_sealed(
            self._store.key("cli-code", _digest(code)),
            {
                "signed_in": ws.signed_in(),
                "redirect_uri": redirect_uri,
                "code_challenge": code_challenge,
            },
            ttl=CODE_TTL_SECONDS,
            only_if_new=True,
        )
        return code

    def exchange_code(
        self, *, code: str | None, code_verifier: str | None, redirect_uri: str | None
    ) -> WebSession:
        if not code or len(code) > 128:
            raise errors.BadRequest("code is required")
        if not code_verifier or not _VERIFIER_RE.match(code_verifier):
            raise errors.BadRequest("code_verifier must be 43-128 characters (RFC 7636)")
        # Taken before any check: a code is used up by its first presentation, right or
        # wrong, so a guessed verifier cannot be retried.
        pending = self._store.take_sealed(self._store.key("cli-code", _digest(code)))
        if not isinstance(pending, Mapping):
            raise InvalidGrant()
        if not hmac.compare_digest(
            str(pending.get("redirect_uri", "")).encode(), (redirect_uri or "").encode()
        ):
            raise InvalidGrant("redirect_uri does not match the one the code was issued for")
        if not hmac.compare_digest(
            str(pending.get("code_challenge", "")).encode(), s256(code_verifier).encode()
        ):
            raise InvalidGrant("code_verifier does not match the code_challenge")
        return self._session(pending.get("signed_in"))

    # -- device ------------------------------------------------------------------------

    def start_device(self) -> DeviceStart:
        device_code = secrets.token_urlsafe(32)
        ttl = self.settings.login_ttl_seconds
        for _ in range(5):
            user_code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
            # only_if_new: two pending logins must never share a user code.
            if self._store.set_flag(
                # The digest, not the device code: the code is the CLI's secret.
                self._user_code_key(user_code),
                ttl=ttl,
                only_if_new=True,
                value=_digest(device_code),
            ):
                break
        else:
            # Five collisions in 20^8 codes: the store is refusing, not the odds.
            raise errors.DependencyUnavailable("could not allocate a device user code; try again")
        self._store.set_sealed(
            self._device_key(_digest(device_code)),
            {"status": "pending", "user_code": user_code},
            ttl=ttl,
            only_if_new=True,
        )
        return DeviceStart(
            device_code=device_code,
            user_code=format_user_code(user_code),
            expires_in=ttl,
            interval=self.settings.device_poll_seconds,
        )

    def pending_device(self, user_code: str) -> str:
        """The digest of the device code waiting for ``user_code``; ``BadRequest`` if
        there is none."""
        device_digest = self._store.get_flag(self._user_code_key(normalize_user_code(user_code)))
        if device_digest is None:
            raise errors.BadRequest(
                "no sign-in is waiting for this code; check it, or run broker login again"
            )
        return device_digest

    def decide_device(self, ws: WebSession, *, user_code: str, approve: bool) -> None:
        """Record the person's answer. The user code is taken (GETDEL) first, so of two
        answers at once only one counts, and it is used up either way."""
        device_digest = self._store.take_flag(self._user_code_key(normalize_user_code(user_code)))
        if device_digest is None:
            raise errors.BadRequest(
                "no sign-in is waiting for this code; check it, or run broker login again"
            )
        key = self._device_key(device_digest)
        ttl = self._store.ttl_seconds(key)
        if ttl is None:
            raise errors.BadRequest("this sign-in has expired; run broker login again")
        value: dict[str, Any] = (
            {"status": "approved", "signed_in": ws.signed_in()} if approve else {"status": "denied"}
        )
        if not self._store.set_sealed(key, value, ttl=ttl, only_if_exists=True):
            raise errors.BadRequest("this sign-in has expired; run broker login again")

    def poll_device(self, device_code: str | None) -> WebSession:
        if not device_code or not _DEVICE_CODE_RE.match(device_code):
            raise errors.BadRequest("device_code is required")
        key = self._device_key(_digest(device_code))
        pending = self._store.get_sealed(key)
        if not isinstance(pending, Mapping):
            raise ExpiredDeviceCode()
        # One poll per interval across every broker process (RFC 8628 section 3.5).
        gap = max(0.5, self.settings.device_poll_seconds * 0.8)
        poll_key = self._store.key("cli-poll", _digest(device_code))
        if not self._store.set_flag(poll_key, ttl=gap, only_if_new=True):
            raise SlowDown()
        status = pending.get("status")
        if status == "pending":
            raise AuthorizationPending()
        taken = self._store.take_sealed(key)
        if status == "denied":
            raise LoginRefused()
        if not isinstance(taken, Mapping) or taken.get("status") != "approved":
            raise InvalidGrant()  # another poll took it a moment ago
        return self._session(taken.get("signed_in"))

    # -- sessions ----------------------------------------------------------------------

    def revoke(self, identity_id: str) -> int:
        """End every CLI session of one identity (an operator's lost-laptop button);
        returns how many there were. Cached credentials are the caller's to forget."""
        return self._store.drop_index(self._index_key(identity_id))

    def _index_key(self, identity_id: str) -> str:
        return self._store.key("cli-sessions-of", identity_id)

    def _session(self, signed_in: Any) -> WebSession:
        if not isinstance(signed_in, Mapping):
            raise InvalidGrant()
        try:
            ws = self.sessions.create_from(signed_in)
        except (KeyError, TypeError, ValueError):
            raise InvalidGrant() from None
        # Indexed per identity, so an operator can end them all without holding any.
        identity_id = self._identity_ids.derive(ws.provider, ws.subject)
        self._store.index_add(
            self._index_key(identity_id),
            self.sessions.key(ws.session_id),
            ttl=self.sessions.absolute_seconds,
        )
        return ws

    def _device_key(self, device_digest: str) -> str:
        return self._store.key("cli-device", device_digest)

    def _user_code_key(self, user_code: str) -> str:
        return self._store.key("cli-user-code", user_code)
