"""Validation of the ``next`` parameter: where to send a browser after sign-in.

An open redirect on the broker's own origin would let a phishing link that starts with
our trusted host end on an attacker's page (and, with the OAuth callback in the chain,
leak codes or look like a genuine sign-in). So ``next`` is accepted only when it is,
beyond doubt, a path on this origin, and anything else becomes ``/``.

An allow-list, not a block-list: the value must be a short, printable-ASCII,
origin-relative path. Browsers are lenient in ways a naive prefix check misses, so each
rule below closes a known bypass:

* ``//evil.example`` and ``/\\evil.example`` are scheme-relative URLs to another host
  (browsers treat ``\\`` like ``/``), so the second character may not be ``/`` or ``\\``,
  and no backslash may appear anywhere;
* browsers strip tab, CR and LF from URLs (``/\\t/evil.example`` becomes
  ``//evil.example``), so no control characters or whitespace at all;
* ``javascript:``, ``data:``, ``https:`` ... need a scheme, and a path that starts with
  ``/`` has none, which ``urlsplit`` confirms;
* percent-encoding hides all of the above from a single look (``/%2F%2Fevil``,
  ``/%5Cevil``, ``/%09/evil``, doubly encoded ``%252F``): we decode repeatedly and apply
  the same checks to every layer, and refuse malformed escapes outright;
* non-ASCII look-alikes (fullwidth solidus, U+2215 ...) are refused rather than trusted
  to every browser's normaliser.

The function is pure: the same input always gives the same answer, so it is
table-tested (``tests/unit/test_safe_redirect.py``).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

DEFAULT = "/"
MAX_LENGTH = 1024
# How many percent-decoding layers we look through. Every layer is checked; a value
# still containing escapes of escapes after this is refused, not guessed at.
MAX_DECODE_ROUNDS = 4

# RFC 3986 characters that may appear unencoded in a path, query or fragment, plus '%'
# for escapes. Anything else (space, quotes, <, >, \, ^, `, {, |, }, non-ASCII) is out.
_ALLOWED = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@/?#%]*$")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Raw values may not contain spaces (the allow-list above); a decoded layer may ("%20"
# is ordinary), but never a control character a browser would strip or act on.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _layer_is_safe(value: str) -> bool:
    """Checks one (possibly decoded) layer of the value."""
    if not value.startswith("/"):
        return False
    # "//host" and "/\host" are scheme-relative: another origin.
    if value[1:2] in {"/", "\\"}:
        return False
    if "\\" in value or _CONTROL.search(value):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    # A leading "/" already rules both out; this states the invariant we rely on.
    return not parts.scheme and not parts.netloc


def safe_next(value: str | None, *, default: str = DEFAULT, forbid: str = "") -> str:
    """``value`` when it is a same-origin relative path, else ``default``. Characters in
    ``forbid`` are refused too, in every percent-decoding layer."""
    if not value or len(value) > MAX_LENGTH:
        return default
    if not _ALLOWED.match(value) or _BAD_ESCAPE.search(value):
        return default
    layer = value
    for _ in range(MAX_DECODE_ROUNDS):
        if not _layer_is_safe(layer) or any(c in layer for c in forbid):
            return default
        try:
            decoded = unquote(layer, errors="strict") if "%" in layer else layer
        except UnicodeDecodeError:
            return default  # escapes that are not UTF-8 (%FF): no page of ours uses them
        if decoded == layer:
            return value
        if not decoded.isascii():
            # Encoded UTF-8 look-alikes of '/' or '\' (e.g. %EF%BC%8F, fullwidth solidus).
            return default
        layer = decoded
    # Still decoding after MAX_DECODE_ROUNDS layers: nobody legitimate nests that deep.
    return default


def is_safe_next(value: str | None, *, forbid: str = "") -> bool:
    return bool(value) and safe_next(value, default="", forbid=forbid) == value
