"""Guest identities: the guest token (one row per forgery), the config checks, and the
trust policies iam-setup writes for the guest role and the others."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from broker import errors, iam_setup
from broker.guest import GuestTokens
from broker.settings import ConfigError
from tests.unit.issuer_fixtures import ABAC_ROLE, BASE, load
from tests.unit.oidc_fixtures import FakeClock

GUEST_ROLE = "arn:aws:iam::123456789012:role/Guest"
KEY = b"k" * 32


def tokens(clock: FakeClock, key: bytes = KEY) -> GuestTokens:
    return GuestTokens(identity_key=key, lifetime_seconds=86400, clock=clock)


def test_a_guest_token_gives_the_subject_back(clock: FakeClock) -> None:
    subject = GuestTokens.new_subject()
    token, expires = tokens(clock).issue(subject)
    assert expires == int(clock()) + 86400
    assert tokens(clock).open(token) == subject
    assert subject != GuestTokens.new_subject()


def _flip(text: str, index: int) -> str:
    return text[:index] + ("a" if text[index] != "a" else "b") + text[index + 1 :]


FORGERIES: list[tuple[str, Any, type[errors.BrokerError]]] = [
    ("another subject", lambda t: t.replace(t.split(".")[1], "0" * 32), errors.InvalidToken),
    ("later expiry", lambda t: t.replace(t.split(".")[2], "9" * 12), errors.InvalidToken),
    ("changed mac", lambda t: _flip(t, len(t) - 5), errors.InvalidToken),
    ("another version", lambda t: "g2" + t[2:], errors.InvalidToken),
    ("padding", lambda t: t + "=", errors.InvalidToken),
    ("whitespace", lambda t: " " + t, errors.InvalidToken),
    ("empty", lambda _t: "", errors.InvalidToken),
    ("a JWT", lambda _t: "eyJhbGciOiJub25lIn0.e30.", errors.InvalidToken),
]


@pytest.mark.parametrize(
    ("change", "error"), [f[1:] for f in FORGERIES], ids=[f[0] for f in FORGERIES]
)
def test_forged_guest_tokens_are_refused(
    clock: FakeClock, change: Any, error: type[errors.BrokerError]
) -> None:
    token, _ = tokens(clock).issue(GuestTokens.new_subject())
    with pytest.raises(error) as caught:
        tokens(clock).open(change(token))
    assert caught.value.status == 401


def test_another_key_and_expiry_are_refused(clock: FakeClock) -> None:
    token, _ = tokens(clock).issue(GuestTokens.new_subject())
    with pytest.raises(errors.InvalidToken):
        tokens(clock, key=b"o" * 32).open(token)
    clock.advance(86400)
    with pytest.raises(errors.ExpiredToken):
        tokens(clock).open(token)


def guest_config(**guest: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw["guest"] = {"enabled": True, "role_arn": GUEST_ROLE, **guest}
    return raw


MISTAKES: list[tuple[str, dict[str, Any], str]] = [
    ("no role", {"role_arn": None}, "guest.role_arn: guest access needs the role"),
    ("not an ARN", {"role_arn": "Guest"}, "is not an IAM role ARN"),
    ("a rule's role", {"role_arn": ABAC_ROLE}, "must not be a role that rules grant"),
    ("too long", {"duration_seconds": 7200}, "guest.duration_seconds: must be between 900"),
    ("no new guests", {"new_per_ip_per_hour": 0}, "guest.new_per_ip_per_hour"),
    ("bad policy", {"session_policy": {"Statement": "${nope}"}}, "unknown placeholder"),
    ("unknown key", {"rolearn": "x"}, "did you mean 'role_arn'"),
]


@pytest.mark.parametrize(
    ("guest", "needle"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_guest_config_mistakes(guest: dict[str, Any], needle: str) -> None:
    raw = guest_config(**guest)
    if guest.get("role_arn", "") is None:
        raw["guest"].pop("role_arn")
    with pytest.raises(ConfigError) as caught:
        load(raw)
    assert any(needle in p for p in caught.value.problems), caught.value.problems


def test_guests_are_off_by_default() -> None:
    settings = load(copy.deepcopy(BASE))
    assert settings.guest.enabled is False


def test_trust_policies_keep_guests_and_people_apart() -> None:
    settings = load(guest_config())
    docs = iam_setup.documents(settings, "iam")["roles"]
    host = "broker.example.com"
    guest = docs[GUEST_ROLE]["Statement"][0]["Condition"]
    assert guest["ForAnyValue:StringLike"] == {f"{host}:amr": "unauthenticated"}
    assert docs[GUEST_ROLE]["Statement"][0]["Action"] == ["sts:AssumeRoleWithWebIdentity"]
    people = docs[ABAC_ROLE]["Statement"][0]["Condition"]
    assert people["ForAllValues:StringNotLike"] == {f"{host}:amr": "unauthenticated"}
