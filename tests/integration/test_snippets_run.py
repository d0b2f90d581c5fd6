"""The credentials page's snippets, pasted as a person would: the ``~/.aws/config``
profile read by the real AWS CLI and by boto3, and the ``sh`` lines run by ``sh`` before
the AWS CLI and boto3, with nothing else in the environment. Every one must reach STS
(moto) as the signed-in person's role.

(PowerShell is not on this machine; its snippet is checked for the same variables in
tests/unit/test_snippets.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.devstack.stack import ADMIN_ROLE, DEV_PROVIDER
from broker.web.sso import snippets
from tests.conftest import LiveBroker

pytestmark = pytest.mark.integration

AWS = str(Path(sys.executable).with_name("aws"))
BOTO3_WHO = (
    "import boto3, sys\n"
    "session = boto3.Session(profile_name=sys.argv[1] if len(sys.argv) > 1 else None)\n"
    "print(session.client('sts').get_caller_identity()['Arn'])\n"
)


def _clean_env(home: Path) -> dict[str, str]:
    """Only what a fresh terminal has: no AWS variable, no AWS files of the user's."""
    return {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "HOME": str(home),
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
    }


def _run(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, (argv[:3], done.stdout, done.stderr)
    return done.stdout


def test_the_credentials_page_snippets_work_as_pasted(broker: LiveBroker, tmp_path: Path) -> None:
    services = broker.services
    identity = services.identify(DEV_PROVIDER, broker.id_token("alice"))
    issued = services.issue(identity, role_arn=ADMIN_ROLE)
    out = snippets(
        issued, region="us-east-1", broker_url=broker.url, sts_endpoint=broker.stack.moto.url
    )
    who = "assumed-role/BrokerDemoAdmin/"
    env = _clean_env(tmp_path)

    # The profile, appended to ~/.aws/config as the page says.
    Path(env["AWS_CONFIG_FILE"]).write_text(out["profile"] + "\n")
    profile = out["profile"].splitlines()[0].removeprefix("[profile ").removesuffix("]")
    answer = json.loads(_run([AWS, "sts", "get-caller-identity", "--profile", profile], env))
    assert who in answer["Arn"]
    assert who in _run([sys.executable, "-c", BOTO3_WHO, profile], env)

    # The sh lines, then the tools, in one shell with no AWS files at all.
    Path(env["AWS_CONFIG_FILE"]).unlink()
    shell = f'{out["sh"]}\n{AWS} sts get-caller-identity\n{sys.executable} -c "$WHO"\n'
    printed = _run(["sh", "-c", shell], {**env, "WHO": BOTO3_WHO})
    assert printed.count(who) == 2, printed
