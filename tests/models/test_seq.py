"""Sequence arithmetic on the 2**32 circle: properties, with the wrap-around in play."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st
from vtl.models.seq import (
    HALF,
    MASK,
    MOD,
    between,
    in_window,
    seq_add,
    seq_diff,
    seq_ge,
    seq_gt,
    seq_le,
    seq_lt,
    seq_max,
    seq_min,
)

u32 = st.one_of(st.integers(0, MASK), st.integers(MASK - 70_000, MASK), st.integers(0, 70_000))
delta = st.integers(-(HALF - 1), HALF - 1)
small = st.integers(0, 1 << 30)


@given(u32, st.integers(-(1 << 40), 1 << 40))
def test_add_stays_on_the_circle(a: int, n: int) -> None:
    r = seq_add(a, n)
    assert 0 <= r <= MASK and r == (a + n) % MOD


@given(u32, delta)
def test_diff_undoes_add(a: int, d: int) -> None:
    b = seq_add(a, d)
    assert seq_diff(b, a) == d
    assert seq_diff(a, b) == -d


@given(u32, u32)
def test_diff_range(a: int, b: int) -> None:
    d = seq_diff(a, b)
    assert -HALF <= d < HALF and seq_add(b, d) == a


@given(u32, delta)
def test_order_follows_the_distance(a: int, d: int) -> None:
    b = seq_add(a, d)
    assert seq_lt(a, b) is (d > 0)
    assert seq_le(a, b) is (d >= 0)
    assert seq_gt(b, a) is (d > 0)
    assert seq_ge(b, a) is (d >= 0)
    assert seq_max(a, b) == (b if d > 0 else a)
    assert seq_min(a, b) == (a if d > 0 else b)


@given(u32, u32)
def test_order_is_antisymmetric(a: int, b: int) -> None:
    assume(seq_diff(a, b) != -HALF)  # exactly half way round: neither is before the other
    assert seq_lt(a, b) != seq_le(b, a)
    assert not (seq_lt(a, b) and seq_lt(b, a))


def test_wrap_around() -> None:
    assert seq_add(MASK, 1) == 0
    assert seq_lt(MASK - 5, 3) and seq_gt(3, MASK - 5)
    assert seq_diff(3, MASK - 5) == 9
    assert seq_max(MASK, 0) == 0 and seq_min(MASK, 0) == MASK
    assert in_window(2, MASK - 1, 10) and not in_window(8, MASK - 1, 10)
    assert between(MASK - 1, 0, 1) and not between(MASK - 1, 2, 1)


@given(u32, small, st.integers(-(1 << 31) + 1, (1 << 31) - 1))
def test_in_window(start: int, size: int, off: int) -> None:
    s = seq_add(start, off)
    assert in_window(s, start, size) is (0 <= off < size)


@given(u32, u32)
def test_empty_window_holds_nothing(s: int, start: int) -> None:
    assert not in_window(s, start, 0)


@given(u32, small, st.integers(-(1 << 30), (1 << 30) + 10))
def test_between(low: int, span: int, off: int) -> None:
    high = seq_add(low, span)
    s = seq_add(low, off)
    assert between(low, s, high) is (0 <= off <= span)
    assert between(low, low, high) and between(low, high, high)


@given(u32, small)
def test_between_agrees_with_in_window(low: int, span: int) -> None:
    high = seq_add(low, span)
    for s in (low, seq_add(low, span // 2), high, seq_add(high, 1), seq_add(low, -1)):
        assert between(low, s, high) is in_window(s, low, span + 1)
