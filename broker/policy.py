"""Session policies, tags, source identity and session names, filled in for one identity
(pure functions; the template syntax and its load-time check are
``broker.policy_template``).

A template is a JSON policy object whose *string values* may hold placeholders::

    ${identity_id}  the broker's identity id (region:uuid)
    ${sub}          the provider's subject
    ${provider}     the configured provider name
    ${email}        the ``email`` claim
    ${aud}          the ``aud`` claim (the first one when it is a list)
    ${claim:NAME}   any string claim; NAME may be a dotted path into nested claims

Substitution happens on the parsed structure, never on policy text, and the result is
serialised once: a value stays inside the string it was put in, so no claim can add a
statement, an action or a quote. Values are also held to a small character set (see
``_SAFE_VALUE_RE``) so none can smuggle in a wildcard or an IAM policy variable that
would widen the ARN or condition it lands in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from broker import errors
from broker.identity import Identity
from broker.limits import (
    SOURCE_IDENTITY_RE,
    STS_MAX_INLINE_POLICY_CHARS,
    STS_MAX_TAG_VALUE_CHARS,
    STS_MAX_TAGS,
    tag_text_ok,
)
from broker.policy_template import (
    CLAIM_PREFIX,
    MAX_VALUE_CHARS,
    serialise,
    substitute,
)
from broker.settings import RuleSettings

# No "*" or "?" (wildcards), no "$", "{" or "}" (IAM policy variables), no "/" (a value
# could otherwise reach into another ARN path segment), no ":" (another ARN field), no
# quotes, spaces, control or non-ASCII characters. Plain names, emails and ids fit.
_SAFE_VALUE_RE = re.compile(rf"[A-Za-z0-9_+=,.@-]{{1,{MAX_VALUE_CHARS}}}")
# Identity ids are ours (region:uuid), so their ":" is known and harmless.
_SAFE_IDENTITY_ID_RE = re.compile(rf"[A-Za-z0-9_+=,.@:-]{{1,{MAX_VALUE_CHARS}}}")

_SESSION_NAME_BAD_CHARS_RE = re.compile(r"[^\w+=,.@-]", re.ASCII)
SESSION_NAME_MAX = 64
_SESSION_HASH_CHARS = 10


# --------------------------------------------------------------------------- claims


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


def find_claim(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at ``path`` ("email", "address.country"), or None when it is absent.

    A key that exists as written wins over a dotted walk, because namespaced claims
    (Auth0's ``https://example.com/roles``) contain dots themselves. JSON null counts as
    absent: a null claim proves nothing, so it must not satisfy any rule.
    """
    if path in claims:
        return claims[path]
    for i, char in enumerate(path):
        if char != ".":
            continue
        child = claims.get(path[:i])
        if isinstance(child, Mapping):
            found = find_claim(child, path[i + 1 :])
            if found is not None:
                return found
    return None


def _identity_value(name: str, identity: Identity) -> str:
    """The raw value for placeholder ``name``; AccessDenied when the identity lacks it."""
    if name == "identity_id":
        return identity.identity_id
    if name == "sub":
        return identity.subject
    if name == "provider":
        return identity.provider
    if name.startswith(CLAIM_PREFIX):
        claim = name[len(CLAIM_PREFIX) :]
    elif name in {"email", "aud"}:
        claim = name
    else:
        # check_policy_template refuses these at load time: reaching here is a bug.
        raise errors.ServerError(f"the session policy uses unknown placeholder {name!r}")
    value = find_claim(identity.claims, claim)
    if claim == "aud" and isinstance(value, list) and value:
        value = value[0]
    if value is None:
        raise errors.AccessDenied(
            f"the session policy requires claim {claim!r}, which this identity does not have"
        )
    if not isinstance(value, str):
        raise errors.AccessDenied(
            f"the session policy requires claim {claim!r} to be a string for this identity"
        )
    return value


def _checked_value(name: str, identity: Identity) -> str:
    value = _identity_value(name, identity)
    if name == "identity_id":
        if not _SAFE_IDENTITY_ID_RE.fullmatch(value):
            # The broker derives identity ids from identity.region, which settings
            # checks: reaching here is a bug.
            raise errors.ServerError("identity ids are unsuitable for session policies")
        return value
    if not _SAFE_VALUE_RE.fullmatch(value):
        # 403 rather than 400: the caller cannot fix the request, their identity simply
        # cannot be scoped safely. The value itself is not echoed.
        raise errors.AccessDenied(
            f"the identity value for ${{{name}}} is unsuitable for the session policy "
            f"(allowed: 1 to {MAX_VALUE_CHARS} of A-Z a-z 0-9 _ + = , . @ -)"
        )
    return value


