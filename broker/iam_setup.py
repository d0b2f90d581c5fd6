"""What IAM needs for rules that send STS the broker's token (``broker iam-setup``).

From the configuration alone (no AWS call, no key needed): the IAM OIDC provider for the
broker (its URL and the audience as client id; IAM fetches the JWKS itself, so no
thumbprint) and, for every role such rules grant, a trust policy that lets
``sts:AssumeRoleWithWebIdentity`` through only for the broker's tokens: ``aud`` equal to
``issuer.audience`` and ``sub`` an identity id of the broker (``<identity.region>:*``),
plus ``sts:TagSession`` when a rule granting the role sets session tags and
``sts:SetSourceIdentity`` when one sets a source identity (STS refuses the call without
them). With guests on, the guest role also requires ``amr`` "unauthenticated" and every
other role refuses it. Three spellings of the same documents: IAM JSON, CloudFormation
and Terraform JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from broker.guest import GUEST_AMR
from broker.settings import RuleSettings, Settings

Format = Literal["iam", "cloudformation", "terraform"]
FORMATS: tuple[Format, ...] = ("iam", "cloudformation", "terraform")


def provider_host(settings: Settings) -> str:
    """The issuer as IAM names it in condition keys: the URL without its scheme."""
    parts = urlsplit(settings.server.public_url)
    return parts.netloc + parts.path.rstrip("/")


def provider_arn(settings: Settings, account: str) -> str:
    return f"arn:aws:iam::{account}:oidc-provider/{provider_host(settings)}"


def broker_rules(settings: Settings) -> tuple[RuleSettings, ...]:
    return tuple(r for r in settings.rules if r.broker_token)


def issuer_in_use(settings: Settings) -> bool:
    """Whether STS ever gets the broker's token: a rule asks for it, or guests are on."""
    return bool(broker_rules(settings)) or settings.guest.enabled


def guest_role(settings: Settings) -> str | None:
    return settings.guest.role_arn if settings.guest.enabled else None


def _role_account(role_arn: str) -> str:
    return role_arn.split(":")[4]


def trust_policy(settings: Settings, role_arn: str, provider: Any = None) -> dict[str, Any]:
    """The trust policy for ``role_arn``; ``provider`` overrides the provider ARN (the
    CloudFormation and Terraform spellings refer to the resource they create)."""
    rules = [r for r in broker_rules(settings) if role_arn in r.roles]
    actions = ["sts:AssumeRoleWithWebIdentity"]
    if any(r.principal_tags for r in rules):
        actions.append("sts:TagSession")
    if any(r.source_identity_claim for r in rules):
        actions.append("sts:SetSourceIdentity")
    host = provider_host(settings)
    conditions: dict[str, Any] = {
        "StringEquals": {f"{host}:aud": settings.issuer.audience},
        # Every identity id the broker issues has this form; the broker's rules decide
        # who gets one of them for this role.
        "StringLike": {f"{host}:sub": f"{settings.identity.region}:*"},
    }
    if role_arn == guest_role(settings):
        # Guest tokens carry amr ["unauthenticated"] (as Cognito's guest identities).
        conditions["ForAnyValue:StringLike"] = {f"{host}:amr": GUEST_AMR}
    elif guest_role(settings) is not None:
        # ...and a role for signed-in people never takes a guest's token.
        conditions["ForAllValues:StringNotLike"] = {f"{host}:amr": GUEST_AMR}
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {
                    "Federated": provider or provider_arn(settings, _role_account(role_arn))
                },
                "Action": actions,
                "Condition": conditions,
            }
        ],
    }


def roles(settings: Settings) -> list[str]:
    found = {role for r in broker_rules(settings) for role in r.roles}
    guest = guest_role(settings)
    return sorted(found | {guest} if guest else found)


def _role_name(role_arn: str) -> str:
    return role_arn.rsplit("/", 1)[1]


def _logical_id(role_arn: str) -> str:
    # CloudFormation logical ids and Terraform names: letters and digits (and _ in TF).
    return re.sub(r"[^A-Za-z0-9]", "", _role_name(role_arn)) or "Role"


def documents(settings: Settings, fmt: Format) -> dict[str, Any]:
    url = settings.server.public_url
    audiences = [settings.issuer.audience]
    if fmt == "iam":
        return {
            "oidc_provider": {
                "Url": url,
                "ClientIDList": audiences,
                "Arns": sorted({provider_arn(settings, _role_account(r)) for r in roles(settings)}),
            },
            "roles": {role: trust_policy(settings, role) for role in roles(settings)},
        }
    if fmt == "cloudformation":
        resources: dict[str, Any] = {
            "BrokerOIDCProvider": {
                "Type": "AWS::IAM::OIDCProvider",
                # No ThumbprintList: IAM secures the JWKS fetch with its own trusted CAs.
                "Properties": {"Url": url, "ClientIdList": audiences},
            }
        }
        for role in roles(settings):
            resources[_logical_id(role) + "Role"] = {
                "Type": "AWS::IAM::Role",
                "Properties": {
                    "RoleName": _role_name(role),
                    "AssumeRolePolicyDocument": trust_policy(
                        settings, role, provider={"Ref": "BrokerOIDCProvider"}
                    ),
                },
            }
        return {"AWSTemplateFormatVersion": "2010-09-09", "Resources": resources}
    tf_roles = {
        _logical_id(role).lower(): {
            "name": _role_name(role),
            # A JSON string, as aws_iam_role wants; the provider's ARN is spelt out (it is
            # known from the URL), and depends_on orders the creation.
            "assume_role_policy": json.dumps(trust_policy(settings, role), sort_keys=True),
            "depends_on": ["aws_iam_openid_connect_provider.broker"],
        }
        for role in roles(settings)
    }
    return {
        "resource": {
            "aws_iam_openid_connect_provider": {
                "broker": {"url": url, "client_id_list": audiences}
            },
            "aws_iam_role": tf_roles,
        }
    }
