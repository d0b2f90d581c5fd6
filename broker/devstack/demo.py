"""``broker demo-login``: what a mobile backend does, from a terminal.

Logs a demo user in at the dev stack's OIDC provider (authorization code flow over
HTTP), then calls ``POST /v1/credentials`` on the broker exactly as a backend would.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import requests

from broker.devstack.oidc_login import login
from broker.devstack.stack import STATE_FILE


def demo_login(
    *,
    user: str,
    role_arn: str | None = None,
    duration_seconds: int | None = None,
    workdir: str = ".devstack",
) -> dict[str, Any]:
    state_path = Path(workdir) / STATE_FILE
    if not state_path.exists():
        raise RuntimeError(
            f"no running dev stack found ({state_path}); start one with `python3 run.py dev`"
        )
    state = json.loads(state_path.read_text())
    subject = next((u for u in state["users"] if u == user or u.split("@")[0] == user), None)
    if subject is None:
        raise RuntimeError(f"unknown demo user {user!r}; try one of {', '.join(state['users'])}")
    nonce = secrets.token_urlsafe(16)
    tokens = login(state["issuer"], subject=subject, client_id=state["client_id"], nonce=nonce)
    body: dict[str, Any] = {"provider": state["provider"], "token": tokens.id_token, "nonce": nonce}
    if role_arn:
        body["role_arn"] = role_arn
    if duration_seconds:
        body["duration_seconds"] = duration_seconds
    response = requests.post(f"{state['broker_url']}/v1/credentials", json=body, timeout=30)
    result: dict[str, Any] = response.json()
    if response.status_code != 200:
        raise RuntimeError(f"broker answered {response.status_code}: {json.dumps(result)}")
    return result
