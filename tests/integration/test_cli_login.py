"""The AWS tools with zero glue: ``broker login`` (loopback and device), the profile
``broker configure`` writes, ``broker credential-process``, ``broker exec`` and the
container credentials endpoint, driven with the real ``broker`` and ``aws`` commands
and boto3 against the local stack (broker, redis-server, moto with IAM auth, the OIDC
provider). A ``requests.Session`` plays the person's browser.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit

import boto3
import pytest
import requests

from broker.client import files
from broker.devstack.processes import free_port
from broker.devstack.stack import ADMIN_ROLE, DEMO_BUCKET, USER_ROLE, Stack
from tests.conftest import LiveBroker, make_settings, serve
from tests.integration.test_sso_flow import WebClient, demo_sub

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
TIMEOUT = 60
HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


@pytest.fixture
def cli_broker(stack: Stack) -> Iterator[LiveBroker]:
    port = free_port()
    settings = make_settings(stack, f"http://127.0.0.1:{port}", cli={"device_poll_seconds": 1})
    with serve(settings, stack, port) as live:
        yield live


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A user's environment with no AWS credentials of its own."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BROKER_"))}
    (tmp_path / "aws").mkdir()
    base.update(
        PATH=f"{BIN}{os.pathsep}{base.get('PATH', '')}",
        HOME=str(tmp_path),
        BROKER_CLI_HOME=str(tmp_path / "broker-cli"),
        AWS_CONFIG_FILE=str(tmp_path / "aws" / "config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "aws" / "credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return base


def run(env: dict[str, str], *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if check:
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
    return result


def approve(web: WebClient, url: str, user: str) -> requests.Response:
    """What the person does in the browser: sign in if asked, then click Approve."""
    page = web.get(url)
    if page.status_code == 303:  # not signed in yet: through the provider and back
        start = web.get(page.headers["Location"])
        assert start.status_code == 302, start.text
        back = web.get(web.authorize(start.headers["Location"], demo_sub(user)))
        assert back.status_code == 303, back.text
        page = web.get(back.headers["Location"])
    assert page.status_code == 200, page.text
    form = dict(HIDDEN.findall(page.text))
    form["decision"] = "approve"
    action = urlsplit(url).path
    return web.post(action, data=form)


def read_until(stream: IO[str], pattern: str) -> re.Match[str]:
    seen = []
    for line in stream:
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"{pattern!r} not in {''.join(seen)!r}")


@contextmanager
def cli_process(cmd: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A ``broker`` command that waits on the person; killed if the test fails first."""
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def login_loopback(broker: LiveBroker, env: dict[str, str], user: str = "alice") -> None:
    cmd = ["broker", "login", "--broker", broker.url, "--no-browser", "--provider", "demo"]
    with cli_process(cmd, env) as proc:
        assert proc.stderr is not None
        url = read_until(proc.stderr, r"^\s+(http://\S+/cli/authorize\S+)").group(1)
        answer = approve(WebClient(broker), url, user)
        assert answer.status_code == 303
        loopback = answer.headers["Location"]
        assert loopback.startswith("http://127.0.0.1:")
        # The browser follows the redirect to the CLI's one-shot listener.
        assert requests.get(loopback, timeout=TIMEOUT).status_code == 200
        rest = proc.stderr.read()
        assert proc.wait(TIMEOUT) == 0, rest
    assert "Signed in" in rest


def aws(env: dict[str, str], broker: LiveBroker, *argv: str) -> dict[str, Any]:
    result = run(env, "aws", *argv, "--endpoint-url", broker.stack.moto.url, "--output", "json")
    out: dict[str, Any] = json.loads(result.stdout or "{}")
    return out


# ---------------------------------------------------------------------- people


