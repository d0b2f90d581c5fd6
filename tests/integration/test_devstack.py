"""`broker dev` as a newcomer runs it: the whole stack in one process tree, every
`demo-login` variant from the README against it, and Ctrl-C leaving nothing running."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from broker.devstack.demo import demo_login
from broker.devstack.stack import DEMO_BUCKET, STATE_FILE, USER_ROLE

pytestmark = pytest.mark.integration

START_TIMEOUT = 60.0


def _port_open(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((parts.hostname or "127.0.0.1", parts.port or 80)) == 0


def _service_urls(state: dict[str, Any]) -> list[str]:
    return [
        state["broker_url"],
        state["issuer"],
        state["sts_url"],
        state["redis_url"],
        state["amazon_url"],
        state["facebook_url"],
        state["federation_url"],
    ]


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    workdir = tmp_path_factory.mktemp("dev")
    process = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "dev", "--port", "0", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state_path = workdir / STATE_FILE
    deadline = time.monotonic() + START_TIMEOUT
    while not state_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the dev stack did not start:\n{process.communicate()[0]}")
        time.sleep(0.2)
    try:
        yield process, workdir
    finally:
        if process.poll() is None:  # a test failed before Ctrl-C: stop it the same way
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


def _state(workdir: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((workdir / STATE_FILE).read_text())
    return state


def test_every_service_of_the_stack_answers(
    dev: tuple[subprocess.Popen[str], Path],
) -> None:
    state = _state(dev[1])
    assert all(_port_open(url) for url in _service_urls(state))
    ready = requests.get(f"{state['broker_url']}/readyz", timeout=5)
    assert ready.status_code == 200
    login_page = requests.get(f"{state['broker_url']}/login", timeout=5).text
    for provider in ("/login/demo", "/login/amazon", "/login/facebook"):
        assert provider in login_page


@pytest.mark.parametrize("provider", ["demo", "amazon", "facebook"])
def test_demo_login_gets_working_credentials_from_each_provider(
    dev: tuple[subprocess.Popen[str], Path], provider: str
) -> None:
    state = _state(dev[1])
    result = demo_login(user="bob", provider=provider, workdir=str(dev[1]))
    assert result["provider"] == provider
    assert result["role_arn"] == USER_ROLE
    creds = result["credentials"]
    s3 = boto3.client(
        "s3",
        endpoint_url=state["sts_url"],
        region_name="us-east-1",
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
        config=Config(retries={"max_attempts": 1}),
    )
    listed = s3.list_objects_v2(Bucket=DEMO_BUCKET)
    assert listed["ResponseMetadata"]["HTTPStatusCode"] == 200
    with pytest.raises(ClientError):
        s3.list_buckets()  # BrokerDemoUser may only touch the demo bucket


def test_demo_login_refuses_a_user_no_rule_admits(
    dev: tuple[subprocess.Popen[str], Path],
) -> None:
    with pytest.raises(RuntimeError, match=r"403.*no_matching_rule.*not verified at Demo"):
        demo_login(user="mallory", workdir=str(dev[1]))


def test_broker_explain_reads_the_config_the_dev_stack_wrote(
    dev: tuple[subprocess.Popen[str], Path], tmp_path: Path
) -> None:
    state = _state(dev[1])
    # The files the banner names, for this user's eyes only (the config holds dev keys).
    config = Path(state["config_file"])
    claims = config.with_name("bob.json")
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    for path in (config, claims):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert json.loads(claims.read_text())["sub"] == "bob"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "broker.cli", "explain", "--config", state["config_file"]),
            *("--provider", "demo", "--claims", str(claims), "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["rule"], answer["role_arn"]) == ("example-users", USER_ROLE)
    assert f"users/{answer['identity_id']}/*" in json.dumps(answer["session_policy"])


def test_demo_login_console_returns_a_signin_url_at_the_local_federation_endpoint(
    dev: tuple[subprocess.Popen[str], Path],
) -> None:
    state = _state(dev[1])
    result = demo_login(user="alice", console=True, workdir=str(dev[1]))
    assert result["url"].startswith(f"{state['federation_url']}?Action=login&")
    assert "SigninToken=" in result["url"]


def test_ctrl_c_stops_the_whole_stack(dev: tuple[subprocess.Popen[str], Path]) -> None:
    process, workdir = dev
    state = _state(workdir)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "stopped; nothing left running." in output
    assert not (workdir / STATE_FILE).exists()
    assert not (workdir / "broker.toml").exists()  # the dev keys do not outlive the stack
    assert not (workdir / "run").exists()  # nor do the processes' files (no --keep)
    assert not [u for u in ("alice", "bob", "carol", "mallory") if (workdir / f"{u}.json").exists()]
    assert not any(_port_open(url) for url in _service_urls(state))
    with pytest.raises(ProcessLookupError):
        os.kill(state["pid"], 0)
