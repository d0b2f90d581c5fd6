"""Session tags and source identity: rule config checked at load time (one row per
mistake, the rule named), claim values checked before any STS call (one row per hostile
value), and what explain shows."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker import errors, rules
from broker.cli import format_explanation
from broker.credentials import CredentialService
from broker.issuer import Issuer
from broker.services import explain_claims
from broker.settings import ConfigError
from broker.store import Store
from broker.sts import AssumeRequest, IssuedCredentials
from tests.unit.issuer_fixtures import ALICE, issuer_config, load
from tests.unit.issuer_fixtures import identity as make_identity


def abac(raw: dict[str, Any]) -> dict[str, Any]:
    rule: dict[str, Any] = raw["rules"][0]
    return rule


def tags(n: int) -> dict[str, Any]:
    return {f"k{i}": {"value": "v"} for i in range(n)}


CONFIG_MISTAKES: list[tuple[str, Any, str]] = [
    (
        "tags with the provider's token",
        lambda r: abac(r).update(sts_token="provider"),
        'rules[0].sts_token: session tags and source identity need sts_token = "broker"',
    ),
    (
        "source identity with the provider's token (default)",
        lambda r: (
            abac(r).pop("sts_token"),
            abac(r).pop("principal_tags"),
            abac(r).pop("transitive_tag_keys"),
        ),
        "rules[0].sts_token: session tags and source identity need",
    ),
    (
        "unknown token kind",
        lambda r: abac(r).update(sts_token="mine"),
        "must be one of provider, broker",
    ),
    (
        "51 tags",
        lambda r: abac(r).update(principal_tags=tags(51), transitive_tag_keys=[]),
        "at most 50 session tags",
    ),
    (
        "key too long",
        lambda r: abac(r)["principal_tags"].update({"k" * 129: {"value": "v"}}),
        "1 to 128 characters",
    ),
    (
        "key with a quote",
        lambda r: abac(r)["principal_tags"].update({'a"b': {"value": "v"}}),
        "tag keys may hold only",
    ),
    (
        "key with ${",
        lambda r: abac(r)["principal_tags"].update({"${aws:username}": {"value": "v"}}),
        "tag keys may hold only",
    ),
    (
        "aws: key",
        lambda r: abac(r)["principal_tags"].update({"AWS:x": {"value": "v"}}),
        "must not start with aws:",
    ),
    (
        "keys differing in case",
        lambda r: abac(r)["principal_tags"].update({"Department": {"value": "v"}}),
        "only in case",
    ),
    (
        "fixed value too long",
        lambda r: abac(r)["principal_tags"].update({"x": {"value": "v" * 257}}),
        "at most 256",
    ),
    (
        "fixed value with *",
        lambda r: abac(r)["principal_tags"].update({"x": {"value": "a*"}}),
        "at most 256",
    ),
    (
        "claim and value",
        lambda r: abac(r)["principal_tags"].update({"x": {"value": "a", "claim": "b"}}),
        "must be { claim",
    ),
    ("neither", lambda r: abac(r)["principal_tags"].update({"x": {}}), "must be { claim"),
    (
        "not a table",
        lambda r: abac(r).update(principal_tags=["a"]),
        "principal_tags: must be a table",
    ),
    (
        "empty claim",
        lambda r: abac(r)["principal_tags"].update({"x": {"claim": " "}}),
        "non-empty claim name",
    ),
    (
        "transitive not a tag",
        lambda r: abac(r).update(transitive_tag_keys=["nope"]),
        "'nope' is not one of",
    ),
    (
        "token too long-lived",
        lambda r: r.update(issuer={"token_seconds": 301}),
        "issuer.token_seconds: must be between 60 and 300",
    ),
    (
        "bad algorithm",
        lambda r: r.update(issuer={"algorithm": "HS256"}),
        "issuer.algorithm: must be RS256 or ES256",
    ),
    (
        "missing key file",
        lambda r: r.update(issuer={"key_files": ["/nonexistent.pem"]}),
        "issuer.key_files: cannot read",
    ),
    (
        "unknown issuer key",
        lambda r: r.update(issuer={"audiences": ["x"]}),
        "did you mean 'audience'",
    ),
]


@pytest.mark.parametrize(
    ("mutation", "needle"), [c[1:] for c in CONFIG_MISTAKES], ids=[c[0] for c in CONFIG_MISTAKES]
)
def test_config_mistakes_are_refused_naming_the_rule(mutation: Any, needle: str) -> None:
    raw = issuer_config()
    mutation(raw)
    with pytest.raises(ConfigError) as caught:
        load(raw)
    found = [p for p in caught.value.problems if needle in p]
    assert found, caught.value.problems
    if found[0].startswith("rules[0]"):
        assert found[0].endswith("(in rule 'abac')")


def decide(claims: dict[str, Any]) -> rules.Grant:
    settings = load(issuer_config())
    return rules.decide(settings.rules, make_identity(settings, claims))


def test_tags_and_source_identity_from_claims() -> None:
    grant = decide(ALICE)
    assert grant.sts_token == "broker"
    assert grant.tags == (("department", "Engineering"), ("team", "Platform 7"), ("tier", "gold"))
    assert grant.transitive_tag_keys == ("department",)
    assert grant.source_identity == "alice"


def test_unicode_letters_and_numbers_are_tag_values() -> None:
    grant = decide(
        {**ALICE, "department": "Forschung & Entwicklung".replace("&", "und"), "org": {"team": 42}}
    )
    assert dict(grant.tags)["department"] == "Forschung und Entwicklung"
    assert dict(grant.tags)["team"] == "42"


def with_claim(path: str, value: Any) -> dict[str, Any]:
    claims = copy.deepcopy(ALICE)
    if path == "team":
        claims["org"]["team"] = value
    else:
        claims[path] = value
    return claims


HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("tag value 257 chars", with_claim("department", "x" * 257), "session tag 'department'"),
    ("tag value with a quote", with_claim("department", 'a","b'), "session tag 'department'"),
    (
        "tag value with a policy variable",
        with_claim("department", "${aws:username}"),
        "session tag 'department'",
    ),
    ("tag value with a wildcard", with_claim("department", "*"), "session tag 'department'"),
    ("tag value with a newline", with_claim("department", "a\nb"), "session tag 'department'"),
    (
        "tag value with JSON",
        with_claim("department", '{"principal_tags":{}}'),
        "session tag 'department'",
    ),
    ("tag value with a control char", with_claim("team", "a\x00"), "session tag 'team'"),
    ("tag value a list", with_claim("department", ["a", "b"]), "not a single string"),
    (
        "tag value an object",
        with_claim("team", {"principal_tags": {"x": ["y"]}}),
        "not a single string",
    ),
    ("tag value a float", with_claim("department", 1.5), "not a single string"),
    ("tag claim missing", {k: v for k, v in ALICE.items() if k != "department"}, "does not have"),
    ("source identity too long", with_claim("preferred_username", "a" * 65), "source identity"),
    ("source identity too short", with_claim("preferred_username", "a"), "source identity"),
    ("source identity with a space", with_claim("preferred_username", "a b"), "source identity"),
    ("source identity non-ASCII", with_claim("preferred_username", "ålice"), "source identity"),
    ("source identity aws:", with_claim("preferred_username", "aws:root"), "source identity"),
    (
        "source identity missing",
        {k: v for k, v in ALICE.items() if k != "preferred_username"},
        "does not have",
    ),
]


@pytest.mark.parametrize(
    ("claims", "needle"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_claim_values_are_refused_before_sts(claims: dict[str, Any], needle: str) -> None:
    with pytest.raises(errors.AccessDenied) as caught:
        decide(claims)
    assert caught.value.status == 403
    assert needle in caught.value.message
    for value in (claims.get("department"), claims.get("preferred_username")):
        if isinstance(value, str) and len(value) > 3:
            assert value not in caught.value.message  # never echoed


def test_explain_shows_tags_and_source_identity() -> None:
    settings = load(issuer_config())
    answer = explain_claims(settings, "corp", ALICE).to_json()
    assert answer["sts_token"] == "broker"
    assert answer["session_tags"] == {
        "department": "Engineering",
        "team": "Platform 7",
        "tier": "gold",
    }
    assert answer["transitive_tag_keys"] == ["department"]
    assert answer["source_identity"] == "alice"
    refused = explain_claims(settings, "corp", with_claim("department", "*")).to_json()
    assert refused["allowed"] is False
    assert refused["session_tags"] == {}
    assert "session tag 'department'" in refused["error"]["message"]


class RecordingSTS:
    """STS at its interface (the network boundary): records each request, answers with
    fresh credentials."""

    def __init__(self) -> None:
        self.requests: list[AssumeRequest] = []

    def assume_role_with_web_identity(self, request: AssumeRequest) -> IssuedCredentials:
        self.requests.append(request)
        return IssuedCredentials(
            access_key_id=f"ASIA{len(self.requests):016d}",
            secret_access_key="secret",
            session_token="session",
            expiration=datetime.now(UTC) + timedelta(hours=1),
            assumed_role_arn="arn:aws:sts::123456789012:assumed-role/Abac/alice",
            assumed_role_id="AROA:alice",
        )


def test_credentials_use_the_broker_token_and_are_cached_per_tags(store: Store) -> None:
    settings = load(issuer_config())
    sts = RecordingSTS()
    issuer = Issuer(settings=settings, store=store)
    service = CredentialService(
        sts=sts, store=store, settings=settings.cache, config_version="v1", issuer=issuer
    )
    alice = make_identity(settings, ALICE)
    grant = rules.decide(settings.rules, alice)
    first = service.get(alice, grant)
    (request,) = sts.requests
    assert request.provider_id is None
    assert request.web_identity_token != "provider-token"
    assert service.get(alice, grant) == first  # cached
    # The same person with another department claim: other tags, other credentials.
    moved = make_identity(settings, {**ALICE, "department": "Finance"})
    regranted = rules.decide(settings.rules, moved)
    assert moved.identity_id == alice.identity_id
    assert service.get(moved, regranted) != first
    assert len(sts.requests) == 2
    assert len({r.web_identity_token for r in sts.requests}) == 2


def test_broker_explain_prints_tags_and_source_identity() -> None:
    settings = load(issuer_config())
    text = format_explanation(explain_claims(settings, "corp", ALICE).to_json())
    assert "token for STS: broker" in text
    assert '  department = "Engineering" (transitive)' in text
    assert '  tier = "gold"' in text
    assert "source identity alice" in text
