"""Redis high availability on real processes: TLS and ACL credentials on every
topology, and a live broker riding through a Sentinel failover under load.

The topologies come from ``tests.redis_ha`` (real redis-server and redis-sentinel
processes on loopback). Sentinel declares a master down after ``DOWN_AFTER_MS`` (1 s
here) and fails over within a few seconds; the broker must follow the promotion without
a restart, answer 503 with Retry-After during the gap (never a 500, never a 401 for a
session that exists), and lose no session that had reached the replica.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from redis.crc import key_slot

from broker.devstack.processes import free_port
from broker.devstack.stack import DEV_PROVIDER, Stack, dump_toml
from broker.errors import StoreUnavailable
from broker.services import Services
from broker.sessions import SessionStore, cookie_name
from broker.settings import (
    ConfigError,
    RedisSettings,
    WebSettings,
    redis_settings_from_mapping,
    settings_from_mapping,
)
from broker.store import RedisGuard, Sealer, Store, connect, hash_tag
from tests.conftest import LiveBroker, make_settings, serve
from tests.integration.test_serve import wait_until_ready
from tests.redis_ha import (
    PASSWORD,
    Cluster,
    RedisTarget,
    Security,
    SentinelGroup,
    close_clients,
    command,
    make_tls_files,
    running_cluster,
    running_sentinel_group,
    start_node,
    tls_redis_binary,
)

pytestmark = pytest.mark.integration

SEALER = Sealer([os.urandom(32)])


# --------------------------------------------------------------------------- TLS + ACL


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Security:
    """Mutual TLS with a throwaway CA, and an ACL user (the default user is off)."""
    workdir = tmp_path_factory.mktemp("tls")
    return Security(
        tls=make_tls_files(workdir / "certs"), acl=True, binary=tls_redis_binary(workdir / "bin")
    )


@contextlib.contextmanager
def secure_topology(kind: str, workdir: Path, security: Security) -> Iterator[dict[str, Any]]:
    """A running ``kind`` topology; yields its [redis] section (password aside)."""
    if kind == "standalone":
        node = start_node(workdir, security)
        try:
            yield {"url": f"rediss://127.0.0.1:{node.port}/0", **security.settings()}
        finally:
            node.stop()
    elif kind == "cluster":
        with running_cluster(workdir, security, replicas=False) as cluster:
            yield cluster.settings()
    else:
        with running_sentinel_group(workdir, security) as group:
            yield group.settings()


# How a wrong client setting must fail: a clean StoreUnavailable (a 503), never in.
WRONG: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("wrong password", {"password": "not-the-password"}, ()),
    ("unknown user", {"username": "mallory"}, ()),
    ("no client certificate", {}, ("tls_cert_path", "tls_key_path")),
    ("server certificate not trusted (system CAs only)", {}, ("tls_ca_path",)),
]
SENTINEL_WRONG: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("wrong sentinel password", {"sentinel_password": "not-the-password"}, ()),
    ("no sentinel password", {}, ("sentinel_password",)),
]


@pytest.mark.parametrize("kind", ["standalone", "sentinel", "cluster"])
def test_tls_and_acl_credentials_reach_every_topology(
    kind: str, secure: Security, tmp_path: Path
) -> None:
    with secure_topology(kind, tmp_path / "redis", secure) as section:
        # The password comes from a secret file, as an orchestrator mounts it.
        (tmp_path / "redis-password").write_text(PASSWORD + "\n")
        good = {k: v for k, v in section.items() if k != "password"}
        good.update(password_file="redis-password", key_prefix="tls:", socket_timeout_seconds=2)
        settings = redis_settings_from_mapping(good, base_dir=tmp_path)
        assert settings.tls
        assert settings.password == PASSWORD
        assert PASSWORD not in repr(settings)

        client = connect(settings)
        try:
            store = Store(client=client, prefix="tls:", sealer=SEALER)
            assert store.ping()
            key = store.key("session", "abc")
            store.set_sealed(key, {"who": "alice"}, ttl=30)
            assert store.get_sealed(key) == {"who": "alice"}
            index = store.key("creds-index", tag="id-1")
            member = store.key("creds", "d1", tag="id-1")
            store.set_sealed(member, {"k": 1}, ttl=30)
            store.index_add(index, member, ttl=30)
            assert store.drop_index(index) == 1
            with store.lock("tls-lock", timeout=5, wait=1) as acquired:
                assert acquired
        finally:
            client.close()

        rows = WRONG + (SENTINEL_WRONG if kind == "sentinel" else [])
        for what, changes, dropped in rows:
            gone = (*dropped, "password_file") if "password" in changes else dropped
            bad = {k: v for k, v in {**good, **changes}.items() if k not in gone}
            refusal = _refusal(redis_settings_from_mapping(bad, base_dir=tmp_path))
            assert isinstance(refusal, StoreUnavailable | redis.exceptions.RedisClusterException), (
                f"{kind}: {what}: {refusal!r}"
            )


def _refusal(settings: RedisSettings) -> BaseException | None:
    """What connecting and one PING raised, if anything."""
    try:
        client = connect(settings)
    except Exception as exc:
        return exc
    try:
        Store(client=client, prefix="tls:", sealer=SEALER).ping()
    except Exception as exc:
        return exc
    finally:
        client.close()
    return None


def test_a_cluster_unreachable_at_start_is_a_503_then_found(
    tmp_path: Path, redis_cluster: Cluster
) -> None:
    """Workers boot while no Cluster node answers (503s), and find the Cluster later."""
    down = connect(
        redis_settings_from_mapping(
            {"mode": "cluster", "url": f"redis://127.0.0.1:{free_port()}/0"}, base_dir=tmp_path
        )
    )
    store = Store(client=down, prefix="lazy:", sealer=SEALER)
    with pytest.raises(StoreUnavailable):
        store.ping()
    down.close()

    up = connect(redis_settings_from_mapping(redis_cluster.settings(), base_dir=tmp_path))
    try:
        assert Store(client=up, prefix="lazy:", sealer=SEALER).ping()
    finally:
        close_clients([up])


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"url": "rediss://h:1/0", "tls": False}, "redis.tls: must match the URL"),
        ({"url": "redis://h:1/0", "tls": True}, "redis.tls: must match the URL"),
        ({"url": "redis://:pw@h:1/0"}, "redis.url: must not carry a password"),
        ({"tls_ca_path": "/nonexistent/ca.crt", "url": "rediss://h:1/0"}, "redis.tls_ca_path"),
        ({"tls_cert_path": "ca.crt", "url": "rediss://h:1/0"}, "needs both tls_cert_path"),
        ({"tls_ca_path": "ca.crt"}, "redis.tls: tls_*_path is set but TLS is off"),
        ({"key_prefix": "{broker}:"}, "redis.key_prefix: must not contain { or }"),
        ({"sentinel_password": "x"}, "redis.sentinel_password: is only used in sentinel"),
        ({"password_file": "missing"}, "redis.password_file: cannot read"),
        ({"password": "x", "password_file": "ca.crt"}, "set either password or password_file"),
    ],
)
def test_redis_security_settings_are_checked(
    section: dict[str, Any], problem: str, tmp_path: Path
) -> None:
    (tmp_path / "ca.crt").write_text("not really a certificate, but readable")
    with pytest.raises(ConfigError) as caught:
        redis_settings_from_mapping(section, base_dir=tmp_path)
    assert any(problem in p for p in caught.value.problems), caught.value.problems


# --------------------------------------------------------------------------- Sentinel


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    with running_sentinel_group(tmp_path_factory.mktemp("sentinel")) as group:
        yield group


@dataclass(frozen=True)
class Answer:
    at: float
    what: str  # credentials | session
    status: int
    retry_after: str | None
    body: dict[str, Any]


def test_a_live_broker_follows_a_sentinel_failover_under_load(
    stack: Stack, sentinel_group: SentinelGroup
) -> None:
    group = sentinel_group
    port = free_port()
    settings = make_settings(
        stack,
        f"http://127.0.0.1:{port}",
        redis={**group.settings(), "socket_timeout_seconds": 1.0},
        rate_limit={"per_ip_per_minute": 0, "per_identity_per_minute": 0},
        # Every request asks Redis: no worker memory, no replay answers.
        cache={"local_seconds": 0, "replay": False},
    )
    with serve(settings, stack, port) as live:
        sessions = _sessions(live, 20)
        with redis.Redis(port=group.master.port, socket_timeout=5) as master:
            # Every session has reached the replica before the master dies.
            assert command(master, "WAIT", 1, 5000) >= 1

        nonce = secrets.token_urlsafe(8)
        token = live.id_token("bob", nonce=nonce)  # a demo user the dev rules allow
        answers: list[Answer] = []
        stop = threading.Event()

        def load(worker: int) -> None:
            http = requests.Session()
            i = worker
            while not stop.is_set():
                i += 1
                if i % 2:
                    r = http.post(
                        f"{live.url}/v1/credentials",
                        json={"provider": DEV_PROVIDER, "token": token, "nonce": nonce},
                        timeout=10,
                    )
                    what = "credentials"
                else:
                    r = http.get(
                        f"{live.url}/v1/session",
                        cookies={cookie_name(settings.web): sessions[i % len(sessions)]},
                        timeout=10,
                    )
                    what = "session"
                body = r.json() if r.headers.get("Content-Type") == "application/json" else {}
                answers.append(
                    Answer(
                        time.monotonic(), what, r.status_code, r.headers.get("Retry-After"), body
                    )
                )
                time.sleep(0.02)

        threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            killed_at = time.monotonic()
            os.killpg(group.master.proc.pid, signal.SIGKILL)
            # Until the replica is promoted and the broker answers again for a while.
            deadline = killed_at + 30
            while time.monotonic() < deadline:
                recent = [a for a in answers[-20:] if a.at > killed_at + 1]
                if (
                    group.master_port() == group.replica.port
                    and len(recent) == 20
                    and all(a.status == 200 for a in recent)
                ):
                    break
                time.sleep(0.1)
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)

        statuses = {a.status for a in answers}
        assert statuses <= {200, 503}, [a for a in answers if a.status not in (200, 503)][:3]
        gap = [a for a in answers if a.status == 503]
        assert gap, "the master's death was never noticed: the test proved nothing"
        for answer in gap:
            assert answer.retry_after
            assert int(answer.retry_after) > 0
            assert answer.body.get("error"), answer
        assert group.master_port() == group.replica.port  # promoted, and the broker...
        after = [a for a in answers if a.at > gap[-1].at]
        assert after
        assert all(a.status == 200 for a in after)  # ...followed, without a restart
        assert {a.what for a in after} == {"credentials", "session"}
        outage = gap[-1].at - gap[0].at
        assert outage < 20, f"503s for {outage:.1f} s"

        # No session that had been replicated is lost.
        for session_id in sessions:
            r = requests.get(
                f"{live.url}/v1/session",
                cookies={cookie_name(settings.web): session_id},
                timeout=10,
            )
            assert r.status_code == 200, r.text


def web_sessions(store: Store, web: WebSettings) -> SessionStore:
    """The browser session store, as the broker builds it."""
    return SessionStore(
        store=store,
        idle_seconds=web.session_idle_seconds,
        absolute_seconds=web.session_absolute_seconds,
    )


def _sessions(live: LiveBroker, count: int) -> list[str]:
    """``count`` browser sessions created by the broker's own session store."""
    store = web_sessions(live.services.store, live.settings.web)
    out = []
    for n in range(count):
        nonce = secrets.token_urlsafe(8)
        token = live.id_token(f"session-user-{n}", nonce=nonce)
        verified = live.services.provider(DEV_PROVIDER).verify(token, nonce=nonce)
        out.append(store.create(verified, refresh_token=None).session_id)
    return out


