"""What STS and IAM accept: the AssumeRoleWithWebIdentity limits and the shapes of ARNs,
session tags and source identities.

Written once, from the AWS API reference and the IAM user guide, and read by the
configuration checks (``broker.settings``), the policy renderer and the STS client
alike, so a value refused at load time is the value STS would refuse.
"""

from __future__ import annotations

import re
import unicodedata

# STS limits (AssumeRoleWithWebIdentity API reference).
STS_MIN_DURATION = 900
STS_MAX_DURATION = 43200
STS_MAX_POLICY_ARNS = 10
STS_MAX_INLINE_POLICY_CHARS = 2048
# Session tags and source identity (AssumeRoleWithWebIdentity, "Passing session tags
# using AssumeRoleWithWebIdentity" and SourceIdentity in the IAM user guide).
STS_MAX_TAGS = 50
STS_MAX_TAG_KEY_CHARS = 128
STS_MAX_TAG_VALUE_CHARS = 256
# The broker's own tokens for STS live at most this long: STS reads them once, at the
# call, so a longer life would only widen what a leaked one is worth.
ISSUER_MAX_TOKEN_SECONDS = 300

ROLE_ARN_RE = re.compile(r"^arn:aws(?:-cn|-us-gov)?:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
POLICY_ARN_RE = re.compile(r"^arn:aws(?:-cn|-us-gov)?:iam::(?:\d{12}|aws):policy/[\w+=,.@/-]+$")
# SourceIdentity as STS accepts it (ASCII: `\w` would admit letters STS refuses).
SOURCE_IDENTITY_RE = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)
_TAG_PUNCTUATION = frozenset("_.:/=+-@")


def tag_text_ok(text: str) -> bool:
    """Whether every character of a tag key or value is one STS accepts:
    ``[\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]`` (letters, separators, numbers and a little
    punctuation). No quote, brace, dollar, star or control character can get through."""
    return all(c in _TAG_PUNCTUATION or unicodedata.category(c)[0] in "LZN" for c in text)


def tag_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a session tag key, or None."""
    if not 1 <= len(key) <= STS_MAX_TAG_KEY_CHARS:
        return f"tag keys are 1 to {STS_MAX_TAG_KEY_CHARS} characters"
    if not tag_text_ok(key):
        return "tag keys may hold only letters, digits, spaces and _ . : / = + - @"
    if key.lower().startswith("aws:"):
        return "tag keys must not start with aws: (reserved by AWS)"
    return None
