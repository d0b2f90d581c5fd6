"""A fault drill for the issuer's signing keys: two ``broker serve`` processes (gunicorn,
two workers each) in issuer mode share one real redis-server while client threads ask
both, in turn, for credentials; meanwhile the drill

1. SIGKILLs redis-server while a rotation holds the ring's lock and has read the ring,
   and starts it again on the same port, empty (no persistence: the ring is lost);
2. rotates with ``broker keys rotate``: ``--publish-ahead N``, the default
   (``issuer.publish_ahead_seconds``, the floor), ``--now``;
3. restarts node B (SIGTERM, then start again) while a published next key waits to sign.

Every token STS received (moto's recorder) is verified with joserfc against the JWKS
each node served right after it was issued, and against both nodes' JWKS at the end:
every key that signed is still published (no time is advanced, so every token is
still live), except the one Redis lost, whose tokens stop verifying (the documented
"ring lost" state). A verifier that caches either node's JWKS for its ``max-age``
knows the key of every token issued meanwhile (invariant 2), except across ``--now``
and the lost ring. Every answer is 2xx, but for 503 ``dependency_unavailable`` with
``Retry-After`` while Redis is down; both nodes answer 2xx again within
``RECOVERY_SECONDS`` of Redis answering.

The rotation Redis dies under runs in this process (``Issuer.rotate``, which ``broker
keys rotate`` calls), on a clock that parks it right after it read the ring under the
lock: a CLI process cannot be stopped deterministically inside its few-millisecond
critical section. When it resumes, the ring it read is gone and the nodes have made
and signed with a new one: it must be refused, not write the lost ring back.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc import jws

from broker.devstack.oidc_login import login
from broker.devstack.processes import ManagedProcess, free_port
from broker.devstack.stack import DEV_CLIENT_ID, DEV_PROVIDER, Stack, dump_toml
from broker.errors import DependencyUnavailable
from broker.issuer import JWKS_PATH, Issuer, SigningKey
from broker.services import Services
from broker.settings import load_settings
from tests.conftest import config_for
from tests.integration.aws_fixtures import Recording
from tests.integration.test_api import CREDENTIALS
from tests.integration.test_issuer import (
    abac_rule,
    broker_cli,
    fetch_published,
    recorder,
    verify_signed,
)
from tests.integration.test_serve import json_lines, wait_until_ready
from tests.redis_faults import FaultyRedis

pytestmark = pytest.mark.integration

# issuer.publish_ahead_seconds: the longest JWKS max-age, so the shortest
# --publish-ahead a rotation may ask for.
PUBLISH_AHEAD = 2
RECOVERY_SECONDS = 2.0
USERS = ("alice", "bob", "carol")  # one client thread each
# Every request asks for its own DurationSeconds, which names its STS call (and so its
# token) in moto's recording; this range also bounds the drill's request count.
DURATIONS = range(900, 43201)
# Each client thread starts a request at most this often: a steady load that leaves
# the two cores to the nodes, moto and the CLI (a 503 comes back at once).
PACE_SECONDS = 0.04
WAIT_SECONDS = 20.0  # the longest any one step may wait for the load to show something
# The next key waits this long while node B restarts (a restart takes a few seconds).
RESTART_AHEAD = 8


@dataclass(frozen=True)
class Answer:
    node: str
    path: str
    started: float
    ended: float
    status: int | None  # None: no HTTP answer at all (refused, reset, timed out)
    retry_after: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """A JWKS as one node served it, and the max-age it was served with."""

    node: str
    started: float
    ended: float
    jwks: dict[str, Any]
    max_age: int

    @property
    def kids(self) -> set[str]:
        return {k["kid"] for k in self.jwks["keys"]}


@dataclass
class Issued:
    """A 200 from /v1/credentials; its token comes from moto's recording."""

    node: str
    duration: int
    started: float
    ended: float
    identity_id: str
    snapshots: list[Snapshot] = field(default_factory=list)  # both nodes', right after
    missed: list[str] = field(default_factory=list)  # nodes whose JWKS was not a 200
    token: str = ""
    kid: str = ""