def test_login_configure_and_the_aws_cli_just_work(
    cli_broker: LiveBroker, env: dict[str, str]
) -> None:
    login_loopback(cli_broker, env)
    session_file = next((Path(env["BROKER_CLI_HOME"]) / "sessions").glob("*.json"))
    assert oct(session_file.stat().st_mode & 0o777) == "0o600"
    assert oct(session_file.parent.stat().st_mode & 0o777) == "0o700"

    args = ["--broker", cli_broker.url, "--role-arn", ADMIN_ROLE, "--region", "eu-west-1"]
    run(env, "broker", "configure", "--profile", "work", *args)
    printed = run(env, "broker", "configure", "--profile", "work", *args).stderr  # idempotent
    config = Path(env["AWS_CONFIG_FILE"]).read_text()
    assert config.count("[profile work]") == 1
    assert "region = eu-west-1" in config
    # The dev stack's STS is in the profile, so the line configure prints works as is.
    assert f"endpoint_url = {cli_broker.stack.moto.url}" in config
    try_line = next(line for line in printed.splitlines() if line.startswith("try: "))
    who = json.loads(run(env, *shlex.split(try_line.removeprefix("try: "))).stdout)
    assert "assumed-role/BrokerDemoAdmin/alice@example.com" in who["Arn"]

    who = aws(env, cli_broker, "sts", "get-caller-identity", "--profile", "work")
    assert "assumed-role/BrokerDemoAdmin/alice@example.com" in who["Arn"]
    key = f"cli-check-{secrets.token_hex(4)}.txt"
    bucket = ("--bucket", DEMO_BUCKET, "--profile", "work")
    aws(env, cli_broker, "s3api", "put-object", *bucket, "--key", key)
    listing = aws(env, cli_broker, "s3api", "list-objects-v2", *bucket)
    assert key in {item["Key"] for item in listing["Contents"]}


def test_login_with_an_unknown_provider_fails_at_once(
    cli_broker: LiveBroker, env: dict[str, str]
) -> None:
    cmd = ["broker", "login", "--broker", cli_broker.url, "--no-browser", "--provider"]
    started = time.monotonic()
    done = run(env, *cmd, "gogle", check=False)
    assert done.returncode != 0
    assert time.monotonic() - started < 30  # not the 600 s wait for a browser
    assert "has no provider 'gogle'; sign in with one of: demo" in done.stderr
    assert "/cli/authorize" not in done.stderr  # no address to a page that only refuses
    assert "Traceback" not in done.stderr


def test_the_providers_list_says_which_take_a_browser(cli_broker: LiveBroker) -> None:
    answer = requests.get(f"{cli_broker.url}/v1/providers", timeout=10)
    assert answer.status_code == 200
    listed = {p["name"]: p for p in answer.json()["providers"]}
    assert listed["demo"]["browser_sign_in"] is True
    assert set(listed) == set(cli_broker.settings.providers)


def test_configure_refuses_what_is_not_a_role_or_not_this_persons(
    cli_broker: LiveBroker, env: dict[str, str]
) -> None:
    base = ["broker", "configure", "--profile", "p", "--broker", cli_broker.url]
    base += ["--region", "us-east-1", "--role-arn"]
    not_arn = run(env, *base, "BrokerDemoUser", check=False)
    assert not_arn.returncode == 2
    assert "'BrokerDemoUser' is not a role ARN" in not_arn.stderr
    login_loopback(cli_broker, env, user="bob")
    foreign = run(env, *base, ADMIN_ROLE, check=False)
    assert foreign.returncode == 2
    assert f"you may not use {ADMIN_ROLE}" in foreign.stderr
    assert USER_ROLE in foreign.stderr  # what bob may choose
    assert not Path(env["AWS_CONFIG_FILE"]).exists()
    assert "Traceback" not in not_arn.stderr + foreign.stderr


def test_credential_process_caches_renews_and_explains(
    cli_broker: LiveBroker, env: dict[str, str]
) -> None:
    login_loopback(cli_broker, env)
    cmd = ["broker", "credential-process", "--broker", cli_broker.url, "--role-arn", ADMIN_ROLE]
    first = json.loads(run(env, *cmd).stdout)
    assert set(first) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}

    # Served from the cache: works even with the broker's session gone server-side.
    cache = next((Path(env["BROKER_CLI_HOME"]) / "credentials").glob("*.json"))
    assert json.loads(run(env, *cmd).stdout) == first

    # Time passes: fetched an hour ago, the cached credentials are about to expire, so
    # they are renewed.
    entry = json.loads(cache.read_text())
    soon = datetime.now(UTC) + timedelta(seconds=60)
    entry["credentials"]["Expiration"] = soon.strftime("%Y-%m-%dT%H:%M:%SZ")
    entry["fetched_at"] = soon.timestamp() - 3600
    files.write_private(cache, entry)
    renewed = json.loads(run(env, *cmd).stdout)
    assert renewed["Expiration"] == first["Expiration"] != entry["credentials"]["Expiration"]

    # A role the rules do not allow: the broker's reason, on stderr.
    refused = run(
        env,
        "broker",
        "credential-process",
        "--broker",
        cli_broker.url,
        "--role-arn",
        "arn:aws:iam::123456789012:role/Nope",
        check=False,
    )
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert "role_not_allowed" in refused.stderr

    # Signed out: no cache, no session, and the message says what to run.
    run(env, "broker", "logout", "--broker", cli_broker.url)
    gone = run(env, *cmd, check=False)
    assert gone.returncode == 1
    assert gone.stdout == ""
    assert f"broker login --broker {cli_broker.url}" in gone.stderr


