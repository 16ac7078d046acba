"""A token bucket: the rate limits of services (puzzle budgets, firewall limits and logs).

``Bucket(rate, burst, now)`` holds at most ``burst`` tokens and gains ``rate`` per
second; :meth:`Bucket.take` spends one if there is one. Time comes in as ``now``
(the bridge's monotonic clock), so it is sans-IO and exact in tests.
"""

from __future__ import annotations


class Bucket:
    """``rate`` tokens per second, at most ``burst`` saved (full at the start)."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst, self.tokens, self.last = rate, burst, float(burst), now

    def take(self, now: float) -> bool:
        """Spend a token at ``now``; False (nothing spent) when there is none."""
        tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False
