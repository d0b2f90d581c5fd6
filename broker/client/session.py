"""Talking to a broker, and the CLI session it issued."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from broker.client import files
from broker.client.errors import CLIError, command
from broker.guards import is_loopback_host

BROKER_URL_ENV = "BROKER_URL"
# Every call to the broker has a deadline: an AWS command waiting on credential_process
# must fail with a message, not hang.
TIMEOUT_SECONDS = 30.0


class BrokerAPIError(CLIError):
    """The broker answered with its JSON error shape."""

    def __init__(self, http_status: int, code: str, message: str) -> None:
        super().__init__(f"the broker refused ({http_status} {code}): {message}")
        self.http_status = http_status
        self.code = code
        self.reason = message


def broker_url(value: str | None) -> str:
    """The broker's base URL from ``--broker`` or ``$BROKER_URL``, normalised."""
    url = (value or os.environ.get(BROKER_URL_ENV) or "").strip().rstrip("/")
    if not url:
        raise CLIError(f"say which broker: --broker URL (or set {BROKER_URL_ENV})", status=2)
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc or parts.query:
        raise CLIError(f"--broker must be the broker's http(s) URL, got {url!r}", status=2)
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        # The session secret and AWS keys would cross the network in the clear.
        raise CLIError(
            f"--broker must use https (plain http only for this machine): {url}", status=2
        )
    return url


class BrokerClient:
    def __init__(self, url: str, *, timeout: float = TIMEOUT_SECONDS) -> None:
        self.url = url
        self._timeout = timeout
        self._http = requests.Session()

    def call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        bearer: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        try:
            response = self._http.request(
                method,
                self.url + path,
                json=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except requests.Timeout:
            raise CLIError(
                f"the broker at {self.url} did not answer within {self._timeout:.0f} s"
            ) from None
        except requests.exceptions.SSLError:
            raise CLIError(
                f"cannot reach the broker at {self.url}: its TLS certificate is not trusted"
            ) from None
        except requests.RequestException as exc:
            raise CLIError(
                f"cannot reach the broker at {self.url} ({type(exc).__name__})"
            ) from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise CLIError(
                f"the broker at {self.url} answered HTTP {response.status_code} without JSON;"
                " is this the broker's URL?"
            )
        if response.status_code != 200:
            raise BrokerAPIError(
                response.status_code,
                str(data.get("error", "error")),
                str(data.get("message", "")),
            )
        return data

    def close(self) -> None:
        self._http.close()


@dataclass(frozen=True, kw_only=True)
class CLISession:
    broker: str
    token: str
    expires_at: str
    identity_id: str
    provider: str

    @staticmethod
    def path(broker: str) -> Path:
        return files.home() / "sessions" / f"{files.digest(broker)}.json"

    @classmethod
    def load(cls, broker: str) -> CLISession | None:
        data = files.read_private(cls.path(broker))
        if data is None or data.get("broker") != broker:
            return None
        try:
            return cls(
                broker=broker,
                token=str(data["session_token"]),
                expires_at=str(data.get("expires_at", "")),
                identity_id=str(data.get("identity_id", "")),
                provider=str(data.get("provider", "")),
            )
        except KeyError:
            return None

    @classmethod
    def from_answer(cls, broker: str, answer: dict[str, Any]) -> CLISession:
        return cls(
            broker=broker,
            token=str(answer["session_token"]),
            expires_at=str(answer.get("expires_at", "")),
            identity_id=str(answer.get("identity_id", "")),
            provider=str(answer.get("provider", "")),
        )

    def save(self) -> None:
        files.write_private(
            self.path(self.broker),
            {
                "broker": self.broker,
                "session_token": self.token,
                "expires_at": self.expires_at,
                "identity_id": self.identity_id,
                "provider": self.provider,
            },
        )

    def forget(self) -> None:
        files.remove(self.path(self.broker))


def login_hint(broker: str) -> str:
    return f"sign in with: {command('login', '--broker', broker)}"


def require_session(broker: str) -> CLISession:
    session = CLISession.load(broker)
    if session is None:
        raise CLIError(f"no broker CLI session for {broker}; {login_hint(broker)}")
    return session
