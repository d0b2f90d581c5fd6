"""``broker exec``: run one command with credentials the AWS SDKs refresh by themselves.

Like ``aws-vault exec``: a loopback HTTP server speaks the AWS container credentials
format, and the child gets ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` and a random
``AWS_CONTAINER_AUTHORIZATION_TOKEN``, so only that child (and what it starts) can use
the server. Every answer comes from the CLI session through the on-disk cache, so a
long-running child keeps getting fresh credentials.
"""

from __future__ import annotations

import configparser
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from broker.client.aws_config import config_path
from broker.client.credentials import CredentialSource
from broker.client.errors import CLIError
from broker.errors import UNAVAILABLE_RETRY_AFTER
from broker.guards import same_secret

# Variables that would make the child's SDK pick other credentials before ours.
_SHADOWING = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


def container_answer(process: Mapping[str, Any], role_arn: str | None) -> dict[str, Any]:
    answer = {
        "AccessKeyId": process["AccessKeyId"],
        "SecretAccessKey": process["SecretAccessKey"],
        "Token": process["SessionToken"],
        "Expiration": process["Expiration"],
    }
    if role_arn:
        answer["RoleArn"] = role_arn
    return answer


def serve(source: CredentialSource, token: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            # The SDKs send AWS_CONTAINER_AUTHORIZATION_TOKEN as the whole header value.
            if not same_secret(self.headers.get("Authorization"), token):
                self._json(401, {"error": "unauthenticated", "message": "wrong token"})
                return
            try:
                process = source.get()
            except CLIError as exc:
                print(f"broker exec: {exc.message}", file=sys.stderr)
                self._json(503, {"error": "dependency_unavailable", "message": exc.message})
                return
            except Exception:  # never a traceback into the child's terminal
                message = "could not get credentials"
                print(f"broker exec: {message}", file=sys.stderr)
                self._json(503, {"error": "dependency_unavailable", "message": message})
                return
            self._json(200, container_answer(process, source.role_arn()))

        def _json(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            if status == 503:
                # The broker or the provider may be back in a moment; the SDK retries.
                self.send_header("Retry-After", str(UNAVAILABLE_RETRY_AFTER))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args: object, **_kwargs: object) -> None:
            return

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


def _user_region() -> str | None:
    """The region the user's own AWS config names (env, then the active profile)."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            return os.environ[name]
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    parser = configparser.RawConfigParser()
    try:
        parser.read(config_path())
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None
    section = "default" if not profile or profile == "default" else f"profile {profile}"
    region = parser.get(section, "region", fallback=None) if parser.has_section(section) else None
    return region.strip() or None if region else None


def run(source: CredentialSource, command: Sequence[str], *, region: str | None) -> int:
    if not command:
        raise CLIError("say what to run: broker exec --role-arn ARN -- COMMAND [ARGS...]", status=2)
    source.get()  # fail now, with the session's message, rather than inside the child
    token = secrets.token_urlsafe(32)
    server = serve(source, token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    region = region or _user_region()
    env = {k: v for k, v in os.environ.items() if k not in _SHADOWING}
    env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = f"http://127.0.0.1:{server.server_address[1]}/"
    env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = token
    # The SDKs ask the shared files (a [default] profile with keys, credential_process
    # or role_arn) before the container endpoint: the child sees none, so nothing there
    # can quietly give it other credentials.
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env["AWS_CONFIG_FILE"] = os.devnull
    if region:
        env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = region
    try:
        child = subprocess.Popen(list(command), env=env)
    except FileNotFoundError:
        raise CLIError(f"command not found: {command[0]}", status=127) from None
    except PermissionError:
        raise CLIError(f"cannot run {command[0]}: permission denied", status=126) from None
    forwarded = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for sig in forwarded:
        signal.signal(sig, forward)
    try:
        status = child.wait()
    finally:
        for sig, previous in forwarded.items():
            signal.signal(sig, previous)
        server.shutdown()
        server.server_close()
    # A child ended by a signal: the shell's convention, 128 + the signal number.
    return 128 - status if status < 0 else status
