"""vtl.ratelimit.Bucket: a burst, then the rate, never more."""

from __future__ import annotations

from vtl.ratelimit import Bucket


def test_burst_then_rate() -> None:
    b = Bucket(rate=10.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert b.take(0.1) and not b.take(0.1), "one token per 0.1 s"
    assert sum(b.take(10.0) for _ in range(10)) == 3, "never more than the burst saved"