class Node:
    """One ``broker serve`` process on a fixed port, started again on the same port."""

    def __init__(self, name: str, config: Path, workdir: Path) -> None:
        self.name, self.config, self.workdir = name, config, workdir
        self.port = free_port()  # kept across restarts
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs: list[Path] = []
        self.proc: ManagedProcess | None = None

    def start(self) -> None:
        log = self.workdir / f"node-{self.name}-{len(self.logs)}.log"
        self.logs.append(log)
        argv = [
            sys.executable,
            "-m",
            "broker.cli",
            "serve",
            "--config",
            str(self.config),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            "2",
            "--threads",
            "4",
        ]
        self.proc = ManagedProcess(f"broker-{self.name}", argv, port=self.port, log_path=log)

    def wait_ready(self) -> None:
        assert self.proc is not None
        wait_until_ready(self.url, self.proc.proc, self.proc.log_path)

    def stop(self) -> int | None:
        """SIGTERM, and gunicorn's exit status (0: a graceful shutdown)."""
        if self.proc is None:
            return None
        self.proc.stop(timeout=30)
        return self.proc.proc.returncode


class Load:
    """Client threads asking both nodes in turn, each 200 followed by both nodes' JWKS."""

    def __init__(self, nodes: dict[str, Node], tokens: dict[str, str]) -> None:
        self.nodes, self.tokens = nodes, tokens
        self.answers: list[Answer] = []
        self.issued: list[Issued] = []
        self.down: set[str] = set()  # not sent anything (a node being restarted)
        self._in_flight: Counter[str] = Counter()
        self._durations = iter(DURATIONS)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i, user), daemon=True)
            for i, user in enumerate(tokens)
        ]

    # -- the clients --------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive()

    @contextmanager
    def _sending(self, preferred: str) -> Iterator[str | None]:
        """The node to ask (``preferred`` unless it is down), counted as in flight."""
        with self._changed:
            up = [n for n in (preferred, *self.nodes) if n not in self.down]
            node = up[0] if up else None
            if node is not None:
                self._in_flight[node] += 1
        try:
            yield node
        finally:
            if node is not None:
                with self._changed:
                    self._in_flight[node] -= 1
                    self._changed.notify_all()

    def _request(self, node: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        started = time.time()
        try:
            response = requests.request(method, self.nodes[node].url + path, timeout=10, **kwargs)
        except requests.RequestException:
            self._record(Answer(node, path, started, time.time(), None))
            raise
        error = None
        if response.status_code >= 400 and response.headers.get("Content-Type", "").startswith(
            "application/json"
        ):
            error = response.json().get("error")
        self._record(
            Answer(
                node,
                path,
                started,
                time.time(),
                response.status_code,
                response.headers.get("Retry-After"),
                error,
            )
        )
        return response

    def _record(self, answer: Answer) -> None:
        with self._changed:
            self.answers.append(answer)
            self._changed.notify_all()

    def _client(self, index: int, user: str) -> None:
        names = list(self.nodes)
        due = time.monotonic()
        for turn in itertools.count(index):
            due += PACE_SECONDS
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            with self._changed:
                duration = next(self._durations, None)
            if duration is None:
                return  # the drill's bound on requests
            body = {
                "provider": DEV_PROVIDER,
                "token": self.tokens[user],
                "duration_seconds": duration,
            }
            with self._sending(names[turn % len(names)]) as node:
                if node is None:
                    continue
                started = time.time()
                try:
                    response = self._request(node, "POST", CREDENTIALS, json=body)
                except requests.RequestException:
                    continue
                ended = time.time()
            if response.status_code != 200:
                continue
            issued = Issued(node, duration, started, ended, response.json()["identity_id"])
            for other in names:
                with self._sending(other) as asked:
                    if asked != other:
                        continue  # down: nothing to fetch from it
                    fetched = time.time()
                    try:
                        jwks = self._request(other, "GET", JWKS_PATH)
                    except requests.RequestException:
                        issued.missed.append(other)
                        continue
                    if jwks.status_code == 200:
                        issued.snapshots.append(
                            Snapshot(other, fetched, time.time(), jwks.json(), max_age(jwks))
                        )
                    else:
                        issued.missed.append(other)
            with self._changed:
                self.issued.append(issued)
                self._changed.notify_all()

    # -- what the drill waits for ------------------------------------------------------

    def wait_for(self, what: str, predicate: Callable[[], bool]) -> None:
        with self._changed:
            if self._changed.wait_for(predicate, WAIT_SECONDS):
                return
            recent = time.time() - 5
            seen = Counter(
                (a.node, a.path, a.status, a.error) for a in self.answers if a.ended >= recent
            )
            raise AssertionError(f"no {what} within {WAIT_SECONDS} s; the last 5 s: {seen}")

    def issued_since(self, since: float, node: str) -> int:
        return sum(1 for i in self.issued if i.node == node and i.started >= since)

    def wait_issued(self, since: float, count: int = 3) -> None:
        """Until each node has issued ``count`` tokens asked for after ``since``."""
        for node in self.nodes:
            self.wait_for(
                f"{node} issued {count} tokens after {since}",
                functools.partial(self._issued_at_least, since, node, count),
            )

    def _issued_at_least(self, since: float, node: str, count: int) -> bool:
        return self.issued_since(since, node) >= count

    def answered_503_since(self, since: float, node: str) -> bool:
        return any(a.node == node and a.status == 503 and a.started >= since for a in self.answers)

    def drain(self, node: str) -> None:
        """Send ``node`` nothing more, and wait until it has answered what it was asked."""
        with self._changed:
            self.down.add(node)
            assert self._changed.wait_for(lambda: self._in_flight[node] == 0, WAIT_SECONDS)

    def resume(self, node: str) -> None:
        with self._changed:
            self.down.discard(node)


def max_age(response: requests.Response) -> int:
    found = re.search(r"max-age=(\d+)", response.headers.get("Cache-Control", ""))
    return int(found.group(1)) if found else 0


class ParkedClock:
    """``time.time``, except that its first call parks the caller until ``release``.

    ``Issuer.rotate`` first reads its clock right after it has taken the ring's lock and
    read the ring: a rotation on this clock parks there, inside its critical section."""

    def __init__(self) -> None:
        self.parked = threading.Event()
        self._release = threading.Event()
        self._armed = True

    def __call__(self) -> float:
        if self._armed:
            self._armed = False
            self.parked.set()
            assert self._release.wait(60)
        return time.time()

    def release(self) -> None:
        self._release.set()


@dataclass
class Rotation:
    """What an in-process ``Issuer.rotate`` returned or raised, from its thread."""

    key: SigningKey | None = None
    error: BaseException | None = None
    ended: float = 0.0


def rotate_in_thread(issuer: Issuer, ahead: float) -> tuple[threading.Thread, Rotation]:
    outcome = Rotation()

    def run() -> None:
        try:
            outcome.key = issuer.rotate(publish_ahead_seconds=ahead)
        except Exception as exc:  # reported by the drill
            outcome.error = exc
        outcome.ended = time.time()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@dataclass(frozen=True)
class Rotated:
    """A key a rotation made, as the ring holds it."""

    kid: str
    started: float  # the rotation was asked for then
    saved: float  # and had written the ring by then
    activates_at: float  # the key signs from then on

    @property
    def in_force(self) -> float:
        """From then on no older key signs."""
        return max(self.activates_at, self.saved)


def rotate_cli(config: Path, observer: Issuer, *args: str) -> Rotated:
    """``broker keys rotate`` on the shared config; the key it made."""
    started = time.time()
    done = broker_cli("keys", "rotate", "--config", str(config), *args)
    saved = time.time()
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    found = re.match(r"next key (\S+) \(RS256\) published", done.stdout)
    assert found, done.stdout
    (state,) = [s for s in observer.states() if s.kid == found.group(1)]
    assert state.state == ("current" if "--now" in args else "next"), state
    return Rotated(kid=state.kid, started=started, saved=saved, activates_at=state.activates_at)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyRedis]:
    server = FaultyRedis(tmp_path_factory.mktemp("drill-redis"))
    yield server
    server.stop()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return tmp_path / "broker.toml"


