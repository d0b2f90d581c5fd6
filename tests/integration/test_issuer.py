"""The broker as an OpenID issuer, proven the way IAM would check it.

moto does not validate web identity tokens, so these tests do: they take the
``WebIdentityToken`` each ``AssumeRoleWithWebIdentity`` carried (moto's recorder), fetch
the broker's discovery document and JWKS over HTTP, verify the token with joserfc (an
independent JOSE library, not the broker's code) and check every claim. Key rotation
runs across two broker apps sharing Redis and a third process (``broker keys rotate``),
with a token signed just before the rotation verified after it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, cast

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet

from broker import iam_setup
from broker.devstack.processes import free_port
from broker.devstack.stack import ADMIN_ROLE, DEV_PROVIDER, USER_ROLE, Stack, dump_toml
from broker.issuer import SOURCE_IDENTITY_CLAIM, TAGS_CLAIM
from broker.sts import BotocoreSTS
from tests.conftest import make_settings, serve
from tests.integration.aws_fixtures import LocalAWS, Recording
from tests.integration.test_api import CREDENTIALS, Counted, assert_error, real_sts, running
from tests.integration.test_sso_flow import WebClient, rewrite_session
from tests.unit.oidc_fixtures import claims, rsa_key, sign

pytestmark = pytest.mark.integration

__all__ = ["real_sts"]

AUDIENCE = "sts.amazonaws.com"


def abac_rule(**changes: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": "abac",
        "providers": [DEV_PROVIDER],
        "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
        "require_email_verified": True,
        "roles": [USER_ROLE],
        "sts_token": "broker",
        "principal_tags": {
            "username": {"claim": "preferred_username"},
            "display": {"claim": "name"},
            "tier": {"value": "gold"},
        },
        "transitive_tag_keys": ["username"],
        "source_identity_claim": "preferred_username",
    }
    rule.update(changes)
    return rule


def recorder(stack: Stack) -> LocalAWS:
    # Only the recorder is used: no admin keys needed.
    return LocalAWS(url=stack.moto.url, admin=cast(Any, None))


def fetch_published(
    issuer: str, *, fetch_from: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The discovery document, then the JWKS it names, over HTTP, as IAM fetches them
    (``fetch_from``: from that process instead of the public URL)."""
    base = fetch_from or issuer
    discovery = requests.get(f"{base}/.well-known/openid-configuration", timeout=10)
    assert discovery.status_code == 200
    doc = discovery.json()
    assert doc["issuer"] == issuer
    jwks_url = doc["jwks_uri"] if fetch_from is None else f"{base}/.well-known/jwks.json"
    jwks = requests.get(jwks_url, timeout=10)
    assert jwks.status_code == 200
    assert jwks.headers["Content-Type"].startswith("application/jwk-set+json")
    keys = jwks.json()
    assert all("d" not in k for k in keys["keys"])
    return doc, keys


def verify_as_iam(token: str, issuer: str, *, fetch_from: str | None = None) -> jwt.Token:
    """Discovery, then JWKS, over HTTP; signature and claims checked by joserfc."""
    doc, keys = fetch_published(issuer, fetch_from=fetch_from)
    decoded = verify_signed(token, keys, issuer)
    assert decoded.header["alg"] in doc["id_token_signing_alg_values_supported"]
    assert abs(decoded.claims["iat"] - time.time()) < 60
    return decoded


def verify_signed(token: str, keys: dict[str, Any], issuer: str) -> jwt.Token:
    """joserfc checks the signature against the key set ``keys``, then the claims."""
    decoded = jwt.decode(
        token, KeySet.import_key_set(cast(Any, keys)), algorithms=["RS256", "ES256"]
    )
    jwt.JWTClaimsRegistry(
        leeway=0,
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": AUDIENCE},
        sub={"essential": True},
        exp={"essential": True},
        iat={"essential": True},
    ).validate(decoded.claims)
    claims = decoded.claims
    assert 0 < claims["exp"] - claims["iat"] <= 300
    return decoded


