"""Role rules: verified claims -> the roles an identity may assume (pure functions).

Rules are tried in order and the first that matches decides; no match is a 403. A rule
matches when the identity's provider is one of the rule's providers, every condition
holds and every requirement (verified email, MFA) is met.

Condition semantics, chosen so that anything unexpected fails closed:

* a missing (or null) claim satisfies no condition, not even ``not_equals``;
* strings compare as they are (case-sensitive); booleans and integers compare by their
  JSON spelling (``true``, ``false``, ``42``); other types (floats, objects) never match;
* a list claim satisfies ``equals``/``starts_with``/``glob``/``in`` when any element
  does, ``contains`` when the value is one of its elements, and ``not_equals`` only when
  every element is a comparable value different from the condition's value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from broker import errors, policy
from broker.identity import Identity
from broker.settings import STS_MAX_DURATION, STS_MIN_DURATION, Condition, RuleSettings


@dataclass(frozen=True, kw_only=True)
class Grant:
    """What one request may receive: the role, its lifetime and its scope."""

    rule: str
    role_arn: str
    duration_seconds: int
    session_policy: str | None  # rendered, minified JSON
    policy_arns: tuple[str, ...]


def claim_text(value: Any) -> str | None:
    """A scalar claim as the text conditions compare against; None when not comparable."""
    if isinstance(value, str):
        return value
    # bool before int: bool is an int subclass, and True must read "true", not "1".
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # Floats have several spellings (1, 1.0, 1e0): refusing them beats guessing.
    return None


def _scalar_holds(condition: Condition, text: str) -> bool:
    expected = condition.value
    if condition.op == "in":
        # A lone string must not turn membership into a substring test.
        options = (expected,) if isinstance(expected, str) else expected
        return text in options
    if not isinstance(expected, str):
        return False
    if condition.op == "equals":
        return text == expected
    if condition.op == "not_equals":
        return text != expected
    if condition.op == "contains":
        return expected in text
    if condition.op == "starts_with":
        return text.startswith(expected)
    if condition.op == "glob":
        # fnmatchcase, not fnmatch: fnmatch folds case on some platforms, and a rule
        # must mean the same thing wherever the broker runs.
        return fnmatchcase(text, expected)
    raise errors.ConfigurationError(f"unknown rule operator {condition.op!r}")


def condition_holds(condition: Condition, claims: Mapping[str, Any]) -> bool:
    value = policy.find_claim(claims, condition.claim)
    if value is None:
        return False
    if isinstance(value, list | tuple):
        texts = [claim_text(v) for v in value]
        if condition.op == "not_equals":
            # An element we cannot compare might be the forbidden value in disguise.
            return all(t is not None and _scalar_holds(condition, t) for t in texts)
        if condition.op == "contains":
            return isinstance(condition.value, str) and condition.value in texts
        return any(t is not None and _scalar_holds(condition, t) for t in texts)
    text = claim_text(value)
    return text is not None and _scalar_holds(condition, text)


def _email_verified(claims: Mapping[str, Any]) -> bool:
    # Some providers send the string "true"; anything else, including absence, is no.
    value = claims.get("email_verified")
    return value is True or value == "true"


def _mfa_satisfied(rule: RuleSettings, claims: Mapping[str, Any]) -> bool:
    amr = claims.get("amr")
    methods = [amr] if isinstance(amr, str) else amr if isinstance(amr, list) else []
    if any(isinstance(m, str) and m in rule.mfa_amr_values for m in methods):
        return True
    acr = claims.get("acr")
    return isinstance(acr, str) and acr in rule.mfa_acr_values


def rule_matches(rule: RuleSettings, identity: Identity) -> bool:
    if identity.provider not in rule.providers:
        return False
    # Settings refuses unbound rules; refusing them here too keeps a hand-built rule
    # with no conditions from matching everyone the provider vouches for.
    if not rule.conditions:
        return False
    claims = identity.claims
    if not all(condition_holds(c, claims) for c in rule.conditions):
        return False
    if rule.require_email_verified and not _email_verified(claims):
        return False
    return not (rule.require_mfa and not _mfa_satisfied(rule, claims))


def matching_rule(rules: Sequence[RuleSettings], identity: Identity) -> RuleSettings:
    for rule in rules:
        if rule_matches(rule, identity):
            return rule
    # Neither claim values nor rule names go into the message: the caller learns only
    # that they are denied, not what would have let them in.
    raise errors.NoMatchingRule(
        f"no role rule matches this identity from provider {identity.provider!r}"
    )


def allowed_roles(rules: Sequence[RuleSettings], identity: Identity) -> tuple[str, ...]:
    return matching_rule(rules, identity).roles


def _duration(rule: RuleSettings, requested: int | None) -> int:
    if requested is None:
        return rule.default_duration_seconds
    high = min(STS_MAX_DURATION, rule.max_duration_seconds)
    # bool is an int subclass; `true` in a JSON body is not a duration.
    valid = isinstance(requested, int) and not isinstance(requested, bool)
    if not valid or not STS_MIN_DURATION <= requested <= high:
        raise errors.BadRequest(
            f"duration_seconds must be an integer from {STS_MIN_DURATION} to {high}"
        )
    return requested


def decide(
    rules: Sequence[RuleSettings],
    identity: Identity,
    *,
    role_arn: str | None = None,
    duration_seconds: int | None = None,
) -> Grant:
    rule = matching_rule(rules, identity)
    if role_arn is None:
        role = rule.roles[0]
    elif not isinstance(role_arn, str):
        raise errors.BadRequest("role_arn must be a string")
    elif role_arn in rule.roles:
        role = role_arn
    else:
        raise errors.RoleNotAllowed()
    duration = _duration(rule, duration_seconds)
    session_policy = (
        policy.render(rule.session_policy, identity) if rule.session_policy is not None else None
    )
    return Grant(
        rule=rule.name,
        role_arn=role,
        duration_seconds=duration,
        session_policy=session_policy,
        policy_arns=rule.policy_arns,
    )
