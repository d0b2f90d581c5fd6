"""Session policy templates as the configuration sees them: the placeholder syntax,
the load-time check, and the two steps both the check and the renderer take
(``substitute`` on the parsed structure, ``serialise`` once).

No identity here: ``broker.policy`` fills templates in for one identity. Keeping the
syntax apart lets the configuration refuse a bad template at load time without
reaching up into the renderer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from broker.limits import STS_MAX_INLINE_POLICY_CHARS

PLACEHOLDER_RE = re.compile(r"\$\{([^{}]*)\}")
SIMPLE_PLACEHOLDERS = ("identity_id", "sub", "provider", "email", "aud")
CLAIM_PREFIX = "claim:"

# The longest value any placeholder may receive. check_policy_template sizes templates with
# values this long, so a template that passes at load time cannot outgrow STS's limit
# at request time; longer values are refused rather than trusted to fit.
MAX_VALUE_CHARS = 64
# What check_policy_template substitutes to find a template's worst-case size. Identity ids
# are "region:uuid"; us-east-1 stands for the usual region length.
SAMPLE_IDENTITY_ID = "us-east-1:" + "0" * 36
SAMPLE_VALUE = "x" * MAX_VALUE_CHARS


def _placeholder_problem(name: str) -> str | None:
    if name in SIMPLE_PLACEHOLDERS:
        return None
    if name.startswith(CLAIM_PREFIX) and name[len(CLAIM_PREFIX) :].strip():
        return None
    supported = ", ".join(f"${{{n}}}" for n in (*SIMPLE_PLACEHOLDERS, "claim:NAME"))
    # IAM's own policy variables use the same ${...} syntax; refusing them keeps every
    # ${...} in a template under our control, so none can be resolved by AWS against
    # values we never checked.
    return f"unknown placeholder ${{{name}}} (supported: {supported})"


def _string_problems(text: str) -> list[str]:
    problems = [p for n in PLACEHOLDER_RE.findall(text) if (p := _placeholder_problem(n))]
    if "${" in PLACEHOLDER_RE.sub("", text):
        problems.append(f"unterminated or nested placeholder in {text!r}")
    return problems


def _walk_problems(node: Any, where: str, problems: list[str]) -> None:
    def add(texts: list[str]) -> None:
        problems.extend(f"{where or '<root>'}: {t}" for t in texts)

    if isinstance(node, Mapping):
        for key, value in node.items():
            child = f"{where}.{key}" if where else str(key)
            if not isinstance(key, str):
                add([f"object key {key!r} is not a string"])
            elif "${" in key:
                # Keys name policy elements and condition operators: letting identity
                # values choose them would let a claim decide what the policy says.
                problems.append(f"{child}: placeholders are not allowed in object keys")
            _walk_problems(value, child, problems)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _walk_problems(value, f"{where}[{i}]", problems)
    elif isinstance(node, str):
        add(_string_problems(node))
    elif isinstance(node, float) and not math.isfinite(node):
        add(["NaN and infinity are not JSON"])
    elif node is not None and not isinstance(node, bool | int | float):
        add([f"a {type(node).__name__} is not a JSON value"])


def _sample_value(name: str) -> str:
    return SAMPLE_IDENTITY_ID if name == "identity_id" else SAMPLE_VALUE


def check_policy_template(template: Mapping[str, Any] | None) -> list[str]:
    """Problems with a session policy template (a rule's or the guests'), at load time."""
    if template is None:
        return []
    problems: list[str] = []
    _walk_problems(template, "", problems)
    if problems:
        return problems
    size = len(serialise(substitute(template, lambda m: _sample_value(m.group(1)))))
    if size > STS_MAX_INLINE_POLICY_CHARS:
        problems.append(
            f"with the longest allowed identity values the policy is {size} characters; "
            f"STS accepts at most {STS_MAX_INLINE_POLICY_CHARS}"
        )
    return problems


def substitute(node: Any, replace: Callable[[re.Match[str]], str]) -> Any:
    if isinstance(node, Mapping):
        # Keys are copied as they are: check_policy_template refuses placeholders in them.
        return {key: substitute(value, replace) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return [substitute(value, replace) for value in node]
    if isinstance(node, str):
        # re.sub does one pass over the template text, so a substituted value is never
        # scanned again for placeholders.
        return PLACEHOLDER_RE.sub(replace, node)
    return node


def serialise(policy: Any) -> str:
    return json.dumps(policy, separators=(",", ":"), allow_nan=False)