def only_token(recording: Recording) -> dict[str, str]:
    (call,) = recording.sts_calls()
    return call


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_sts_gets_the_broker_token_with_tags_and_source_identity(
    stack: Stack, real_sts: BotocoreSTS, algorithm: str
) -> None:
    with running(stack, real_sts, rules=[abac_rule()], issuer={"algorithm": algorithm}) as broker:
        aws = recorder(stack)
        provider_token = broker.live.id_token("alice")
        with aws.recording() as recording:
            response = broker.live.post(
                CREDENTIALS, {"provider": DEV_PROVIDER, "token": provider_token}
            )
        assert response.status_code == 200, response.text
        call = only_token(recording)
        token = call["WebIdentityToken"]
        assert token != provider_token  # the provider's token never reaches STS
        assert "ProviderId" not in call
        assert call["RoleArn"] == USER_ROLE
        decoded = verify_as_iam(token, broker.url)
        claims = decoded.claims
        assert decoded.header["alg"] == algorithm
        assert claims["sub"] == response.json()["identity_id"]
        assert claims["amr"] == ["pwd", "mfa"]
        assert claims[TAGS_CLAIM] == {
            "principal_tags": {
                "username": ["alice"],
                "display": ["Alice Admin"],
                "tier": ["gold"],
            },
            "transitive_tag_keys": ["username"],
        }
        assert claims[SOURCE_IDENTITY_CLAIM] == "alice"
        assert broker.sts.calls == 1

        # What broker iam-setup prints for this broker admits exactly this token.
        docs = json.loads(json.dumps(iam_setup.documents(broker.live.settings, "iam")))
        assert docs["oidc_provider"]["Url"] == claims["iss"]
        assert docs["oidc_provider"]["ClientIDList"] == [claims["aud"]]
        statement = docs["roles"][call["RoleArn"]]["Statement"][0]
        host = claims["iss"].split("://", 1)[1]
        assert statement["Principal"]["Federated"].endswith(f":oidc-provider/{host}")
        assert statement["Condition"]["StringEquals"] == {f"{host}:aud": claims["aud"]}
        (pattern,) = statement["Condition"]["StringLike"].values()
        assert fnmatchcase(claims["sub"], pattern)
        assert {"sts:TagSession", "sts:SetSourceIdentity"} <= set(statement["Action"])


@pytest.mark.parametrize(
    ("tags", "source", "needle"),
    [
        # A list claim cannot be one tag value: refused, not flattened or joined.
        ({"groups": {"claim": "groups"}}, None, "session tag 'groups'"),
        ({"missing": {"claim": "department"}}, None, "does not have"),
        (None, "name", "source identity"),  # "Alice Admin": a space STS refuses
        (None, "email_verified", "source identity"),  # "true" is fine, but...
    ],
    ids=["list claim", "missing claim", "space in source identity", "boolean source identity"],
)
def test_claims_that_break_sts_limits_are_refused_before_sts(
    stack: Stack,
    real_sts: BotocoreSTS,
    tags: dict[str, Any] | None,
    source: str | None,
    needle: str,
) -> None:
    rule = abac_rule(source_identity_claim=source, transitive_tag_keys=[])
    if tags is not None:
        rule["principal_tags"] = tags
    if source is None:
        rule.pop("source_identity_claim")
    with running(stack, real_sts, rules=[rule]) as broker:
        aws = recorder(stack)
        with aws.recording() as recording:
            response = broker.ask("alice")
        if source == "email_verified":
            # A boolean reads "true" (4 characters, allowed): this row proves the
            # check is not over-eager, and STS got the broker's token.
            assert response.status_code == 200, response.text
            claims = verify_as_iam(only_token(recording)["WebIdentityToken"], broker.url)
            assert claims.claims[SOURCE_IDENTITY_CLAIM] == "true"
            return
        assert needle in assert_error(response, 403, "access_denied")
        assert recording.sts_calls() == []
        assert broker.sts.calls == 0


def test_issuer_documents_are_404_without_a_broker_rule(
    stack: Stack, real_sts: BotocoreSTS
) -> None:
    with running(stack, real_sts) as broker:  # the dev rules: provider tokens only
        for path in ("/.well-known/openid-configuration", "/.well-known/jwks.json"):
            response = requests.get(broker.url + path, timeout=10)
            assert_error(response, 404, "not_found")


@pytest.fixture
def shared_brokers(
    stack: Stack, real_sts: BotocoreSTS, tmp_path: Path
) -> Iterator[tuple[Counted, Counted, Path]]:
    """Two broker apps behind one public URL, sharing Redis keys, and their config file."""
    prefix = f"test:issuer:{time.time_ns()}:"
    with running(stack, real_sts, rules=[abac_rule()], redis={"key_prefix": prefix}) as first:
        public = {"public_url": first.url}
        overrides: dict[str, Any] = {
            "rules": [abac_rule()],
            "redis": {"key_prefix": prefix},
            "server": public,
        }
        with running(stack, real_sts, **overrides) as second:
            config = stack.config(first.url)
            config.update(rules=[abac_rule()])
            config["redis"]["key_prefix"] = prefix
            path = tmp_path / "broker.toml"
            path.write_text(dump_toml(config))
            yield first, second, path


