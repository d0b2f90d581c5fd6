"""moto in server mode as the local STS, IAM and S3, with IAM authentication switched on.

``start_moto`` spawns ``python -m broker.devstack.moto_server --port N`` with
authentication off; ``seed_aws`` creates roles, buckets and an admin user and then
switches authentication on (``POST /moto-api/reset-auth`` with body ``0``). From then on
moto checks every signed call: unknown access keys are refused, signatures are verified
and the identity's IAM policies (a role's policies for assumed-role credentials) decide
each action, including the ``Resource`` element for S3 bucket and object ARNs.

What moto does *not* do for ``AssumeRoleWithWebIdentity``, even with authentication
on: validate the web identity token, check that the role exists, evaluate the role's
trust policy, check ``RoleSessionName`` or ``DurationSeconds`` against the role's
maximum, or apply the session policy or ``PolicyArns`` to the credentials it issues
(only the role's own policies decide what they may do). Those are the broker's to check
before the call, and our tests' to cover.

moto imports read ``INITIAL_NO_AUTH_ACTION_COUNT`` once, so moto is imported only inside
the server process (``main``), never by code that merely starts or seeds it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from broker.devstack.processes import ManagedProcess, free_port

DEFAULT_REGION = "us-east-1"
ADMIN_USER = "broker-devstack-admin"

# Principals real IAM roles trust for AssumeRoleWithWebIdentity through the built-in
# providers. moto does not evaluate trust policies for that call; the roles carry one
# anyway so that `get-role` shows what a real deployment needs.
WEB_IDENTITY_TRUST_POLICY: Mapping[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Federated": federated},
            "Action": "sts:AssumeRoleWithWebIdentity",
        }
        for federated in ("accounts.google.com", "www.amazon.com", "graph.facebook.com")
    ],
}


@dataclass(frozen=True, kw_only=True)
class RoleSpec:
    name: str
    policy: Mapping[str, Any]  # the role's inline permissions policy
    trust_policy: Mapping[str, Any] = field(default_factory=lambda: WEB_IDENTITY_TRUST_POLICY)
    max_session_duration: int = 43200


@dataclass(frozen=True, kw_only=True)
class AdminKeys:
    """Long-term keys of an IAM user allowed everything: for tests to inspect state."""

    access_key_id: str
    secret_access_key: str = field(repr=False)


# --------------------------------------------------------------------------- API


def start_moto(workdir: Path, *, port: int | None = None) -> ManagedProcess:
    """moto on 127.0.0.1 with authentication off until ``seed_aws`` switches it on."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        # Effectively "never": seed_aws switches authentication on explicitly.
        "INITIAL_NO_AUTH_ACTION_COUNT": "1000000000",
        # moto's own boto3 use (and any SDK defaults in the child) must never find real
        # AWS credentials on the developer's machine.
        "AWS_ACCESS_KEY_ID": "moto-server",
        "AWS_SECRET_ACCESS_KEY": "moto-server",
        "AWS_DEFAULT_REGION": DEFAULT_REGION,
        "MOTO_RECORDER_FILEPATH": str(workdir / f"moto-{port}-recording.jsonl"),
    }
    argv = [sys.executable, "-m", "broker.devstack.moto_server", "--port", str(port)]
    return ManagedProcess("moto", argv, port=port, log_path=workdir / f"moto-{port}.log", env=env)


def seed_aws(
    endpoint_url: str,
    roles: Sequence[RoleSpec],
    *,
    buckets: Sequence[str] = (),
    region: str = DEFAULT_REGION,
) -> AdminKeys:
    """Create roles, buckets and an admin user, then switch IAM authentication on."""
    # Authentication may be on from an earlier seed; creating things needs it off.
    set_auth(endpoint_url, enabled=False)
    iam = _client("iam", endpoint_url, region)
    for role in roles:
        iam.create_role(
            RoleName=role.name,
            AssumeRolePolicyDocument=json.dumps(role.trust_policy),
            MaxSessionDuration=role.max_session_duration,
        )
        iam.put_role_policy(
            RoleName=role.name,
            PolicyName=f"{role.name}-policy",
            PolicyDocument=json.dumps(role.policy),
        )
    s3 = _client("s3", endpoint_url, region)
    for bucket in buckets:
        s3.create_bucket(Bucket=bucket)
    admin = _ensure_admin(iam)
    set_auth(endpoint_url, enabled=True)
    return admin


