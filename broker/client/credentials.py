"""Credentials through the CLI session, cached on disk until shortly before they expire.

The AWS SDKs refresh ``credential_process`` credentials by themselves when fewer than
15 minutes are left (botocore's advisory window), and call the process again each time
until they get fresher ones. So the cache hands out a credential only while more than
15 minutes are left (half its lifetime for credentials that had less than twice that
when fetched), and otherwise renews it through the CLI session, silently; the broker,
for its part, never answers this door with credentials that have less than 16 minutes
left when their lifetime allows more (``broker.credentials.sdk_min_left``). When the
session is gone the user is told which ``broker login`` to run; a browser is started
only when asked (``--login``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.client import files
from broker.client.errors import CLIError
from broker.client.session import (
    BrokerAPIError,
    BrokerClient,
    CLISession,
    login_hint,
)

REFRESH_BEFORE_SECONDS = 15 * 60
_SESSION_GONE = {"unauthenticated", "expired_token"}


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class CredentialSource:
    """``credential_process`` objects for one broker, role and duration."""

    def __init__(
        self,
        client: BrokerClient,
        *,
        role_arn: str | None,
        duration_seconds: int | None,
        relogin: Callable[[], CLISession] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._role_arn = role_arn
        self._duration = duration_seconds
        self._relogin = relogin
        self._clock = clock

    @property
    def cache_path(self) -> Path:
        key = files.digest(self._client.url, self._role_arn or "", str(self._duration or ""))
        return files.home() / "credentials" / f"{key}.json"

    def get(self) -> dict[str, Any]:
        """A ``credential_process`` object (Version, AccessKeyId, ..., Expiration)."""
        cached = self._cached()
        if cached is not None:
            return cached
        session = CLISession.load(self._client.url)
        if session is None:
            session = self._login_or_fail(f"no broker CLI session for {self._client.url}")
        try:
            answer = self._fetch(session)
        except BrokerAPIError as exc:
            if exc.code not in _SESSION_GONE:
                raise CLIError(f"{exc.reason} ({exc.code})") from None
            session.forget()
            answer = self._fetch(self._login_or_fail(exc.reason))
        process = answer.get("credentials")
        if not isinstance(process, dict) or "Expiration" not in process:
            raise CLIError(f"the broker at {self._client.url} answered without credentials")
        files.write_private(
            self.cache_path,
            {
                "broker": self._client.url,
                "credentials": process,
                "fetched_at": self._clock(),
                "role_arn": answer.get("role_arn"),
            },
        )
        return process

    def role_arn(self) -> str | None:
        entry = files.read_private(self.cache_path)
        if entry and isinstance(entry.get("role_arn"), str):
            return str(entry["role_arn"])
        return self._role_arn

    def forget(self) -> None:
        files.remove(self.cache_path)

    def _fetch(self, session: CLISession) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self._role_arn:
            body["role_arn"] = self._role_arn
        if self._duration:
            body["duration_seconds"] = self._duration
        return self._client.call("POST", "/v1/cli/credentials", body=body, bearer=session.token)

    def _login_or_fail(self, why: str) -> CLISession:
        if self._relogin is None:
            raise CLIError(f"{why}; {login_hint(self._client.url)}")
        session = self._relogin()
        session.save()
        return session

    def _cached(self) -> dict[str, Any] | None:
        entry = files.read_private(self.cache_path)
        if entry is None:
            return None
        process = entry.get("credentials")
        fetched_at = entry.get("fetched_at")
        if not isinstance(process, dict) or not isinstance(fetched_at, int | float):
            return None
        expires = _parse_time(process.get("Expiration"))
        if expires is None:
            return None
        lifetime = expires - fetched_at
        margin = REFRESH_BEFORE_SECONDS if lifetime > 2 * REFRESH_BEFORE_SECONDS else lifetime / 2
        if expires - self._clock() <= margin:
            return None
        return process


def forget_cached(broker: str) -> int:
    """Drop every cached credential from ``broker`` (a new sign-in may be someone else)."""
    dropped = 0
    for path in (files.home() / "credentials").glob("*.json"):
        entry = files.read_private(path)
        if entry is None or entry.get("broker") == broker:
            dropped += files.remove(path)
    return dropped
