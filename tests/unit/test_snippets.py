"""The credentials page's ready-to-paste text: every form names the region, the CLI way
is offered, and nothing in it can do more than set a variable."""

from __future__ import annotations

import configparser
import shlex
from datetime import UTC, datetime

import pytest

from broker.identity import Identity, VerifiedClaims, VerifiedToken
from broker.rules import Grant
from broker.services import Issued
from broker.sts import IssuedCredentials
from broker.web.sso import snippets

ROLE = "arn:aws:iam::123456789012:role/App-User"


def issued(secret: str = "se/cr+et") -> Issued:
    verified = VerifiedToken(
        provider="google",
        subject="s",
        claims=VerifiedClaims({}),
        token="t",
        sts_provider_id=None,
        expires_at=2_000_000_000,
    )
    return Issued(
        identity=Identity(identity_id="us-east-1:x", verified=verified),
        grant=Grant(
            rule="r", role_arn=ROLE, duration_seconds=3600, session_policy=None, policy_arns=()
        ),
        credentials=IssuedCredentials(
            access_key_id="ASIAEXAMPLE",
            secret_access_key=secret,
            session_token="to'ken",
            expiration=datetime(2030, 1, 1, tzinfo=UTC),
            assumed_role_arn="arn:aws:sts::123456789012:assumed-role/App-User/s",
            assumed_role_id="AROA:s",
        ),
    )


@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:5000", "https://sts.amazonaws.com"])
def test_every_snippet_names_the_region(endpoint: str | None) -> None:
    out = snippets(
        issued(), region="eu-west-1", broker_url="https://broker.example", sts_endpoint=endpoint
    )
    assert "export AWS_REGION=eu-west-1" in out["sh"]
    assert "$Env:AWS_REGION = 'eu-west-1'" in out["powershell"]
    parsed = configparser.ConfigParser()
    parsed.read_string(out["profile"])
    assert parsed["profile App-User"]["region"] == "eu-west-1"
    assert "--region eu-west-1" in out["cli"]
    # Only a loopback (dev stack) endpoint is ever written into a snippet.
    assert ("endpoint_url" in out["profile"]) is (endpoint == "http://127.0.0.1:5000")


def test_the_cli_snippet_is_runnable_commands() -> None:
    out = snippets(issued(), region="us-east-1", broker_url="https://broker.example")
    lines = [line for line in out["cli"].splitlines() if not line.startswith("#")]
    commands = [shlex.split(line) for line in lines]
    assert commands[0] == ["broker", "login", "--broker", "https://broker.example"]
    assert commands[1][:2] == ["broker", "configure"]
    assert commands[1][commands[1].index("--role-arn") + 1] == ROLE
    assert commands[2][:3] == ["aws", "sts", "get-caller-identity"]


def test_shell_values_are_quoted() -> None:
    out = snippets(issued("a$(rm -rf ~)'b"), region="us-east-1", broker_url="https://b.example")
    line = next(x for x in out["sh"].splitlines() if "SECRET" in x)
    assert shlex.split(line) == ["export", "AWS_SECRET_ACCESS_KEY=a$(rm -rf ~)'b"]
    assert "$Env:AWS_SESSION_TOKEN = 'to''ken'" in out["powershell"]


def test_the_profile_has_no_inline_comment() -> None:
    # botocore reads `key = value  # note` as the value "value  # note" (a broken port in
    # endpoint_url); only whole-line comments are safe in ~/.aws/config.
    out = snippets(
        issued(),
        region="us-east-1",
        broker_url="http://127.0.0.1:8000",
        sts_endpoint="http://127.0.0.1:5000",
    )
    for line in out["profile"].splitlines():
        assert line.startswith("#") or "#" not in line, line
    assert "endpoint_url = http://127.0.0.1:5000" in out["profile"].splitlines()


def test_the_shell_snippets_set_both_region_variables() -> None:
    out = snippets(issued(), region="eu-west-1", broker_url="https://b.example")
    assert "export AWS_DEFAULT_REGION=eu-west-1" in out["sh"]
    assert "$Env:AWS_DEFAULT_REGION = 'eu-west-1'" in out["powershell"]
