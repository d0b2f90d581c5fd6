"""Load benchmark: the cached path of POST /v1/credentials vs a bare Flask endpoint.

Both run under gunicorn with the same settings in the same run; the figures printed are
throughput (requests/s), the ratio, and p50/p99 latency. Usage:

    python3 run.py bench [--seconds 10] [--rounds 3] [--workers 2] [--threads 4]

Uses `wrk` when it is installed (apt-get install wrk), else bench/loadgen.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402
from broker.devstack.oidc_login import login  # noqa: E402
from broker.devstack.processes import ManagedProcess, free_port  # noqa: E402
from broker.devstack.stack import DEV_CLIENT_ID, DEV_PROVIDER, dump_toml, local_stack  # noqa: E402


def gunicorn(
    app: str, *, port: int, workers: int, threads: int, env: dict[str, str], log: Path
) -> ManagedProcess:
    argv = [
        str(Path(sys.executable).parent / "gunicorn"),
        "-c",
        str(ROOT / "deploy" / "gunicorn.conf.py"),
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--chdir",
        str(ROOT),
        app,
    ]
    return ManagedProcess(app, argv, port=port, log_path=log, env=env)


WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open(os.getenv("BENCH_BODY_FILE")):read("*a")
"""


def run_wrk(
    url: str, payload: dict[str, Any], *, seconds: float, connections: int, tmp: Path
) -> dict[str, float]:
    body = tmp / "body.json"
    body.write_text(json.dumps(payload))
    script = tmp / "post.lua"
    script.write_text(WRK_LUA)
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{int(seconds)}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BENCH_BODY_FILE": str(body)},
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        m = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": rps,
        "p50": pct("50"),
        "p99": pct("99"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
    }


def measure(
    url: str, payload: dict[str, Any], args: argparse.Namespace, tmp: Path
) -> dict[str, float]:
    warmup = args.warmup_seconds
    if shutil.which("wrk") and not args.python_loadgen:
        if warmup:
            run_wrk(url, payload, seconds=warmup, connections=args.connections, tmp=tmp)
        return run_wrk(url, payload, seconds=args.seconds, connections=args.connections, tmp=tmp)
    if warmup:
        loadgen.run(url, payload, seconds=warmup, processes=1, connections=args.connections)
    r = loadgen.run(
        url,
        payload,
        seconds=args.seconds,
        processes=args.loadgen_processes,
        connections=max(1, args.connections // args.loadgen_processes),
    )
    return {
        "rps": r.throughput,
        "p50": r.percentile(50),
        "p99": r.percentile(99),
        "errors": float(r.errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--loadgen-processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per app")
    parser.add_argument("--warmup-seconds", type=float, default=2)
    parser.add_argument(
        "--python-loadgen", action="store_true", help="ignore wrk even if installed"
    )
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    with local_stack(tmp / "stack") as stack:
        broker_port, bare_port = free_port(), free_port()
        config = stack.config(f"http://127.0.0.1:{broker_port}")
        config["rate_limit"] = {"per_ip_per_minute": 0, "per_identity_per_minute": 0}
        config_path = tmp / "broker.toml"
        config_path.write_text(dump_toml(config))
        env = {"BROKER_CONFIG": str(config_path), "PYTHONPATH": str(ROOT)}

        nonce = secrets.token_urlsafe(8)
        token = login(
            stack.oidc.url, subject="alice", client_id=DEV_CLIENT_ID, nonce=nonce
        ).id_token
        payload = {"provider": DEV_PROVIDER, "token": token, "nonce": nonce}

        no_replay_port = free_port()
        # name -> (WSGI app, port, extra environment)
        apps: dict[str, tuple[str, int, dict[str, str]]] = {
            "bare flask endpoint": ("bench.bare_app:create_app()", bare_port, {}),
            "broker cached path": ("broker.wsgi:create_app()", broker_port, {}),
            # The same, without the per-worker replay of identical requests: every request
            # runs routing, JSON checks, the token check, rules and the cache lookup.
            "broker, replay off": (
                "broker.wsgi:create_app()",
                no_replay_port,
                {"BROKER_CACHE__REPLAY": "false"},
            ),
        }
        servers = [
            gunicorn(
                app,
                port=port,
                workers=args.workers,
                threads=args.threads,
                env={**env, **extra},
                log=tmp / f"{port}.log",
            )
            for app, port, extra in apps.values()
        ]
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in apps}
        try:
            for name, (_app, port, _env) in apps.items():
                url = f"http://127.0.0.1:{port}/v1/credentials"
                first = requests.post(url, json=payload, timeout=30)
                if first.status_code != 200:
                    print(f"{name}: warm-up request failed: {first.status_code} {first.text}")
                    return 1
            # Let the freshly started stack settle, then alternate the two apps so a
            # burst of background work cannot favour either one.
            time.sleep(min(2.0, args.warmup_seconds))
            for _ in range(args.rounds):
                for name, (_app, port, _env) in apps.items():
                    url = f"http://127.0.0.1:{port}/v1/credentials"
                    rounds[name].append(measure(url, payload, args, tmp))
        finally:
            for server in servers:
                server.stop()
        # The median round by throughput, per app.
        results = {
            name: sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
            for name, runs in rounds.items()
        }

    tool = "wrk" if shutil.which("wrk") and not args.python_loadgen else "bench/loadgen.py"
    print(
        f"\nPOST /v1/credentials, gunicorn gthread workers={args.workers} threads={args.threads}, "
        f"{args.connections} connections, {args.rounds} x {args.seconds:.0f}s per app "
        f"(median round shown), load: {tool}, cores: {os.cpu_count()}"
    )
    for name, runs in rounds.items():
        figures = ", ".join(f"{r['rps']:.0f}" for r in runs)
        print(f"  {name} rounds req/s: {figures}")
    print(f"{'':22} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, r in results.items():
        print(f"{name:22} {r['rps']:10.0f} {r['p50']:8.2f} {r['p99']:8.2f} {r['errors']:7.0f}")
    bare = results["bare flask endpoint"]["rps"]
    print(f"ratio cached/bare: {results['broker cached path']['rps'] / bare:.2f} (target >= 0.80)")
    print(f"ratio replay off/bare: {results['broker, replay off']['rps'] / bare:.2f}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
