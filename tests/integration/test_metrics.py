"""Metrics and readiness on real processes.

* `broker serve` (real gunicorn, 2 workers) issues credentials through both workers;
  one scrape of /metrics (bearer token) and of the separate listener shows the sum of
  both workers' counts; the listener given only a port binds to loopback; the
  multiprocess directory broker serve made is gone after it stops.
* /readyz with the broker's redis-server killed: 503 naming Redis, promptly.
* /readyz with one provider's JWKS endpoint failing: 200 "degraded" naming that
  provider, credentials still issued for the other, and no fetch storm from probes;
  503 when the failing provider is the only one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from broker import metrics
from broker.devstack.processes import free_port
from broker.devstack.redis_server import start_redis
from broker.devstack.stack import DEV_PROVIDER, Stack, dump_toml
from broker.settings import settings_from_mapping
from tests.conftest import LiveBroker, serve

pytestmark = pytest.mark.integration

METRICS_TOKEN = secrets.token_urlsafe(32)
CREDENTIALS_200 = {"route": "/v1/credentials", "method": "POST", "status": "200"}


def scraped(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def per_worker_requests(directory: Path) -> dict[int, float]:
    """Credentials answered by each worker, read from its own counter file."""
    counts: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        merged = MultiProcessCollector.merge([str(path)], accumulate=False)  # type: ignore[no-untyped-call]
        for family in merged:
            for s in family.samples:
                if s.name == "broker_http_requests_total" and all(
                    s.labels.get(k) == v for k, v in CREDENTIALS_200.items()
                ):
                    counts[pid] = counts.get(pid, 0) + s.value
    return counts


def listening_addresses(port: int) -> set[str]:
    """Local addresses of listening TCP sockets on ``port`` (Linux /proc/net/tcp)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_serve_sums_every_workers_metrics_behind_the_token_and_the_listener(
    stack: Stack, broker: LiveBroker, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    config = stack.config(url)
    config["redis"]["key_prefix"] = f"metrics-{secrets.token_hex(4)}:"
    # A port only: the listener must then bind to loopback, never to every interface.
    config["metrics"] = {"token": METRICS_TOKEN, "listen": metrics_port}
    config_path = tmp_path / "broker.toml"
    config_path.write_text(dump_toml(config))
    stderr = tmp_path / "stderr.log"
    argv = [sys.executable, "-m", "broker.cli", "serve", "--config", str(config_path)]
    argv += ["--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "2"]
    with stderr.open("w") as err:
        process = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except (requests.ConnectionError, requests.Timeout):  # workers still booting
                    pass
                assert process.poll() is None, stderr.read_text()
                assert time.monotonic() < deadline, stderr.read_text()
                time.sleep(0.2)
            found = re.search(r"metrics: workers write to (\S+?)\"", stderr.read_text())
            assert found, stderr.read_text()
            directory = Path(found.group(1))

            # New connections each time, so gunicorn hands them to either worker; go on
            # until both have answered (each request is a fresh token: no replays).
            sent = 0
            tokens: list[str] = []
            while len([n for n in per_worker_requests(directory).values() if n]) < 2:
                assert sent < 40, per_worker_requests(directory)
                nonce = secrets.token_urlsafe(8)
                token = broker.id_token("bob", nonce=nonce)
                tokens.append(token)
                response = requests.post(
                    f"{url}/v1/credentials",
                    json={"provider": DEV_PROVIDER, "token": token, "nonce": nonce},
                    timeout=30,
                    headers={"Connection": "close"},
                )
                assert response.status_code == 200, response.text
                sent += 1
            workers = per_worker_requests(directory)
            assert sum(workers.values()) == sent

            # The token guard.
            metrics_url = f"{url}/metrics"
            assert requests.get(metrics_url, timeout=10).status_code == 401
            wrong = {"Authorization": f"Bearer {METRICS_TOKEN[:-1]}x"}
            assert requests.get(metrics_url, headers=wrong, timeout=10).status_code == 401
            right = {"Authorization": f"Bearer {METRICS_TOKEN}"}
            scrape = requests.get(metrics_url, headers=right, timeout=10)
            assert scrape.status_code == 200
            listener = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            assert listener.status_code == 200

            for text in (scrape.text, listener.text):
                # Whichever worker (or the master) answers, the counts are both workers'.
                assert scraped(text, "broker_http_requests_total", **CREDENTIALS_200) == sent
                assert (
                    scraped(
                        text, "broker_credentials_total", provider=DEV_PROVIDER, outcome="issued"
                    )
                    == sent
                )
                assert scraped(text, "broker_authentications_total", outcome="ok") == sent
                # One identity, one grant: one miss (one STS call), the rest cache hits.
                assert scraped(text, "broker_credential_cache_total", result="miss") == 1
                hits = scraped(text, "broker_credential_cache_total", result="memory")
                hits += scraped(text, "broker_credential_cache_total", result="redis")
                assert hits == sent - 1
                assert scraped(text, "broker_sts_request_duration_seconds_count") == 1
                assert scraped(text, "broker_upstream_request_duration_seconds_count") >= 1
                for token in tokens:
                    assert token not in text
                assert "bob" not in text
                assert "@" not in text

            assert listening_addresses(metrics_port) == {"0100007F"}  # 127.0.0.1 only
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)

    assert process.returncode == 0, stderr.read_text()
    assert not directory.exists()  # broker serve made it, broker serve removed it
    assert METRICS_TOKEN not in stderr.read_text()


def test_the_deploy_gunicorn_config_wires_the_same_metrics_hooks(
    stack: Stack, tmp_path: Path
) -> None:
    """`gunicorn -c deploy/gunicorn.conf.py` (the production start) gets the listener and
    the multiprocess directory from [metrics], as `broker serve` does."""
    port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    config = stack.config(url)
    config["redis"]["key_prefix"] = f"metrics-{secrets.token_hex(4)}:"
    config["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    config_path = tmp_path / "broker.toml"
    config_path.write_text(dump_toml(config))
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    (multiproc / "counter_1.db").write_bytes(b"left over from an earlier run")
    env = {
        # Only the variables set here: a developer's BROKER_* would override the config.
        **{k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
        "BROKER_CONFIG": str(config_path),
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "2",
        "GUNICORN_THREADS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),  # the operator's own directory
    }
    root = Path(__file__).resolve().parents[2]
    argv = [sys.executable, "-m", "gunicorn", "-c", str(root / "deploy" / "gunicorn.conf.py")]
    stderr = tmp_path / "stderr.log"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [*argv, "broker.wsgi:create_app()"],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            answered = 0
            deadline = time.monotonic() + 60
            while answered < 5:
                try:
                    if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                        answered += 1
                except (requests.ConnectionError, requests.Timeout):  # workers still booting
                    pass
                assert process.poll() is None, stderr.read_text()
                assert time.monotonic() < deadline, stderr.read_text()
                time.sleep(0.1)
            scrape = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            assert scrape.status_code == 200
            ready = scraped(scrape.text, "broker_http_requests_total", route="/readyz")
            assert ready >= answered
            assert not (multiproc / "counter_1.db").exists()  # emptied at start
            assert list(multiproc.glob("counter_*.db"))
            # No token configured: no /metrics route on the main port.
            assert requests.get(f"{url}/metrics", timeout=10).status_code == 404
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    assert multiproc.exists()  # the operator's directory is left in place


# --------------------------------------------------------------------------- readyz


def test_readyz_names_redis_when_its_server_is_killed(stack: Stack, tmp_path: Path) -> None:
    redis_proc = start_redis(tmp_path)
    try:
        port = free_port()
        config = stack.config(f"http://127.0.0.1:{port}")
        config["redis"].update(
            url=f"redis://127.0.0.1:{redis_proc.port}/0", socket_timeout_seconds=0.5
        )
        settings = settings_from_mapping(config, env={}, base_dir=Path.cwd(), source="test")
        with serve(settings, stack, port) as live:
            ready = requests.get(f"{live.url}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            assert ready.json()["redis"] == "ok"

            redis_proc.stop()

            started = time.monotonic()
            down = requests.get(f"{live.url}/readyz", timeout=10)
            elapsed = time.monotonic() - started
            assert down.status_code == 503
            # The broker's 503: the error shape and the store's Retry-After.
            assert down.headers["Retry-After"] == "2"
            body = down.json()
            assert body["error"] == "dependency_unavailable"
            assert body["request_id"] == down.headers["X-Request-Id"]
            assert body["status"] == "unavailable"
            assert body["redis"].startswith(f"unavailable at {settings.redis.target()}: ")
            assert "Redis" in body["redis"]
            assert set(body["providers"]) == {DEV_PROVIDER}
            assert elapsed < 3  # one ping bounded by the socket timeout, no IdP call
    finally:
        redis_proc.stop()


class FailingJWKS:
    """A JWKS endpoint that answers 500 and counts every request it gets."""

    def __init__(self) -> None:
        self.hits = 0
        self._lock = threading.Lock()
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/jwks"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def app(self, environ: dict[str, Any], start_response: Any) -> Any:
        Request(environ)
        with self._lock:
            self.hits += 1
        return Response("down", status=500)(environ, start_response)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def failing_jwks() -> Iterator[FailingJWKS]:
    endpoint = FailingJWKS()
    yield endpoint
    endpoint.stop()


BROKEN = {
    "type": "oidc",
    "issuer": "https://broken.example",
    "client_ids": ["app"],
    "timeout_seconds": 1,
}


def poll_readyz(url: str, until: Any, *, seconds: float = 20) -> requests.Response:
    deadline = time.monotonic() + seconds
    while True:
        started = time.monotonic()
        response = requests.get(f"{url}/readyz", timeout=10)
        assert time.monotonic() - started < 2, "readyz must never wait on an IdP"
        if until(response.json()) or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def test_readyz_names_a_provider_whose_keys_cannot_be_had(
    stack: Stack, failing_jwks: FailingJWKS, broker: LiveBroker
) -> None:
    port = free_port()
    config = stack.config(f"http://127.0.0.1:{port}")
    config["redis"]["key_prefix"] = f"test:{uuid.uuid4().hex[:8]}:"
    config["providers"]["broken"] = {**BROKEN, "jwks_url": failing_jwks.url}
    settings = settings_from_mapping(config, env={}, base_dir=Path.cwd(), source="test")
    with serve(settings, stack, port) as live:
        response = poll_readyz(
            live.url,
            lambda body: (
                body["providers"]["broken"].startswith("unavailable")
                and body["providers"][DEV_PROVIDER] == "ok"
            ),
        )
        body = response.json()
        assert response.status_code == 200, body
        assert body["status"] == "degraded"
        assert body["redis"] == "ok"
        assert body["providers"][DEV_PROVIDER] == "ok"
        assert body["providers"]["broken"].startswith("unavailable: broken JWKS endpoint")

        # Probes keep coming; the failing IdP sees one fetch (with its retries) per
        # backoff period, not one per probe.
        hits = failing_jwks.hits
        for _ in range(20):
            assert requests.get(f"{live.url}/readyz", timeout=10).status_code == 200
        assert failing_jwks.hits - hits <= 3

        # The other provider still works.
        nonce = secrets.token_urlsafe(8)
        token = broker.id_token("bob", nonce=nonce)
        issued = live.post(
            "/v1/credentials", {"provider": DEV_PROVIDER, "token": token, "nonce": nonce}
        )
        assert issued.status_code == 200, issued.text


def test_readyz_is_unavailable_when_no_provider_works(
    stack: Stack, failing_jwks: FailingJWKS
) -> None:
    port = free_port()
    config: dict[str, Any] = json.loads(json.dumps(stack.config(f"http://127.0.0.1:{port}")))
    config["redis"]["key_prefix"] = f"test:{uuid.uuid4().hex[:8]}:"
    config["providers"] = {"broken": {**BROKEN, "jwks_url": failing_jwks.url}}
    for rule in config["rules"]:
        rule["providers"] = ["broken"]
    settings = settings_from_mapping(config, env={}, base_dir=Path.cwd(), source="test")
    with serve(settings, stack, port) as live:
        response = poll_readyz(
            live.url, lambda body: body["providers"]["broken"].startswith("unavailable")
        )
        assert response.status_code == 503, response.text
        assert response.json()["status"] == "unavailable"
        assert response.json()["redis"] == "ok"


# --------------------------------------------------------------------------- in process


def counted(name: str, **labels: str) -> float:
    """Sum of this process's samples of ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for family in metrics.REGISTRY.collect()
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_a_replay_counts_as_a_request_an_issuance_and_a_replay_hit(broker: LiveBroker) -> None:
    nonce = secrets.token_urlsafe(8)
    body = {"provider": DEV_PROVIDER, "token": broker.id_token("bob", nonce=nonce), "nonce": nonce}
    requests_before = counted("broker_http_requests_total", **CREDENTIALS_200)
    issued_before = counted("broker_credentials_total", provider=DEV_PROVIDER, outcome="issued")
    hits_before = counted("broker_replay_hits_total")

    first = broker.post("/v1/credentials", body)
    broker.post("/v1/credentials", body)  # seen twice: kept for a replay
    again = broker.post("/v1/credentials", body)  # byte-identical: replayed

    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert counted("broker_replay_hits_total") == hits_before + 1
    assert counted("broker_http_requests_total", **CREDENTIALS_200) == requests_before + 3
    assert (
        counted("broker_credentials_total", provider=DEV_PROVIDER, outcome="issued")
        == issued_before + 3
    )


def test_console_sign_ins_and_denials_are_counted(broker: LiveBroker) -> None:
    signins = counted("broker_console_signins_total", provider=DEV_PROVIDER, outcome="ok")
    denied = counted(
        "broker_credentials_total",
        provider=DEV_PROVIDER,
        rule="none",
        role="none",
        outcome="no_matching_rule",
    )
    refused = counted("broker_authentications_total", provider="other", outcome="unknown_provider")

    nonce = secrets.token_urlsafe(8)
    token = broker.id_token("bob", nonce=nonce)
    console = broker.post(
        "/v1/console-url", {"provider": DEV_PROVIDER, "token": token, "nonce": nonce}
    )
    assert console.status_code == 200, console.text
    nonce = secrets.token_urlsafe(8)
    mallory = broker.id_token("mallory", nonce=nonce)  # unverified e-mail: no rule matches
    response = broker.post(
        "/v1/credentials", {"provider": DEV_PROVIDER, "token": mallory, "nonce": nonce}
    )
    assert response.status_code == 403
    # A provider name shaped like an e-mail is counted, as "other".
    odd = broker.post("/v1/credentials", {"provider": "mallory@example.com", "token": "x" * 20})
    assert odd.status_code == 400

    assert counted("broker_console_signins_total", provider=DEV_PROVIDER, outcome="ok") == (
        signins + 1
    )
    assert (
        counted(
            "broker_credentials_total",
            provider=DEV_PROVIDER,
            rule="none",
            role="none",
            outcome="no_matching_rule",
        )
        == denied + 1
    )
    assert (
        counted("broker_authentications_total", provider="other", outcome="unknown_provider")
        == refused + 1
    )
    values = {
        v
        for family in metrics.REGISTRY.collect()
        for s in family.samples
        for v in s.labels.values()
    }
    assert not [v for v in values if "@" in v or token in v or mallory in v]
