"""Identity ids: keyed, stable, one per (provider, subject), remembered per process."""

from __future__ import annotations

import re

import pytest

from broker.identity import DERIVED_IDS, IdentityIds


def test_an_id_is_stable_keyed_and_one_per_provider_and_subject() -> None:
    ids = IdentityIds(key=b"k" * 32, region="eu-west-1")
    other_key = IdentityIds(key=b"q" * 32, region="eu-west-1")

    alice = ids.derive("google", "alice")
    assert re.fullmatch(r"eu-west-1:[0-9a-f-]{36}", alice)
    assert ids.derive("google", "alice") == alice
    assert IdentityIds(key=b"k" * 32, region="eu-west-1").derive("google", "alice") == alice
    assert other_key.derive("google", "alice") != alice
    # Length-prefixed: moving a character between the parts is another identity.
    assert ids.derive("googlea", "lice") != alice
    assert ids.derive("amazon", "alice") != alice


def test_remembered_ids_are_the_ones_derived_even_past_the_bound() -> None:
    ids = IdentityIds(key=b"k" * 32, region="us-east-1")
    fresh = IdentityIds(key=b"k" * 32, region="us-east-1")
    subjects = [f"user{i}" for i in range(DERIVED_IDS + 10)]

    first = [ids.derive("p", s) for s in subjects]
    again = [ids.derive("p", s) for s in reversed(subjects)]

    assert again == list(reversed(first))
    assert first == [fresh.derive("p", s) for s in subjects]
    assert len(set(first)) == len(subjects)


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        IdentityIds(key=b"short", region="us-east-1")
