"""Fixtures the unit tests share: a real redis-server per module and a store on it, a
fake clock, a local identity provider per module, and HTTP clients for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.devstack.processes import ManagedProcess
from broker.http import Http
from broker.store import Store
from tests.unit.oidc_fixtures import FakeClock, FakeIdP, make_store, redis_process


@pytest.fixture(scope="module")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    yield from redis_process(tmp_path_factory)


@pytest.fixture
def store(redis_proc: ManagedProcess) -> Iterator[Store]:
    store, client = make_store(redis_proc.port)
    yield store
    client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def idp_server() -> Iterator[FakeIdP]:
    """A local OIDC provider (JWKS, discovery) for the module; tests reset it."""
    server = FakeIdP()
    yield server
    server.close()


@pytest.fixture
def http() -> Iterator[Http]:
    """No retries: each failure is one request, so request counts are exact."""
    client = Http(retries=0)
    yield client
    client.close()


@pytest.fixture
def production_http() -> Iterator[Http]:
    """The production retry budget (2 retries), with a short backoff for quick tests."""
    client = Http(retries=2, backoff_seconds=0.01)
    yield client
    client.close()
