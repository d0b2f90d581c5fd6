"""One reading of every token (broker.jws), through the real verifier.

Each hostile row is signed with the real test IdP key (tests/unit/oidc_fixtures.py) and
is otherwise a valid ID token: without the strict parser the signature, issuer,
audience and lifetime checks would all pass, so the only thing that can refuse it is
the parser, and the test checks it is refused for the parser's reason (401
``invalid_token`` and the message) and never echoed. The control rows build valid
tokens the same hand-made way and must be accepted, so a row cannot pass because the
hand-made token was broken anyway. Property-based tests (hypothesis) then feed the
parser arbitrary input and mutations of good tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import errors, jws
from broker.http import Http
from broker.providers.oidc import OIDCProvider
from broker.store import Store
from tests.unit.oidc_fixtures import (
    FakeIdP,
    claims,
    oidc_settings,
    rsa_key,
    sign,
    sign_raw,
)

KEY = rsa_key("k1")
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
HEADER = {"alg": "RS256", "typ": "JWT", "kid": "k1"}


@pytest.fixture(scope="module")
def idp() -> Iterator[FakeIdP]:
    server = FakeIdP()
    server.reset(KEY)
    yield server
    server.close()


@pytest.fixture(scope="module")
def http() -> Iterator[Http]:
    client = Http(retries=0)
    yield client
    client.close()


@pytest.fixture
def provider(idp: FakeIdP, http: Http, store: Store) -> OIDCProvider:
    idp.reset(KEY)
    return OIDCProvider(settings=oidc_settings(idp), http=http, store=store)


# --------------------------------------------------------------------------- builders


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _raw(header: str, payload: str) -> Callable[[], str]:
    """A token over exactly these JSON texts ({claims} is replaced by valid claims)."""

    def build() -> str:
        body = _json(claims())[1:-1]
        return sign_raw(KEY, header.replace("{claims}", body), payload.replace("{claims}", body))

    return build


def _good() -> str:
    return sign(KEY, claims())


def _with_segment(index: int, change: Callable[[str], str]) -> Callable[[], str]:
    def build() -> str:
        parts = _good().split(".")
        parts[index] = change(parts[index])
        return ".".join(parts)

    return build


def _trailing_bits(segment: str) -> str:
    """The same bytes, another spelling: set an unused low bit of the last character.

    An RS256 signature is 256 bytes, 342 characters: the last one carries 2 data bits
    and 4 unused bits, which lenient decoders ignore.
    """
    assert len(segment) % 4 in (2, 3), "no unused bits in this segment"
    index = ALPHABET.index(segment[-1])
    return segment[:-1] + ALPHABET[index | 1]


def _standard_alphabet_payload() -> str:
    """A valid token whose payload is spelt with "+" and "/" instead of "-" and "_".

    A filler claim is grown until the payload's encoding contains a "-" or "_", so the
    row always exercises the translation (no luck involved).
    """
    for filler in range(64):
        token = sign(KEY, claims(filler="?" * filler + ">"))
        header, payload, signature = token.split(".")
        if "-" in payload or "_" in payload:
            standard = payload.translate(str.maketrans("-_", "+/"))
            return f"{header}.{standard}.{signature}"
    raise AssertionError("no filler gave a payload with - or _")


def _signed(**header: Any) -> Callable[[], str]:
    return lambda: sign(KEY, claims(), headers=header)


def _header_json(**header: Any) -> str:
    return _json({**HEADER, **header})


# --------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Hostile:
    token: Callable[[], str]
    message: str


NOT_WELL_FORMED = "token is not a well-formed JWT"
ID_TOKEN_EXPECTED = "an ID token is expected"

HOSTILE = [
    # -- the same member twice: Python keeps the last, other parsers the first
    pytest.param(
        Hostile(
            _raw(_header_json(), '{{claims},"sub":"admin"}'),
            'the payload has "sub" twice (duplicate member names are refused)',
        ),
        id="duplicate-sub",
    ),
    pytest.param(
        Hostile(
            _raw(_header_json(), '{"email":"admin@example.test",{claims}}'),
            'the payload has "email" twice',
        ),
        id="duplicate-email-first-differs",
    ),
    pytest.param(
        Hostile(
            _raw(_header_json(), '{{claims},"address":{"country":"NZ","country":"US"}}'),
            'the payload has "country" twice',
        ),
        id="duplicate-nested-member",
    ),
    pytest.param(
        Hostile(
            _raw('{"alg":"none","alg":"RS256","typ":"JWT","kid":"k1"}', "{{claims}}"),
            'the header has "alg" twice',
        ),
        id="duplicate-header-alg",
    ),
    pytest.param(
        Hostile(
            _raw('{"alg":"RS256","kid":"other","kid":"k1"}', "{{claims}}"),
            'the header has "kid" twice',
        ),
        id="duplicate-header-kid",
    ),
    pytest.param(
        Hostile(
            _raw(_header_json(), '{{claims},"x\\ud800":1}'),
            "unpaired surrogate",
        ),
        id="lone-surrogate-member-name",
    ),
    pytest.param(
        Hostile(
            _raw(
                _header_json(), '{{claims},"a' + "\u00e9" * 50 + '":1,"a' + "\u00e9" * 50 + '":2}'
            ),
            "the payload has a member name twice",
        ),
        id="duplicate-long-name-not-quoted",
    ),
    # -- one spelling per token: canonical unpadded base64url only
    pytest.param(
        Hostile(_with_segment(2, lambda s: s + "=="), "the signature is not canonical base64url"),
        id="padded-signature",
    ),
    pytest.param(
        Hostile(_with_segment(2, lambda s: s + "="), "the signature is not canonical base64url"),
        id="signature-one-pad",
    ),
    pytest.param(
        Hostile(_with_segment(0, lambda s: s + "="), "the header is not canonical base64url"),
        id="padded-header",
    ),
    pytest.param(
        Hostile(_standard_alphabet_payload, "the payload is not canonical base64url"),
        id="plus-slash-alphabet",
    ),
    pytest.param(
        Hostile(_with_segment(2, _trailing_bits), "non-zero trailing bits"),
        id="signature-trailing-bits",
    ),
    pytest.param(
        Hostile(_with_segment(1, _trailing_bits), "non-zero trailing bits"),
        id="payload-trailing-bits",
    ),
    pytest.param(
        Hostile(_with_segment(2, lambda s: s[:40] + "\n" + s[40:]), "not canonical base64url"),
        id="newline-inside-signature",
    ),
    pytest.param(
        Hostile(lambda: _good() + "\n", "the signature is not canonical base64url"),
        id="trailing-newline",
    ),
    pytest.param(
        Hostile(lambda: " " + _good(), "the header is not canonical base64url"),
        id="leading-space",
    ),
    pytest.param(
        Hostile(_with_segment(1, lambda s: s[:8] + "\t" + s[8:]), "not canonical base64url"),
        id="tab-inside-payload",
    ),
    pytest.param(
        Hostile(_with_segment(2, lambda s: s + "AAA"), "a length no base64url encoding has"),
        id="impossible-length",
    ),
    pytest.param(
        Hostile(_with_segment(2, lambda s: s[:-1] + "%"), "not canonical base64url"),
        id="percent-in-signature",
    ),
    # -- typ: an ID token and nothing else
    pytest.param(
        Hostile(_signed(typ="at+jwt"), "OAuth access token (typ at+jwt): an ID token is expected"),
        id="typ-at+jwt",
    ),
    pytest.param(
        Hostile(_signed(typ="application/at+JWT"), "OAuth access token"),
        id="typ-application-at+jwt",
    ),
    pytest.param(Hostile(_signed(typ="JWT "), ID_TOKEN_EXPECTED), id="typ-trailing-space"),
    pytest.param(Hostile(_signed(typ="logout+jwt"), ID_TOKEN_EXPECTED), id="typ-logout"),
    pytest.param(Hostile(_signed(typ="JOSE"), ID_TOKEN_EXPECTED), id="typ-jose"),
    pytest.param(Hostile(_signed(typ="application/json"), ID_TOKEN_EXPECTED), id="typ-json"),
    # (pyjwt drops a falsy typ when signing, so null and "" are hand-made)
    pytest.param(
        Hostile(_raw(_header_json(typ=None), "{{claims}}"), ID_TOKEN_EXPECTED), id="typ-null"
    ),
    pytest.param(
        Hostile(_raw(_header_json(typ=""), "{{claims}}"), ID_TOKEN_EXPECTED), id="typ-empty"
    ),
    pytest.param(Hostile(_signed(typ=["JWT"]), ID_TOKEN_EXPECTED), id="typ-list"),
    # -- header parameters no ID token carries
    pytest.param(Hostile(_signed(cty="JWT"), "cty, a nested token"), id="cty-nested"),
    pytest.param(Hostile(_signed(b64=False), "unencoded payloads (b64)"), id="b64-false"),
    pytest.param(
        Hostile(_raw(_header_json(kid=None), "{{claims}}"), "the key id (kid) is not a string"),
        id="kid-null",
    ),
    # -- JSON only one parser family reads
    pytest.param(
        Hostile(_raw(_header_json(), '{{claims},"n":NaN}'), "contains NaN, which is not JSON"),
        id="nan",
    ),
    pytest.param(
        Hostile(_raw(_header_json(), '{{claims},"n":-Infinity}'), "contains -Infinity"),
        id="minus-infinity",
    ),
    pytest.param(
        Hostile(_raw(_header_json(), '{{claims},"n":1e999}'), "a number too large"),
        id="float-overflow",
    ),
    pytest.param(
        Hostile(_raw(_header_json(), '{{claims},"sub2":"\\udc00"}'), "unpaired surrogate"),
        id="lone-surrogate-value",
    ),
    pytest.param(
        Hostile(
            lambda: sign_raw(KEY, _header_json(), "\ufeff" + _json(claims())),
            "the payload is not JSON",
        ),
        id="byte-order-mark",
    ),
    pytest.param(
        Hostile(
            lambda: sign_raw(KEY, _header_json(), _json(claims()).encode("utf-16")),
            "the payload is not UTF-8",
        ),
        id="utf-16-payload",
    ),
    pytest.param(
        Hostile(
            lambda: sign_raw(KEY, _header_json(), b'{"sub":"\xff"}'), "the payload is not UTF-8"
        ),
        id="invalid-utf-8",
    ),
    pytest.param(
        Hostile(_raw(_header_json(), '{{claims},"n":' + "[" * 20 + "]" * 20 + "}"), "too deeply"),
        id="nested-20-deep",
    ),
    pytest.param(
        Hostile(_raw(_header_json(), '{{claims},"n":' + "[" * 5000 + "]" * 5000 + "}"), "deeply"),
        id="nested-5000-deep",
    ),
    pytest.param(
        Hostile(_raw(_header_json(), '{{claims},"n":1' + "0" * 5000 + "}"), "is not JSON"),
        id="int-beyond-digit-limit",
    ),
    pytest.param(Hostile(_raw(_header_json(), "[1,2]"), "is not a JSON object"), id="array"),
    pytest.param(
        Hostile(_raw(_header_json(), "{{claims}} {}"), "the payload is not JSON"),
        id="trailing-json",
    ),
    # -- shape
    pytest.param(
        Hostile(lambda: _good() + ".e30", "expected three dot-separated segments"),
        id="four-segments",
    ),
    pytest.param(
        Hostile(lambda: _good() + ".e30.e30", "expected three dot-separated segments"),
        id="jwe-shape",
    ),
]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_token_is_refused_by_the_parser(
    case: Hostile, provider: OIDCProvider, caplog: pytest.LogCaptureFixture
) -> None:
    token = case.token()
    with caplog.at_level(logging.DEBUG), pytest.raises(errors.BrokerError) as info:
        provider.verify(token)
    error = info.value
    assert type(error) is errors.InvalidToken
    assert (error.status, error.code) == (401, "invalid_token")
    assert case.message in error.message
    assert token not in error.message
    assert token.strip() not in caplog.text
    for segment in token.strip().split("."):
        if len(segment) > 16:
            assert segment not in error.message


# --------------------------------------------------------------------------- controls


CONTROLS = [
    pytest.param(_raw(_header_json(), "{{claims}}"), id="hand-signed"),
    pytest.param(
        _raw(_header_json(), '{{claims},"address":{"country":"NZ"},"n":[1,2.5,null]}'),
        id="hand-signed-nested",
    ),
    pytest.param(_signed(typ="JWT"), id="typ-JWT"),
    pytest.param(_signed(typ="jwt"), id="typ-lower-case"),
    pytest.param(_signed(typ="application/jwt"), id="typ-application-jwt"),
    pytest.param(_signed(typ="Application/JWT"), id="typ-application-JWT-mixed-case"),
    pytest.param(_raw('{"alg":"RS256","kid":"k1"}', "{{claims}}"), id="no-typ"),
    pytest.param(
        _raw(_header_json(), '{{claims},"name":"Zo\\u00eb \\ud83d\\ude00"}'),
        id="escaped-surrogate-pair",
    ),
]


@pytest.mark.parametrize("build", CONTROLS)
def test_control_tokens_built_the_same_way_are_accepted(
    build: Callable[[], str], provider: OIDCProvider
) -> None:
    token = build()
    verified = provider.verify(token)
    assert verified.subject == "user-123"
    assert verified.token == token


def test_the_claims_rules_see_are_the_parsers_reading(provider: OIDCProvider) -> None:
    token = _raw(_header_json(), '{{claims},"name":"Zo\\u00eb \\ud83d\\ude00"}')()
    verified = provider.verify(token)
    assert verified.claims["name"] == "Zoë 😀"
    assert dict(verified.claims) == dict(jws.parse(token).payload)


def test_a_refused_spelling_never_enters_the_verified_token_memory(
    provider: OIDCProvider, idp: FakeIdP
) -> None:
    token = _good()
    provider.verify(token)
    hits = idp.jwks_hits
    # Re-spellings of a token the provider has just verified and remembered: each is
    # refused by the parser, none is answered from the memory of the canonical one.
    for respelt in (token + "==", _with_segment(2, _trailing_bits)(), token + " "):
        with pytest.raises(errors.InvalidToken, match="not canonical base64url"):
            provider.verify(respelt)
    provider.verify(token)
    assert idp.jwks_hits == hits


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "token is empty"),
        ("e30." * (jws.MAX_TOKEN_LENGTH // 4) + "e30", "token is too large"),
        ("e30.e30", "expected three dot-separated segments"),
        ("e30", "expected three dot-separated segments"),
    ],
)
def test_the_parser_bounds_the_shape_itself(token: str, message: str) -> None:
    # The verifier checks the size first too; the parser must not rely on it.
    with pytest.raises(errors.InvalidToken, match=message):
        jws.parse(token)


# --------------------------------------------------------------------------- base64url


@pytest.mark.parametrize(
    ("segment", "reason"),
    [
        ("QQ==", "padding"),
        ("QQ=", "padding"),
        ("Q+/A", "alphabet"),
        ("QR", "trailing bits"),
        ("QUJ", "trailing bits"),
        ("QUJD\n", "alphabet"),
        ("Q", "length"),
        ("QUJDR", "length"),
        ("QUJD ", "alphabet"),
        ("\u0661\u0662", "alphabet"),  # non-ASCII digits: str.isalnum() would say yes
    ],
)
def test_non_canonical_base64url_is_refused(segment: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        jws.decode_segment(segment)


@pytest.mark.parametrize(
    ("segment", "data"),
    [("", b""), ("QQ", b"A"), ("QUI", b"AB"), ("QUJD", b"ABC"), ("-_8", b"\xfb\xff")],
)
def test_canonical_base64url_decodes(segment: str, data: bytes) -> None:
    assert jws.decode_segment(segment) == data


# --------------------------------------------------------------------------- properties


@given(st.binary(max_size=300))
def test_every_byte_string_has_exactly_one_spelling(data: bytes) -> None:
    segment = jws.encode_segment(data)
    assert jws.decode_segment(segment) == data


@given(st.text(alphabet=ALPHABET + "=+/ \n.%", max_size=60))
def test_whatever_decodes_re_encodes_to_itself(segment: str) -> None:
    try:
        data = jws.decode_segment(segment)
    except ValueError:
        return
    assert jws.encode_segment(data) == segment


# Claim values as ID tokens have them: scalars, lists, one level of objects (so the
# depth stays far below MAX_JSON_DEPTH).
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_JSON = (
    _SCALARS
    | st.lists(_SCALARS, max_size=4)
    | st.dictionaries(st.text(max_size=10), _SCALARS | st.lists(_SCALARS, max_size=3), max_size=4)
)


@given(
    header=st.fixed_dictionaries(
        {"alg": st.text(max_size=8)},
        optional={"kid": st.text(max_size=8), "typ": st.sampled_from(["JWT", "jwt"])},
    ),
    payload=st.dictionaries(st.text(max_size=12), _JSON, max_size=6),
    signature=st.binary(max_size=64),
)
def test_a_well_formed_token_reads_back_as_written(
    header: dict[str, Any], payload: dict[str, Any], signature: bytes
) -> None:
    token = ".".join(
        jws.encode_segment(part)
        for part in (_json(header).encode(), _json(payload).encode(), signature)
    )
    parsed = jws.parse(token)
    assert parsed.header == header
    assert parsed.payload == payload


def _refused_or_read(token: str) -> None:
    """The parser's whole contract on arbitrary input: a reading or InvalidToken."""
    refused: errors.InvalidToken | None = None
    try:
        jws.parse(token)
    except errors.InvalidToken as exc:
        refused = exc
    if refused is not None:
        assert refused.status == 401
        if len(token) >= 24:
            assert token not in refused.message


