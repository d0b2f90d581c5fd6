"""Session policy templates and session names, one row per case: rendering, injection
attempts, size limits, load-time template checks and RoleSessionName properties."""

from __future__ import annotations

import copy
import datetime
import json
import random
import re
from typing import Any

import pytest

from broker import errors
from broker.identity import Identity, IdentityIds, VerifiedClaims, VerifiedToken
from broker.limits import STS_MAX_INLINE_POLICY_CHARS
from broker.policy import render, session_name
from broker.policy_template import MAX_VALUE_CHARS, check_policy_template
from broker.settings import Condition, RuleSettings

IDS = IdentityIds(key=b"k" * 32, region="us-east-1")
# STS's RoleSessionName pattern, restated here so the tests pin the contract itself.
STS_SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)

TEMPLATE: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject"],
            "Resource": "arn:aws:s3:::bucket/${identity_id}/*",
        },
        {
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": "arn:aws:s3:::bucket",
            "Condition": {"StringLike": {"s3:prefix": ["${identity_id}/*"]}},
        },
    ],
}

RULE = RuleSettings(
    name="r",
    providers=("corp",),
    conditions=(Condition(claim="email", op="glob", value="*@example.com"),),
    roles=("arn:aws:iam::123456789012:role/Dev",),
    require_email_verified=False,
    require_mfa=False,
    mfa_amr_values=("mfa",),
    mfa_acr_values=(),
    default_duration_seconds=3600,
    max_duration_seconds=3600,
    session_policy=TEMPLATE,
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


def one_statement(resource: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": resource}],
    }


def minified(policy: Any) -> str:
    return json.dumps(policy, separators=(",", ":"))


# --------------------------------------------------------------------------- rendering


def test_render_fills_every_placeholder_at_the_json_level() -> None:
    template = one_statement(
        "arn:aws:s3:::b/${provider}/${sub}/${identity_id}/${email}/${aud}/${claim:tenant}/"
        "${claim:org.unit}/x"
    )
    who = identity(
        {
            "email": "alice+aws@example.com",
            "aud": ["app-1", "app-2"],
            "tenant": "acme",
            "org": {"unit": "eng"},
        },
        subject="alice-1",
    )
    expected = one_statement(
        f"arn:aws:s3:::b/corp/alice-1/{who.identity_id}/alice+aws@example.com/app-1/acme/eng/x"
    )
    assert render(template, who) == minified(expected)


def test_render_keeps_structure_and_non_string_values() -> None:
    template: dict[str, Any] = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Own${sub}",
                "Effect": "Allow",
                "Action": "s3:*",
                "Resource": ["a/${sub}", "b"],
                "Condition": {"NumericLessThan": {"s3:max-keys": 10}, "Bool": {"x": True}},
                "Extra": None,
            }
        ],
    }
    text = render(template, identity(subject="u1"))
    assert " " not in text
    expected = copy.deepcopy(template)
    expected["Statement"][0]["Sid"] = "Ownu1"
    expected["Statement"][0]["Resource"] = ["a/u1", "b"]
    assert json.loads(text) == expected


def test_render_does_not_touch_object_keys_or_the_template() -> None:
    template = {"Statement": [{"Effect": "Allow", "${sub}": "${sub}"}]}
    before = copy.deepcopy(template)
    assert json.loads(render(template, identity(subject="u1"))) == {
        "Statement": [{"Effect": "Allow", "${sub}": "u1"}]
    }
    assert template == before


def test_render_aud_string_or_first() -> None:
    template = one_statement("r/${aud}")
    assert json.loads(render(template, identity({"aud": "one"})))["Statement"][0]["Resource"] == (
        "r/one"
    )
    assert json.loads(render(template, identity({"aud": ["two", "x"]})))["Statement"][0][
        "Resource"
    ] == ("r/two")