def broker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_rotation_across_two_brokers_sharing_redis(
    stack: Stack, shared_brokers: tuple[Counted, Counted, Path]
) -> None:
    first, second, config = shared_brokers
    issuer = first.url
    aws = recorder(stack)
    with aws.recording() as recording:
        assert first.ask("alice", duration_seconds=900).status_code == 200
    before = only_token(recording)["WebIdentityToken"]  # signed just before the rotation
    old_kid = verify_as_iam(before, issuer).header["kid"]

    listed = broker_cli("keys", "list", "--config", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(k["kid"], k["state"]) for k in json.loads(listed.stdout)] == [(old_kid, "current")]

    # Sooner than verifiers may cache the JWKS (300 s here): refused, nothing changes.
    refused = broker_cli("keys", "rotate", "--config", str(config), "--publish-ahead", "0")
    assert refused.returncode == 1
    assert "shorter than the 300 s verifiers may cache the JWKS" in refused.stderr
    listed = broker_cli("keys", "list", "--config", str(config), "--json")
    assert [k["kid"] for k in json.loads(listed.stdout)] == [old_kid]

    rotated = broker_cli("keys", "rotate", "--config", str(config), "--now")
    assert rotated.returncode == 0, rotated.stderr
    assert old_kid not in rotated.stdout
    assert "may refuse its tokens for up to 300 s" in rotated.stderr

    with aws.recording() as recording:
        # Another duration: a new cache entry, so a new STS call, on the other broker.
        assert second.ask("alice", duration_seconds=1000).status_code == 200
    after = only_token(recording)["WebIdentityToken"]
    new_kid = verify_as_iam(after, issuer, fetch_from=second.url).header["kid"]
    assert new_kid != old_kid

    # Both processes publish both keys: the old token still verifies everywhere.
    for base in (first.url, second.url):
        verify_as_iam(before, issuer, fetch_from=base)
        verify_as_iam(after, issuer, fetch_from=base)
    listed = broker_cli("keys", "list", "--config", str(config), "--json")
    states = {k["kid"]: k["state"] for k in json.loads(listed.stdout)}
    assert states == {old_kid: "retiring", new_kid: "current"}


def test_web_session_with_the_broker_token_outlives_the_provider_token(
    stack: Stack,
) -> None:
    port = free_port()
    settings = make_settings(
        stack,
        f"http://127.0.0.1:{port}",
        rules=[abac_rule()],
        rate_limit={"per_ip_per_minute": 0, "per_identity_per_minute": 0},
    )
    with serve(settings, stack, port) as live:
        web = WebClient(live)
        web.login("alice")
        session_id = web.session_id()
        assert session_id is not None
        # The provider's token expired long ago and cannot be refreshed...
        rewrite_session(
            live, session_id, token_expires_at=int(time.time()) - 3600, refresh_token=None
        )
        assert web.get("/v1/session").json()["token_expired"] is False
        aws = recorder(stack)
        with aws.recording() as recording:
            r = web.post("/v1/session/credentials", json={}, headers={"X-CSRF-Token": web.csrf()})
        # ...yet the session mints: STS gets the broker's token, not the provider's.
        assert r.status_code == 200, r.text
        claims = verify_as_iam(only_token(recording)["WebIdentityToken"], live.url).claims
        assert claims[SOURCE_IDENTITY_CLAIM] == "alice"
        # The session's own absolute lifetime still ends it.
        absolute = settings.web.session_absolute_seconds
        rewrite_session(live, session_id, created_at=int(time.time()) - absolute - 1)
        r = web.post("/v1/session/credentials", json={}, headers={"X-CSRF-Token": "x"})
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "unauthenticated"
        assert web.get("/v1/session").status_code == 401
        web.http.close()


def test_developer_identities_reach_sts_through_the_broker_token(
    stack: Stack, real_sts: BotocoreSTS, tmp_path: Path
) -> None:
    """An app backend signs for its users with a key listed in a JWKS file; IAM never
    hears of the backend, only of the broker."""
    backend = rsa_key("backend-1")
    jwks = tmp_path / "backend-jwks.json"
    jwks.write_text(json.dumps({"keys": [backend.public_jwk()]}))
    provider = {
        "type": "developer",
        "issuer": "https://backend.example.com",
        "client_ids": ["my-app"],
        "jwks_file": str(jwks),
    }
    rule = {
        "name": "app-users",
        "providers": ["app"],
        "conditions": [{"claim": "plan", "op": "in", "value": ["free", "pro"]}],
        "roles": [USER_ROLE],
        "sts_token": "broker",
        "principal_tags": {"plan": {"claim": "plan"}},
    }
    with running(stack, real_sts, providers={"app": provider}, rules=[rule]) as broker:
        token = sign(
            backend,
            claims(issuer="https://backend.example.com", audience="my-app", sub="u-42", plan="pro"),
        )
        with recorder(stack).recording() as recording:
            response = broker.live.post(CREDENTIALS, {"provider": "app", "token": token})
        assert response.status_code == 200, response.text
        sent = only_token(recording)["WebIdentityToken"]
        assert sent != token
        verified = verify_as_iam(sent, broker.url).claims
        assert verified["sub"] == response.json()["identity_id"]
        assert verified[TAGS_CLAIM]["principal_tags"] == {"plan": ["pro"]}

        forged = sign(
            rsa_key("backend-1", label="attacker"),
            claims(issuer="https://backend.example.com", audience="my-app", plan="pro"),
        )
        refused = broker.live.post(CREDENTIALS, {"provider": "app", "token": forged})
        assert_error(refused, 401, "invalid_token")
        assert broker.sts.calls == 1
        # Nothing to fetch, so nothing that could be down: ready as long as Redis is.
        ready = requests.get(f"{broker.url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["providers"]["app"].startswith("ok")


GUEST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": "s3:GetObject",
            "Resource": "arn:aws:s3:::broker-demo-bucket/guests/${identity_id}/*",
        }
    ],
}


