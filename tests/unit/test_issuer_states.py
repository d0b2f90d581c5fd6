"""The signing-key ring as a state machine (broker.issuer's docstring names its states).

A hypothesis stateful test drives rotations (with and without ``--publish-ahead``),
signing, the clock, a second and third node, restarts and a Redis flush against a real
redis-server, and after every step checks the ring's invariants with an independent
JOSE library (joserfc) playing the verifier: IAM, holding the JWKS for the ``max-age``
it was served with.

1. every node has a key that may sign now;
2. a verifier's cached JWKS, while its ``max-age`` lasts, holds the key that signs now,
   and ``max-age`` never runs past the moment the next key starts signing;
3. every token still within its lifetime plus the leeway verifies against the JWKS
   every node publishes.

The examples below the machine pin the states it cannot reach by itself: Redis down,
a ring sealed with other encryption keys, a lock held by another node.
"""

from __future__ import annotations

import os
from typing import Any, cast

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from joserfc import jwt
from joserfc.jwk import KeySet

from broker import errors
from broker.devstack.processes import ManagedProcess, free_port
from broker.issuer import (
    ACTIVATION_MARGIN_SECONDS,
    VERIFIER_LEEWAY_SECONDS,
    Issuer,
    KeyRingUnreadable,
)
from broker.settings import Settings
from broker.store import Sealer, Store
from tests.unit.issuer_fixtures import ALICE, identity, issuer_config, load
from tests.unit.oidc_fixtures import FakeClock, make_store

PUBLISH_AHEAD = 120
ROTATE_AFTER = 3600
TOKEN_SECONDS = 300


def ring_settings() -> Settings:
    # ES256: key generation is cheap, so the machine can take many steps.
    return load(
        issuer_config(
            algorithm="ES256",
            publish_ahead_seconds=PUBLISH_AHEAD,
            rotate_after_seconds=ROTATE_AFTER,
        )
    )


def kids(jwks: dict[str, Any]) -> set[str]:
    return {k["kid"] for k in jwks["keys"]}


def signature_verifies(token: str, jwks: dict[str, Any]) -> str:
    """The token's kid, after joserfc checked its signature against ``jwks``."""
    decoded = jwt.decode(token, KeySet.import_key_set(cast(Any, jwks)), algorithms=["ES256"])
    return str(decoded.header["kid"])


