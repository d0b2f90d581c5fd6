"""Shared fixtures: one real local stack per test session (redis-server, moto with IAM
auth on, the OIDC provider), and a live broker on a real socket per test; and the
hypothesis profiles the property-based (fuzz) tests run under."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, settings
from werkzeug.serving import BaseWSGIServer, make_server

from broker.app import create_app
from broker.devstack.processes import free_port
from broker.devstack.redis_server import start_redis
from broker.devstack.stack import DEV_CLIENT_ID, Stack, local_stack
from broker.services import Services
from broker.settings import Settings, settings_from_mapping
from tests.redis_ha import Cluster, RedisTarget, cluster_target, running_cluster, standalone_target

# Property-based tests run in the normal suite, so they must be bounded and repeatable:
# derandomize makes every run (a developer's, CI's) try the same examples, and keeps no
# example database. "ci" (the default) bounds each test to 100 examples, no deadline
# (a loaded 2-core machine must not turn slowness into failures); "deep" is for a long
# hunt by hand: HYPOTHESIS_PROFILE=deep python3 run.py test tests/ -k fuzz.
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "deep",
    parent=settings.get_profile("ci"),
    max_examples=5_000,
    derandomize=False,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real 3-master Cluster with a replica each, started once for the session."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def redis_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisTarget]:
    """The Redis a contract test runs against: each test runs once on a standalone
    redis-server and once on a Cluster (Store, credentials, singleflight, sessions)."""
    if request.param == "cluster":
        yield cluster_target(request.getfixturevalue("redis_cluster"))
        return
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield standalone_target(server.port)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with local_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


@dataclass
class LiveBroker:
    url: str
    settings: Settings
    services: Services
    stack: Stack

    def post(self, path: str, body: Any, **kwargs: Any) -> requests.Response:
        return requests.post(f"{self.url}{path}", json=body, timeout=30, **kwargs)

    def id_token(self, subject: str, *, nonce: str | None = None) -> str:
        from broker.devstack.oidc_login import login

        return login(
            self.stack.oidc.url, subject=subject, client_id=DEV_CLIENT_ID, nonce=nonce
        ).id_token


def config_for(stack: Stack, url: str, **overrides: Any) -> dict[str, Any]:
    """The dev configuration for a broker at ``url``: a table in ``overrides`` updates
    that section key by key, anything else replaces it."""
    config = stack.config(url)
    # A fresh key prefix per test keeps tests independent on the shared Redis.
    config["redis"]["key_prefix"] = f"test:{uuid.uuid4().hex[:8]}:"
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    return config


def make_settings(stack: Stack, url: str, **overrides: Any) -> Settings:
    config = config_for(stack, url, **overrides)
    return settings_from_mapping(config, env={}, base_dir=Path.cwd(), source="test")


@contextlib.contextmanager
def serve(settings: Settings, stack: Stack, port: int) -> Iterator[LiveBroker]:
    services = Services.build(settings)
    app = create_app(services=services)
    server: BaseWSGIServer = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield LiveBroker(
            url=f"http://127.0.0.1:{port}", settings=settings, services=services, stack=stack
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        services.close()


@pytest.fixture
def broker(stack: Stack) -> Iterator[LiveBroker]:
    port = free_port()
    with serve(make_settings(stack, f"http://127.0.0.1:{port}"), stack, port) as live:
        yield live