def test_the_guard_keeps_one_timeout_budget_on_sentinel(sentinel_group: SentinelGroup) -> None:
    """Sentinel mode keeps connect()'s promises: no retries, socket timeouts as set."""
    group = sentinel_group
    settings = replace(
        redis_settings_from_mapping(
            {**group.settings(), "socket_timeout_seconds": 0.5}, base_dir=Path.cwd()
        ),
    )
    client = connect(settings)
    try:
        pool_kwargs = client.connection_pool.connection_kwargs
        assert pool_kwargs["socket_timeout"] == 0.5
        assert pool_kwargs["retry"].get_retries() == 0
        store = Store(client=client, prefix="guard:", sealer=SEALER, guard=RedisGuard())
        assert store.ping()
    finally:
        client.close()


# --------------------------------------------------------------------------- two nodes


@contextlib.contextmanager
def broker_node(config: dict[str, Any], workdir: Path, port: int) -> Iterator[tuple[str, Path]]:
    """One `broker serve` (a gunicorn master with two workers) on ``config``."""
    url = f"http://127.0.0.1:{port}"
    config_path = workdir / f"broker-{port}.toml"
    config_path.write_text(dump_toml(config))
    stderr = workdir / f"broker-{port}.log"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "broker.cli", "serve", "--config", str(config_path)),
                *("--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "4"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_until_ready(url, process, stderr)
            yield url, stderr
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


LOCAL_SECONDS = 2


def test_two_broker_nodes_share_singleflight_and_sign_outs(
    stack: Stack, broker: LiveBroker, tmp_path: Path
) -> None:
    """Two gunicorn masters on one Redis: a burst for one identity across both makes one
    STS call (one set of credentials, every answer the same), and a sign-out on one
    ends the session on the other at once and its cached credentials within
    ``cache.local_seconds``."""
    # One configuration for both, as behind a load balancer: the public URL is part of
    # the config version, and so of every credential cache key.
    port_a, port_b = free_port(), free_port()
    public_url = f"http://127.0.0.1:{port_a}"
    config = stack.config(public_url)
    config["redis"]["key_prefix"] = f"nodes-{secrets.token_hex(4)}:"
    config["cache"] = {**config.get("cache", {}), "local_seconds": LOCAL_SECONDS}
    config["rate_limit"] = {"per_ip_per_minute": 0, "per_identity_per_minute": 0}
    with (
        broker_node(config, tmp_path, port_a) as (a, a_log),
        broker_node(config, tmp_path, port_b) as (b, b_log),
    ):
        nonce = secrets.token_urlsafe(8)
        token = broker.id_token("bob", nonce=nonce)
        body = {"provider": DEV_PROVIDER, "token": token, "nonce": nonce}

        def ask(url: str) -> requests.Response:
            return requests.post(f"{url}/v1/credentials", json=body, timeout=30)

        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(ask, [a, b] * 16))
        assert {r.status_code for r in answers} == {200}, [r.text for r in answers][:2]
        keys = {r.json()["credentials"]["AccessKeyId"] for r in answers}
        assert len(keys) == 1, f"{len(keys)} STS calls for one identity"
        (key,) = keys
        for log_file in (a_log, b_log):  # both nodes answered, with those credentials
            issued = [
                line
                for line in map(json.loads, log_file.read_text().splitlines())
                if line.get("event") == "credentials_issued"
            ]
            assert issued
            assert {line["access_key_id"] for line in issued} == {key}

        # A browser session for the same person, signed out on node A.
        settings = settings_from_mapping(config, env={}, base_dir=tmp_path, source="test")
        services = Services.build(settings)
        try:
            sign_in = secrets.token_urlsafe(8)
            verified = services.provider(DEV_PROVIDER).verify(
                broker.id_token("bob", nonce=sign_in), nonce=sign_in
            )
            ws = web_sessions(services.store, settings.web).create(verified, refresh_token=None)
        finally:
            services.close()
        cookies = {cookie_name(settings.web): ws.session_id}
        assert requests.get(f"{b}/v1/session", cookies=cookies, timeout=10).status_code == 200
        assert ask(b).json()["credentials"]["AccessKeyId"] == key  # B holds them in memory

        r = requests.post(
            f"{a}/logout",
            data={"csrf_token": ws.csrf_token},
            cookies=cookies,
            headers={"Origin": public_url},
            allow_redirects=False,
            timeout=10,
        )
        assert r.status_code == 303, r.text
        signed_out = time.monotonic()
        # The session lives in Redis only: gone on B at once.
        assert requests.get(f"{b}/v1/session", cookies=cookies, timeout=10).status_code == 401
        # B's workers may hand out their copy of the credentials for local_seconds, no more.
        time.sleep(LOCAL_SECONDS + 0.5)
        fresh = {ask(b).json()["credentials"]["AccessKeyId"] for _ in range(4)}
        assert key not in fresh, "node B still serves credentials of a signed-out identity"
        assert time.monotonic() - signed_out < LOCAL_SECONDS + 5