class CachedVerifier:
    """A verifier that keeps the JWKS for the max-age it was served with."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] | None = None
        self.until = 0.0

    def fetch(self, node: Issuer, now: float) -> None:
        # As the JWKS route serves it: the key set and its max-age from one ring read.
        publication = node.publication()
        self.jwks, self.until = node.jwks(publication), now + publication.cache_seconds

    def keys_for(self, node: Issuer, now: float) -> dict[str, Any]:
        if self.jwks is None or now >= self.until:
            self.fetch(node, now)
        assert self.jwks is not None
        return self.jwks


class KeyRing(RuleBasedStateMachine):
    def __init__(self, port: int) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store, self.client = make_store(port)
        self.settings = ring_settings()
        self.nodes = [self._node()]
        self.verifier = CachedVerifier()
        self.tokens: list[tuple[str, float]] = []  # (token, exp)

    def _node(self) -> Issuer:
        return Issuer(settings=self.settings, store=self.store, clock=self.clock)

    def teardown(self) -> None:
        self.client.close()

    # -- operations ---------------------------------------------------------------------

    @rule(
        node=st.integers(0, 2),
        ahead=st.sampled_from([None, 0, 5, PUBLISH_AHEAD - 1, PUBLISH_AHEAD, 3 * PUBLISH_AHEAD]),
    )
    def rotate(self, node: int, ahead: int | None) -> None:
        issuer = self.nodes[node % len(self.nodes)]
        could_sign = self._ring_has_signer()
        try:
            key = issuer.rotate(publish_ahead_seconds=ahead)
        except errors.BadRequest:
            # Only a rotation sooner than the longest max-age served is refused, and
            # only while some key signs (else nothing can be cached that misses it).
            assert could_sign
            assert ahead is not None
            assert ahead < issuer.min_publish_ahead()
            return
        now = self.clock()
        if not could_sign:
            assert key.activates_at == now  # a ring with no signer gets one at once
        else:
            assert key.activates_at >= now + issuer.min_publish_ahead()

    @rule(node=st.integers(0, 2))
    def sign(self, node: int) -> None:
        issuer = self.nodes[node % len(self.nodes)]
        now = self.clock()
        token = issuer.sign(identity(self.settings, ALICE))
        # Invariant 2 as IAM meets it: the cached key set (fetched now if stale) knows
        # the key that just signed.
        signature_verifies(token, self.verifier.keys_for(issuer, now))
        self.tokens.append((token, now + TOKEN_SECONDS))

    @rule(node=st.integers(0, 2))
    def verifier_fetches(self, node: int) -> None:
        self.verifier.fetch(self.nodes[node % len(self.nodes)], self.clock())

    @rule(seconds=st.sampled_from([1, 30, 59, PUBLISH_AHEAD, TOKEN_SECONDS + 60, ROTATE_AFTER]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: len(self.nodes) < 3)
    @rule()
    def add_node(self) -> None:
        self.nodes.append(self._node())

    @rule(node=st.integers(0, 2))
    def restart(self, node: int) -> None:
        self.nodes[node % len(self.nodes)] = self._node()  # no memory of parsed keys

    @rule()
    def redis_loses_the_ring(self) -> None:
        self.store.delete(self.store.key("issuer", "keys"))
        # The one state the invariants cannot cover: the keys are gone, so tokens
        # they signed no longer verify and cached key sets miss the next key
        # (docs: "Losing the ring").
        self.tokens.clear()
        self.verifier = CachedVerifier()

    # -- invariants ---------------------------------------------------------------------

    def _ring_has_signer(self) -> bool:
        ring = self.nodes[0]._load()
        now = self.clock()
        return any(
            k.activates_at <= now and (k.retired_at is None or now < k.retired_at) for k in ring
        )

    # The checks below read the ring as requests do, and a request on an empty ring
    # makes its first key: they wait until the ring exists, so that rules still meet
    # the empty ring (a fresh deploy, a flushed Redis), rotate above all.

    def _ring_exists(self) -> bool:
        return self.store.exists(self.store.key("issuer", "keys"))

    @invariant()
    def empty_or_a_key_may_sign_now(self) -> None:
        if self._ring_exists():
            assert self._ring_has_signer()
            for issuer in self.nodes:
                assert issuer.signing_key().activates_at <= self.clock()

    @invariant()
    def max_age_ends_before_the_next_key_signs(self) -> None:
        if not self._ring_exists():
            return
        now = self.clock()
        for issuer in self.nodes:
            upcoming = [k.activates_at - now for k in issuer._load() if k.activates_at > now]
            assert issuer.cache_seconds() <= min(upcoming, default=float("inf"))
            assert issuer.cache_seconds() <= issuer.min_publish_ahead()

    @invariant()
    def a_cached_key_set_knows_the_signing_key(self) -> None:
        now = self.clock()
        if not self._ring_exists():
            return
        if self.verifier.jwks is not None and now < self.verifier.until:
            assert self.nodes[0].signing_key().kid in kids(self.verifier.jwks)

    @invariant()
    def every_live_token_verifies_against_every_node(self) -> None:
        now = self.clock()
        self.tokens = [(t, exp) for t, exp in self.tokens if now < exp + VERIFIER_LEEWAY_SECONDS]
        if not self.tokens:
            return
        for issuer in self.nodes:
            published = issuer.jwks()
            for token, _ in self.tokens:
                signature_verifies(token, published)


@pytest.fixture(scope="module")
def port(redis_proc: ManagedProcess) -> int:
    return redis_proc.port


def test_the_key_ring_keeps_its_invariants_in_every_state(port: int) -> None:
    run_state_machine_as_test(
        lambda: KeyRing(port),  # type: ignore[arg-type]
        settings=settings(
            max_examples=60,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# --------------------------------------------------------------------------- examples


@pytest.fixture
def ring(store: Store, clock: FakeClock) -> Issuer:
    return Issuer(settings=ring_settings(), store=store, clock=clock)


def test_a_rotation_before_the_first_token_makes_a_key_that_signs_at_once(
    ring: Issuer, clock: FakeClock
) -> None:
    # Right after a deploy: nothing has signed yet, and the operator rotates.
    key = ring.rotate(publish_ahead_seconds=PUBLISH_AHEAD)
    assert key.activates_at == clock()
    assert ring.signing_key().kid == key.kid


@pytest.mark.parametrize("ahead", [0, 5, PUBLISH_AHEAD - 1])
def test_a_rotation_sooner_than_the_served_max_age_is_refused(
    ring: Issuer, clock: FakeClock, ahead: int
) -> None:
    current = ring.signing_key().kid
    with pytest.raises(errors.BadRequest, match="verifiers may cache the JWKS") as caught:
        ring.rotate(publish_ahead_seconds=ahead)
    assert caught.value.status == 400
    assert ring.signing_key().kid == current
    assert len(ring.jwks()["keys"]) == 1  # nothing was published


def test_max_age_shrinks_as_the_next_key_comes_closer(ring: Issuer, clock: FakeClock) -> None:
    ring.signing_key()
    assert ring.cache_seconds() == PUBLISH_AHEAD
    ring.rotate(publish_ahead_seconds=3 * PUBLISH_AHEAD)
    assert ring.cache_seconds() == PUBLISH_AHEAD
    clock.advance(3 * PUBLISH_AHEAD + ACTIVATION_MARGIN_SECONDS - 40)
    assert ring.cache_seconds() == 40
    clock.advance(40)
    assert ring.cache_seconds() == PUBLISH_AHEAD  # the next key signs now: no next key


def test_redis_down_is_a_503_with_retry_after(clock: FakeClock) -> None:
    client = redis.Redis(port=free_port(), socket_timeout=0.5, socket_connect_timeout=0.5)
    dead = Store(client=client, prefix="t:", sealer=Sealer([os.urandom(32)]))
    issuer = Issuer(settings=ring_settings(), store=dead, clock=clock)
    for call in (issuer.signing_key, issuer.jwks, issuer.cache_seconds, issuer.rotate):
        with pytest.raises(errors.StoreUnavailable) as caught:
            call()
        assert (caught.value.status, caught.value.code) == (503, "dependency_unavailable")
        assert caught.value.retry_after
    client.close()


@pytest.fixture
def other_node_store(store: Store) -> Store:
    """The same Redis and prefix, sealed with encryption keys this node does not have."""
    return Store(client=store.client, prefix=store.prefix, sealer=Sealer([os.urandom(32)]))


@pytest.mark.parametrize("content", ["other keys", "not a ring"])
def test_a_ring_this_node_cannot_open_is_a_503_and_is_never_overwritten(
    store: Store, other_node_store: Store, clock: FakeClock, content: str
) -> None:
    ring_key = store.key("issuer", "keys")
    if content == "other keys":
        Issuer(settings=ring_settings(), store=other_node_store, clock=clock).signing_key()
    else:
        store.set_sealed(ring_key, {"keys": [{"kid": "x"}]}, ttl=60)
    before = store.client.get(ring_key)
    issuer = Issuer(settings=ring_settings(), store=store, clock=clock)
    for call in (issuer.signing_key, issuer.jwks, issuer.rotate):
        with pytest.raises(KeyRingUnreadable) as caught:
            call()
        assert (caught.value.status, caught.value.code) == (503, "dependency_unavailable")
        assert "encryption_keys" in caught.value.message
    assert store.client.get(ring_key) == before
    # The operator's explicit remedy when no node can open it: a new ring, signing now.
    new = issuer.rotate(at_once=True)
    assert issuer.signing_key().kid == new.kid
    assert kids(issuer.jwks()) == {new.kid}


def test_a_due_rotation_waits_while_another_node_holds_the_lock(
    ring: Issuer, store: Store, clock: FakeClock
) -> None:
    current = ring.signing_key().kid
    clock.advance(ROTATE_AFTER)
    with store.lock("issuer-keys", timeout=30, wait=0) as held:
        assert held
        # Due to rotate, but the ring is busy: the current key keeps signing, no 503.
        assert ring.signing_key().kid == current
    assert {s.state for s in ring.states()} == {"current", "next"}


def test_a_leaked_key_is_replaced_at_once_and_stays_published(
    ring: Issuer, clock: FakeClock
) -> None:
    leaked = ring.signing_key()
    new = ring.rotate(at_once=True)
    assert new.activates_at == clock()
    assert ring.signing_key().kid == new.kid
    assert kids(ring.jwks()) == {leaked.kid, new.kid}  # its tokens still verify until exp