def render(template: Mapping[str, Any], identity: Identity) -> str:
    """The template filled in for ``identity`` as minified JSON, within STS's limit."""
    policy = substitute(template, lambda m: _checked_value(m.group(1), identity))
    try:
        text = serialise(policy)
    except (TypeError, ValueError):
        # check_policy_template refuses non-JSON values at load time: reaching here is a bug.
        raise errors.ServerError("the session policy template is not JSON") from None
    if len(text) > STS_MAX_INLINE_POLICY_CHARS:
        # check_policy_template sized the template with the longest values any
        # identity may bring, so no identity gets here: reaching here is a bug.
        raise errors.ServerError(
            f"the session policy for this identity is {len(text)} characters; "
            f"STS accepts at most {STS_MAX_INLINE_POLICY_CHARS}"
        )
    return text


# --------------------------------------------------------------------------- tags


def _tag_claim_text(rule: RuleSettings, claim: str, what: str, identity: Identity) -> str:
    value = find_claim(identity.claims, claim)
    if value is None:
        raise errors.AccessDenied(
            f"rule {rule.name!r} takes {what} from claim {claim!r}, which this identity "
            "does not have"
        )
    # Only one value per tag (STS): a list or an object claim is refused, not flattened.
    text = claim_text(value)
    if text is None:
        raise errors.AccessDenied(
            f"rule {rule.name!r} takes {what} from claim {claim!r}, which is not a "
            "single string, number or boolean for this identity"
        )
    return text


def render_tags(rule: RuleSettings, identity: Identity) -> tuple[tuple[str, str], ...]:
    """The rule's session tags filled from ``identity``'s verified claims, each within
    STS's limits; AccessDenied (403) naming the tag when a claim would break one.

    Values are kept as separate strings and put in the token as JSON values (see
    broker.issuer): a claim cannot add a tag, a key or a transitive key, and the
    character check refuses quotes, braces, ``$`` and ``*`` before any STS call.
    """
    out: list[tuple[str, str]] = []
    for key, source in rule.principal_tags:
        if source.value is not None:
            out.append((key, source.value))  # checked at load time
            continue
        assert source.claim is not None  # settings builds one or the other
        text = _tag_claim_text(rule, source.claim, f"session tag {key!r}", identity)
        if len(text) > STS_MAX_TAG_VALUE_CHARS or not tag_text_ok(text):
            # The value itself is not echoed: it came from the caller's token.
            raise errors.AccessDenied(
                f"the value of claim {source.claim!r} cannot be session tag {key!r}: STS "
                f"accepts at most {STS_MAX_TAG_VALUE_CHARS} letters, digits, spaces and "
                "_ . : / = + - @"
            )
        out.append((key, text))
    if len(out) > STS_MAX_TAGS:  # settings refuses such rules: reaching here is a bug
        raise errors.ServerError(f"rule {rule.name!r} has more than {STS_MAX_TAGS} tags")
    return tuple(out)


def render_source_identity(rule: RuleSettings, identity: Identity) -> str | None:
    """The source identity from the rule's chosen claim, as STS accepts it, or None."""
    claim = rule.source_identity_claim
    if claim is None:
        return None
    text = _tag_claim_text(rule, claim, "the source identity", identity)
    if not SOURCE_IDENTITY_RE.fullmatch(text) or text.lower().startswith("aws:"):
        raise errors.AccessDenied(
            f"the value of claim {claim!r} cannot be the source identity: STS accepts 2 to "
            "64 of A-Z a-z 0-9 _ + = , . @ - and nothing starting with aws:"
        )
    return text


# --------------------------------------------------------------------------- session names


def _email_for_session_name(identity: Identity) -> str | None:
    email = identity.claims.get("email")
    if not isinstance(email, str) or not email:
        return None
    verified = identity.claims.get("email_verified", True)
    # The session name is what CloudTrail shows as "who": an address the provider says
    # it has not verified could name someone else, so it is not used. Providers that
    # send no email_verified (LWA, Facebook) only hand out addresses they verified.
    if verified is not True and verified != "true":
        return None
    return email


def session_name(identity: Identity) -> str:
    """A RoleSessionName naming the caller in CloudTrail, always valid for STS."""
    original = _email_for_session_name(identity) or f"{identity.provider}-{identity.subject}"
    name = _SESSION_NAME_BAD_CHARS_RE.sub("-", original)
    if name != original or len(name) > SESSION_NAME_MAX or len(name) < 2:
        # Replacing characters or cutting can make two callers look alike; a digest of
        # the full value keeps their session names apart.
        digest = hashlib.sha256(original.encode()).hexdigest()[:_SESSION_HASH_CHARS]
        name = f"{name[: SESSION_NAME_MAX - _SESSION_HASH_CHARS - 1]}-{digest}"
    return name