def test_identity_id_keeps_its_colon() -> None:
    who = identity()
    assert ":" in who.identity_id
    assert json.loads(render(one_statement("r/${identity_id}"), who))["Statement"][0][
        "Resource"
    ] == (f"r/{who.identity_id}")


# --------------------------------------------------------------------------- injection

INJECTIONS = [
    '"], "Effect": "Allow", "Action": "*',
    '","Action":"*","Resource":"*"},{"Effect":"Allow',
    "*",
    "alice*",
    "a?b",
    "${aws:username}",
    "${identity_id}",
    "${*}",
    "a}b",
    "a{b",
    "$",
    "../../other-user",
    "a/b",
    "a:b",
    'a"b',
    "a\\b",
    "a\nb",
    "a\rb",
    "a\x00b",
    "a\tb",
    "alice ",
    "",
    "é",
    "alice\u202egnp",  # right-to-left override
    "\uff0a",  # fullwidth asterisk
    "a" * (MAX_VALUE_CHARS + 1),
]

# (placeholder, how to build an identity carrying `value` there)
POSITIONS = ["sub", "email", "claim:tenant", "claim:org.team", "aud"]


def identity_with(position: str, value: str) -> Identity:
    base = {"email": "ok@example.com", "tenant": "t", "org": {"team": "x"}, "aud": "app"}
    if position == "sub":
        return identity(base, subject=value)
    if position == "email":
        return identity({**base, "email": value})
    if position == "aud":
        return identity({**base, "aud": [value]})
    if position == "claim:tenant":
        return identity({**base, "tenant": value})
    return identity({**base, "org": {"team": value}})


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_attempts_are_refused(position: str, value: str) -> None:
    template = one_statement(f"arn:aws:s3:::bucket/${{{position}}}/*")
    with pytest.raises(errors.AccessDenied) as caught:
        render(template, identity_with(position, value))
    assert caught.value.status == 403
    if len(value) > 3:  # shorter ones occur in the message's own text
        assert value not in caught.value.message


SAFE_ODD_VALUES = [
    "alice",
    "a.b+c@example.com",
    "a,b=c",
    "-_-",
    "..",
    "@",
    "a" * MAX_VALUE_CHARS,
]


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("value", SAFE_ODD_VALUES)
def test_accepted_values_stay_inside_their_string(position: str, value: str) -> None:
    template = one_statement(f"arn:aws:s3:::bucket/${{{position}}}/*")
    parsed = json.loads(render(template, identity_with(position, value)))
    assert parsed == one_statement(f"arn:aws:s3:::bucket/{value}/*")


def test_substituted_values_are_not_expanded_again() -> None:
    # A claim whose value names another placeholder must not pull that value in.
    template = one_statement("${claim:a}")
    with pytest.raises(errors.AccessDenied):
        render(template, identity({"a": "${sub}"}))


@pytest.mark.parametrize(
    ("placeholder", "claims", "needle"),
    [
        ("email", {}, "'email'"),
        ("email", {"email": None}, "'email'"),
        ("email", {"email": ["a@example.com"]}, "'email'"),
        ("aud", {}, "'aud'"),
        ("aud", {"aud": []}, "'aud'"),
        ("aud", {"aud": [7]}, "'aud'"),
        ("claim:tenant", {}, "'tenant'"),
        ("claim:tenant", {"tenant": 42}, "'tenant'"),
        ("claim:tenant", {"tenant": True}, "'tenant'"),
        ("claim:tenant", {"tenant": {"id": "x"}}, "'tenant'"),
        ("claim:org.team", {"org": {}}, "'org.team'"),
        ("claim:org.team", {"org": "team"}, "'org.team'"),
    ],
)
def test_missing_or_non_string_claim_denies(
    placeholder: str, claims: dict[str, Any], needle: str
) -> None:
    with pytest.raises(errors.AccessDenied) as caught:
        render(one_statement(f"r/${{{placeholder}}}"), identity(claims))
    assert "requires claim" in caught.value.message
    assert needle in caught.value.message


