"""The embedded dev stack: real local Redis, STS (moto), an OIDC provider, Login with
Amazon and Facebook stand-ins and the AWS federation endpoint, plus the broker.

``broker dev`` starts everything on free ports, wires the broker to it with an example
rule set, prints what to do next and stops it all on Ctrl-C, leaving nothing running.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from werkzeug.serving import make_server

from broker.devstack.federation_server import FederationServer, start_federation_server
from broker.devstack.moto_server import RoleSpec, seed_aws, start_moto
from broker.devstack.oidc_server import DEMO_USERS, start_oidc_provider
from broker.devstack.processes import ManagedProcess
from broker.devstack.redis_server import start_redis
from broker.devstack.social_servers import SocialServers, start_social_servers

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

DEV_CLIENT_ID = "broker-demo"
DEV_PROVIDER = "demo"
SOCIAL_PROVIDERS = ("amazon", "facebook")
ACCOUNT_ID = "123456789012"  # moto's default account
DEMO_BUCKET = "broker-demo-bucket"
OTHER_BUCKET = "broker-other-bucket"
ADMIN_ROLE = f"arn:aws:iam::{ACCOUNT_ID}:role/BrokerDemoAdmin"
USER_ROLE = f"arn:aws:iam::{ACCOUNT_ID}:role/BrokerDemoUser"
STATE_FILE = "state.json"

DEV_ROLES = (
    RoleSpec(
        name="BrokerDemoAdmin",
        policy={
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        },
    ),
    RoleSpec(
        name="BrokerDemoUser",
        policy={
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["s3:ListBucket", "s3:GetObject", "s3:PutObject"],
                    "Resource": [
                        f"arn:aws:s3:::{DEMO_BUCKET}",
                        f"arn:aws:s3:::{DEMO_BUCKET}/*",
                    ],
                }
            ],
        },
    ),
)


def _dev_keys(workdir: Path) -> dict[str, str]:
    """Dev keys persist in the workdir so identity ids stay stable across restarts."""
    path = workdir / "dev-keys.json"
    if path.exists():
        keys: dict[str, str] = json.loads(path.read_text())
        return keys
    keys = {
        "identity_key": base64.b64encode(os.urandom(32)).decode(),
        "encryption_key": base64.b64encode(os.urandom(32)).decode(),
    }
    _write_private(path, json.dumps(keys))
    return keys


def dev_config(
    *,
    broker_url: str,
    redis_url: str,
    sts_url: str,
    issuer: str,
    keys: Mapping[str, str],
    extra_providers: Mapping[str, Any] | None = None,
    federation_url: str | None = None,
) -> dict[str, Any]:
    """The example configuration the dev stack runs with (and the tests start from).

    ``extra_providers`` named ``amazon``/``facebook`` get the social example rule."""
    social = [name for name in SOCIAL_PROVIDERS if name in (extra_providers or {})]
    config: dict[str, Any] = {
        "server": {"public_url": broker_url},
        "redis": {"url": redis_url, "key_prefix": "broker-dev:"},
        "security": {
            "identity_key": keys["identity_key"],
            "encryption_keys": [keys["encryption_key"]],
        },
        "sts": {"region": "us-east-1", "endpoint_url": sts_url},
        # Plain http on localhost: a Secure cookie would never be sent back.
        "web": {"cookie_secure": False},
        "providers": {
            DEV_PROVIDER: {
                "type": "oidc",
                "display_name": "Demo OpenID Connect provider",
                "issuer": issuer,
                "client_ids": [DEV_CLIENT_ID],
                "client_secret": "demo-client-secret",
            },
            **(extra_providers or {}),
        },
        "rules": [
            {
                "name": "admins-with-mfa",
                "providers": [DEV_PROVIDER],
                "conditions": [{"claim": "groups", "op": "contains", "value": "admins"}],
                "require_mfa": True,
                "require_email_verified": True,
                "roles": [ADMIN_ROLE, USER_ROLE],
                "max_duration_seconds": 43200,
            },
            {
                "name": "example-users",
                "providers": [DEV_PROVIDER],
                "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
                "require_email_verified": True,
                "roles": [USER_ROLE],
                "max_duration_seconds": 3600,
                # Each user may only touch their own prefix of the demo bucket.
                "session_policy": {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Action": ["s3:GetObject", "s3:PutObject"],
                            "Resource": f"arn:aws:s3:::{DEMO_BUCKET}/users/${{identity_id}}/*",
                        },
                        {
                            "Effect": "Allow",
                            "Action": "s3:ListBucket",
                            "Resource": f"arn:aws:s3:::{DEMO_BUCKET}",
                        },
                    ],
                },
            },
        ],
    }
    if social:
        # Login with Amazon and Facebook carry no email_verified claim: both only
        # release addresses their owners confirmed, so the rule does not ask for it.
        config["rules"].append(
            {
                "name": "social-example-users",
                "providers": social,
                "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
                "roles": [USER_ROLE],
                "max_duration_seconds": 3600,
                "session_policy": config["rules"][1]["session_policy"],
            }
        )
    if federation_url:
        config["console"] = {"federation_url": federation_url}
    return config


@dataclass(frozen=True, kw_only=True)
class Stack:
    workdir: Path
    redis: ManagedProcess
    moto: ManagedProcess
    oidc: ManagedProcess
    social: SocialServers
    federation: FederationServer
    keys: Mapping[str, str]

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    def config(self, broker_url: str, *, social: bool = False) -> dict[str, Any]:
        """The dev configuration; ``social`` adds the Login with Amazon and Facebook
        providers (Limited Login on) served by the local stand-ins."""
        extra = (
            self.social.provider_config(limited_login=True, limited_login_sts_ready=True)
            if social
            else None
        )
        return dev_config(
            broker_url=broker_url,
            redis_url=self.redis_url,
            sts_url=self.moto.url,
            issuer=self.oidc.url,
            keys=self.keys,
            extra_providers=extra,
            federation_url=self.federation.url,
        )


@contextmanager
def local_stack(workdir: Path) -> Iterator[Stack]:
    """Redis, moto (IAM auth on, demo roles seeded), the OIDC provider, the social
    stand-ins and the federation endpoint, all stopped on exit whatever happens."""
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        redis = start_redis(workdir)
        stack.callback(redis.stop)
        moto = start_moto(workdir)
        stack.callback(moto.stop)
        seed_aws(moto.url, DEV_ROLES, buckets=(DEMO_BUCKET, OTHER_BUCKET))
        oidc = start_oidc_provider(workdir)
        stack.callback(oidc.stop)
        social = start_social_servers()
        stack.callback(social.stop)
        federation = start_federation_server(sts_url=moto.url)
        stack.callback(federation.stop)
        yield Stack(
            workdir=workdir,
            redis=redis,
            moto=moto,
            oidc=oidc,
            social=social,
            federation=federation,
            keys=_dev_keys(workdir),
        )


def _write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, readable by this user only from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return path


class _LateApp:
    """A WSGI app given its app after the server that serves it is listening."""

    def __init__(self) -> None:
        self.app: WSGIApplication | None = None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        if self.app is None:  # nothing is served before the banner says it is up
            start_response("503 Service Unavailable", [("Retry-After", "1")])
            return [b""]
        return self.app(environ, start_response)


def run_dev(*, port: int, workdir: str, keep: bool = False) -> int:
    from broker.app import create_app
    from broker.settings import settings_from_mapping

    root = Path(workdir).resolve()
    # This user's alone: the directory holds the dev keys and Redis's files.
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.chmod(0o700)
    # Bound now, before the stack starts: with port 0 the OS picks one that stays ours
    # (a port found free and bound seconds later may be taken meanwhile). The app is
    # plugged in once the stack it talks to is up.
    late = _LateApp()
    server = make_server("127.0.0.1", port, late, threaded=True)
    port = server.server_port
    broker_url = f"http://127.0.0.1:{port}"
    print("starting the dev stack (Redis, STS, OIDC provider, social, federation) ...", flush=True)
    with local_stack(root / "run") as stack:
        # Environment overrides apply to the dev stack too (e.g. BROKER_RATE_LIMIT__...).
        config = stack.config(broker_url, social=True)
        settings = settings_from_mapping(config, source="dev stack")
        # The same configuration as a file, for `broker explain --config` and check-config,
        # and each demo user's claims for `--claims`: while the stack runs, and readable
        # by this user alone (the file holds the dev stack's keys).
        written = [_write_private(root / "broker.toml", dump_toml(config))]
        written += [
            _write_private(root / f"{user['sub']}.json", json.dumps(dict(user)))
            for user in DEMO_USERS
        ]
        app = late.app = create_app(settings)
        state = {
            "broker_url": broker_url,
            "issuer": stack.oidc.url,
            "client_id": DEV_CLIENT_ID,
            "provider": DEV_PROVIDER,
            "sts_url": stack.moto.url,
            "redis_url": stack.redis_url,
            "users": [u["sub"] for u in DEMO_USERS],
            "amazon_url": stack.social.amazon.url,
            "amazon_users": list(stack.social.amazon.users),
            "facebook_url": stack.social.facebook.url,
            "facebook_users": list(stack.social.facebook.users),
            "federation_url": stack.federation.url,
            "config_file": str(root / "broker.toml"),
            "pid": os.getpid(),
        }
        state_path = root / STATE_FILE
        state_path.write_text(json.dumps(state, indent=2))

        def stop(_signum: int, _frame: FrameType | None) -> None:
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        # Ctrl-C stops the stack even when it was started with SIGINT ignored (a shell
        # starts background jobs that way, and children inherit it across exec).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(_banner(state), flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
            state_path.unlink(missing_ok=True)
            for path in written:
                path.unlink(missing_ok=True)
            app.extensions["broker"].close()
            print("\nstopping the dev stack ...", flush=True)
    if not keep:
        # The processes' files and the dev keys: a new start makes new ones.
        shutil.rmtree(root / "run", ignore_errors=True)
        with suppress(OSError):
            root.rmdir()  # only if nothing else of the user's is in it
    print("stopped; nothing left running.", flush=True)
    return 0


def _banner(state: Mapping[str, Any]) -> str:
    url = state["broker_url"]
    return f"""
