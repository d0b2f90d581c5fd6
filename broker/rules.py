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

One evaluation, two readers: ``evaluate_rule`` reports every check a rule makes (and
the claim value it saw); ``decide`` stops at the first rule whose checks all pass, and
``explain`` calls ``decide`` and shows every rule's checks, so what explain says is what
decide did (tests/unit/test_explain.py holds the two together). Refusals are worded for
the person (``denial_reasons``) only when asked (``explain_denials``), and never echo a
claim value.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cache
from typing import Any, Literal, NamedTuple

from broker import errors, policy
from broker.identity import Identity
from broker.limits import (
    ROLE_ARN_RE,
    STS_MAX_DURATION,
    STS_MAX_INLINE_POLICY_CHARS,
    STS_MIN_DURATION,
)
from broker.policy import claim_text
from broker.settings import Condition, RuleSettings, StsToken


@dataclass(frozen=True, kw_only=True)
class Grant:
    """What one request may receive: the role, its lifetime and its scope."""

    rule: str
    role_arn: str
    duration_seconds: int
    session_policy: str | None  # rendered, minified JSON
    policy_arns: tuple[str, ...]
    sts_token: StsToken = "provider"  # noqa: S105 - which token STS receives (broker.issuer)
    tags: tuple[tuple[str, str], ...] = ()  # session tags, checked against STS limits
    transitive_tag_keys: tuple[str, ...] = ()
    source_identity: str | None = None

    @property
    def broker_token(self) -> bool:
        """Whether STS receives the broker's own token (the rule's sts_token)."""
        return self.sts_token == "broker"  # noqa: S105 - a kind of token, not a secret


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
    # settings refuses other operators: reaching here is a bug.
    raise errors.ServerError(f"unknown rule operator {condition.op!r}")


def condition_holds(condition: Condition, claims: Mapping[str, Any]) -> bool:
    return _value_holds(condition, policy.find_claim(claims, condition.claim))


def _value_holds(condition: Condition, value: Any) -> bool:
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


# --------------------------------------------------------------------------- evaluation
#
# One evaluation of one rule, reported check by check. decide() and explain() both read
# it, so what explain says about a rule is what decide did with it.

CheckKind = Literal["provider", "unbound", "condition", "email_verified", "mfa"]


class Check(NamedTuple):
    """One thing a rule asks of an identity, and whether this identity has it.
    (A tuple: decide builds several per request, and tuples are cheap to build.)"""

    kind: CheckKind
    passed: bool
    # What the rule asks, in an operator's words ('groups contains "admins"').
    wants: str
    claim: str | None = None
    # The claim value(s) seen, as JSON data; None when absent.
    seen: Any = None


class RuleOutcome(NamedTuple):
    rule: RuleSettings
    checks: tuple[Check, ...]

    @property
    def matched(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)


# The descriptions depend only on the (frozen, immutable) rule data: worked out once.


@cache
def _describe(condition: Condition) -> str:
    value = condition.value
    shown = json.dumps(list(value) if isinstance(value, tuple) else value)
    return f"{condition.claim} {condition.op} {shown}"


@cache
def _wants_provider(providers: tuple[str, ...]) -> str:
    return f"provider in {json.dumps(list(providers))}"


@cache
def _wants_mfa(amr_values: tuple[str, ...], acr_values: tuple[str, ...]) -> str:
    wants = f"amr has one of {json.dumps(list(amr_values))}"
    return f"{wants} or acr in {json.dumps(list(acr_values))}" if acr_values else wants