def test_unknown_placeholder_at_render_is_an_internal_error() -> None:
    # check_policy_template refuses it at load time; render's refusal is the backstop.
    with pytest.raises(errors.ServerError) as caught:
        render(one_statement("r/${aws:username}"), identity())
    assert caught.value.code == "internal_error"


# --------------------------------------------------------------------------- size


def padded(total: int) -> dict[str, Any]:
    """A template that renders to exactly ``total`` characters."""
    empty = len(minified(one_statement("")))
    return one_statement("x" * (total - empty))


def test_policy_at_the_limit_renders() -> None:
    assert len(render(padded(STS_MAX_INLINE_POLICY_CHARS), identity())) == 2048


def test_oversize_policy_is_refused_before_sts() -> None:
    # The load-time check refuses such templates; this is render's backstop.
    with pytest.raises(errors.ServerError) as caught:
        render(padded(STS_MAX_INLINE_POLICY_CHARS + 1), identity())
    assert caught.value.code == "internal_error"
    assert "2049" in caught.value.message
    assert "2048" in caught.value.message


def test_policy_that_outgrows_the_limit_with_long_values() -> None:
    template = one_statement("/".join(["${email}"] * 40))
    short = identity({"email": "a@b.c"})
    long = identity({"email": "a" * 50 + "@example.com"})
    assert len(render(template, short)) < 2048
    with pytest.raises(errors.ServerError):
        render(template, long)
    # ...which the load-time check foresaw.
    assert any("2048" in p for p in check_policy_template(template))


# --------------------------------------------------------------------------- check_policy_template


def problems_for(template: Any) -> list[str]:
    return check_policy_template(template)


def test_check_policy_template_accepts_good_templates() -> None:
    assert problems_for(TEMPLATE) == []
    assert problems_for(None) == []
    every = one_statement("${identity_id}${sub}${provider}${email}${aud}${claim:x}${claim:a.b}")
    assert problems_for(every) == []
    assert problems_for(one_statement("cost is $5 {approx}")) == []


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        (one_statement("r/${foo}"), "Statement[0].Resource: unknown placeholder ${foo}"),
        (one_statement("r/${aws:username}"), "unknown placeholder ${aws:username}"),
        (one_statement("r/${Sub}"), "unknown placeholder ${Sub}"),
        (one_statement("r/${ sub}"), "unknown placeholder ${ sub}"),
        (one_statement("r/${claim:}"), "unknown placeholder ${claim:}"),
        (one_statement("r/${}"), "unknown placeholder ${}"),
        (one_statement("r/${sub"), "unterminated"),
        (one_statement("r/${${sub}}"), "unterminated or nested"),
        ({"Statement": [{"Effect": "Allow", "${sub}": "x"}]}, "Statement[0].${sub}: placeholders"),
        ({"Statement": [], "Version": datetime.date(2012, 10, 17)}, "Version: a date"),
        ({"Statement": [], "N": float("nan")}, "N: NaN"),
        ({"Statement": [], 1: "x"}, "not a string"),
        (padded(STS_MAX_INLINE_POLICY_CHARS + 1), "STS accepts at most 2048"),
    ],
)
def test_check_policy_template_problems(template: Any, needle: str) -> None:
    problems = problems_for(template)
    assert any(needle in p for p in problems), problems


def test_check_policy_template_reports_every_problem() -> None:
    template = {
        "Statement": [
            {"Effect": "Allow", "Resource": ["${a}", "${b}"], "${c}": "x"},
        ]
    }
    problems = problems_for(template)
    assert len(problems) == 3, problems


def test_worst_case_size_uses_the_longest_values() -> None:
    # 2048 characters only when every ${email} is at its longest allowed length.
    empty = len(minified(one_statement("")))
    count = 10
    fixed = STS_MAX_INLINE_POLICY_CHARS - empty - count * MAX_VALUE_CHARS
    fits = one_statement("${email}" * count + "x" * fixed)
    assert problems_for(fits) == []
    too_big = one_statement("${email}" * count + "x" * (fixed + 1))
    assert problems_for(too_big) != []


