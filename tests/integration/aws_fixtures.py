"""Local AWS for integration tests: moto with IAM auth on, seeded with test roles.

Test modules wrap ``local_aws`` in their own module-scoped fixture, so each module gets
its own moto process (its recorder and state are then the module's alone).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3
import botocore
import requests
from botocore.config import Config

from broker.devstack.moto_server import AdminKeys, RoleSpec, seed_aws, start_moto
from broker.settings import STSSettings
from broker.sts import IssuedCredentials

ACCOUNT_ID = "123456789012"  # moto's default account
REGION = "us-east-1"
ALLOWED_BUCKET = "broker-test-allowed"
OTHER_BUCKET = "broker-test-other"

READER_ROLE = f"arn:aws:iam::{ACCOUNT_ID}:role/BrokerTestReader"
WRITER_ROLE = f"arn:aws:iam::{ACCOUNT_ID}:role/BrokerTestWriter"

TEST_ROLES = (
    RoleSpec(
        name="BrokerTestReader",
        policy={
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": "s3:ListBucket",
                    "Resource": f"arn:aws:s3:::{ALLOWED_BUCKET}",
                }
            ],
        },
    ),
    RoleSpec(
        name="BrokerTestWriter",
        policy={
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["s3:ListBucket", "s3:PutObject", "s3:GetObject"],
                    "Resource": [
                        f"arn:aws:s3:::{ALLOWED_BUCKET}",
                        f"arn:aws:s3:::{ALLOWED_BUCKET}/*",
                    ],
                }
            ],
        },
    ),
)

# Each client call should fail fast and exactly once: a retried 403 would hide nothing,
# but a retried 500 would make a broken stand-in look merely slow.
_NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})


@dataclass(frozen=True)
class LocalAWS:
    url: str
    admin: AdminKeys

    def sts_settings(self, *, max_attempts: int = 3) -> STSSettings:
        return STSSettings(
            region=REGION, endpoint_url=self.url, timeout_seconds=5.0, max_attempts=max_attempts
        )

    def client(self, service: str, credentials: IssuedCredentials | None = None) -> Any:
        """A signed boto3 client: the given credentials, else the admin's keys."""
        if credentials is None:
            keys = {
                "aws_access_key_id": self.admin.access_key_id,
                "aws_secret_access_key": self.admin.secret_access_key,
            }
        else:
            keys = {
                "aws_access_key_id": credentials.access_key_id,
                "aws_secret_access_key": credentials.secret_access_key,
                "aws_session_token": credentials.session_token,
            }
        return boto3.client(
            service, endpoint_url=self.url, region_name=REGION, config=_NO_RETRIES, **keys
        )

    def raw_client(self, service: str, **keys: str) -> Any:
        """A client with exactly these keys (none at all: unsigned)."""
        config = _NO_RETRIES
        if not keys:
            config = config.merge(Config(signature_version=botocore.UNSIGNED))
        return boto3.client(
            service, endpoint_url=self.url, region_name=REGION, config=config, **keys
        )

    @contextmanager
    def recording(self) -> Iterator[Recording]:
        """What moto receives inside the block (moto's request recorder)."""
        self._moto_api("recorder/reset-recording")
        self._moto_api("recorder/start-recording")
        recording = Recording()
        try:
            yield recording
        finally:
            self._moto_api("recorder/stop-recording")
            raw = self._moto_api("recorder/download-recording", method="GET")
            recording.entries = [json.loads(line) for line in raw.splitlines() if line]

    def _moto_api(self, path: str, *, method: str = "POST") -> str:
        response = requests.request(method, f"{self.url}/moto-api/{path}", timeout=10)
        response.raise_for_status()
        return response.text


class Recording:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def sts_calls(self) -> list[dict[str, str]]:
        """The form parameters of every AssumeRoleWithWebIdentity moto received."""
        calls = []
        for entry in self.entries:
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode()
            form = {k: v[0] for k, v in parse_qs(body).items()}
            if form.get("Action") == "AssumeRoleWithWebIdentity":
                calls.append(form)
        return calls


@contextmanager
def local_aws(workdir: Path) -> Iterator[LocalAWS]:
    moto = start_moto(workdir)
    try:
        admin = seed_aws(moto.url, TEST_ROLES, buckets=(ALLOWED_BUCKET, OTHER_BUCKET))
        yield LocalAWS(url=moto.url, admin=admin)
    finally:
        moto.stop()
