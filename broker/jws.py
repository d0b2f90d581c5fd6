"""One strict reading of a compact JWS (RFC 7515) ID token, before anything else reads it.

Every JWT the broker verifies (OpenID Connect and Google ID tokens, Facebook Limited
Login tokens, ID tokens from a browser sign-in or a session refresh) goes through
``OIDCProvider``, which calls :func:`parse` first, before the header picks a key and
before pyjwt or any rule sees a claim. STS, the IdP and any log pipeline may parse the
same token with other JSON and base64 libraries; a token they could read differently
from us is refused here, so what the rules decide on is what STS is sent.

What :func:`parse` promises (each is a row in ``tests/unit/test_jws.py``); every refusal
is ``InvalidToken`` (401 ``invalid_token``) with a message that never quotes the token:

* **Shape**: at most ``MAX_TOKEN_LENGTH`` characters, exactly three ``.``-separated
  segments (a JWE's five, a JWS JSON serialization, or anything else is refused).
* **One spelling**: each segment is canonical unpadded base64url (RFC 7515 section 2):
  only ``A-Z a-z 0-9 - _``, no ``=`` padding, no whitespace, no length that cannot
  occur, and zero unused trailing bits. ``decode(s)`` re-encodes to exactly ``s``, so
  two different strings are never the same token, and a cache keyed by the token
  string (``OIDCProvider``'s verified-token memory, the replay memory) cannot be
  dodged by re-spelling one.
* **One JSON reading** of the header and the payload (RFC 7515 section 5.2 and RFC 8725
  section 3.2 allow a verifier to refuse what it cannot read unambiguously): strict
  UTF-8 (no byte order mark, no UTF-16/32, which Python's ``json`` would otherwise
  guess), an object at the top, **no member name twice at any depth** (Python keeps the
  last ``"sub"``, other parsers the first), no ``NaN``/``Infinity`` and no number that
  overflows to infinity (not JSON), no unpaired surrogate escapes (``"\\ud800"`` is no
  Unicode string other parsers agree on), nesting at most ``MAX_JSON_DEPTH`` deep.
* **An ID token, nothing else** (RFC 8725 section 3.11, explicit typing): ``typ``, when
  present, is ``JWT`` or ``application/jwt`` in any case. RFC 7515 section 4.1.9 says a
  ``typ`` without ``/`` means ``application/`` + the value and media types compare
  case-insensitively, so those spellings name one type, the one RFC 7519 section 5.1
  registers for JWTs; anything else (``at+jwt`` access tokens of RFC 9068,
  ``logout+jwt``, ``JWT `` with a space...) is another kind of token and refused with a
  message saying an ID token is expected. ``cty`` (a nested JWT), ``crit`` (extensions
  we do not implement, RFC 7515 section 4.1.11 says refuse) and ``b64`` (RFC 7797
  unencoded payloads) are refused too: no ID token carries them.
* ``kid``, when present, is a string (the key lookup relies on it).

The algorithm allow-list, the key, the signature and the claims are the verifier's
(``providers/oidc.py``); this module only decides whether there is one unambiguous
token to verify.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from broker import errors

# Real ID tokens are 1-2 KiB. Anything far larger is junk or an attempt to make us
# spend CPU and memory before a single check has run.
MAX_TOKEN_LENGTH = 16 * 1024

# ID token claims are flat but for a few small objects (OIDC "address"); a deep
# structure is junk, and Python's json would hit its recursion limit on a deep one.
MAX_JSON_DEPTH = 16

# RFC 7515 section 2 "Base64url Encoding": the URL-safe alphabet with the padding
# removed. \Z, not $, which would let one trailing newline through.
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*\Z")

# A member name quoted back in a message only when it is short and plain, so a refusal
# can say "sub" without ever echoing attacker-chosen bytes of any length.
_QUOTABLE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,40}\Z")

# RFC 7515 4.1.9 + RFC 7519 5.1: the media type of a JWT, with and without the prefix.
_JWT_TYPES = frozenset({"jwt", "application/jwt"})

_NOT_WELL_FORMED = "token is not a well-formed JWT"


@dataclass(frozen=True)
class CompactJWS:
    """A token that passed :func:`parse`: its one reading (not yet verified)."""

    header: Mapping[str, Any]
    payload: Mapping[str, Any]
    # What the signature covers (the first two segments as sent) and the signature's
    # bytes: the verifier checks exactly these, with no second reading of the token.
    signing_input: bytes
    signature: bytes


class _Refused(Exception):
    """Internal: why the JSON of one segment is refused (becomes InvalidToken)."""


def parse(token: str) -> CompactJWS:
    """The header and payload of ``token``, read strictly, or ``InvalidToken``."""
    if not token:
        raise errors.InvalidToken("token is empty")
    if len(token) > MAX_TOKEN_LENGTH:
        raise errors.InvalidToken("token is too large")
    segments = token.split(".")
    if len(segments) != 3:
        raise errors.InvalidToken(f"{_NOT_WELL_FORMED}: expected three dot-separated segments")
    encoded_header, encoded_payload, encoded_signature = segments
    header = _json_object(_segment(encoded_header, "header"), "header")
    _check_header(header)
    payload = _json_object(_segment(encoded_payload, "payload"), "payload")
    # The signature is opaque bytes to us, but its spelling is part of the token's.
    signature = _segment(encoded_signature, "signature")
    return CompactJWS(
        header=header,
        payload=payload,
        signing_input=f"{encoded_header}.{encoded_payload}".encode("ascii"),
        signature=signature,
    )


def decode_segment(segment: str) -> bytes:
    """Canonical unpadded base64url to bytes, or ``ValueError``: the inverse of
    :func:`encode_segment` and nothing more (see the module docstring)."""
    if not _BASE64URL.match(segment):
        raise ValueError("characters outside the base64url alphabet (or padding)")
    if len(segment) % 4 == 1:
        raise ValueError("a length no base64url encoding has")
    try:
        decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except binascii.Error:  # pragma: no cover - excluded by the two checks above
        raise ValueError("not base64url") from None
    if encode_segment(decoded) != segment:
        # The only remaining freedom: non-zero bits in the last character's unused
        # low bits ("AB" and "AA" would both decode to b"\x00").
        raise ValueError("non-zero trailing bits")
    return decoded


def encode_segment(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(segment: str, part: str) -> bytes:
    try:
        return decode_segment(segment)
    except ValueError as exc:
        raise errors.InvalidToken(
            f"{_NOT_WELL_FORMED}: the {part} is not canonical base64url ({exc})"
        ) from None


def _json_object(raw: bytes, part: str) -> dict[str, Any]:
    try:
        # Strict UTF-8 first: json.loads(bytes) would guess UTF-16 or UTF-32 too.
        text = raw.decode("utf-8")
        value = _DECODER.decode(text)
        if not isinstance(value, dict):
            raise _Refused("is not a JSON object")
        # The walk below can find something only if the text has a \u escape (the
        # only way to write a lone surrogate in UTF-8 that decoded strictly) or more
        # brackets than the depth allowed; a typical ID token has neither.
        if "\\u" in text or text.count("{") + text.count("[") >= MAX_JSON_DEPTH:
            _check_strings_and_depth(value)
    except UnicodeDecodeError:
        raise errors.InvalidToken(f"{_NOT_WELL_FORMED}: the {part} is not UTF-8") from None
    except _Refused as exc:
        raise errors.InvalidToken(f"{_NOT_WELL_FORMED}: the {part} {exc}") from None
    except RecursionError:
        raise errors.InvalidToken(f"{_NOT_WELL_FORMED}: the {part} is nested too deeply") from None
    except ValueError:
        # JSONDecodeError, and int() refusing more digits than sys.int_info allows.
        raise errors.InvalidToken(f"{_NOT_WELL_FORMED}: the {part} is not JSON") from None
    return value


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            quoted = f'"{name}"' if _QUOTABLE_NAME.match(name) else "a member name"
            raise _Refused(f"has {quoted} twice (duplicate member names are refused)")
        result[name] = value
    return result


def _no_constant(name: str) -> Any:
    raise _Refused(f"contains {name}, which is not JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        # "1e999" is valid JSON syntax that Python reads as inf: no claim means that.
        raise _Refused("contains a number too large to represent")
    return value


# Built once: json.loads with these options would build a decoder per call. Shared by
# threads as json's own default decoder is (its C scanner holds the GIL throughout).
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_members,
    parse_constant=_no_constant,
    parse_float=_finite_float,
)


def _check_strings_and_depth(root: dict[str, Any]) -> None:
    """Every string (member names included) is real Unicode; nesting is bounded."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _Refused("is nested too deeply")
        children: Iterable[Any]
        if isinstance(value, dict):
            for name in value:
                _check_text(name)
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            if isinstance(value, str):
                _check_text(value)
            continue
        stack.extend((child, depth + 1) for child in children)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Only an escaped lone surrogate ("\ud800") gets here: the bytes were UTF-8.
        raise _Refused("contains an unpaired surrogate escape") from None


def _check_header(header: Mapping[str, Any]) -> None:
    # Present-but-null counts as present: "typ": null is no spelling of "JWT".
    typ = header.get("typ")
    if "typ" in header and (not isinstance(typ, str) or typ.lower() not in _JWT_TYPES):
        if isinstance(typ, str) and typ.lower() in {"at+jwt", "application/at+jwt"}:
            raise errors.InvalidToken(
                "this is an OAuth access token (typ at+jwt): an ID token is expected"
            )
        raise errors.InvalidToken(
            "token type (typ) is not JWT: an ID token is expected (typ absent or JWT)"
        )
    if "cty" in header:
        raise errors.InvalidToken(
            f"{_NOT_WELL_FORMED}: a content type (cty, a nested token) is not an ID token"
        )
    if "b64" in header:
        raise errors.InvalidToken(f"{_NOT_WELL_FORMED}: unencoded payloads (b64) are refused")
    if "crit" in header:
        raise errors.InvalidToken(
            f"{_NOT_WELL_FORMED}: critical header parameters (crit) are not supported"
        )
    if "kid" in header and not isinstance(header["kid"], str):
        raise errors.InvalidToken(f"{_NOT_WELL_FORMED}: the key id (kid) is not a string")