# --------------------------------------------------------------------------- session names


@pytest.mark.parametrize(
    ("claims", "provider", "subject", "expected"),
    [
        ({"email": "alice@example.com"}, "corp", "u1", "alice@example.com"),
        ({"email": "a.b+c=d,e@example.com"}, "corp", "u1", "a.b+c=d,e@example.com"),
        ({"email": "alice@example.com", "email_verified": True}, "corp", "u1", "alice@example.com"),
        ({"email": "alice@example.com", "email_verified": "true"}, "g", "u1", "alice@example.com"),
        # an unverified address could name someone else in CloudTrail
        ({"email": "alice@example.com", "email_verified": False}, "corp", "u1", "corp-u1"),
        ({"email": "alice@example.com", "email_verified": "false"}, "corp", "u1", "corp-u1"),
        ({}, "corp", "u1", "corp-u1"),
        ({"email": ""}, "corp", "u1", "corp-u1"),
        ({"email": None}, "corp", "u1", "corp-u1"),
        ({"email": ["alice@example.com"]}, "corp", "u1", "corp-u1"),
        ({}, "google", "110169484474386276334", "google-110169484474386276334"),
        ({}, "a", "", "a-"),
    ],
)
def test_session_name_choice(
    claims: dict[str, Any], provider: str, subject: str, expected: str
) -> None:
    assert session_name(identity(claims, provider=provider, subject=subject)) == expected


AWKWARD = [
    "josé@example.com",
    "jos\u00e8@example.com",
    "用户@例子.公司",
    "emoji😀@example.com",
    "a b@example.com",
    "a/b:c*d?e@example.com",
    "\x00\x01\n\t",
    "\u202e",
    "'; DROP TABLE users; --",
    "x" * 64,
    "x" * 65,
    "x" * 1000,
    "a",
    "-",
    "ab",
    "é",
    "ﬀ",  # a ligature that str.isalnum accepts
    "١٢٣",  # Arabic-Indic digits: \w without re.ASCII would keep them
]


@pytest.mark.parametrize("value", AWKWARD)
@pytest.mark.parametrize("where", ["email", "subject"])
def test_session_name_is_always_valid_for_sts(value: str, where: str) -> None:
    who = (
        identity({"email": value}, subject="u1")
        if where == "email"
        else identity({}, subject=value)
    )
    name = session_name(who)
    assert STS_SESSION_NAME.fullmatch(name), name
    assert name.isascii()
    assert session_name(who) == name  # stable across calls


def test_session_name_random_inputs() -> None:
    rng = random.Random(20240611)
    alphabet = "aZ09_+=,.@-/:*? \t\n\x00é用😀\u202e\uff0a"
    for _ in range(2000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        for who in (identity({"email": value}), identity({}, subject=value)):
            assert STS_SESSION_NAME.fullmatch(session_name(who)), repr(value)


@pytest.mark.parametrize(
    ("one", "two"),
    [
        ("x" * 70 + "1@example.com", "x" * 70 + "2@example.com"),  # same after truncation
        ("josé@example.com", "josè@example.com"),  # same after replacing characters
        ("a b@example.com", "a/b@example.com"),
    ],
)
def test_session_names_stay_apart_when_shortened_or_replaced(one: str, two: str) -> None:
    first = session_name(identity({"email": one}))
    second = session_name(identity({"email": two}))
    assert first != second
    assert len(first) <= 64
    assert len(second) <= 64


def test_long_session_name_keeps_a_readable_prefix() -> None:
    name = session_name(identity({"email": "averyveryverylongname" * 4 + "@example.com"}))
    assert len(name) == 64
    assert name.startswith("averyveryverylongname")
