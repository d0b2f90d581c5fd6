"""`broker serve` (gunicorn from Python) and the Procfile's plain gunicorn command on the
dev stack: they answer, their forked workers write the audit trail (the log writer
thread is restarted after fork), and every line either writes, gunicorn's own records
included (start, workers booting and exiting, a worker timeout, SIGTERM shutdown, access
lines), is one JSON object: never a ``--- Logging error ---`` traceback."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.devstack.processes import free_port
from broker.devstack.stack import DEV_PROVIDER, Stack, dump_toml
from broker.settings import WORKER_CLASSES
from tests.conftest import LiveBroker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line, parsed: a line that is not one JSON object fails the test."""
    assert "Logging error" not in text, text
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        assert isinstance(line, dict)
        assert {"time", "level", "logger", "message"} <= set(line), line
    return lines


def gunicorn_messages(lines: list[dict[str, Any]]) -> list[str]:
    return [str(line["message"]) for line in lines if line["logger"] == "gunicorn.error"]


def assert_gunicorn_lifecycle(lines: list[dict[str, Any]]) -> None:
    messages = gunicorn_messages(lines)
    for start in (
        "Starting gunicorn",
        "Listening at",
        "Booting worker with pid",
        "Handling signal: term",
        "Worker exiting",
        "Shutting down",
    ):
        assert any(message.startswith(start) for message in messages), (start, messages)


def booted_workers(stderr: Path) -> list[int]:
    prefix = "Booting worker with pid: "
    # Complete lines only: the server may be writing the last one right now.
    complete = stderr.read_text().rpartition("\n")[0]
    messages = gunicorn_messages(json_lines(complete))
    return [int(m.removeprefix(prefix)) for m in messages if m.startswith(prefix)]


def wait_until_ready(url: str, process: subprocess.Popen[bytes], stderr: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or a worker still booting on a busy machine
        assert process.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, stderr.read_text()
        time.sleep(0.2)


@pytest.mark.parametrize("worker_class", sorted(WORKER_CLASSES))
def test_broker_serve_answers_and_its_workers_write_the_audit_trail(
    stack: Stack, broker: LiveBroker, tmp_path: Path, worker_class: str
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = stack.config(url)
    config["server"]["worker_class"] = worker_class
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
            wait_until_ready(url, process, stderr)

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

    lines = json_lines(stderr.read_text())
    assert_gunicorn_lifecycle(lines)
    issued = [line for line in lines if line.get("event") == "credentials_issued"]
    assert len(issued) == 1
    assert issued[0]["access_key_id"] == key_id
    assert token not in stderr.read_text()
    assert response.json()["credentials"]["SecretAccessKey"] not in stderr.read_text()


@pytest.mark.parametrize("worker_class", sorted(WORKER_CLASSES))
def test_the_procfile_command_logs_json_lines_through_a_worker_timeout(
    stack: Stack, tmp_path: Path, worker_class: str
) -> None:
    """The Procfile's exact command (plain gunicorn: the broker configures logging only
    in the workers, so the master's records rely on the logger class), with a short
    worker timeout and the access log on, to see those records too."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = stack.config(url)
    config["redis"]["key_prefix"] = f"procfile-{secrets.token_hex(4)}:"
    config_path = tmp_path / "broker.toml"
    config_path.write_text(dump_toml(config))
    [web] = [
        line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:")
    ]
    command = shlex.split(web.removeprefix("web:"))
    assert command[0] == "gunicorn"
    env = {
        **os.environ,
        "BROKER_CONFIG": str(config_path),
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "1",
        "GUNICORN_THREADS": "2",
        "BROKER_SERVER__WORKER_CLASS": worker_class,
    }
    stderr = tmp_path / "stderr.log"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                *command[1:],
                "--timeout",
                "2",
                "--access-logfile",
                "-",
            ],
            cwd=ROOT,
            env=env,
            stdout=err,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_ready(url, process, stderr)
            response = requests.get(
                f"{url}/no-such-page?code=secret-query-value",
                headers={"X-Request-Id": "procfile-access"},
                timeout=10,
            )
            assert response.status_code == 404
            # Written by the worker's log thread: wait for it before the worker is
            # stopped and killed below, which would lose what it had not written yet.
            deadline = time.monotonic() + 10
            while "procfile-access" not in stderr.read_text():
                assert time.monotonic() < deadline, stderr.read_text()
                time.sleep(0.1)
            # A worker that stops answering the master's heartbeat is timed out,
            # killed and replaced: all of which gunicorn logs.
            [worker] = booted_workers(stderr)
            os.kill(worker, signal.SIGSTOP)
            deadline = time.monotonic() + 30
            while len(booted_workers(stderr)) < 2:
                assert time.monotonic() < deadline, stderr.read_text()
                time.sleep(0.2)
            wait_until_ready(url, process, stderr)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)

    lines = json_lines(stderr.read_text())
    assert_gunicorn_lifecycle(lines)
    messages = gunicorn_messages(lines)
    timeouts = [line for line in lines if line["message"] == f"WORKER TIMEOUT (pid:{worker})"]
    assert [line["level"] for line in timeouts] == ["critical"]
    assert any(m.startswith(f"Worker (pid:{worker}) was sent SIGKILL") for m in messages)
    [access] = [line for line in lines if line.get("request_id") == "procfile-access"]
    assert access["logger"] == "gunicorn.access"
    assert access["path"] == "/no-such-page"
    assert access["status"] == 404
    assert access["method"] == "GET"
    assert "secret-query-value" not in stderr.read_text()


def test_broker_serve_without_redis_says_so_and_readyz_names_the_address(
    stack: Stack, tmp_path: Path
) -> None:
    port, dead = free_port(), free_port()  # nothing listens on `dead`
    url = f"http://127.0.0.1:{port}"
    config = stack.config(url)
    config["redis"]["url"] = f"redis://127.0.0.1:{dead}/3"
    config["redis"]["password"] = "not-for-logs"
    config_path = tmp_path / "broker.toml"
    config_path.write_text(dump_toml(config))
    stderr = tmp_path / "stderr.log"
    argv = [sys.executable, "-m", "broker.cli", "serve", "--config", str(config_path)]
    argv += ["--bind", f"127.0.0.1:{port}", "--workers", "1"]
    with stderr.open("w") as err:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    ready = requests.get(f"{url}/readyz", timeout=5)
                    break
                except (requests.ConnectionError, requests.Timeout):
                    assert process.poll() is None, stderr.read_text()
                    assert time.monotonic() < deadline, stderr.read_text()
                    time.sleep(0.2)
            assert ready.status_code == 503
            assert ready.headers["Retry-After"]
            where = f"redis://127.0.0.1:{dead}/3"
            assert ready.json()["redis"].startswith(f"unavailable at {where}: ")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    text = stderr.read_text()
    assert "not-for-logs" not in text + ready.text
    warnings = [
        line
        for line in json_lines(text)
        if line["logger"] == "broker.serve" and line["level"] == "warning"
    ]
    assert len(warnings) == 1, text
    assert warnings[0]["message"].startswith(f"Redis at {where} does not answer (")
