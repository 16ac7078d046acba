"""TCP sequence-number arithmetic (RFC 9293 3.4): 32-bit, modular.

Sequence numbers live on a circle of 2**32. ``a`` is *before* ``b`` when the
forward distance from ``a`` to ``b`` is less than 2**31; that is the only
meaningful order, valid while the numbers compared are within 2**31 of each
other (a TCP window never exceeds 2**30 bytes, RFC 7323 2.3, so the numbers a
connection compares always are).

Every function takes and returns plain ints in ``0 .. 2**32-1`` (inputs are
reduced first), so callers can store them in dataclasses and compare for
equality directly.
"""

from __future__ import annotations

MOD = 1 << 32
MASK = MOD - 1
HALF = 1 << 31


def seq_add(a: int, n: int) -> int:
    """``a + n`` on the circle (``n`` may be negative)."""
    return (a + n) & MASK


def seq_diff(a: int, b: int) -> int:
    """The signed distance ``a - b``, in ``-2**31 .. 2**31-1``."""
    d = (a - b) & MASK
    return d - MOD if d >= HALF else d


def seq_lt(a: int, b: int) -> bool:
    """``a`` comes before ``b``."""
    return 0 < ((b - a) & MASK) < HALF


def seq_le(a: int, b: int) -> bool:
    return ((b - a) & MASK) < HALF


def seq_gt(a: int, b: int) -> bool:
    return seq_lt(b, a)


def seq_ge(a: int, b: int) -> bool:
    return seq_le(b, a)


def seq_max(a: int, b: int) -> int:
    return b if seq_lt(a, b) else a


def seq_min(a: int, b: int) -> int:
    return a if seq_lt(a, b) else b


def in_window(s: int, start: int, size: int) -> bool:
    """``start <= s < start + size`` on the circle (``size`` bytes, may be 0)."""
    return ((s - start) & MASK) < size


def between(low: int, s: int, high: int) -> bool:
    """``low <= s <= high`` on the circle."""
    return ((s - low) & MASK) <= ((high - low) & MASK)
