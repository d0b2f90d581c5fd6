"""Role rules, one row per case: operators, list and missing claims, provider scoping,
ordering, email/MFA requirements, role choice and duration bounds."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from broker import errors
from broker.identity import Identity, IdentityIds, VerifiedClaims, VerifiedToken
from broker.rules import Grant, decide, matching_rule
from broker.settings import Condition, RuleSettings

IDS = IdentityIds(key=b"k" * 32, region="us-east-1")
DEV = "arn:aws:iam::123456789012:role/Dev"
READ = "arn:aws:iam::123456789012:role/ReadOnly"
ADMIN = "arn:aws:iam::123456789012:role/Admin"
EMAIL_RULE = Condition(claim="email", op="glob", value="*@example.com")

BASE_RULE = RuleSettings(
    name="dev",
    providers=("corp",),
    conditions=(EMAIL_RULE,),
    roles=(DEV, READ),
    require_email_verified=False,
    require_mfa=False,
    mfa_amr_values=("mfa", "otp", "hwk", "swk"),
    mfa_acr_values=(),
    default_duration_seconds=3600,
    max_duration_seconds=7200,
    session_policy=None,
    policy_arns=(),
)


def identity(
    claims: dict[str, Any] | None = None, *, provider: str = "corp", subject: str = "user-1"
) -> Identity:
    return IDS.identify(
        VerifiedToken(
            provider=provider,
            subject=subject,
            claims=VerifiedClaims({"sub": subject} if claims is None else claims),
            token="token",
            sts_provider_id=None,
            expires_at=2_000_000_000,
        )
    )


def rule(**changes: Any) -> RuleSettings:
    return replace(BASE_RULE, **changes)


def matches(rules: list[RuleSettings], who: Identity) -> str | None:
    """The name of the rule that decides for ``who``, or None when all deny."""
    try:
        return matching_rule(rules, who).name
    except errors.NoMatchingRule:
        return None


def condition_matches(op: str, expected: str | tuple[str, ...], claims: dict[str, Any]) -> bool:
    cond = Condition(claim="c", op=op, value=expected)  # type: ignore[arg-type]
    return matches([rule(conditions=(cond,))], identity(claims)) is not None


# --------------------------------------------------------------------------- operators

OPERATOR_CASES: list[tuple[str, str | tuple[str, ...], Any, bool]] = [
    # equals
    ("equals", "eng", "eng", True),
    ("equals", "eng", "Eng", False),
    ("equals", "eng", "engineering", False),
    ("equals", "eng", "", False),
    # not_equals
    ("not_equals", "eng", "ops", True),
    ("not_equals", "eng", "eng", False),
    # contains: substring of a string
    ("contains", "adm", "sysadmin", True),
    ("contains", "adm", "user", False),
    ("contains", "Adm", "sysadmin", False),
    # starts_with
    ("starts_with", "eng-", "eng-core", True),
    ("starts_with", "eng-", "core-eng-", False),
    ("starts_with", "eng-", "eng", False),
    # glob: case-sensitive, anchored at both ends
    ("glob", "*@example.com", "alice@example.com", True),
    ("glob", "*@example.com", "alice@EXAMPLE.com", False),
    ("glob", "*@example.com", "alice@example.com.evil.test", False),
    ("glob", "*@example.com", "alice@notexample.com", False),
    ("glob", "team-?", "team-a", True),
    ("glob", "team-?", "team-ab", False),
    ("glob", "[ab]x", "bx", True),
    ("glob", "[ab]x", "cx", False),
    # in: membership, never substring
    ("in", ("eng", "sre"), "sre", True),
    ("in", ("eng", "sre"), "ops", False),
    ("in", ("eng", "sre"), "en", False),
    ("in", ("eng", "sre"), "engsre", False),
]


@pytest.mark.parametrize(("op", "expected", "claim", "result"), OPERATOR_CASES)
def test_operator_on_string_claim(
    op: str, expected: str | tuple[str, ...], claim: Any, result: bool
) -> None:
    assert condition_matches(op, expected, {"c": claim}) is result


LIST_CASES: list[tuple[str, str | tuple[str, ...], list[Any], bool]] = [
    ("equals", "eng", ["ops", "eng"], True),
    ("equals", "eng", ["ops", "sre"], False),
    ("equals", "eng", [], False),
    ("equals", "eng", [["eng"]], False),  # nested lists are not flattened
    ("starts_with", "aws-", ["staff", "aws-admins"], True),
    ("starts_with", "aws-", ["staff", "admins-aws-"], False),
    ("glob", "aws-*", ["staff", "aws-admins"], True),
    ("glob", "aws-*", ["staff", "AWS-admins"], False),
    ("in", ("eng", "sre"), ["ops", "sre"], True),
    ("in", ("eng", "sre"), ["ops", "qa"], False),
    # contains on a list is membership, not a substring of an element
    ("contains", "aws-admins", ["staff", "aws-admins"], True),
    ("contains", "aws-admins", ["aws-admins-readonly"], False),
    ("contains", "aws-admins", [], False),
    # not_equals on a list: no element may equal the value
    ("not_equals", "banned", ["staff", "eng"], True),
    ("not_equals", "banned", ["staff", "banned"], False),
    ("not_equals", "banned", [], True),
    # an element we cannot compare could be anything: fail closed
    ("not_equals", "banned", ["staff", {"name": "banned"}], False),
    ("not_equals", "banned", ["staff", None], False),
    ("not_equals", "banned", ["staff", 1.5], False),
]


@pytest.mark.parametrize(("op", "expected", "claim", "result"), LIST_CASES)
def test_operator_on_list_claim(
    op: str, expected: str | tuple[str, ...], claim: list[Any], result: bool
) -> None:
    assert condition_matches(op, expected, {"c": claim}) is result


SCALAR_CASES: list[tuple[str, str | tuple[str, ...], Any, bool]] = [
    # booleans and integers compare by their JSON spelling
    ("equals", "true", True, True),
    ("equals", "true", False, False),
    ("equals", "false", False, True),
    ("equals", "True", True, False),
    ("equals", "1", True, False),  # a bool is not the integer 1
    ("not_equals", "true", False, True),
    ("not_equals", "true", True, False),
    ("equals", "42", 42, True),
    ("equals", "42", 43, False),
    ("equals", "-7", -7, True),
    ("in", ("41", "42"), 42, True),
    ("starts_with", "12", 1234, True),
    ("glob", "12*", 1234, True),
    ("contains", "23", 1234, True),
    ("equals", "true", [False, True], True),
    ("equals", "42", ["x", 42], True),
    # floats have no single spelling, objects none at all: never comparable
    ("equals", "1", 1.0, False),
    ("equals", "1.0", 1.0, False),
    ("not_equals", "1", 1.5, False),
    ("equals", "{}", {}, False),
    ("not_equals", "x", {"a": "b"}, False),
    # null proves nothing
    ("equals", "null", None, False),
    ("not_equals", "x", None, False),
]


@pytest.mark.parametrize(("op", "expected", "claim", "result"), SCALAR_CASES)
def test_operator_on_non_string_claim(
    op: str, expected: str | tuple[str, ...], claim: Any, result: bool
) -> None:
    assert condition_matches(op, expected, {"c": claim}) is result


MALFORMED_CASES: list[tuple[str, tuple[str, ...], Any]] = [
    ("equals", ("y",), "y"),
    ("not_equals", ("x",), "y"),
    ("not_equals", ("x",), ["y"]),
    ("contains", ("y",), "y"),
    ("contains", ("y",), ["y"]),
    ("starts_with", ("y",), "y"),
    ("glob", ("*",), "y"),
]


@pytest.mark.parametrize(("op", "expected", "claim"), MALFORMED_CASES)
def test_hand_built_tuple_value_for_a_non_in_op_fails_closed(
    op: str, expected: tuple[str, ...], claim: Any
) -> None:
    # Settings never builds these; a hand-built one must deny, not match everyone.
    assert condition_matches(op, expected, {"c": claim}) is False


MISSING_CASES: list[tuple[str, str | tuple[str, ...]]] = [
    ("equals", "x"),
    ("not_equals", "x"),  # absent is not "different": fail closed
    ("contains", "x"),
    ("starts_with", "x"),
    ("glob", "*"),
    ("in", ("x",)),
]


@pytest.mark.parametrize(("op", "expected"), MISSING_CASES)
def test_missing_claim_satisfies_nothing(op: str, expected: str | tuple[str, ...]) -> None:
    assert condition_matches(op, expected, {"other": "x"}) is False


DOTTED_CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("address.country", {"address": {"country": "NZ"}}, True),
    ("address.country", {"address": {"country": "AU"}}, False),
    ("address.country", {"address": {}}, False),
    ("address.country", {"address": "NZ"}, False),
    ("address.country", {"address": ["NZ"]}, False),
    ("address.country", {}, False),
    ("org.unit.name", {"org": {"unit": {"name": "NZ"}}}, True),
    # namespaced claims contain dots themselves: the exact key is found first
    ("https://example.com/country", {"https://example.com/country": "NZ"}, True),
    ("https://example.com/ns.country", {"https://example.com/ns": {"country": "NZ"}}, True),
    ("address.country", {"address.country": "NZ"}, True),
]


@pytest.mark.parametrize(("path", "claims", "result"), DOTTED_CASES)
def test_dotted_claim_paths(path: str, claims: dict[str, Any], result: bool) -> None:
    cond = Condition(claim=path, op="equals", value="NZ")
    assert (matches([rule(conditions=(cond,))], identity(claims)) is not None) is result


def test_every_condition_must_hold() -> None:
    both = rule(
        conditions=(EMAIL_RULE, Condition(claim="dept", op="in", value=("eng", "sre"))),
    )
    assert matches([both], identity({"email": "a@example.com", "dept": "sre"})) == "dev"
    assert matches([both], identity({"email": "a@example.com", "dept": "ops"})) is None
    assert matches([both], identity({"email": "a@other.test", "dept": "sre"})) is None


def test_rule_without_conditions_never_matches() -> None:
    assert matches([rule(conditions=())], identity({"email": "a@example.com"})) is None


# --------------------------------------------------------------------------- scoping, order


@pytest.mark.parametrize(
    ("providers", "caller", "result"),
    [
        (("corp",), "corp", True),
        (("corp",), "google", False),
        (("corp", "google"), "google", True),
        (("google",), "corp", False),
        (("Corp",), "corp", False),
    ],
)
def test_provider_scoping(providers: tuple[str, ...], caller: str, result: bool) -> None:
    who = identity({"email": "a@example.com"}, provider=caller)
    assert (matches([rule(providers=providers)], who) is not None) is result


def test_first_matching_rule_wins() -> None:
    admins = rule(
        name="admins",
        conditions=(Condition(claim="groups", op="contains", value="aws-admins"),),
        roles=(ADMIN,),
    )
    staff = rule(name="staff")
    rules = [admins, staff]
    both = identity({"email": "a@example.com", "groups": ["aws-admins"]})
    assert matches(rules, both) == "admins"
    assert matches([staff, admins], both) == "staff"
    assert matches(rules, identity({"email": "a@example.com", "groups": []})) == "staff"
    assert matches(rules, identity({"email": "a@other.test", "groups": []})) is None


def test_no_match_is_a_clear_403_without_claim_values() -> None:
    who = identity({"email": "secret-person@other.test", "sub": "sub-123"}, provider="corp")
    with pytest.raises(errors.NoMatchingRule) as caught:
        matching_rule([rule(name="internal-rule-name")], who)
    assert caught.value.status == 403
    assert caught.value.code == "no_matching_rule"
    assert "corp" in caught.value.message
    for leaked in ("secret-person", "other.test", "sub-123", "internal-rule-name"):
        assert leaked not in caught.value.message


def test_no_rules_denies() -> None:
    with pytest.raises(errors.NoMatchingRule):
        matching_rule([], identity({"email": "a@example.com"}))


# --------------------------------------------------------------------------- requirements

VERIFIED_EMAIL_CASES: list[tuple[dict[str, Any], bool]] = [
    ({"email_verified": True}, True),
    ({"email_verified": "true"}, True),
    ({"email_verified": False}, False),
    ({"email_verified": "false"}, False),
    ({"email_verified": "True"}, False),
    ({"email_verified": "yes"}, False),
    ({"email_verified": 1}, False),
    ({"email_verified": None}, False),
    ({"email_verified": [True]}, False),
    ({}, False),
]


@pytest.mark.parametrize(("extra", "result"), VERIFIED_EMAIL_CASES)
def test_require_email_verified(extra: dict[str, Any], result: bool) -> None:
    who = identity({"email": "a@example.com", **extra})
    assert (matches([rule(require_email_verified=True)], who) is not None) is result


def test_email_verified_not_required_by_default() -> None:
    assert matches([rule()], identity({"email": "a@example.com", "email_verified": False}))


MFA_CASES: list[tuple[dict[str, Any], dict[str, Any], bool]] = [
    ({}, {"amr": ["pwd", "mfa"]}, True),
    ({}, {"amr": ["otp"]}, True),
    ({}, {"amr": ["hwk", "pwd"]}, True),
    ({}, {"amr": "mfa"}, True),  # a lone string is one method
    ({}, {"amr": ["pwd"]}, False),
    ({}, {"amr": []}, False),
    ({}, {"amr": "pwd mfa"}, False),  # not split, not searched
    ({}, {"amr": "mfa-bypass"}, False),
    ({}, {"amr": ["MFA"]}, False),
    ({}, {"amr": [["mfa"]]}, False),
    ({}, {"amr": {"mfa": True}}, False),
    ({}, {}, False),
    ({}, {"acr": "urn:mfa"}, False),  # no acr values configured
    ({"mfa_acr_values": ("urn:mfa",)}, {"acr": "urn:mfa"}, True),
    ({"mfa_acr_values": ("urn:mfa",)}, {"acr": "urn:password"}, False),
    ({"mfa_acr_values": ("urn:mfa",)}, {"acr": ["urn:mfa"]}, False),
    ({"mfa_acr_values": ("urn:mfa",)}, {"amr": ["pwd"]}, False),
    ({"mfa_amr_values": ("hwk",)}, {"amr": ["otp"]}, False),
    ({"mfa_amr_values": ("hwk",)}, {"amr": ["hwk"]}, True),
    ({"mfa_amr_values": ()}, {"amr": ["mfa"]}, False),
]


@pytest.mark.parametrize(("rule_changes", "extra", "result"), MFA_CASES)
def test_require_mfa(rule_changes: dict[str, Any], extra: dict[str, Any], result: bool) -> None:
    mfa_rule = rule(require_mfa=True, **rule_changes)
    who = identity({"email": "a@example.com", **extra})
    assert (matches([mfa_rule], who) is not None) is result


def test_requirements_fall_through_to_later_rules() -> None:
    strict = rule(name="strict", require_mfa=True, roles=(ADMIN,))
    lax = rule(name="lax", roles=(READ,))
    assert matches([strict, lax], identity({"email": "a@example.com"})) == "lax"
    assert matches([strict, lax], identity({"email": "a@example.com", "amr": ["mfa"]})) == "strict"


# --------------------------------------------------------------------------- decide

ALICE = identity({"email": "alice@example.com"}, subject="alice-1")


def test_the_matching_rule_offers_its_roles() -> None:
    assert matching_rule([rule()], ALICE).roles == (DEV, READ)
    with pytest.raises(errors.NoMatchingRule):
        matching_rule([rule(providers=("google",))], ALICE)


def test_decide_defaults() -> None:
    grant = decide([rule(policy_arns=("arn:aws:iam::aws:policy/ReadOnlyAccess",))], ALICE)
    assert grant == Grant(
        rule="dev",
        role_arn=DEV,
        duration_seconds=3600,
        session_policy=None,
        policy_arns=("arn:aws:iam::aws:policy/ReadOnlyAccess",),
    )


@pytest.mark.parametrize(("requested", "chosen"), [(None, DEV), (DEV, DEV), (READ, READ)])
def test_decide_role_choice_allowed(requested: str | None, chosen: str) -> None:
    assert decide([rule()], ALICE, role_arn=requested).role_arn == chosen


@pytest.mark.parametrize(
    "requested",
    [
        ADMIN,  # another rule's role
        DEV + "/",
        "arn:aws:iam::999999999999:role/Dev",
    ],
)
def test_decide_role_choice_refused(requested: str) -> None:
    admins = rule(name="admins", roles=(ADMIN,), require_mfa=True)
    with pytest.raises(errors.RoleNotAllowed) as caught:
        decide([admins, rule()], ALICE, role_arn=requested)
    assert caught.value.status == 403


@pytest.mark.parametrize(
    "requested", [DEV.upper(), DEV + " ", DEV + "\n", "", "BrokerDemoUser", "Dev"]
)
def test_decide_a_value_that_is_no_role_arn_is_a_bad_request(requested: str) -> None:
    with pytest.raises(errors.BadRequest) as caught:
        decide([rule()], ALICE, role_arn=requested)
    assert caught.value.status == 400
    assert "is not a role ARN" in caught.value.message
    assert caught.value.details["allowed_roles"] == [DEV, READ]


@pytest.mark.parametrize("requested", [123, [DEV], {"arn": DEV}])
def test_decide_role_must_be_text(requested: Any) -> None:
    with pytest.raises(errors.BadRequest):
        decide([rule()], ALICE, role_arn=requested)


def test_decide_no_match_before_role_check() -> None:
    with pytest.raises(errors.NoMatchingRule):
        decide([rule(providers=("google",))], ALICE, role_arn=DEV)


@pytest.mark.parametrize(
    ("rule_max", "requested", "granted"),
    [
        (7200, None, 3600),  # the rule's default
        (7200, 900, 900),
        (7200, 7200, 7200),
        (43200, 43200, 43200),
        (43200, 900, 900),
    ],
)
def test_decide_duration_accepted(rule_max: int, requested: int | None, granted: int) -> None:
    grant = decide([rule(max_duration_seconds=rule_max)], ALICE, duration_seconds=requested)
    assert grant.duration_seconds == granted


@pytest.mark.parametrize(
    ("rule_max", "requested"),
    [
        (7200, 899),
        (7200, 0),
        (7200, -3600),
        (7200, 7201),  # over the rule's maximum
        (43200, 43201),  # over STS's maximum
        (3600, 3601),
        (7200, True),  # JSON true is not a duration
        (7200, "3600"),
        (7200, 3600.0),
        (7200, [3600]),
    ],
)
def test_decide_duration_refused(rule_max: int, requested: Any) -> None:
    with pytest.raises(errors.BadRequest) as caught:
        decide([rule(max_duration_seconds=rule_max)], ALICE, duration_seconds=requested)
    assert caught.value.status == 400
    assert f"900 to {rule_max}" in caught.value.message


def test_decide_renders_the_session_policy() -> None:
    template = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": "arn:aws:s3:::bucket/${identity_id}/*",
            }
        ],
    }
    grant = decide([rule(session_policy=template)], ALICE)
    assert grant.session_policy is not None
    rendered = json.loads(grant.session_policy)
    resource = rendered["Statement"][0]["Resource"]
    assert resource == f"arn:aws:s3:::bucket/{ALICE.identity_id}/*"


def test_decide_refuses_identity_unsuitable_for_the_policy() -> None:
    template = {"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "a/${sub}/*"}]}
    who = identity({"email": "a@example.com"}, subject="*")
    with pytest.raises(errors.AccessDenied):
        decide([rule(session_policy=template)], who)