@given(st.text(max_size=200))
def test_arbitrary_text_is_read_or_refused_never_crashes(token: str) -> None:
    _refused_or_read(token)


@given(
    st.lists(
        st.binary(max_size=80).map(jws.encode_segment) | st.text(ALPHABET + "=+/.", max_size=80),
        min_size=1,
        max_size=5,
    )
)
def test_arbitrary_segments_are_read_or_refused(segments: list[str]) -> None:
    _refused_or_read(".".join(segments))


# A fixed, well-formed token (the parser does not look at its lifetime).
GOOD_TOKEN = sign(KEY, claims(iat=1_700_000_000, exp=1_700_000_600))


@given(
    position=st.integers(min_value=0),
    character=st.sampled_from(list("=+/ \t\n\r.%\x00\u00e9\ufeff")),
)
def test_any_foreign_character_in_a_good_token_is_refused(position: int, character: str) -> None:
    token = GOOD_TOKEN
    index = position % (len(token) + 1)
    mutated = token[:index] + character + token[index:]
    with pytest.raises(errors.InvalidToken) as info:
        jws.parse(mutated)
    assert mutated not in info.value.message


@pytest.mark.parametrize("levels", range(10, 22))
def test_nesting_is_refused_from_the_same_depth_with_or_without_the_walk(levels: int) -> None:
    # parse() walks the claims only when the text could hold something to find; at the
    # edge of MAX_JSON_DEPTH its answer must be the walk's own.
    payload = '{"a":' + "[" * levels + "1" + "]" * levels + "}"
    token = ".".join(
        [
            jws.encode_segment(b'{"alg":"RS256"}'),
            jws.encode_segment(payload.encode()),
            jws.encode_segment(b"sig"),
        ]
    )
    try:
        jws._check_strings_and_depth(json.loads(payload))
        walk_refuses = False
    except jws._Refused:
        walk_refuses = True

    if walk_refuses:
        with pytest.raises(errors.InvalidToken, match="nested too deeply"):
            jws.parse(token)
    else:
        assert jws.parse(token).payload == json.loads(payload)
    assert walk_refuses == (levels >= jws.MAX_JSON_DEPTH - 1)