def evaluate_rule(rule: RuleSettings, identity: Identity) -> RuleOutcome:
    """Every check ``rule`` makes of ``identity``. A provider the rule is not scoped to
    ends the evaluation: its claims mean nothing to this rule."""
    claims = identity.claims
    scoped = identity.provider in rule.providers
    checks = [Check("provider", scoped, _wants_provider(rule.providers), None, identity.provider)]
    if not scoped:
        return RuleOutcome(rule=rule, checks=tuple(checks))
    if not rule.conditions:
        # Settings refuses unbound rules; refusing them here too keeps a hand-built rule
        # with no conditions from matching everyone the provider vouches for.
        checks.append(Check("unbound", False, "at least one condition"))
    for condition in rule.conditions:
        value = policy.find_claim(claims, condition.claim)
        passed = _value_holds(condition, value)
        checks.append(Check("condition", passed, _describe(condition), condition.claim, value))
    if rule.require_email_verified:
        verified = _email_verified(claims)
        seen = claims.get("email_verified")
        checks.append(
            Check("email_verified", verified, "email_verified true", "email_verified", seen)
        )
    if rule.require_mfa:
        wants = _wants_mfa(rule.mfa_amr_values, rule.mfa_acr_values)
        seen = {"amr": claims.get("amr"), "acr": claims.get("acr")}
        checks.append(Check("mfa", _mfa_satisfied(rule, claims), wants, "amr", seen))
    return RuleOutcome(rule=rule, checks=tuple(checks))


def evaluate(rules: Sequence[RuleSettings], identity: Identity) -> Iterator[RuleOutcome]:
    """Each rule's outcome, in order (the caller stops at the first match)."""
    for rule in rules:
        yield evaluate_rule(rule, identity)


# --------------------------------------------------------------------------- denials


def denial_reasons(outcomes: Sequence[RuleOutcome], provider_label: str) -> list[str]:
    """Why no rule matched, in words a person can act on.

    A rule that failed only on a requirement (verified e-mail, MFA) is the nearest miss:
    its requirement is what the person can fix, so it is named first and alone. Claim
    values are never echoed (they may be an e-mail address, and messages reach logs).
    """
    scoped = [o for o in outcomes if o.checks[0].passed]
    if not scoped:
        return [f"no role is set up for people who sign in with {provider_label}"]
    for outcome in scoped:
        kinds = {c.kind for c in outcome.failed}
        if kinds and kinds <= {"email_verified", "mfa"}:
            reasons = []
            if "email_verified" in kinds:
                reasons.append(f"your e-mail address is not verified at {provider_label}")
            if "mfa" in kinds:
                reasons.append(
                    "this needs multi-factor sign-in: sign in again at "
                    f"{provider_label} with a second factor"
                )
            return reasons
    reasons = []
    for outcome in scoped:
        wants = [c.wants for c in outcome.failed if c.kind == "condition"]
        if wants:
            reasons.append(f"rule {outcome.rule.name!r} needs {' and '.join(wants)}")
    return reasons or [f"no rule accepts this account at {provider_label}"]


def matching_rule(
    rules: Sequence[RuleSettings],
    identity: Identity,
    *,
    explain_denials: bool = False,
    provider_label: str | None = None,
) -> RuleSettings:
    seen: list[RuleOutcome] = []
    for outcome in evaluate(rules, identity):
        if outcome.matched:
            return outcome.rule
        seen.append(outcome)
    if explain_denials:
        reasons = denial_reasons(seen, provider_label or identity.provider)
        raise errors.NoMatchingRule("; ".join(reasons), details={"reasons": reasons})
    # Without explain_denials neither claim values nor rule names go into the message:
    # the caller learns only that they are denied, not what would have let them in.
    raise errors.NoMatchingRule(
        f"no role rule matches this identity from provider {identity.provider!r}"
    )


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
    explain_denials: bool = False,
    provider_label: str | None = None,
) -> Grant:
    rule = matching_rule(
        rules, identity, explain_denials=explain_denials, provider_label=provider_label
    )
    if role_arn is None:
        role = rule.roles[0]
    elif not isinstance(role_arn, str):
        raise errors.BadRequest("role_arn must be a string")
    elif not ROLE_ARN_RE.fullmatch(role_arn):
        raise errors.BadRequest(
            "role_arn is not a role ARN (arn:aws:iam::ACCOUNT:role/NAME); this identity "
            f"may choose: {', '.join(rule.roles)}",
            details={"allowed_roles": list(rule.roles)},
        )
    elif role_arn in rule.roles:
        role = role_arn
    else:
        # The roles this identity may choose are no secret (POST /v1/roles lists them),
        # and naming them is what lets the caller fix the request.
        raise errors.RoleNotAllowed(
            f"this identity may not assume the requested role; it may choose: "
            f"{', '.join(rule.roles)}",
            details={"allowed_roles": list(rule.roles)},
        )
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
        sts_token=rule.sts_token,
        tags=policy.render_tags(rule, identity),
        transitive_tag_keys=rule.transitive_tag_keys,
        source_identity=policy.render_source_identity(rule, identity),
    )