def test_guests_are_off_by_default(stack: Stack, real_sts: BotocoreSTS) -> None:
    with running(stack, real_sts) as broker:
        assert_error(broker.live.post("/v1/guest", {}), 404, "not_found")
        assert broker.sts.calls == 0


def test_guest_identities(stack: Stack, real_sts: BotocoreSTS) -> None:
    guest = {
        "enabled": True,
        "role_arn": ADMIN_ROLE,  # no rule grants it here
        "session_policy": GUEST_POLICY,
        "new_per_ip_per_hour": 2,
    }
    with running(stack, real_sts, rules=[abac_rule()], guest=guest) as broker:
        with recorder(stack).recording() as recording:
            first = broker.live.post("/v1/guest", {})
        assert first.status_code == 200, first.text
        assert first.headers["Cache-Control"] == "no-store"
        body = first.json()
        assert body["provider"] == "guest"
        assert body["role_arn"] == ADMIN_ROLE
        call = only_token(recording)
        assert body["identity_id"] in call["Policy"]  # the guest session policy, filled in
        claims = verify_as_iam(call["WebIdentityToken"], broker.url).claims
        assert claims["sub"] == body["identity_id"]
        assert claims["amr"] == ["unauthenticated"]
        assert TAGS_CLAIM not in claims

        # The device comes back with its token: the same guest, a renewed token.
        again = broker.live.post("/v1/guest", {"guest_token": body["guest_token"]})
        assert again.status_code == 200, again.text
        assert again.json()["identity_id"] == body["identity_id"]

        tampered = body["guest_token"][:-2] + ("AA" if body["guest_token"][-2:] != "AA" else "BB")
        assert_error(broker.live.post("/v1/guest", {"guest_token": tampered}), 401, "invalid_token")
        assert_error(broker.live.post("/v1/guest", {"guest_token": 7}), 400, "invalid_request")
        assert_error(broker.live.post("/v1/guest", {"token": "x"}), 400, "invalid_request")

        # Strict per-address limit on new guests (2 an hour here).
        assert broker.live.post("/v1/guest", {}).status_code == 200
        limited = broker.live.post("/v1/guest", {})
        assert "new guests an hour" in assert_error(limited, 429, "rate_limited")
        assert limited.headers["Retry-After"] == "3600"
        # A returning guest is not a new one.
        assert broker.live.post("/v1/guest", {"guest_token": body["guest_token"]}).ok


@pytest.mark.parametrize(("provider", "user"), [("amazon", "alice"), ("facebook", "bob")])
def test_access_token_providers_reach_sts_through_the_broker_token(
    stack: Stack, real_sts: BotocoreSTS, provider: str, user: str
) -> None:
    """Login with Amazon and Facebook access tokens: with the broker's token STS gets no
    ProviderId and no access token, and the tags come from the verified profile."""
    rule = {
        "name": f"{provider}-users",
        "providers": [provider],
        "conditions": [{"claim": "email", "op": "glob", "value": "*@example.com"}],
        "roles": [USER_ROLE],
        "sts_token": "broker",
        "principal_tags": {"email": {"claim": "email"}},
    }
    providers = stack.social.provider_config(limited_login=True, limited_login_sts_ready=True)
    with running(stack, real_sts, providers=providers, rules=[rule]) as broker:
        access_token = getattr(stack.social, provider).mint(user)
        with recorder(stack).recording() as recording:
            response = broker.live.post(CREDENTIALS, {"provider": provider, "token": access_token})
        assert response.status_code == 200, response.text
        call = only_token(recording)
        assert "ProviderId" not in call
        assert call["WebIdentityToken"] != access_token
        verified = verify_as_iam(call["WebIdentityToken"], broker.url).claims
        assert verified["sub"] == response.json()["identity_id"]
        assert verified[TAGS_CLAIM]["principal_tags"] == {"email": [f"{user}@example.com"]}
