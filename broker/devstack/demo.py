"""``broker demo-login``: what a mobile backend does, from a terminal.

Signs a demo user in at one of the dev stack's providers, the way the app's SDK would:
the OIDC provider by the authorization code flow over HTTP (an ID token), Login with
Amazon and Facebook by their stand-ins' demo token endpoint (an access token). Then it
calls ``POST /v1/credentials`` (or ``POST /v1/console-url``) on the broker exactly as a
backend would.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import requests

from broker.devstack.oidc_login import login
from broker.devstack.social_servers import mint_demo_token
from broker.devstack.stack import STATE_FILE

PROVIDERS = ("demo", "amazon", "facebook")


def _state(workdir: str) -> dict[str, Any]:
    state_path = Path(workdir) / STATE_FILE
    if not state_path.exists():
        raise RuntimeError(
            f"no running dev stack found ({state_path}); start one with `python3 run.py dev`"
        )
    state: dict[str, Any] = json.loads(state_path.read_text())
    return state


def provider_token(state: dict[str, Any], provider: str, user: str) -> dict[str, Any]:
    """The request body fields a mobile backend would send for ``user`` at ``provider``."""
    if provider == "demo":
        if user not in state["users"]:
            raise RuntimeError(
                f"unknown demo user {user!r}; try one of {', '.join(state['users'])}"
            )
        nonce = secrets.token_urlsafe(16)
        tokens = login(state["issuer"], subject=user, client_id=state["client_id"], nonce=nonce)
        return {"provider": state["provider"], "token": tokens.id_token, "nonce": nonce}
    if provider in ("amazon", "facebook"):
        return {"provider": provider, "token": mint_demo_token(state[f"{provider}_url"], user)}
    raise RuntimeError(f"unknown provider {provider!r}; try one of {', '.join(PROVIDERS)}")


def demo_login(
    *,
    user: str,
    provider: str = "demo",
    role_arn: str | None = None,
    duration_seconds: int | None = None,
    console: bool = False,
    workdir: str = ".devstack",
) -> dict[str, Any]:
    state = _state(workdir)
    # Every local provider knows its demo users by first name: alice@example.com is alice.
    body = provider_token(state, provider, user.partition("@")[0])
    if role_arn:
        body["role_arn"] = role_arn
    if duration_seconds:
        body["duration_seconds" if not console else "session_duration"] = duration_seconds
    path = "/v1/console-url" if console else "/v1/credentials"
    response = requests.post(f"{state['broker_url']}{path}", json=body, timeout=30)
    result: dict[str, Any] = response.json()
    if response.status_code != 200:
        raise RuntimeError(f"broker answered {response.status_code}: {json.dumps(result)}")
    return result
