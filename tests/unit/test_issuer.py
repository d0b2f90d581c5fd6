"""broker.issuer: its tokens read by an independent JOSE library (joserfc, which authlib
itself depends on), and its key ring shared in Redis by two issuers standing for two
broker processes, across a rotation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.errors import BadSignatureError, ExpiredTokenError, InvalidKeyIdError
from joserfc.jwk import KeySet

from broker import rules
from broker.errors import BadRequest
from broker.issuer import (
    ACTIVATION_MARGIN_SECONDS,
    SOURCE_IDENTITY_CLAIM,
    TAGS_CLAIM,
    VERIFIER_LEEWAY_SECONDS,
    Issuer,
)
from broker.settings import Settings
from broker.store import Store
from tests.unit.issuer_fixtures import ALICE, PUBLIC_URL, identity, issuer_config, load
from tests.unit.oidc_fixtures import FakeClock


def make(store: Store, clock: FakeClock, **issuer: Any) -> tuple[Settings, Issuer]:
    settings = load(issuer_config(**issuer))
    return settings, Issuer(settings=settings, store=store, clock=clock)


def signed(settings: Settings, issuer: Issuer, claims: dict[str, Any] = ALICE) -> str:
    who = identity(settings, claims)
    grant = rules.decide(settings.rules, who)
    return issuer.sign(
        who,
        tags=grant.tags,
        transitive_tag_keys=grant.transitive_tag_keys,
        source_identity=grant.source_identity,
    )


def verify(token: str, jwks: dict[str, Any], now: float) -> jwt.Token:
    """What IAM does, with joserfc: signature by a published key, then the claims."""
    decoded = jwt.decode(
        token, KeySet.import_key_set(cast(Any, jwks)), algorithms=["RS256", "ES256"]
    )
    registry = jwt.JWTClaimsRegistry(
        now=int(now),
        leeway=0,
        iss={"essential": True, "value": PUBLIC_URL},
        aud={"essential": True, "value": "sts.amazonaws.com"},
        sub={"essential": True},
        exp={"essential": True},
        iat={"essential": True},
    )
    registry.validate(decoded.claims)
    return decoded


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_tokens_carry_every_claim_sts_reads(store: Store, clock: FakeClock, algorithm: str) -> None:
    settings, issuer = make(store, clock, algorithm=algorithm)
    token = verify(signed(settings, issuer), issuer.jwks(), clock())
    claims = token.claims
    assert token.header["alg"] == algorithm
    assert token.header["kid"] == issuer.signing_key().kid
    assert token.header["typ"] == "JWT"
    assert claims["sub"] == identity(settings, ALICE).identity_id
    assert claims["iat"] == claims["nbf"] == int(clock())
    assert claims["exp"] - claims["iat"] == 300
    assert claims["amr"] == ["pwd", "mfa"]
    assert claims[TAGS_CLAIM] == {
        "principal_tags": {
            "department": ["Engineering"],
            "team": ["Platform 7"],
            "tier": ["gold"],
        },
        "transitive_tag_keys": ["department"],
    }
    assert claims[SOURCE_IDENTITY_CLAIM] == "alice"
    # The kid is the key's RFC 7638 thumbprint, as joserfc computes it.
    jwk = KeySet.import_key_set(cast(Any, issuer.jwks())).keys[0]
    assert jwk.thumbprint() == token.header["kid"]


def test_discovery_names_the_issuer_and_its_keys(store: Store, clock: FakeClock) -> None:
    _, issuer = make(store, clock, algorithm="ES256")
    doc = issuer.discovery()
    assert doc["issuer"] == PUBLIC_URL
    assert doc["jwks_uri"] == PUBLIC_URL + "/.well-known/jwks.json"
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
    assert all("d" not in key for key in issuer.jwks()["keys"])  # never a private part


def test_token_lifetime_follows_config_and_expires(store: Store, clock: FakeClock) -> None:
    settings, issuer = make(store, clock, token_seconds=120)
    token = signed(settings, issuer)
    assert verify(token, issuer.jwks(), clock()).claims["exp"] == int(clock()) + 120
    with pytest.raises(ExpiredTokenError):
        verify(token, issuer.jwks(), clock() + 121)


def test_keys_are_sealed_in_redis(store: Store, clock: FakeClock) -> None:
    _, issuer = make(store, clock)
    issuer.jwks()
    raw = store.client.get(store.key("issuer", "keys"))
    assert isinstance(raw, bytes)
    assert b"PRIVATE" not in raw
    assert b"BEGIN" not in raw
    assert store.ttl_seconds(store.key("issuer", "keys")) is not None


def test_two_processes_share_keys_across_a_rotation(store: Store, clock: FakeClock) -> None:
    settings, first = make(store, clock, publish_ahead_seconds=600)
    _, second = make(store, clock, publish_ahead_seconds=600)
    old_kid = first.signing_key().kid
    assert second.signing_key().kid == old_kid  # one key for every process

    new = first.rotate()
    # Published at once, everywhere, but not signing until publish_ahead has passed.
    assert {k["kid"] for k in second.jwks()["keys"]} == {old_kid, new.kid}
    assert second.signing_key().kid == old_kid

    # publish_ahead, and the margin for a JWKS answered while the rotation was written.
    clock.advance(599 + ACTIVATION_MARGIN_SECONDS)
    before = signed(settings, second)  # the old key's last token, just before the switch
    clock.advance(1)
    assert second.signing_key().kid == new.kid
    after = signed(settings, second)
    assert (
        jwt.decode(after, KeySet.import_key_set(cast(Any, first.jwks()))).header["kid"] == new.kid
    )
    # Both verify against what either process publishes now.
    for published in (first.jwks(), second.jwks()):
        verify(before, published, clock())
        verify(after, published, clock())

    # Kept until no token it signed can be valid (lifetime + leeway), then dropped.
    clock.advance(300 + VERIFIER_LEEWAY_SECONDS - 1)
    assert old_kid in {k["kid"] for k in second.jwks()["keys"]}
    clock.advance(2)
    assert {k["kid"] for k in second.jwks()["keys"]} == {new.kid}
    with pytest.raises(InvalidKeyIdError):
        verify(before, second.jwks(), clock())
    assert [s.state for s in second.states()] == ["current"]


def test_rotation_happens_by_itself_after_rotate_after(store: Store, clock: FakeClock) -> None:
    _, issuer = make(store, clock, rotate_after_seconds=3600, publish_ahead_seconds=60)
    first = issuer.signing_key().kid
    clock.advance(3600)
    states = {s.state for s in issuer.states()}
    assert states == {"current", "next"}
    assert issuer.signing_key().kid == first
    clock.advance(60 + ACTIVATION_MARGIN_SECONDS)
    assert issuer.signing_key().kid != first


def test_a_token_from_another_key_does_not_verify(store: Store, clock: FakeClock) -> None:
    settings, issuer = make(store, clock)
    other_store = Store(client=store.client, prefix=store.prefix + "other:", sealer=store._sealer)
    other = Issuer(settings=settings, store=other_store, clock=clock)
    forged = signed(settings, other)
    with pytest.raises((BadSignatureError, InvalidKeyIdError)):
        verify(forged, issuer.jwks(), clock())


def _pem_file(tmp_path: Path, name: str, key: Any) -> str:
    path = tmp_path / name
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return name


def test_file_keys_first_signs_all_published(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    a = _pem_file(tmp_path, "a.pem", ec.generate_private_key(ec.SECP256R1()))
    b = _pem_file(tmp_path, "b.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    settings = load(issuer_config(key_files=[a, b]), base_dir=tmp_path)
    issuer = Issuer(settings=settings, store=store, clock=clock)
    token = verify(signed(settings, issuer), issuer.jwks(), clock())
    assert token.header["alg"] == "ES256"
    assert len(issuer.jwks()["keys"]) == 2
    clock.advance(86400 * 365)
    assert len(issuer.jwks()["keys"]) == 2  # listed files stay published
    with pytest.raises(BadRequest, match="key_files"):
        issuer.rotate()
    assert store.client.get(store.key("issuer", "keys")) is None  # nothing in Redis
