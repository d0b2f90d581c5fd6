"""Load benchmark: POST /v1/credentials under realistic mixes vs a bare Flask endpoint.

Every app runs under gunicorn with the same settings (workers, worker class, threads) in
the same run, and every mix is measured against the bare Flask endpoint
(``bench/bare_app.py``: the same imports and a built botocore STS client, then one JSON
parse) with the same request bodies and connections. The mixes:

* ``one token``: one token repeated (what the per-worker replay answers);
* ``cached identities``: ``--identities`` people, one token each, their credentials
  already cached;
* ``fresh tokens``: the same people, a token never seen before on every request (mobile
  apps refresh ID tokens hourly): a signature check per request, cached credentials;
* ``new identities``: a never-seen person on every request, at ``--new-connections``;
  STS (``bench/stand_ins.py``) answers after ``--sts-latency-ms``.

The broker runs each mix twice, replay on and off. Printed per row: requests/s, the
ratio to bare Flask, p50/p99 ms, errors (non-2xx and socket errors), STS calls and
distinct subjects STS saw, the most STS calls in flight at once (``peak``: with gthread it
cannot pass workers x threads), and each worker's RSS after the row. ``--soak-seconds``
then runs a mixed load on the broker and prints the workers' RSS over time. Usage:

    python3 run.py bench [--seconds 10] [--worker-class gevent] [--soak-seconds 600]

Uses ``wrk`` (installed with apt-get when missing and root), else bench/loadgen.py. A
benchmark, never a pass/fail test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import loadgen, profile  # noqa: E402
from bench.stand_ins import KID  # noqa: E402
from broker.devstack.packages import apt_install  # noqa: E402
from broker.devstack.processes import ManagedProcess, free_port  # noqa: E402
from broker.devstack.redis_server import start_redis  # noqa: E402
from broker.devstack.stack import dump_toml  # noqa: E402

PROVIDER = "bench"
CLIENT_ID = "bench-client"
ROLE = "arn:aws:iam::123456789012:role/bench"
MIXES = ("one token", "cached identities", "fresh tokens", "new identities")
TARGETS = {"cached identities": 0.8, "fresh tokens": 0.7, "new identities": 0.3}


def gunicorn(
    app: str,
    *,
    port: int,
    args: argparse.Namespace,
    env: dict[str, str],
    log: Path,
) -> ManagedProcess:
    argv = [
        str(Path(sys.executable).parent / "gunicorn"),
        "-c",
        str(ROOT / "deploy" / "gunicorn.conf.py"),
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(args.workers),
        "--threads",
        str(args.threads),
        "--chdir",
        str(ROOT),
        app,
    ]
    return ManagedProcess(
        app,
        argv,
        port=port,
        log_path=log,
        env={**env, "BROKER_SERVER__WORKER_CLASS": args.worker_class},
    )


def worker_rss_mb(server: ManagedProcess) -> list[float]:
    """Resident memory of each gunicorn worker (the master's children), in MB."""
    pid = server.proc.pid
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    sizes = []
    for child in children:
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except OSError:
            continue
        m = re.search(r"VmRSS:\s+(\d+) kB", status)
        if m:
            sizes.append(int(m.group(1)) / 1024)
    return sorted(sizes)


def wait_booted(server: ManagedProcess, workers: int, timeout: float = 120) -> None:
    """Until every worker has loaded the app: gunicorn's port is open before its workers
    are, and a row measured meanwhile would time its start-up, not the app."""
    deadline = time.monotonic() + timeout
    last: list[float] = []
    while time.monotonic() < deadline:
        rss = worker_rss_mb(server)
        # Loaded: all workers there, and none growing any more (the imports are done).
        if len(rss) == workers and rss == last:
            return
        last = rss
        time.sleep(1.5)
    raise RuntimeError(f"{server.name}: workers did not finish booting")


# ------------------------------------------------------------------------------ tokens


class Issuer:
    """Signs ID tokens as the stand-in IdP whose key set bench/stand_ins.py serves."""

    def __init__(self, issuer: str, alg: str = "RS256") -> None:
        self.issuer = issuer
        self.alg = alg
        # RS256 is what Google and most IdPs sign with (a cheap check: e = 65537);
        # ES256 mints far faster and costs the broker more to verify.
        self.key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if alg == "RS256"
            else ec.generate_private_key(ec.SECP256R1())
        )
        self.pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def token(self, subject: str) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "sub": subject,
            "email": f"{subject}@example.com",
            "email_verified": True,
            "iat": now,
            "exp": now + 3600,
            # A token never seen before, even for the same person in the same second.
            "jti": secrets.token_urlsafe(12),
        }
        return jwt.encode(claims, self.key, algorithm=self.alg, headers={"kid": KID})

    def body(self, subject: str) -> str:
        return json.dumps({"provider": PROVIDER, "token": self.token(subject)})


