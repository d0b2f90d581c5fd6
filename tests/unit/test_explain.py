"""rules.explain: one row per failing check, each naming the check and the claim value
seen; explain and decide agree on a fixed table of identities; the words a refused
person reads; the role list a wrong role choice names."""

from __future__ import annotations

from typing import Any

import pytest

from broker import errors
from broker.rules import decide, explain
from broker.settings import Condition, RuleSettings
from tests.unit.test_rules import ADMIN, DEV, READ, identity, rule

ADMINS = rule(
    name="admins",
    conditions=(Condition(claim="groups", op="contains", value="admins"),),
    roles=(ADMIN, READ),
    require_mfa=True,
    require_email_verified=True,
    max_duration_seconds=43200,
)
DEVS = rule(
    name="devs",
    conditions=(
        Condition(claim="email", op="glob", value="*@example.com"),
        Condition(claim="team", op="in", value=("eng", "sre")),
    ),
    roles=(DEV,),
    require_email_verified=True,
    session_policy={
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/${sub}/*"}
        ],
    },
)
OTHER = rule(
    name="other-provider",
    providers=("elsewhere",),
    conditions=(Condition(claim="sub", op="equals", value="x"),),
)
RULES = [OTHER, ADMINS, DEVS]

GOOD_DEV: dict[str, Any] = {
    "sub": "u1",
    "email": "dana@example.com",
    "email_verified": True,
    "team": "eng",
}
GOOD_ADMIN: dict[str, Any] = {
    "sub": "u2",
    "email": "ann@example.com",
    "email_verified": True,
    "groups": ["admins"],
    "amr": ["pwd", "mfa"],
}


# --------------------------------------------------------------------------- per check

# (claims, rule, the failing check kind, its claim, the value seen)
FAILING: list[tuple[str, dict[str, Any], RuleSettings, str, str | None, Any]] = [
    (
        "wrong email domain",
        {**GOOD_DEV, "email": "dana@evil.com"},
        DEVS,
        "condition",
        "email",
        "dana@evil.com",
    ),
    (
        "email missing",
        {k: v for k, v in GOOD_DEV.items() if k != "email"},
        DEVS,
        "condition",
        "email",
        None,
    ),
    ("team not listed", {**GOOD_DEV, "team": "sales"}, DEVS, "condition", "team", "sales"),
    ("team a number", {**GOOD_DEV, "team": 7}, DEVS, "condition", "team", 7),
    (
        "email unverified",
        {**GOOD_DEV, "email_verified": False},
        DEVS,
        "email_verified",
        "email_verified",
        False,
    ),
    (
        "email_verified absent",
        {k: v for k, v in GOOD_DEV.items() if k != "email_verified"},
        DEVS,
        "email_verified",
        "email_verified",
        None,
    ),
    ("not in admins", {**GOOD_ADMIN, "groups": ["eng"]}, ADMINS, "condition", "groups", ["eng"]),
    ("no mfa", {**GOOD_ADMIN, "amr": ["pwd"]}, ADMINS, "mfa", "amr", {"amr": ["pwd"], "acr": None}),
    (
        "mfa absent",
        {k: v for k, v in GOOD_ADMIN.items() if k != "amr"},
        ADMINS,
        "mfa",
        "amr",
        {"amr": None, "acr": None},
    ),
]


@pytest.mark.parametrize(
    ("claims", "target", "kind", "claim", "seen"),
    [pytest.param(*row[1:], id=row[0]) for row in FAILING],
)
def test_each_failing_check_is_reported_with_the_value_seen(
    claims: dict[str, Any], target: RuleSettings, kind: str, claim: str | None, seen: Any
) -> None:
    answer = explain([target], identity(claims, subject=claims["sub"])).to_json()
    (reported,) = answer["rules"]
    assert reported["name"] == target.name
    assert reported["matched"] is False
    failed = [c for c in reported["checks"] if not c["passed"]]
    assert len(failed) == 1, failed
    assert failed[0]["check"] == kind
    assert failed[0]["claim"] == claim
    assert failed[0]["seen"] == seen
    assert answer["allowed"] is False
    assert answer["error"]["error"] == "no_matching_rule"


def test_a_rule_for_another_provider_reports_the_provider_and_stops() -> None:
    answer = explain([OTHER], identity(GOOD_DEV, subject="u1")).to_json()
    (checks,) = [r["checks"] for r in answer["rules"]]
    assert checks == [
        {
            "check": "provider",
            "passed": False,
            "wants": 'provider in ["elsewhere"]',
            "claim": None,
            "seen": "corp",
        }
    ]


def test_the_grant_is_shown_in_full_and_later_rules_are_marked_not_reached() -> None:
    answer = explain(RULES, identity(GOOD_DEV | {"groups": ["admins"], "amr": "mfa"}, subject="u1"))
    out = answer.to_json()
    assert out["allowed"] is True
    assert out["rule"] == "admins"
    assert [(r["name"], r["matched"], r["reached"]) for r in out["rules"]] == [
        ("other-provider", False, True),
        ("admins", True, True),
        ("devs", True, False),
    ]
    assert out["roles"] == [ADMIN, READ]
    assert out["role_arn"] == ADMIN
    assert out["duration_seconds"] == {"min": 900, "default": 3600, "max": 43200, "granted": 3600}
    assert out["session_name"] == "dana@example.com"
    assert out["session_policy"] is None
    assert out["error"] is None


def test_the_rendered_session_policy_and_its_size_against_the_sts_limit() -> None:
    out = explain(RULES, identity(GOOD_DEV, subject="u1"), duration_seconds=1800).to_json()
    assert out["rule"] == "devs"
    assert out["session_policy"]["Statement"][0]["Resource"] == "arn:aws:s3:::b/u1/*"
    granted = decide(RULES, identity(GOOD_DEV, subject="u1"), duration_seconds=1800)
    assert out["session_policy_chars"] == len(granted.session_policy or "") > 0
    assert out["session_policy_limit"] == 2048
    assert out["duration_seconds"]["granted"] == 1800


# --------------------------------------------------------------------------- agreement

IDENTITIES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("dev", GOOD_DEV, {}),
    ("admin", GOOD_ADMIN, {}),
    ("admin picks read", GOOD_ADMIN, {"role_arn": READ}),
    ("admin picks dev", GOOD_ADMIN, {"role_arn": DEV}),
    ("admin too long", GOOD_ADMIN, {"duration_seconds": 50000}),
    ("dev too long", GOOD_DEV, {"duration_seconds": 7201}),
    ("dev too short", GOOD_DEV, {"duration_seconds": 899}),
    ("admin without mfa falls to devs", {**GOOD_ADMIN, "amr": [], "team": "sre"}, {}),
    ("unverified", {**GOOD_DEV, "email_verified": "false"}, {}),
    ("verified as text", {**GOOD_DEV, "email_verified": "true"}, {}),
    ("nobody", {"sub": "u9"}, {}),
    ("unsafe policy value", {**GOOD_DEV, "sub": "a/b"}, {}),
    ("list team", {**GOOD_DEV, "team": ["x", "sre"]}, {}),
]


@pytest.mark.parametrize(
    ("claims", "ask"), [pytest.param(c, a, id=name) for name, c, a in IDENTITIES]
)
def test_explain_and_decide_agree(claims: dict[str, Any], ask: dict[str, Any]) -> None:
    who = identity(claims, subject=claims["sub"])
    explained = explain(RULES, who, **ask)
    try:
        decided: Any = decide(RULES, who, explain_denials=True, **ask)
    except errors.BrokerError as exc:
        decided = (exc.code, exc.message)
    if explained.error is not None:
        assert (explained.error.code, explained.error.message) == decided
        assert explained.grant is None
    else:
        assert explained.grant == decided
        assert explained.rule is not None
        assert explained.rule.name == decided.rule
    # The first matching outcome is the rule decide used (or none matched at all).
    first = next((o.rule.name for o in explained.outcomes if o.matched), None)
    assert first == (explained.rule.name if explained.rule else None)


# --------------------------------------------------------------------------- denials

DENIALS: list[tuple[str, list[RuleSettings], dict[str, Any], list[str]]] = [
    (
        "email unverified",
        [DEVS],
        {**GOOD_DEV, "email_verified": False},
        ["your e-mail address is not verified at Corp SSO"],
    ),
    (
        "mfa missing",
        [ADMINS],
        {**GOOD_ADMIN, "amr": ["pwd"]},
        ["this needs multi-factor sign-in: sign in again at Corp SSO with a second factor"],
    ),
    (
        "both missing",
        [ADMINS],
        {**GOOD_ADMIN, "amr": "pwd", "email_verified": False},
        [
            "your e-mail address is not verified at Corp SSO",
            "this needs multi-factor sign-in: sign in again at Corp SSO with a second factor",
        ],
    ),
    (
        "the nearest miss wins over a condition miss",
        [ADMINS, DEVS],
        {**GOOD_DEV, "email_verified": False},
        ["your e-mail address is not verified at Corp SSO"],
    ),
    (
        "conditions named, values not echoed",
        [ADMINS, DEVS],
        {"sub": "u", "email": "eve@evil.com"},
        [
            "rule 'admins' needs groups contains \"admins\"",
            'rule \'devs\' needs email glob "*@example.com" and team in ["eng", "sre"]',
        ],
    ),
    (
        "no rule for the provider",
        [OTHER],
        GOOD_DEV,
        ["no role is set up for people who sign in with Corp SSO"],
    ),
]


@pytest.mark.parametrize(
    ("rules", "claims", "reasons"), [pytest.param(*row[1:], id=row[0]) for row in DENIALS]
)
def test_denials_say_what_the_person_can_do(
    rules: list[RuleSettings], claims: dict[str, Any], reasons: list[str]
) -> None:
    with pytest.raises(errors.NoMatchingRule) as caught:
        decide(
            rules,
            identity(claims, subject=claims["sub"]),
            explain_denials=True,
            provider_label="Corp SSO",
        )
    assert caught.value.details == {"reasons": reasons}
    assert caught.value.message == "; ".join(reasons)
    assert "evil.com" not in caught.value.message


def test_without_explain_denials_the_refusal_says_nothing_of_the_rules() -> None:
    with pytest.raises(errors.NoMatchingRule) as caught:
        decide([ADMINS, DEVS], identity({**GOOD_DEV, "email_verified": False}, subject="u1"))
    assert caught.value.details == {}
    assert caught.value.message == "no role rule matches this identity from provider 'corp'"


@pytest.mark.parametrize("explain_denials", [True, False])
def test_a_role_not_allowed_names_the_roles_the_caller_may_choose(explain_denials: bool) -> None:
    with pytest.raises(errors.RoleNotAllowed) as caught:
        decide(
            [ADMINS],
            identity(GOOD_ADMIN, subject="u2"),
            role_arn=DEV,
            explain_denials=explain_denials,
        )
    assert caught.value.details == {"allowed_roles": [ADMIN, READ]}
    assert ADMIN in caught.value.message
    assert READ in caught.value.message
    assert caught.value.to_dict()["allowed_roles"] == [ADMIN, READ]