# --------------------------------------------------------------------------- explain


@dataclass(frozen=True, kw_only=True)
class Explanation:
    """The whole decision for one identity, without minting anything.

    ``grant`` and ``error`` are exactly what decide() returned or raised for the same
    arguments (explain calls it), and ``outcomes`` come from the same evaluate_rule()
    decide stops on: explain cannot tell a different story from the real decision.
    """

    identity: Identity
    outcomes: tuple[RuleOutcome, ...]  # every rule, in order
    grant: Grant | None
    error: errors.BrokerError | None

    @property
    def rule(self) -> RuleSettings | None:
        return next((o.rule for o in self.outcomes if o.matched), None)

    def to_json(self) -> dict[str, Any]:
        rule = self.rule
        decisive = next((i for i, o in enumerate(self.outcomes) if o.matched), None)
        grant = self.grant
        return {
            "allowed": grant is not None,
            "provider": self.identity.provider,
            "subject": self.identity.subject,
            "identity_id": self.identity.identity_id,
            "rule": rule.name if rule else None,
            "rules": [
                {
                    "name": o.rule.name,
                    "matched": o.matched,
                    # First match wins: rules after the deciding one are shown, not used.
                    "reached": decisive is None or i <= decisive,
                    "checks": [
                        {
                            "check": c.kind,
                            "passed": c.passed,
                            "wants": c.wants,
                            "claim": c.claim,
                            "seen": c.seen,
                        }
                        for c in o.checks
                    ],
                }
                for i, o in enumerate(self.outcomes)
            ],
            "roles": list(rule.roles) if rule else [],
            "role_arn": grant.role_arn if grant else None,
            "duration_seconds": None
            if rule is None
            else {
                "min": STS_MIN_DURATION,
                "default": rule.default_duration_seconds,
                "max": min(STS_MAX_DURATION, rule.max_duration_seconds),
                "granted": grant.duration_seconds if grant else None,
            },
            "session_policy": json.loads(grant.session_policy)
            if grant and grant.session_policy
            else None,
            "session_policy_chars": len(grant.session_policy)
            if grant and grant.session_policy
            else 0,
            "session_policy_limit": STS_MAX_INLINE_POLICY_CHARS,
            "policy_arns": list(grant.policy_arns) if grant else [],
            "session_name": policy.session_name(self.identity),
            "sts_token": rule.sts_token if rule else None,
            "session_tags": dict(grant.tags) if grant else {},
            "transitive_tag_keys": list(grant.transitive_tag_keys) if grant else [],
            "source_identity": grant.source_identity if grant else None,
            "error": None if self.error is None else self.error.to_dict(),
        }


def explain(
    rules: Sequence[RuleSettings],
    identity: Identity,
    *,
    role_arn: str | None = None,
    duration_seconds: int | None = None,
    explain_denials: bool = True,
    provider_label: str | None = None,
) -> Explanation:
    """What decide() does for ``identity``, rule by rule, and why."""
    grant: Grant | None = None
    error: errors.BrokerError | None = None
    try:
        grant = decide(
            rules,
            identity,
            role_arn=role_arn,
            duration_seconds=duration_seconds,
            explain_denials=explain_denials,
            provider_label=provider_label,
        )
    except errors.BrokerError as exc:
        error = exc
    return Explanation(
        identity=identity,
        outcomes=tuple(evaluate(rules, identity)),
        grant=grant,
        error=error,
    )
