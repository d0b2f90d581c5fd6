"""The ``broker`` command: serve | dev | check-config | demo-login | keygen."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from broker.settings import ConfigError, load_settings


def _configure_logging(level: str) -> None:
    from broker.logs import configure

    configure(level)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{settings.source}: OK (config version {settings.config_version})")
    print(f"  providers: {', '.join(f'{n} ({p.type})' for n, p in settings.providers.items())}")
    for rule in settings.rules:
        print(f"  rule {rule.name!r}: {', '.join(rule.providers)} -> {', '.join(rule.roles)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    _configure_logging(args.log_level)
    from broker.server import serve

    serve(settings, bind=args.bind, workers=args.workers, threads=args.threads)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    from broker.devstack.stack import run_dev

    return run_dev(port=args.port, workdir=args.workdir)


def cmd_demo_login(args: argparse.Namespace) -> int:
    from broker.devstack.demo import demo_login

    try:
        result = demo_login(
            user=args.user,
            provider=args.provider,
            role_arn=args.role_arn,
            duration_seconds=args.duration,
            console=args.console,
            workdir=args.workdir,
        )
    except RuntimeError as exc:
        print(f"demo-login: {exc}", file=sys.stderr)
        return 1
    output: Any = result["credentials"] if args.credential_process and not args.console else result
    print(json.dumps(output, indent=None if args.credential_process else 2))
    return 0


def cmd_keygen(_args: argparse.Namespace) -> int:
    def key() -> str:
        return base64.b64encode(os.urandom(32)).decode()

    print("[security]")
    print(f'identity_key = "{key()}"')
    print(f'encryption_keys = ["{key()}"]')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the broker under gunicorn")
    p.add_argument("--config", help="TOML config file (default: $BROKER_CONFIG)")
    p.add_argument("--bind", default="127.0.0.1:8000")
    p.add_argument("--workers", type=int, default=None, help="default: 2 x CPU cores")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--log-level", default="info")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("dev", help="run the broker on the embedded local dev stack")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workdir", default=".devstack", help="state, logs and dev keys")
    p.add_argument("--log-level", default="info")
    p.set_defaults(fn=cmd_dev)

    p = sub.add_parser("check-config", help="validate a config file and report every problem")
    p.add_argument("config", nargs="?", help="TOML config file (default: $BROKER_CONFIG)")
    p.set_defaults(fn=cmd_check_config)

    p = sub.add_parser(
        "demo-login",
        help="sign a demo user in at a dev stack provider and fetch credentials",
    )
    p.add_argument("--user", default="alice", help="demo user: alice, bob, carol or mallory")
    p.add_argument(
        "--provider",
        default="demo",
        choices=("demo", "amazon", "facebook"),
        help="demo (OpenID Connect), amazon (Login with Amazon) or facebook",
    )
    p.add_argument("--role-arn", default=None)
    p.add_argument(
        "--duration",
        type=int,
        default=None,
        help="DurationSeconds (SessionDuration with --console)",
    )
    p.add_argument(
        "--console", action="store_true", help="ask for an AWS console sign-in URL instead"
    )
    p.add_argument("--workdir", default=".devstack")
    p.add_argument(
        "--credential-process",
        action="store_true",
        help="print only the credential_process object (for ~/.aws/config)",
    )
    p.set_defaults(fn=cmd_demo_login)

    p = sub.add_parser("keygen", help="print fresh random keys for the [security] section")
    p.set_defaults(fn=cmd_keygen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.fn(args)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig()
    sys.exit(main())