@pytest.fixture
def nodes(
    stack: Stack, redis_server: FaultyRedis, config: Path, tmp_path: Path
) -> Iterator[dict[str, Node]]:
    """Nodes A and B on one config (the CLI's too): issuer mode, node A's URL as the
    issuer, no credential cache (every request signs a token and calls STS), no rate
    limits, a one-second Redis timeout."""
    both = {name: Node(name, config, tmp_path) for name in ("a", "b")}
    raw = config_for(
        stack,
        both["a"].url,
        rules=[abac_rule(max_duration_seconds=DURATIONS[-1])],
        redis={"url": redis_server.url, "socket_timeout_seconds": 1.0},
        issuer={"publish_ahead_seconds": PUBLISH_AHEAD},
        cache={"enabled": False},
        rate_limit={"per_ip_per_minute": 0, "per_identity_per_minute": 0},
    )
    config.write_text(dump_toml(raw))
    try:
        for node in both.values():
            node.start()
        for node in both.values():
            node.wait_ready()
        yield both
    finally:
        for node in both.values():
            node.stop()


@pytest.fixture
def services(config: Path, nodes: dict[str, Node]) -> Iterator[Services]:
    """This process's view of the shared ring (what `broker keys list` reads)."""
    built = Services.build(load_settings(config))
    yield built
    built.close()


