"""The shared guards: reading a bearer token, comparing a secret, telling loopback."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.guards import bearer_token, is_loopback_host, same_secret


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER  abc ", "abc"),
        ("  Bearer abc", "abc"),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("abc", None),
        ("", None),
        (None, None),
        ("Bearerabc", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    ("given_value", "matches"),
    [
        ("s3cret-token", True),
        ("s3cret-toke", False),  # a prefix
        ("s3cret-tokenx", False),  # longer
        ("S3CRET-TOKEN", False),
        ("", False),
        (None, False),
    ],
)
def test_same_secret(given_value: str | None, matches: bool) -> None:
    assert same_secret(given_value, "s3cret-token") is matches


@given(st.text(), st.text())
def test_same_secret_is_equality(a: str, b: str) -> None:
    assert same_secret(a, b) is (a == b)


@pytest.mark.parametrize(
    ("host", "loopback", "ip_only"),
    [
        ("127.0.0.1", True, True),
        ("127.8.9.10", True, True),
        ("::1", True, True),
        ("localhost", True, False),
        ("LocalHost", True, False),
        ("localhost.example.com", False, False),
        ("127.0.0.1.nip.io", False, False),
        ("10.0.0.1", False, False),
        ("::ffff:10.0.0.1", False, False),
        ("example.com", False, False),
        ("", False, False),
        (None, False, False),
    ],
)
def test_is_loopback_host(host: str | None, loopback: bool, ip_only: bool) -> None:
    assert is_loopback_host(host) is loopback
    assert is_loopback_host(host, allow_localhost=False) is ip_only