def test_a_session_revoked_at_the_broker_is_reported(
    cli_broker: LiveBroker, env: dict[str, str]
) -> None:
    login_loopback(cli_broker, env)
    token = json.loads(
        next((Path(env["BROKER_CLI_HOME"]) / "sessions").glob("*.json")).read_text()
    )["session_token"]
    revoked = requests.post(
        f"{cli_broker.url}/v1/cli/logout",
        headers={"Authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    )
    assert revoked.status_code == 200
    result = run(env, "broker", "credential-process", "--broker", cli_broker.url, check=False)
    assert result.returncode == 1
    assert "ended or was revoked" in result.stderr
    assert f"broker login --broker {cli_broker.url}" in result.stderr
    assert token not in result.stderr


def test_device_login(cli_broker: LiveBroker, env: dict[str, str]) -> None:
    cmd = ["broker", "login", "--broker", cli_broker.url, "--device", "--provider", "demo"]
    with cli_process(cmd, env) as proc:
        assert proc.stderr is not None
        url = read_until(proc.stderr, r"or open (http://\S+/device\?\S+)").group(1)
        done = approve(WebClient(cli_broker), url, "bob")
        assert done.status_code == 200
        assert 'id="device-done"' in done.text
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read()
    result = run(env, "broker", "credential-process", "--broker", cli_broker.url)
    assert json.loads(result.stdout)["AccessKeyId"]


def test_broker_exec_gives_only_its_child_credentials(
    cli_broker: LiveBroker, env: dict[str, str]
) -> None:
    login_loopback(cli_broker, env)
    child = (
        "import os, json, urllib.request, urllib.error\n"
        "url = os.environ['AWS_CONTAINER_CREDENTIALS_FULL_URI']\n"
        "try:\n"
        "    urllib.request.urlopen(url, timeout=10)\n"
        "    print('open')\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
    )
    # The user's own files name other credentials, which the SDKs would ask before the
    # container endpoint: exec must keep them from the child.
    Path(env["AWS_SHARED_CREDENTIALS_FILE"]).write_text(
        "[default]\naws_access_key_id = AKIDSTATIC\naws_secret_access_key = static\n"
    )
    Path(env["AWS_CONFIG_FILE"]).write_text("[default]\nregion = eu-west-1\n")
    base = ["broker", "exec", "--broker", cli_broker.url, "--role-arn", USER_ROLE, "--"]
    assert run(env, *base, sys.executable, "-c", child).stdout.strip() == "401"
    who = run(
        env, *base, "aws", "sts", "get-caller-identity", "--endpoint-url", cli_broker.stack.moto.url
    )
    assert "assumed-role/BrokerDemoUser/alice@example.com" in who.stdout
    failing = run(env, *base, sys.executable, "-c", "raise SystemExit(7)", check=False)
    assert failing.returncode == 7
    # The region came from the user's config; a signal death is 128 + the signal.
    region = "import os; print(os.environ['AWS_REGION'])"
    no_env_region = {k: v for k, v in env.items() if k != "AWS_DEFAULT_REGION"}
    assert run(no_env_region, *base, sys.executable, "-c", region).stdout.strip() == "eu-west-1"
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    assert run(env, *base, sys.executable, "-c", killed, check=False).returncode == 128 + 15
    # No command, an unknown one: exit codes a shell uses, one line on stderr.
    missing = run(env, *base, "no-such-command-xyz", check=False)
    assert missing.returncode == 127
    assert "broker exec: command not found" in missing.stderr


# ---------------------------------------------------------------------- workloads


def container_uri(broker: LiveBroker, **query: str) -> str:
    params = "&".join(f"{k}={quote(v)}" for k, v in query.items())
    return f"{broker.url}/v1/container-credentials/demo" + (f"?{params}" if params else "")


def test_the_aws_cli_reads_the_container_endpoint_with_a_token_file(
    cli_broker: LiveBroker, env: dict[str, str], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(cli_broker.id_token("alice"))
    env = {
        **env,
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": container_uri(cli_broker, role_arn=ADMIN_ROLE),
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
    }
    who = aws(env, cli_broker, "sts", "get-caller-identity")
    assert "assumed-role/BrokerDemoAdmin/alice@example.com" in who["Arn"]
    aws(env, cli_broker, "s3api", "list-objects-v2", "--bucket", DEMO_BUCKET)


def test_boto3_refreshes_by_itself_and_rereads_the_token_file(
    cli_broker: LiveBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(cli_broker.id_token("alice"))
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    # 900 s credentials sit inside botocore's 15-minute refresh window: it fetches
    # again before each call, re-reading the token file each time.
    monkeypatch.setenv(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        container_uri(cli_broker, role_arn=USER_ROLE, duration_seconds="900"),
    )
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    sts = boto3.session.Session(region_name="us-east-1").client(
        "sts", endpoint_url=cli_broker.stack.moto.url
    )
    assert sts.get_caller_identity()["Arn"].endswith("/alice@example.com")
    token_file.write_text(cli_broker.id_token("bob"))  # the token was rotated on disk
    assert sts.get_caller_identity()["Arn"].endswith("/bob@example.com")


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/v1/container-credentials/nope", {"Authorization": "x"}, 400, "unknown_provider"),
        ("/v1/container-credentials/demo", {}, 401, "invalid_token"),
        ("/v1/container-credentials/demo", {"Authorization": "Bearer "}, 401, "invalid_token"),
        ("/v1/container-credentials/demo", {"Authorization": "not-a-jwt"}, 401, "invalid_token"),
        ("/v1/container-credentials/demo?role=x", {"Authorization": "t"}, 400, "invalid_request"),
        (
            "/v1/container-credentials/demo?duration_seconds=-5",
            {"Authorization": "t"},
            400,
            "invalid_request",
        ),
    ],
)
def test_container_endpoint_refusals(
    cli_broker: LiveBroker, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    r = requests.get(cli_broker.url + path, headers=headers, timeout=TIMEOUT)
    assert (r.status_code, r.json()["error"]) == (status, code), r.text
    assert r.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("role_arn", "status", "code"),
    [("arn:aws:iam::123456789012:role/Nope", 403, "role_not_allowed")],
)
def test_container_endpoint_applies_the_rules(
    cli_broker: LiveBroker, role_arn: str, status: int, code: str
) -> None:
    r = requests.get(
        container_uri(cli_broker, role_arn=role_arn),
        headers={"Authorization": f"Bearer {cli_broker.id_token('bob')}"},
        timeout=TIMEOUT,
    )
    assert (r.status_code, r.json()["error"]) == (status, code)


def test_container_endpoint_answers_the_aws_format(cli_broker: LiveBroker) -> None:
    r = requests.get(
        container_uri(cli_broker, role_arn=USER_ROLE),
        headers={"Authorization": cli_broker.id_token("bob")},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "RoleArn"}
    assert body["RoleArn"] == USER_ROLE
    assert r.headers["Cache-Control"] == "no-store"


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "Authorization: Bearer"),
        ({"Authorization": "Bearer " + "A" * 43}, "ended or was revoked"),
        ({"Authorization": "Basic abc"}, "Authorization: Bearer"),
        ({"Authorization": "Bearer ../../etc"}, "ended or was revoked"),
    ],
)
def test_cli_session_routes_need_a_live_session(
    cli_broker: LiveBroker, headers: dict[str, str], message: str
) -> None:
    for method, path in (
        ("GET", "/v1/cli/session"),
        ("POST", "/v1/cli/credentials"),
        ("POST", "/v1/cli/logout"),
    ):
        r = requests.request(
            method, cli_broker.url + path, headers=headers, json={}, timeout=TIMEOUT
        )
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "unauthenticated"
        assert message in r.json()["message"]


