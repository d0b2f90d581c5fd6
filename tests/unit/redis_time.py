"""A real redis-server's expiry moved in step with a FakeClock, for the stateful tests.

The code under test reads a FakeClock, while Redis expires keys by its own clock, which
a test cannot move. ``RedisTime`` bridges the two for the keys under one prefix, at the
network boundary (it only ever sets or reads TTLs, as an operator's redis-cli could):

* the fake clock starts on a whole second, and every TTL the code sets there is whole
  seconds, so ``settle()`` (after each step) rounds every key's TTL back to whole
  seconds, undoing the few milliseconds of real time the step took;
* ``advance(seconds)`` moves the fake clock and takes as many seconds off every TTL,
  deleting the keys whose time is up: Redis expires a key when its TTL reaches 0.

It also holds the store's promise that every key it writes has a TTL.
"""

from __future__ import annotations

import redis

from tests.unit.oidc_fixtures import FakeClock


def whole_second_clock() -> FakeClock:
    """A FakeClock on a whole second: every deadline is then exact float arithmetic,
    so the code and the test's model agree on every boundary."""
    clock = FakeClock()
    clock.now = float(int(clock.now))
    return clock


class RedisTime:
    def __init__(self, client: redis.Redis, prefix: str, clock: FakeClock) -> None:
        self.client = client
        self.prefix = prefix
        self.clock = clock

    def _keys(self) -> list[bytes]:
        return list(self.client.scan_iter(match=self.prefix + "*", count=1000))

    def ttls(self) -> dict[str, int]:
        """Each key's TTL in whole seconds, by fake time."""
        out: dict[str, int] = {}
        for key in self._keys():
            ms = int(self.client.pttl(key))
            if ms == -2:
                continue  # expired between the scan and the read
            assert ms != -1, f"{key!r} has no TTL"
            out[key.decode()] = round(ms / 1000)
        return out

    def settle(self) -> None:
        self._shift(0)

    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds)
        self._shift(seconds)

    def _shift(self, seconds: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, ttl in self.ttls().items():
            left = ttl - seconds
            if left <= 0:
                pipe.delete(key)
            else:
                pipe.pexpire(key, left * 1000)
        pipe.execute()
