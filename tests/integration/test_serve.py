"""`broker serve` (gunicorn from Python) on the dev stack: it answers, and its forked
workers write the audit trail (the log writer thread is restarted after fork)."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from broker.devstack.processes import free_port
from broker.devstack.stack import DEV_PROVIDER, Stack, dump_toml
from tests.conftest import LiveBroker

pytestmark = pytest.mark.integration


def test_broker_serve_answers_and_its_workers_write_the_audit_trail(
    stack: Stack, broker: LiveBroker, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = stack.config(url)
    config["redis"]["key_prefix"] = f"serve-{secrets.token_hex(4)}:"
    config_path = tmp_path / "broker.toml"
    config_path.write_text(dump_toml(config))
    stderr = tmp_path / "stderr.log"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker.cli",
                "serve",
                "--config",
                str(config_path),
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "2",
                "--threads",
                "2",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert process.poll() is None, stderr.read_text()
                assert time.monotonic() < deadline, stderr.read_text()
                time.sleep(0.2)

            nonce = secrets.token_urlsafe(8)
            token = broker.id_token("bob", nonce=nonce)
            response = requests.post(
                f"{url}/v1/credentials",
                json={"provider": DEV_PROVIDER, "token": token, "nonce": nonce},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            key_id = response.json()["credentials"]["AccessKeyId"]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)

    lines = [json.loads(line) for line in stderr.read_text().splitlines() if line.startswith("{")]
    issued = [line for line in lines if line.get("event") == "credentials_issued"]
    assert len(issued) == 1
    assert issued[0]["access_key_id"] == key_id
    assert token not in stderr.read_text()
    assert response.json()["credentials"]["SecretAccessKey"] not in stderr.read_text()
