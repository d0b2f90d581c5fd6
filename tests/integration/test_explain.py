"""Explain and the denials people read, over real sockets: ``POST /v1/explain`` (off
without an admin token, 401 with a wrong one, mints nothing with the right one), the
``broker explain`` command as a subprocess, ``/v1/roles`` naming the rule, refusals that
say why (or not, with ``explain_denials`` off), and browsers getting an HTML 404."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.devstack.stack import ADMIN_ROLE, DEV_PROVIDER, USER_ROLE, Stack, dump_toml
from broker.sts import BotocoreSTS
from tests.integration.test_api import Counted, real_sts, running

pytestmark = pytest.mark.integration

__all__ = ["real_sts"]  # the module-scoped fixture, shared with test_api

TOKEN = "admin-token-" + "x" * 40
EXPLAIN = "/v1/explain"
ALICE: dict[str, Any] = {
    "sub": "alice",
    "email": "alice@example.com",
    "email_verified": True,
    "amr": ["pwd", "mfa"],
    "groups": ["admins"],
}
MALLORY: dict[str, Any] = {
    "sub": "mallory",
    "email": "mallory@example.com",
    "email_verified": False,
    "amr": ["pwd"],
}
UNVERIFIED = "your e-mail address is not verified at Demo OpenID Connect provider"


@pytest.fixture(scope="module")
def admin(stack: Stack, real_sts: BotocoreSTS) -> Iterator[Counted]:
    with running(stack, real_sts, admin={"token": TOKEN}) as broker:
        yield broker


@pytest.fixture(scope="module")
def plain(stack: Stack, real_sts: BotocoreSTS) -> Iterator[Counted]:
    with running(stack, real_sts) as broker:
        yield broker


def ask(broker: Counted, body: Any, token: str | None = TOKEN) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return broker.live.post(EXPLAIN, body, headers=headers)


# --------------------------------------------------------------------------- the endpoint


def test_explain_is_off_without_an_admin_token(plain: Counted) -> None:
    response = ask(plain, {"provider": DEV_PROVIDER, "claims": ALICE})
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert plain.sts.calls == 0


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer wrong",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer ",
    ],
)
def test_a_wrong_admin_token_is_a_401(admin: Counted, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    response = admin.live.post(
        EXPLAIN, {"provider": DEV_PROVIDER, "claims": ALICE}, headers=headers
    )
    assert response.status_code == 401
    assert response.json()["error"] == "unauthenticated"
    assert TOKEN not in response.text


def test_explain_shows_the_decision_and_mints_nothing(admin: Counted) -> None:
    before = admin.sts.calls
    response = ask(admin, {"provider": DEV_PROVIDER, "claims": ALICE, "role_arn": USER_ROLE})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["allowed"] is True
    assert answer["rule"] == "admins-with-mfa"
    assert answer["roles"] == [ADMIN_ROLE, USER_ROLE]
    assert answer["role_arn"] == USER_ROLE
    assert answer["duration_seconds"] == {
        "min": 900,
        "default": 3600,
        "max": 43200,
        "granted": 3600,
    }
    assert answer["session_name"] == "alice@example.com"
    assert answer["identity_id"] == admin.live.services.identity_ids.derive(DEV_PROVIDER, "alice")
    assert [r["name"] for r in answer["rules"]] == ["admins-with-mfa", "example-users"]
    assert answer["rules"][1]["reached"] is False
    assert admin.sts.calls == before == 0
    assert "credentials" not in answer


def test_explain_says_which_check_failed_with_the_value_seen(admin: Counted) -> None:
    answer = ask(admin, {"provider": DEV_PROVIDER, "claims": MALLORY}).json()
    assert answer["allowed"] is False
    admins, users = answer["rules"]
    failed = {c["check"]: c["seen"] for c in admins["checks"] if not c["passed"]}
    assert failed == {
        "condition": None,
        "mfa": {"amr": ["pwd"], "acr": None},
        "email_verified": False,
    }
    assert [(c["check"], c["seen"]) for c in users["checks"] if not c["passed"]] == [
        ("email_verified", False)
    ]
    assert answer["error"] == {
        "error": "no_matching_rule",
        "message": UNVERIFIED,
        "reasons": [UNVERIFIED],
    }
    assert admin.sts.calls == 0


def test_explain_renders_the_session_policy_with_its_size(admin: Counted) -> None:
    bob = {"sub": "bob", "email": "bob@example.com", "email_verified": True, "amr": ["pwd"]}
    answer = ask(admin, {"provider": DEV_PROVIDER, "claims": bob}).json()
    assert answer["rule"] == "example-users"
    identity_id = answer["identity_id"]
    assert f"/users/{identity_id}/*" in answer["session_policy"]["Statement"][0]["Resource"]
    assert 0 < answer["session_policy_chars"] <= answer["session_policy_limit"] == 2048


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"provider": DEV_PROVIDER}, 400, "invalid_request"),
        ({"provider": DEV_PROVIDER, "claims": "alice"}, 400, "invalid_request"),
        ({"provider": DEV_PROVIDER, "claims": {"email": "a@example.com"}}, 400, "invalid_request"),
        ({"provider": "nope", "claims": ALICE}, 400, "unknown_provider"),
        ({"provider": DEV_PROVIDER, "claims": ALICE, "token": "x"}, 400, "invalid_request"),
        (
            {"provider": DEV_PROVIDER, "claims": ALICE, "duration_seconds": "1"},
            400,
            "invalid_request",
        ),
    ],
)
def test_bad_explain_requests_are_400s(
    admin: Counted, body: dict[str, Any], status: int, code: str
) -> None:
    response = ask(admin, body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == code


# --------------------------------------------------------------------------- denials and roles


def test_roles_names_the_rule_that_granted_each_role(plain: Counted) -> None:
    token = plain.live.id_token("alice")
    answer = plain.live.post("/v1/roles", {"provider": DEV_PROVIDER, "token": token}).json()
    assert answer["roles"] == [ADMIN_ROLE, USER_ROLE]
    assert answer["rule"] == "admins-with-mfa"
    assert answer["grants"] == [
        {"role_arn": ADMIN_ROLE, "rule": "admins-with-mfa"},
        {"role_arn": USER_ROLE, "rule": "admins-with-mfa"},
    ]


def test_a_refused_person_is_told_why(plain: Counted) -> None:
    response = plain.ask("mallory")
    assert response.status_code == 403
    assert response.json() == {
        "error": "no_matching_rule",
        "message": UNVERIFIED,
        "reasons": [UNVERIFIED],
        "request_id": response.headers["X-Request-Id"],
    }


def test_a_wrong_role_lists_the_roles_to_choose_from(plain: Counted) -> None:
    response = plain.ask("bob", role_arn=ADMIN_ROLE)
    assert response.status_code == 403
    body = response.json()
    assert body["error"] == "role_not_allowed"
    assert body["allowed_roles"] == [USER_ROLE]
    assert USER_ROLE in body["message"]


def test_explain_denials_off_keeps_the_rules_private(stack: Stack, real_sts: BotocoreSTS) -> None:
    with running(stack, real_sts, server={"explain_denials": False}) as quiet:
        response = quiet.ask("mallory")
    assert response.status_code == 403
    assert response.json() == {
        "error": "no_matching_rule",
        "message": f"no role rule matches this identity from provider {DEV_PROVIDER!r}",
        "request_id": response.headers["X-Request-Id"],
    }


# --------------------------------------------------------------------------- not found, favicon


@pytest.mark.parametrize(
    ("path", "accept", "html"),
    [
        ("/no/such/page", "text/html,application/xhtml+xml,*/*;q=0.8", True),
        ("/no/such/page", "*/*", False),
        ("/no/such/page", "application/json", False),
        ("/no/such/page", None, False),
        ("/v1/nothing", "text/html", False),
    ],
)
def test_browsers_get_an_html_404_and_api_clients_json(
    plain: Counted, path: str, accept: str | None, html: bool
) -> None:
    headers = {"Accept": accept} if accept is not None else {}
    response = requests.get(f"{plain.url}{path}", headers=headers, timeout=10)
    assert response.status_code == 404
    if html:
        assert response.headers["Content-Type"].startswith("text/html")
        assert "There is no page at this address" in response.text
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    else:
        assert response.json()["error"] == "not_found"


def test_the_favicon_is_served_with_caching(plain: Counted) -> None:
    response = requests.get(f"{plain.url}/favicon.ico", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("image/svg+xml")
    assert "max-age=86400" in response.headers["Cache-Control"]
    assert "public" in response.headers["Cache-Control"]
    assert response.content.startswith(b"<svg")


# --------------------------------------------------------------------------- the command


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def config_file(stack: Stack, tmp_path: Path) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(dump_toml(stack.config("http://127.0.0.1:8000")))
    return path


def test_broker_explain_prints_the_decision(config_file: Path, tmp_path: Path) -> None:
    claims = tmp_path / "mallory.json"
    claims.write_text(json.dumps(MALLORY))
    done = _cli(
        "explain", "--config", str(config_file), "--provider", DEV_PROVIDER, "--claims", str(claims)
    )
    assert done.returncode == 3, done.stderr
    assert "rule 0 'admins-with-mfa': no match" in done.stdout
    assert "FAIL email_verified true (seen: false)" in done.stdout
    assert f"refused: no_matching_rule: {UNVERIFIED}" in done.stdout

    claims.write_text(json.dumps(ALICE))
    done = _cli(
        "explain",
        "--config",
        str(config_file),
        "--provider",
        DEV_PROVIDER,
        "--claims",
        str(claims),
        "--role-arn",
        USER_ROLE,
        "--json",
        env={"BROKER_VENV": "/somewhere/else"},
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["rule"], answer["role_arn"]) == ("admins-with-mfa", USER_ROLE)


@pytest.mark.parametrize(
    ("claims", "provider", "message"),
    [
        ("not json", DEV_PROVIDER, "cannot read claims"),
        ("[1]", DEV_PROVIDER, "must hold a JSON object"),
        ('{"email": "x"}', DEV_PROVIDER, "non-empty string 'sub'"),
        (json.dumps(ALICE), "nope", "unknown provider 'nope'"),
    ],
)
def test_broker_explain_refuses_bad_input(
    config_file: Path, tmp_path: Path, claims: str, provider: str, message: str
) -> None:
    path = tmp_path / "claims.json"
    path.write_text(claims)
    done = _cli(
        "explain", "--config", str(config_file), "--provider", provider, "--claims", str(path)
    )
    assert done.returncode == 1
    assert message in done.stderr
