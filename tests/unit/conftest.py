"""Fixtures the unit tests share: a real redis-server per module and a store on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.devstack.processes import ManagedProcess
from broker.store import Store
from tests.unit.oidc_fixtures import FakeClock, make_store, redis_process


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