# --------------------------------------------------------------------------- the drill


def test_signing_keys_survive_rotations_restarts_and_a_redis_crash_across_two_nodes(
    stack: Stack,
    redis_server: FaultyRedis,
    config: Path,
    nodes: dict[str, Node],
    services: Services,
) -> None:
    begun = time.monotonic()
    settings = services.settings
    issuer_url = settings.server.public_url
    assert issuer_url == nodes["a"].url
    observer = services.issuer
    assert observer is not None
    tokens = {u: login(stack.oidc.url, subject=u, client_id=DEV_CLIENT_ID).id_token for u in USERS}
    load = Load(nodes, tokens)
    clock = ParkedClock()
    marks: dict[str, float] = {}

    with recorder(stack).recording() as recording:
        load.start()
        try:
            load.wait_issued(time.time(), count=5)
            (first,) = observer.states()

            # 1. Redis dies while a rotation holds the ring's lock and has read the ring;
            # it comes back on the same port without its data.
            parked = Issuer(settings=settings, store=services.store, clock=clock)
            thread, rotation = rotate_in_thread(parked, PUBLISH_AHEAD + 1)
            assert clock.parked.wait(WAIT_SECONDS)
            assert services.store.exists(services.store.key("lock", "issuer-keys"))
            marks["redis killed"] = time.time()
            redis_server.kill()
            for name in nodes:
                load.wait_for(
                    f"{name} answering 503 while Redis is down",
                    functools.partial(load.answered_503_since, marks["redis killed"], name),
                )
            # Rotating against a dead Redis: a clean refusal.
            dead = broker_cli("keys", "rotate", "--config", str(config))
            assert dead.returncode == 1, dead.stdout
            assert "keys: the broker's state store (Redis) is unavailable" in dead.stderr
            assert "Traceback" not in dead.stderr
            redis_server.restore()
            marks["redis ready"] = time.time()
            # The ring is empty: the first request makes a key that signs at once.
            load.wait_issued(marks["redis ready"])
            clock.release()
            thread.join(WAIT_SECONDS)
            assert not thread.is_alive()
            # It had read the lost ring: writing it back over the new one would unpublish
            # the key that signs now (and revive the lost one).
            assert rotation.key is None, "a rotation from the lost ring replaced the new one"
            assert isinstance(rotation.error, DependencyUnavailable), rotation.error
            assert "changed while this process was changing them" in rotation.error.message
            (remade,) = observer.states()
            assert remade.kid != first.kid
            keys = [Rotated(kid=remade.kid, started=0, saved=0, activates_at=remade.activates_at)]

            # 2. `broker keys rotate`: --publish-ahead N, the default (N = PUBLISH_AHEAD),
            # and --now; each time until both nodes signed with the new key.
            for args in (("--publish-ahead", str(PUBLISH_AHEAD + 1)), (), ("--now",)):
                keys.append(rotate_cli(config, observer, *args))
                load.wait_issued(keys[-1].in_force)
            now = keys[-1]
            assert now.started < now.activates_at < now.saved

            # 3. Node B restarts while the next key waits to sign.
            keys.append(rotate_cli(config, observer, "--publish-ahead", str(RESTART_AHEAD)))
            load.drain("b")
            marks["b stopping"] = time.time()
            assert nodes["b"].stop() == 0  # gunicorn's graceful SIGTERM shutdown
            nodes["b"].start()
            nodes["b"].wait_ready()
            marks["b back"] = time.time()
            load.resume("b")
            assert marks["b back"] < keys[-1].activates_at, "B was back only after the rotation"
            load.wait_issued(keys[-1].in_force)
        finally:
            clock.release()  # never leave the rotation parked
            load.stop()
    drill_seconds = time.monotonic() - begun

    issued = with_tokens(load.issued, recording)
    outage = (marks["redis killed"], marks["redis ready"] + RECOVERY_SECONDS)

    # At issue time: each token verifies against the JWKS each node served right after.
    for item in issued:
        assert item.snapshots or item.missed, item
        for snapshot in item.snapshots:
            claims = verify_signed(item.token, snapshot.jwks, issuer_url).claims
            assert claims["sub"] == item.identity_id
            assert item.started - 1 <= claims["iat"] <= item.ended + 1

    # The ring lost: one new key, made on the empty ring, signed on both nodes.
    assert {i.kid for i in issued if i.ended < marks["redis killed"]} == {first.kid}
    after_loss = [i for i in issued if marks["redis ready"] <= i.started < keys[1].started]
    assert {i.kid for i in after_loss} == {remade.kid}
    assert {i.node for i in after_loss} == set(nodes)

    # Each key signs from its activates_at, and no older key once it is in force.
    for older, newer in itertools.pairwise(keys):
        early = [i for i in issued if i.kid == newer.kid and i.ended < newer.activates_at]
        assert not early, (newer, early[:3])
        late = [i for i in issued if i.kid == older.kid and newer.in_force < i.started]
        assert not late, (older, late[:3])
    # Node B, back mid-rotation, published the waiting key and signed with it.
    pending = keys[-1].kid
    from_b = [i for i in issued if i.node == "b" and marks["b back"] <= i.started]
    assert all(pending in s.kids for i in from_b for s in i.snapshots)
    assert any(i.kid == keys[-2].kid for i in from_b if i.ended < keys[-1].activates_at)
    assert any(i.kid == pending for i in from_b)

    # At the end: every token verifies against both nodes' JWKS, all keys that signed
    # still published for their tokens' life; but the tokens of the key Redis lost
    # (documented: "ring lost": they stop verifying).
    lost = [i for i in issued if i.kid == first.kid]
    for node in nodes.values():
        doc, jwks = fetch_published(issuer_url, fetch_from=node.url)
        assert {k["kid"] for k in jwks["keys"]} == {k.kid for k in keys}
        for item in issued:
            if item.kid != first.kid:
                decoded = verify_signed(item.token, jwks, issuer_url)
                assert decoded.header["alg"] in doc["id_token_signing_alg_values_supported"]

    cached_checks = check_cached_verifier(
        issued,
        exempt=[(marks["redis killed"], marks["redis ready"]), (now.started, now.saved)],
    )
    unavailable = check_answers(load.answers, outage)
    recovery = {}
    for name in nodes:
        back = [
            a.ended
            for a in load.answers
            if a.node == name and a.status == 200 and a.ended >= marks["redis ready"]
        ]
        recovery[name] = round(min(back) - marks["redis ready"], 3)
        assert recovery[name] < RECOVERY_SECONDS, recovery

    # The nodes' logs: JSON lines only, never a traceback.
    for node in nodes.values():
        node.stop()
        for log in node.logs:
            text = log.read_text()
            json_lines(text)
            assert "Traceback" not in text

    print(
        json.dumps(
            {
                "drill_seconds": round(drill_seconds, 1),
                "answers_per_node": Counter(a.node for a in load.answers),
                "tokens_per_node": Counter(i.node for i in issued),
                "unavailable_503_per_node": Counter(a.node for a in unavailable),
                "recovery_seconds_after_redis_ready": recovery,
                "redis_down_seconds": round(marks["redis ready"] - marks["redis killed"], 2),
                "b_restart_seconds": round(marks["b back"] - marks["b stopping"], 2),
                "token_checks_at_issue": sum(len(i.snapshots) for i in issued),
                "tokens_checked_on_both_nodes_at_issue": sum(
                    len(i.snapshots) == len(nodes) for i in issued
                ),
                "token_checks_at_end": (len(issued) - len(lost)) * len(nodes),
                "tokens_lost_with_the_ring": len(lost),
                "cached_jwks_checks": cached_checks,
            }
        )
    )


