"""broker iam-setup: the documents are valid JSON in every format, name only the roles
that get the broker's token, ask for TagSession/SetSourceIdentity exactly where rules
use them, and their conditions match the claims of a token the broker signs."""

from __future__ import annotations

import json
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, cast

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from broker import iam_setup, rules
from broker.devstack.stack import dump_toml
from broker.issuer import Issuer
from broker.store import Store
from tests.unit.issuer_fixtures import ABAC_ROLE, ALICE, PLAIN_ROLE, identity, issuer_config, load
from tests.unit.oidc_fixtures import FakeClock

HOST = "broker.example.com"


def statement(policy: dict[str, Any]) -> dict[str, Any]:
    (only,) = policy["Statement"]
    assert isinstance(only, dict)
    return only


def conditions_hold(policy: dict[str, Any], claims: dict[str, Any]) -> bool:
    """IAM's reading of the two condition operators the broker writes."""
    cond = statement(policy)["Condition"]
    equals = all(claims[k.split(":")[-1]] == v for k, v in cond["StringEquals"].items())
    like = all(fnmatchcase(claims[k.split(":")[-1]], v) for k, v in cond["StringLike"].items())
    return equals and like


def test_iam_documents_match_the_tokens(store: Store, clock: FakeClock) -> None:
    settings = load(issuer_config())
    docs = json.loads(json.dumps(iam_setup.documents(settings, "iam")))
    assert docs["oidc_provider"]["Url"] == "https://broker.example.com"
    assert docs["oidc_provider"]["ClientIDList"] == ["sts.amazonaws.com"]
    assert list(docs["roles"]) == [ABAC_ROLE]  # the provider-token rule needs nothing new
    policy = docs["roles"][ABAC_ROLE]
    st = statement(policy)
    assert st["Principal"]["Federated"] == f"arn:aws:iam::123456789012:oidc-provider/{HOST}"
    assert st["Action"] == [
        "sts:AssumeRoleWithWebIdentity",
        "sts:TagSession",
        "sts:SetSourceIdentity",
    ]
    assert set(st["Condition"]["StringEquals"]) == {f"{HOST}:aud"}
    assert set(st["Condition"]["StringLike"]) == {f"{HOST}:sub"}

    issuer = Issuer(settings=settings, store=store, clock=clock)
    who = identity(settings, ALICE)
    grant = rules.decide(settings.rules, who)
    token = issuer.sign(who, tags=grant.tags, transitive_tag_keys=grant.transitive_tag_keys)
    claims = jwt.decode(token, KeySet.import_key_set(cast(Any, issuer.jwks()))).claims
    assert conditions_hold(policy, claims)
    assert not conditions_hold(policy, {**claims, "aud": "other"})
    assert not conditions_hold(policy, {**claims, "sub": "eu-west-1:" + claims["sub"][10:]})


def test_actions_follow_what_rules_use() -> None:
    raw = issuer_config()
    raw["rules"][0].pop("principal_tags")
    raw["rules"][0].pop("transitive_tag_keys")
    raw["rules"][1].update(sts_token="broker")
    settings = load(raw)
    docs = iam_setup.documents(settings, "iam")
    assert statement(docs["roles"][ABAC_ROLE])["Action"] == [
        "sts:AssumeRoleWithWebIdentity",
        "sts:SetSourceIdentity",
    ]
    assert statement(docs["roles"][PLAIN_ROLE])["Action"] == ["sts:AssumeRoleWithWebIdentity"]


def test_cloudformation_and_terraform_spell_the_same_policy() -> None:
    settings = load(issuer_config())
    iam = iam_setup.documents(settings, "iam")["roles"][ABAC_ROLE]
    cfn = json.loads(json.dumps(iam_setup.documents(settings, "cloudformation")))
    assert cfn["Resources"]["BrokerOIDCProvider"]["Properties"] == {
        "Url": "https://broker.example.com",
        "ClientIdList": ["sts.amazonaws.com"],
    }
    role = cfn["Resources"]["AbacRole"]["Properties"]
    assert role["RoleName"] == "Abac"
    cfn_policy = role["AssumeRolePolicyDocument"]
    assert statement(cfn_policy)["Principal"]["Federated"] == {"Ref": "BrokerOIDCProvider"}
    assert statement(cfn_policy)["Condition"] == statement(iam)["Condition"]
    assert statement(cfn_policy)["Action"] == statement(iam)["Action"]

    tf = json.loads(json.dumps(iam_setup.documents(settings, "terraform")))
    resources = tf["resource"]
    assert resources["aws_iam_openid_connect_provider"]["broker"]["client_id_list"] == [
        "sts.amazonaws.com"
    ]
    tf_role = resources["aws_iam_role"]["abac"]
    assert json.loads(tf_role["assume_role_policy"]) == iam
    assert "${" not in tf_role["assume_role_policy"]  # nothing Terraform would interpolate


@pytest.mark.parametrize("fmt", ["iam", "cloudformation", "terraform"])
def test_the_command_prints_json(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(dump_toml(issuer_config()))
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "iam-setup", "--config", str(path), "--format", fmt],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = iam_setup.documents(load(issuer_config()), cast(iam_setup.Format, fmt))
    assert json.loads(done.stdout) == json.loads(json.dumps(expected))