# ------------------------------------------------------------------------------ load


@dataclass
class Figures:
    rps: float
    p50: float
    p99: float
    errors: float
    requests: float
    sts_calls: int = 0
    sts_subjects: int = 0
    sts_peak: int = 0  # most STS calls in flight at once
    rss_mb: list[float] = field(default_factory=list)
    spread: tuple[float, float] = (0.0, 0.0)  # lowest and highest round's req/s


WRK_LUA = """
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end
function init(args)
  local threads = tonumber(args[1])
  bodies = {}
  local i = 0
  for line in io.lines(os.getenv("BENCH_BODY_FILE")) do
    if i % threads == tid then bodies[#bodies + 1] = line end
    i = i + 1
  end
  if #bodies == 0 then
    -- Fewer bodies than threads (one token): every thread sends them all.
    for line in io.lines(os.getenv("BENCH_BODY_FILE")) do bodies[#bodies + 1] = line end
  end
  idx = 0
  headers = {["Content-Type"] = "application/json"}
end
function request()
  idx = idx % #bodies + 1
  return wrk.format("POST", nil, headers, bodies[idx])
end
"""


def run_wrk(url: str, bodies: list[str], *, seconds: float, connections: int, tmp: Path) -> Figures:
    body_file = tmp / "bodies.txt"
    body_file.write_text("\n".join(bodies) + "\n")
    script = tmp / "post.lua"
    script.write_text(WRK_LUA)
    threads = min(2, connections)
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, int(seconds))}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(script),
            url,
            "--",
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BENCH_BODY_FILE": str(body_file)},
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        m = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = 0.0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        errors += float(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(float(g) for g in sock.groups())
    return Figures(rps=rps, p50=pct("50"), p99=pct("99"), errors=errors, requests=total)


def measure(
    url: str,
    bodies: list[str],
    args: argparse.Namespace,
    tmp: Path,
    *,
    connections: int,
    seconds: float | None = None,
) -> Figures:
    seconds = args.seconds if seconds is None else seconds
    if shutil.which("wrk") and not args.python_loadgen:
        return run_wrk(url, bodies, seconds=seconds, connections=connections, tmp=tmp)
    r = loadgen.run(
        url,
        [b.encode() for b in bodies],
        seconds=seconds,
        processes=args.loadgen_processes,
        connections=max(1, connections // args.loadgen_processes),
    )
    return Figures(
        rps=r.throughput,
        p50=r.percentile(50),
        p99=r.percentile(99),
        errors=float(r.errors),
        requests=float(r.requests + r.errors),
    )


# ------------------------------------------------------------------------------ setup


def broker_config(
    *, url: str, redis_url: str, stand_ins: str, prefix: str, replay: bool, alg: str = "RS256"
) -> dict[str, Any]:
    def key() -> str:
        return base64.b64encode(os.urandom(32)).decode()

    return {
        "server": {"public_url": url},
        "redis": {"url": redis_url, "key_prefix": prefix},
        "security": {"identity_key": key(), "encryption_keys": [key()]},
        "sts": {"region": "us-east-1", "endpoint_url": stand_ins},
        "cache": {"replay": replay},
        "rate_limit": {"per_ip_per_minute": 0, "per_identity_per_minute": 0},
        "providers": {
            PROVIDER: {
                "type": "oidc",
                "display_name": "Benchmark IdP",
                "issuer": stand_ins,
                "jwks_url": f"{stand_ins}/jwks",
                "client_ids": [CLIENT_ID],
                "algorithms": [alg],
            }
        },
        "rules": [
            {
                "name": "bench-users",
                "providers": [PROVIDER],
                "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
                "require_email_verified": True,
                "roles": [ROLE],
                "max_duration_seconds": 3600,
            }
        ],
    }


@dataclass
class App:
    name: str
    port: int
    server: ManagedProcess
    broker: bool

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/credentials"


def sts_stats(stand_ins: str, *, reset: bool = False) -> dict[str, int]:
    if reset:
        return dict(requests.post(f"{stand_ins}/stats/reset", timeout=10).json())
    return dict(requests.get(f"{stand_ins}/stats", timeout=10).json())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds per mix, the apps in turn; the median round is reported",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8, help="gthread only")
    parser.add_argument("--worker-class", choices=("gthread", "gevent"), default="gevent")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--new-connections", type=int, default=64)
    parser.add_argument("--identities", type=int, default=1000)
    parser.add_argument("--sts-latency-ms", type=float, default=50)
    parser.add_argument(
        "--pool", type=int, default=20_000, help="never-seen tokens minted per measurement"
    )
    parser.add_argument("--mixes", default=",".join(MIXES), help="comma-separated")
    parser.add_argument("--alg", choices=("RS256", "ES256"), default="RS256")
    parser.add_argument("--loadgen-processes", type=int, default=2)
    parser.add_argument("--warmup-seconds", type=float, default=2)
    parser.add_argument(
        "--warm-seconds",
        type=float,
        default=4,
        help="load on the cached people before their rows, so every worker has seen them",
    )
    parser.add_argument("--soak-seconds", type=float, default=0)
    parser.add_argument("--soak-segment-seconds", type=float, default=60)
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample the broker's workers with py-spy during each row (bench/profile.py)",
    )
    parser.add_argument(
        "--python-loadgen", action="store_true", help="ignore wrk even if installed"
    )
    args = parser.parse_args(argv)
    if args.profile and not profile.available() and not profile.install():
        parser.error("--profile needs py-spy, and pip could not install it")
    args.mix_list = [m.strip() for m in args.mixes.split(",") if m.strip()]
    unknown = set(args.mix_list) - set(MIXES)
    if unknown:
        parser.error(f"unknown mix(es): {', '.join(sorted(unknown))}")
    return args


def start(
    args: argparse.Namespace, tmp: Path, servers: list[ManagedProcess]
) -> tuple[str, Issuer, list[App]]:
    """Redis, the stand-ins and the three apps; each appended to ``servers`` to stop."""
    redis = start_redis(tmp / "redis")
    servers.append(redis)
    stand_port = free_port()
    stand_ins = f"http://127.0.0.1:{stand_port}"
    issuer = Issuer(stand_ins, args.alg)
    key_file = tmp / "idp-key.pem"
    key_file.write_bytes(issuer.pem)
    argv = [sys.executable, "-m", "bench.stand_ins", "--port", str(stand_port)]
    argv += ["--key-file", str(key_file), "--sts-latency-ms", str(args.sts_latency_ms)]
    servers.append(
        ManagedProcess(
            "stand-ins",
            argv,
            port=stand_port,
            log_path=tmp / "stand-ins.log",
            env={"PYTHONPATH": str(ROOT)},
        )
    )
    apps: list[App] = []
    for name, wsgi, replay in (
        ("bare flask", "bench.bare_app:create_app()", None),
        ("broker replay on", "broker.wsgi:create_app()", True),
        ("broker replay off", "broker.wsgi:create_app()", False),
    ):
        port = free_port()
        env = {"PYTHONPATH": str(ROOT)}
        if replay is not None:
            config = broker_config(
                url=f"http://127.0.0.1:{port}",
                redis_url=f"redis://127.0.0.1:{redis.port}/0",
                stand_ins=stand_ins,
                prefix=f"bench-{port}:",
                replay=replay,
                alg=args.alg,
            )
            path = tmp / f"broker-{port}.toml"
            path.write_text(dump_toml(config))
            env["BROKER_CONFIG"] = str(path)
        server = gunicorn(wsgi, port=port, args=args, env=env, log=tmp / f"{port}.log")
        servers.append(server)
        apps.append(App(name, port, server, broker=replay is not None))
    for app in apps:
        wait_booted(app.server, args.workers)
    return stand_ins, issuer, apps


def median_round(rounds: list[Figures]) -> Figures:
    """The round with the median req/s (its latencies and memory as measured), with the
    STS calls, subjects and errors of every round added up and the highest peak."""
    ordered = sorted(rounds, key=lambda f: f.rps)
    middle = ordered[(len(ordered) - 1) // 2]
    return Figures(
        rps=middle.rps,
        p50=middle.p50,
        p99=middle.p99,
        errors=sum(f.errors for f in rounds),
        requests=sum(f.requests for f in rounds),
        sts_calls=sum(f.sts_calls for f in rounds),
        sts_subjects=sum(f.sts_subjects for f in rounds),
        sts_peak=max(f.sts_peak for f in rounds),
        rss_mb=rounds[-1].rss_mb,
        spread=(ordered[0].rps, ordered[-1].rps),
    )


def warm(app: App, bodies: list[str]) -> None:
    """Send each body once (64 at a time) and check every answer is a 200."""

    def send(body: str) -> int:
        return requests.post(app.url, data=body, headers=_JSON, timeout=60).status_code

    with ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(send, bodies))
    failed = len([s for s in statuses if s != 200])
    if failed:
        raise RuntimeError(f"{app.name}: {failed} of {len(bodies)} warm-up requests failed")


def bodies_for(
    mix: str, issuer: Issuer, people: list[str], cached: list[str], pool: int
) -> list[str]:
    """One round's request bodies for ``mix``, shared by the apps: each keeps its own
    memories and Redis prefix, so a token or person new to one is new to the others."""
    if mix == "one token":
        return [issuer.body("alice")]
    if mix == "cached identities":
        return cached
    if mix == "fresh tokens":
        return [issuer.body(random.choice(people)) for _ in range(pool)]
    tag = secrets.token_hex(3)
    return [issuer.body(f"new-{tag}-{i}") for i in range(pool)]


def run_mix(
    mix: str,
    app: App,
    *,
    issuer: Issuer,
    cached: list[str],
    stand_ins: str,
    args: argparse.Namespace,
    tmp: Path,
    bodies: list[str],
    profile_row: bool,
) -> Figures:
    connections = args.new_connections if mix == "new identities" else args.connections
    one = [issuer.body("alice")]
    if mix in {"cached identities", "fresh tokens"}:
        # Every person's credentials cached (and, with replay on, their one token
        # remembered) before the measurement.
        warm(app, cached)
        # In every worker, as the steady state is: one pass reaches one worker per
        # person, and the others would verify the token and ask Redis during the row.
        if args.warm_seconds:
            measure(app.url, cached, args, tmp, connections=connections, seconds=args.warm_seconds)
    if args.warmup_seconds:
        measure(app.url, one, args, tmp, connections=connections, seconds=args.warmup_seconds)
    sts_stats(stand_ins, reset=True)
    spy = None
    if args.profile and app.broker and profile_row:
        args.profile.mkdir(parents=True, exist_ok=True)
        samples = args.profile / f"{mix}-{app.name}.txt".replace(" ", "-")
        spy = profile.start(app.server.proc.pid, args.seconds, samples)
    figures = measure(app.url, bodies, args, tmp, connections=connections)
    if spy is not None:
        spy.wait(timeout=60)
        print(f"\nprofile: {mix}, {app.name}\n{profile.summarize(samples)}", flush=True)
    stats = sts_stats(stand_ins)
    figures.sts_calls = stats["sts_calls"]
    figures.sts_subjects = stats["distinct_subjects"]
    figures.sts_peak = stats["max_in_flight"]
    figures.rss_mb = worker_rss_mb(app.server)
    # (The bare endpoint reads no token: a wrapped pool changes nothing for it.)
    if app.broker and mix in {"fresh tokens", "new identities"} and figures.requests > len(bodies):
        print(
            f"note: {mix}/{app.name} sent {figures.requests:.0f} requests from a pool of "
            f"{len(bodies)}: the pool wrapped, so some tokens were not new (raise --pool)"
        )
    return figures


def load_tool(args: argparse.Namespace) -> None:
    """wrk, installed with apt-get when missing (root only); else bench/loadgen.py, which
    spends more of the same two cores on making the load."""
    if args.python_loadgen or shutil.which("wrk"):
        return
    reason = apt_install("wrk")
    if reason is not None:
        print(f"note: no wrk ({reason}); the load comes from bench/loadgen.py")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_tool(args)
    tmp = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    servers: list[ManagedProcess] = []
    try:
        stand_ins, issuer, apps = start(args, tmp, servers)
        people = [f"user{i:05d}" for i in range(args.identities)]
        cached = [issuer.body(p) for p in people]
        for app in apps:
            first = requests.post(app.url, data=cached[0], timeout=30, headers=_JSON)
            if first.status_code != 200:
                print(f"{app.name}: first request failed: {first.status_code} {first.text}")
                return 1
        rounds: dict[tuple[str, str], list[Figures]] = {}
        for mix in args.mix_list:
            for number in range(args.rounds):
                bodies = bodies_for(mix, issuer, people, cached, args.pool)
                # Each round starts with another app: none is always measured first.
                shift = number % len(apps)
                for app in apps[shift:] + apps[:shift]:
                    figures = run_mix(
                        mix,
                        app,
                        issuer=issuer,
                        cached=cached,
                        stand_ins=stand_ins,
                        args=args,
                        tmp=tmp,
                        bodies=bodies,
                        profile_row=number == 0,
                    )
                    rounds.setdefault((mix, app.name), []).append(figures)
        results = {row: median_round(figures) for row, figures in rounds.items()}
        report(results, args.mix_list, apps, args)
        if args.soak_seconds:
            soak(apps, issuer, people, args, tmp)
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


_JSON = {"Content-Type": "application/json"}


def report(
    results: dict[tuple[str, str], Figures],
    mixes: list[str],
    apps: list[App],
    args: argparse.Namespace,
) -> None:
    tool = "wrk" if shutil.which("wrk") and not args.python_loadgen else "bench/loadgen.py"
    load = os.getloadavg()
    print(
        f"\nPOST /v1/credentials, gunicorn {args.worker_class} workers={args.workers}"
        + (f" threads={args.threads}" if args.worker_class == "gthread" else "")
        + f", {args.seconds:.0f}s per round, median of {args.rounds} round(s) (the apps "
        f"in turn), {args.connections} connections "
        f"({args.new_connections} for new identities), STS latency "
        f"{args.sts_latency_ms:.0f} ms, {args.identities} identities, load: {tool}, "
        f"cores: {os.cpu_count()}, load average after: {load[0]:.2f}"
    )
    print(
        f"{'mix':18} {'app':18} {'req/s':>7} {'ratio':>6} {'rounds req/s':>13} "
        f"{'p50 ms':>7} {'p99 ms':>8} "
        f"{'errors':>6} {'requests':>8} {'STS':>6} {'STS subj':>8} {'peak':>4}  worker RSS MB"
    )
    for mix in mixes:
        bare = results[(mix, "bare flask")].rps
        for app in apps:
            r = results[(mix, app.name)]
            rss = "/".join(f"{x:.0f}" for x in r.rss_mb)
            print(
                f"{mix:18} {app.name:18} {r.rps:7.0f} {r.rps / bare:6.2f} "
                f"{f'{r.spread[0]:.0f}-{r.spread[1]:.0f}':>13} {r.p50:7.2f} "
                f"{r.p99:8.2f} {r.errors:6.0f} {r.requests:8.0f} {r.sts_calls:6d} "
                f"{r.sts_subjects:8d} {r.sts_peak:4d}  {rss}"
            )
    print("targets (broker / bare flask in this run):")
    for mix, target in TARGETS.items():
        if mix not in mixes:
            continue
        bare = results[(mix, "bare flask")].rps
        for app in apps[1:]:
            r = results[(mix, app.name)]
            ratio = r.rps / bare
            extra = ""
            if mix == "new identities":
                one_each = r.sts_calls == r.sts_subjects
                extra = (
                    f", {r.sts_calls} STS calls for {r.sts_subjects} identities"
                    f" ({'one each' if one_each else 'NOT one each'}), {r.errors:.0f} errors"
                )
            verdict = "met" if ratio >= target else "NOT met"
            print(f"  {mix}, {app.name}: {ratio:.2f} (>= {target}: {verdict}){extra}")
    bare_rss = max(results[(mixes[-1], "bare flask")].rss_mb or [0.0])
    for app in apps[1:]:
        most = max(results[(mixes[-1], app.name)].rss_mb or [0.0])
        if bare_rss:
            verdict = "met" if most <= 1.3 * bare_rss else "NOT met"
            print(
                f"  worker RSS, {app.name}: {most:.0f} MB = {most / bare_rss:.2f} x bare "
                f"flask ({bare_rss:.0f} MB) (<= 1.3: {verdict})"
            )


def soak(
    apps: list[App], issuer: Issuer, people: list[str], args: argparse.Namespace, tmp: Path
) -> None:
    """The broker (replay on) under a mixed load, its workers' RSS after each segment."""
    app = apps[1]
    print(
        f"\nsoak: {app.name}, {args.soak_seconds:.0f}s in {args.soak_segment_seconds:.0f}s "
        f"segments, {args.new_connections} connections; each segment's bodies: 60% cached "
        "identities' tokens, 30% fresh tokens for them, 10% new identities"
    )
    print(
        f"  bare flask worker RSS MB: {'/'.join(f'{x:.0f}' for x in worker_rss_mb(apps[0].server))}"
    )
    cached = [issuer.body(p) for p in people]
    start = time.monotonic()
    segment = 0
    while time.monotonic() - start < args.soak_seconds:
        segment += 1
        size = min(args.pool, 6000)
        bodies = (
            [random.choice(cached) for _ in range(size * 6 // 10)]
            + [issuer.body(random.choice(people)) for _ in range(size * 3 // 10)]
            + [issuer.body(f"soak-{segment}-{i}") for i in range(size // 10)]
        )
        random.shuffle(bodies)
        r = measure(
            app.url,
            bodies,
            args,
            tmp,
            connections=args.new_connections,
            seconds=args.soak_segment_seconds,
        )
        rss = "/".join(f"{x:.0f}" for x in worker_rss_mb(app.server))
        print(
            f"  t={time.monotonic() - start:5.0f}s req/s {r.rps:6.0f} errors {r.errors:4.0f} "
            f"p99 {r.p99:7.1f} ms  worker RSS MB {rss}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