Broker dev stack is up.
  broker        {url}      (health: {url}/readyz)
  OIDC provider {state["issuer"]}   demo users: {", ".join(state["users"])}
  Amazon (LWA)  {state["amazon_url"]}   demo users: {", ".join(state["amazon_users"])}
  Facebook      {state["facebook_url"]}   demo users: {", ".join(state["facebook_users"])}
  STS (moto)    {state["sts_url"]}
  Federation    {state["federation_url"]}
  Redis         {state["redis_url"]}

Next, in another terminal:
  python3 run.py broker demo-login --user alice          # admin rule (MFA), two roles
  python3 run.py broker demo-login --user bob            # example-users rule, scoped policy
  python3 run.py broker demo-login --user mallory        # unverified email: 403
  python3 run.py broker demo-login --provider amazon --user bob     # Login with Amazon
  python3 run.py broker demo-login --provider facebook --user bob   # Facebook
  python3 run.py broker demo-login --user alice --console           # console sign-in URL
Or open {url}/login in a browser and pick a demo user (no passwords in the dev stack).
Why a user gets (or not) a role, and the session policy they would get (mints nothing):
  python3 run.py broker explain --config {state["config_file"]} --provider demo \\
      --claims {Path(state["config_file"]).with_name("bob.json")}

Ctrl-C stops everything.
"""


def dump_toml(data: Mapping[str, Any]) -> str:
    """Enough TOML for the dev config (tables, arrays of tables, scalars, lists), so the
    dev stack and the benchmark can hand gunicorn a real config file."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, str):
            return json.dumps(value)
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        if isinstance(value, Mapping):
            return (
                "{ " + ", ".join(f"{json.dumps(k)} = {scalar(v)}" for k, v in value.items()) + " }"
            )
        raise TypeError(f"cannot write {type(value).__name__} as TOML")

    def is_table_list(value: Any) -> bool:
        return (
            isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)
        )

    lines: list[str] = []

    def table(prefix: str, node: Mapping[str, Any]) -> None:
        simple = {
            k: v for k, v in node.items() if not isinstance(v, Mapping) and not is_table_list(v)
        }
        if simple or not prefix:
            if prefix:
                lines.append(f"\n[{prefix}]")
            lines.extend(f"{json.dumps(k)} = {scalar(v)}" for k, v in simple.items())
        for k, v in node.items():
            name = f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k)
            if isinstance(v, Mapping):
                table(name, v)
            elif is_table_list(v):
                for item in v:
                    lines.append(f"\n[[{name}]]")
                    lines.extend(f"{json.dumps(ik)} = {scalar(iv)}" for ik, iv in item.items())

    table("", data)
    return "\n".join(lines).lstrip() + "\n"