# --------------------------------------------------------------------------- hash tags


@pytest.mark.parametrize(
    ("key", "tag"),
    [
        ("broker:creds:abc:{us-east-1:1234}", "us-east-1:1234"),
        ("broker:creds-index:{id}", "id"),
        ("broker:session:abc", None),
        ("broker:{}:x", None),  # empty braces: Redis hashes the whole key
        ("broker:{a}{b}", "a"),  # only the first tag counts
        ("broker:}{a}", "a"),
        ("broker:{open", None),
    ],
)
def test_hash_tag_reads_keys_as_redis_cluster_does(key: str, tag: str | None) -> None:
    assert hash_tag(key) == tag
    if tag is not None:
        assert key_slot(key.encode()) == key_slot(tag.encode())


def test_indexes_drop_their_members_on_every_topology(redis_target: RedisTarget) -> None:
    """A tagged index (credentials of one identity) and an untagged one (CLI sessions,
    spread over slots) both drop every member, on a standalone Redis and on a Cluster."""
    client = redis_target.connect()
    try:
        store = Store(client=client, prefix=f"ix-{secrets.token_hex(4)}:", sealer=SEALER)
        tagged = store.key("creds-index", tag="id-1")
        members = [store.key("creds", f"d{n}", tag="id-1") for n in range(5)]
        untagged = store.key("cli-sessions-of", "id-1")
        sessions = [store.key("cli-session", f"s{n}") for n in range(5)]
        for index, keys in ((tagged, members), (untagged, sessions)):
            for key in keys:
                store.set_sealed(key, {"k": key}, ttl=30)
                store.index_add(index, key, ttl=30)
        if redis_target.kind == "cluster":  # the untagged members really are spread
            assert len({key_slot(k.encode()) for k in sessions}) > 1
        assert store.drop_index(tagged) == 5
        assert store.drop_index(untagged) == 5
        assert all(store.get_sealed(k) is None for k in members + sessions)
        assert store.drop_index(tagged) == 0
        with pytest.raises(ValueError, match="same hash tag"):
            store.index_add(tagged, store.key("creds", "x", tag="id-2"), ttl=30)
    finally:
        close_clients([client])