def set_auth(endpoint_url: str, *, enabled: bool) -> None:
    """Switch moto's IAM authentication on (every call checked) or off."""
    response = requests.post(
        f"{endpoint_url}/moto-api/reset-auth",
        # moto parses the body as a float: how many calls may still skip the checks.
        # Not form-encoded, or werkzeug would consume it and moto would read "".
        data=b"0" if enabled else b"inf",
        headers={"Content-Type": "text/plain"},
        timeout=10,
    )
    response.raise_for_status()


def _ensure_admin(iam: Any) -> AdminKeys:
    with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
        iam.create_user(UserName=ADMIN_USER)
    iam.put_user_policy(
        UserName=ADMIN_USER,
        PolicyName="AdministratorAccess",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName=ADMIN_USER)["AccessKey"]
    return AdminKeys(access_key_id=key["AccessKeyId"], secret_access_key=key["SecretAccessKey"])


def _client(service: str, endpoint_url: str, region: str) -> Any:
    import botocore.session
    from botocore.config import Config

    session = botocore.session.Session()
    return session.create_client(
        service,
        region_name=region,
        endpoint_url=endpoint_url,
        # Any keys do while authentication is off; never the developer's real ones.
        aws_access_key_id="seed",
        aws_secret_access_key="seed",  # noqa: S106 - a dummy for moto
        config=Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 1}),
    )


# --------------------------------------------------------------------------- server


def _allow_unsigned_web_identity() -> None:
    """Let unsigned ``AssumeRoleWithWebIdentity`` through, as real AWS does.

    With authentication on, moto treats every call as signed: an unsigned one fails with
    a 500 (it indexes the missing ``Authorization`` header). Real STS accepts exactly this
    call unsigned, because the web identity token is the proof, and the broker holds no
    AWS keys at all. So, once authentication is on:

    - unsigned ``AssumeRoleWithWebIdentity`` skips the checks (moto, like us, then has
      nothing to check: it does not validate the token);
    - any other unsigned call is refused with a 403, as AWS refuses anonymous calls,
      instead of moto's 500;
    - every signed call is checked exactly as moto does.

    "Signed" means an ``Authorization`` header: moto cannot check query-string
    (presigned) signatures in server mode, so those count as unsigned.
    """
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.iam.access_control import S3IAMRequest
    from moto.s3.exceptions import S3AccessDeniedError
    from werkzeug.exceptions import HTTPException

    class MissingAuthenticationToken(HTTPException):
        code = 403
        # moto's query-protocol handler renders `description` as the response body.
        description = (
            "<ErrorResponse><Error><Type>Sender</Type>"
            "<Code>MissingAuthenticationToken</Code>"
            "<Message>Request is missing Authentication Token</Message>"
            "</Error></ErrorResponse>"
        )

        def get_headers(self, *_args: Any, **_kwargs: Any) -> list[tuple[str, str]]:
            return [("Content-Type", "text/xml")]

        def get_body(self, *_args: Any, **_kwargs: Any) -> str:
            return self.description or ""

    checked = ActionAuthenticatorMixin._authenticate_and_authorize_action

    def authenticate(self: Any, iam_request_cls: type, resource: str = "*") -> None:
        auth_on = ActionAuthenticatorMixin.request_count >= settings.INITIAL_NO_AUTH_ACTION_COUNT
        public = self.headers.get("X-Amz-Target") in ActionAuthenticatorMixin.PUBLIC_OPERATIONS
        if auth_on and not public and "Authorization" not in self.headers:
            if self.service_name == "sts" and self._get_action() == "AssumeRoleWithWebIdentity":
                return
            if iam_request_cls is S3IAMRequest:
                raise S3AccessDeniedError()
            raise MissingAuthenticationToken()
        checked(self, iam_request_cls, resource)

    ActionAuthenticatorMixin._authenticate_and_authorize_action = authenticate  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.devstack.moto_server",
        description="moto (STS, IAM, S3) with IAM authentication that can be switched on",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    # Must be set before moto is imported: moto reads it once, at import.
    os.environ.setdefault("INITIAL_NO_AUTH_ACTION_COUNT", "inf")
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    _allow_unsigned_web_identity()
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(
        args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler
    )

    # SIGTERM (ManagedProcess.stop) takes the same way out as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
