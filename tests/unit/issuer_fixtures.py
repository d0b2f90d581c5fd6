"""Config and identities for the issuer, session tag and IAM setup tests."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

from broker.identity import Identity, IdentityIds, VerifiedClaims, VerifiedToken
from broker.settings import Settings, settings_from_mapping

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()
PUBLIC_URL = "https://broker.example.com"
ABAC_ROLE = "arn:aws:iam::123456789012:role/Abac"
PLAIN_ROLE = "arn:aws:iam::123456789012:role/Plain"

BASE: dict[str, Any] = {
    "server": {"public_url": PUBLIC_URL},
    "security": {"identity_key": KEY_A, "encryption_keys": [KEY_B]},
    "providers": {
        "corp": {
            "type": "oidc",
            "issuer": "https://idp.example",
            "client_ids": ["app"],
            "jwks_url": "https://idp.example/jwks",
        }
    },
    "rules": [
        {
            "name": "abac",
            "providers": ["corp"],
            "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
            "roles": [ABAC_ROLE],
            "sts_token": "broker",
            "principal_tags": {
                "department": {"claim": "department"},
                "team": {"claim": "org.team"},
                "tier": {"value": "gold"},
            },
            "transitive_tag_keys": ["department"],
            "source_identity_claim": "preferred_username",
        },
        {
            "name": "plain",
            "providers": ["corp"],
            "conditions": [{"claim": "email", "op": "glob", "value": "*@partner.example"}],
            "roles": [PLAIN_ROLE],
        },
    ],
}


def issuer_config(**issuer: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    if issuer:
        raw["issuer"] = issuer
    return raw


def load(raw: dict[str, Any], base_dir: Path | None = None) -> Settings:
    return settings_from_mapping(raw, env={}, base_dir=base_dir, source="test")


ALICE: dict[str, Any] = {
    "sub": "alice",
    "email": "alice@example.com",
    "email_verified": True,
    "department": "Engineering",
    "org": {"team": "Platform 7"},
    "preferred_username": "alice",
    "amr": ["pwd", "mfa"],
}


def identity(settings: Settings, claims: dict[str, Any], provider: str = "corp") -> Identity:
    ids = IdentityIds(key=settings.security.identity_key, region=settings.identity.region)
    return ids.identify(
        VerifiedToken(
            provider=provider,
            subject=str(claims["sub"]),
            claims=VerifiedClaims(claims),
            token="provider-token",
            sts_provider_id=None,
            expires_at=2**31,
        )
    )
