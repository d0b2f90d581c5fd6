"""Role rules: verified claims -> the roles an identity may assume (pure functions).

INTERFACE STUB: to be implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from broker.identity import Identity
from broker.settings import RuleSettings


@dataclass(frozen=True, kw_only=True)
class Grant:
    """What one request may receive: the role, its lifetime and its scope."""

    rule: str
    role_arn: str
    duration_seconds: int
    session_policy: str | None  # rendered, minified JSON
    policy_arns: tuple[str, ...]


def matching_rule(rules: Sequence[RuleSettings], identity: Identity) -> RuleSettings:
    raise NotImplementedError


def decide(
    rules: Sequence[RuleSettings],
    identity: Identity,
    *,
    role_arn: str | None = None,
    duration_seconds: int | None = None,
) -> Grant:
    raise NotImplementedError
