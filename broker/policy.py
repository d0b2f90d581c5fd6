"""Session policy templates and STS request limits (pure functions).

INTERFACE STUB: to be implemented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.identity import Identity
from broker.settings import RuleSettings


def check_template(rule: RuleSettings) -> list[str]:
    return []


def render(template: Mapping[str, Any], identity: Identity) -> str:
    raise NotImplementedError


def session_name(identity: Identity) -> str:
    raise NotImplementedError