def with_tokens(issued: list[Issued], recording: Recording) -> list[Issued]:
    """Each 200 with the token STS received for it (named by its DurationSeconds), in
    the order they were asked for."""
    calls = recording.sts_calls()
    tokens = {int(c["DurationSeconds"]): c["WebIdentityToken"] for c in calls}
    assert len(tokens) == len(calls)  # one STS call per request, none retried
    ordered = sorted(issued, key=lambda i: i.started)
    for item in ordered:
        item.token = tokens[item.duration]
        item.kid = str(jws.extract_compact(item.token.encode()).headers()["kid"])
    return ordered


def check_cached_verifier(issued: list[Issued], *, exempt: list[tuple[float, float]]) -> int:
    """Invariant 2 across nodes: a verifier that keeps either node's JWKS for its
    max-age knows the key of every token issued meanwhile, on either node; except
    when the window meets an ``exempt`` span (--now, the lost ring)."""
    starts = [i.started for i in issued]
    checks = 0
    for snapshot in {id(s): s for i in issued for s in i.snapshots}.values():
        assert snapshot.max_age <= PUBLISH_AHEAD
        until = snapshot.started + snapshot.max_age
        for item in issued[bisect.bisect_left(starts, snapshot.ended) :]:
            if item.started > until:
                break
            if item.ended > until or any(
                lo <= item.ended and snapshot.started <= hi for lo, hi in exempt
            ):
                continue
            assert item.kid in snapshot.kids, (snapshot.node, snapshot.started, item)
            checks += 1
    return checks


def check_answers(answers: list[Answer], outage: tuple[float, float]) -> list[Answer]:
    """Every answer is 2xx but for 503 dependency_unavailable with Retry-After while
    Redis is down (and until RECOVERY_SECONDS after it answers): those are returned."""
    unavailable = []
    for answer in answers:
        if answer.status is not None and 200 <= answer.status < 300:
            continue
        assert answer.status == 503, answer
        assert answer.retry_after is not None, answer
        assert int(answer.retry_after) > 0, answer
        assert answer.error == "dependency_unavailable", answer
        assert outage[0] <= answer.ended, answer
        assert answer.started <= outage[1], answer
        unavailable.append(answer)
    return unavailable