@pytest.mark.parametrize(
    "query",
    [
        "redirect_uri=http%3A%2F%2Fevil.example%3A80%2F&code_challenge="
        + "a" * 43
        + "&code_challenge_method=S256&state=s",
        "redirect_uri=http%3A%2F%2F127.0.0.1%3A80%2F&code_challenge="
        + "a" * 43
        + "&code_challenge_method=plain&state=s",
        "redirect_uri=http%3A%2F%2F127.0.0.1%3A80%2F&code_challenge="
        + "a" * 43
        + "&code_challenge_method=S256",
    ],
)
def test_cli_authorize_never_redirects_to_an_unchecked_place(
    cli_broker: LiveBroker, query: str
) -> None:
    r = requests.get(
        f"{cli_broker.url}/cli/authorize?{query}", allow_redirects=False, timeout=TIMEOUT
    )
    assert r.status_code == 400
    assert "Location" not in r.headers
    assert "text/html" in r.headers["Content-Type"]


def test_an_unknown_provider_is_refused_up_front(cli_broker: LiveBroker) -> None:
    r = requests.post(
        f"{cli_broker.url}/v1/cli/device", json={"provider": "nosuch"}, timeout=TIMEOUT
    )
    assert (r.status_code, r.json()["error"]) == (400, "unknown_provider")
    page = requests.get(
        f"{cli_broker.url}/cli/authorize?redirect_uri=http%3A%2F%2F127.0.0.1%3A9%2F"
        f"&code_challenge={'a' * 43}&code_challenge_method=S256&state=s&provider=nosuch",
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert page.status_code == 400
    assert "Location" not in page.headers


def test_the_approval_page_lets_its_form_reach_the_loopback_only(cli_broker: LiveBroker) -> None:
    web = WebClient(cli_broker)
    web.login("alice")
    page = web.get(
        "/cli/authorize?redirect_uri=http%3A%2F%2F127.0.0.1%3A4567%2Fcallback"
        f"&code_challenge={'a' * 43}&code_challenge_method=S256&state=s"
    )
    assert page.status_code == 200
    policy = page.headers["Content-Security-Policy"]
    form_action = next(p for p in policy.split("; ") if p.startswith("form-action"))
    # Chromium applies form-action to the redirect after Approve: the listener's origin
    # must be allowed, and no other loopback port.
    assert "http://127.0.0.1:4567" in form_action.split()
    assert "http://127.0.0.1:*" not in form_action


def test_token_endpoint_refusals(cli_broker: LiveBroker) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({}, 400, "invalid_request"),
        ({"grant_type": "password"}, 400, "invalid_request"),
        (
            {
                "grant_type": "authorization_code",
                "code": "x",
                "code_verifier": "v" * 43,
                "redirect_uri": "http://127.0.0.1:1/",
            },
            400,
            "invalid_grant",
        ),
        (
            {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": "d" * 43},
            400,
            "expired_token",
        ),
        ({"grant_type": "authorization_code", "extra": 1}, 400, "invalid_request"),
    ]
    for body, status, code in cases:
        r = requests.post(f"{cli_broker.url}/v1/cli/token", json=body, timeout=TIMEOUT)
        assert (r.status_code, r.json()["error"]) == (status, code), (body, r.text)


ADMIN_TOKEN = "operator-" + "x" * 40


@pytest.fixture
def admin_broker(stack: Stack) -> Iterator[LiveBroker]:
    port = free_port()
    settings = make_settings(stack, f"http://127.0.0.1:{port}", admin={"token": ADMIN_TOKEN})
    with serve(settings, stack, port) as live:
        yield live


def test_an_operator_revokes_every_cli_session_of_an_identity(
    admin_broker: LiveBroker, env: dict[str, str]
) -> None:
    login_loopback(admin_broker, env)
    session = json.loads(
        next((Path(env["BROKER_CLI_HOME"]) / "sessions").glob("*.json")).read_text()
    )
    url = f"{admin_broker.url}/v1/cli/revoke"
    body = {"identity_id": session["identity_id"]}
    for headers, status in (
        ({}, 401),
        ({"Authorization": "Bearer wrong-token"}, 401),
        ({"Authorization": f"Bearer {session['session_token']}"}, 401),
    ):
        r = requests.post(url, json=body, headers=headers, timeout=TIMEOUT)
        assert r.status_code == status, r.text
    r = requests.post(
        url, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=TIMEOUT
    )
    assert r.json() == {"identity_id": session["identity_id"], "revoked_sessions": 1}
    result = run(env, "broker", "credential-process", "--broker", admin_broker.url, check=False)
    assert result.returncode == 1
    assert "ended or was revoked" in result.stderr


def test_revoking_is_off_without_an_admin_token(cli_broker: LiveBroker) -> None:
    r = requests.post(
        f"{cli_broker.url}/v1/cli/revoke",
        json={"identity_id": "us-east-1:x"},
        headers={"Authorization": "Bearer anything"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 404
