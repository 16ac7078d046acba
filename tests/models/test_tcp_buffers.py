"""The virtual endpoint's buffers and RTO estimator, on their own.

Property tests against small reference models: the receive buffer reassembles segments
given in any order, cut anywhere, duplicated and overlapping, holds nothing at or beyond
the limit it is given nor more out-of-order bytes than its bound, and reports as SACK
blocks exactly the ranges it holds beyond the next expected offset, the most recently
received first (RFC 2018 4); the send buffer hands back exactly the bytes queued; the RTO
follows RFC 6298 and stays within its floor and ceiling.
"""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vtl.models import tcp_buffers
from vtl.models.tcp_buffers import ReceiveBuffer, RtoEstimator, SendBuffer


def pattern(n: int) -> bytes:
    """``n`` bytes in which every offset is recognisable (position mod 251)."""
    return bytes(i % 251 for i in range(n))


# -- the receive buffer --------------------------------------------------------------------------


class RecvModel:
    """What a receive buffer should hold, offset by offset."""

    def __init__(self, data: bytes, ooo_limit: int):
        self.data = data
        self.ooo_limit = ooo_limit
        self.nxt = 0
        self.read_pos = 0
        self.held: set[int] = set()  # out-of-order offsets held, all > nxt

    def add(self, offset: int, size: int, limit: int) -> tuple[int, bool]:
        """Returns (bytes made readable, whether the segment is held out of order)."""
        end = min(offset + size, limit)
        if end <= self.nxt or end <= offset:
            return 0, False
        offset = max(offset, self.nxt)
        span = set(range(offset, end))
        if offset > self.nxt:
            if span <= self.held:
                return 0, True
            if len(self.held | span) > self.ooo_limit:
                return 0, False  # the bound: dropped whole (the sender retransmits)
            self.held |= span
            return 0, True
        before = self.nxt
        self.held -= span
        self.nxt = end
        while self.nxt in self.held:
            self.held.remove(self.nxt)
            self.nxt += 1
        return self.nxt - before, False

    def ranges(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for o in sorted(self.held):
            if out and out[-1][1] == o:
                out[-1] = (out[-1][0], o + 1)
            else:
                out.append((o, o + 1))
        return out


def check_receive(buf: ReceiveBuffer, model: RecvModel, limit: int) -> None:
    assert buf.nxt == model.nxt <= max(limit, 0)
    assert buf.unread == model.nxt - model.read_pos
    assert buf.ooo_bytes == len(model.held) <= model.ooo_limit
    blocks = buf.sack_ranges(1 << 30)
    assert sorted(blocks) == model.ranges()  # exactly what is held, nothing else
    assert all(buf.nxt < s < e <= limit for s, e in blocks)
    assert buf.sack_ranges(3) == blocks[:3]


def fill_holes_and_read(buf: ReceiveBuffer, model: RecvModel) -> bytes:
    """Deliver just the missing bytes, hole by hole, so that what the buffer held out of
    order is what comes out after them; returns every byte read."""
    out = bytearray()
    n = len(model.data)
    while buf.nxt < n:
        starts = [s for s, _ in buf.sack_ranges(1 << 30)]
        hole_end = min(starts, default=n)
        buf.add(buf.nxt, model.data[buf.nxt : hole_end], n)
        out += buf.read(1 << 30)
    return bytes(out)


segments = st.lists(st.tuples(st.integers(0, 299), st.integers(0, 80)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(segs=segments, limit=st.integers(0, 300), ooo_limit=st.integers(0, 300),
       reads=st.lists(st.integers(0, 100), max_size=60))
def test_receive_buffer_matches_the_model(segs: list[tuple[int, int]], limit: int,
                                          ooo_limit: int, reads: list[int]) -> None:
    data = pattern(300)
    buf, model = ReceiveBuffer(ooo_limit), RecvModel(data, ooo_limit)
    got = bytearray()
    for k, (off, size) in enumerate(segs):
        made, held = model.add(off, size, limit)
        assert buf.add(off, data[off : off + size], limit) == made
        if held:  # RFC 2018 4: the first block holds the segment that triggered the ACK
            first = buf.sack_ranges(1)[0]
            assert first[0] <= max(off, buf.nxt) and min(off + size, limit) <= first[1]
        check_receive(buf, model, limit)
        if k < len(reads):
            chunk = buf.read(reads[k])
            assert chunk == data[model.read_pos : model.read_pos + len(chunk)]
            assert len(chunk) == min(reads[k], model.nxt - model.read_pos)
            model.read_pos += len(chunk)
            got += chunk
    got += buf.read(1 << 30)
    assert bytes(got) == data[: buf.nxt]
    assert fill_holes_and_read(buf, model) == data[len(got) :]
    assert buf.ooo_bytes == 0 and buf.sack_ranges(4) == []


@st.composite
def shuffled_cover(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    """Bytes and segments that cover them: cut at random points, with extra overlapping
    and duplicated segments, in any order."""
    n = draw(st.integers(1, 1500))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=40))) if n > 1 else []
    bounds = [0, *cuts, n]
    segs = [(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
    extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 500)), max_size=10))
    segs += [(o, min(s, n - o)) for o, s in extra]
    segs += draw(st.lists(st.sampled_from(segs), max_size=10))  # duplicates
    return pattern(n), draw(st.permutations(segs))


@settings(max_examples=150, deadline=None)
@given(case=shuffled_cover(), read_every=st.integers(1, 20), compact=st.sampled_from([1, 64]))
def test_out_of_order_segments_reassemble_to_the_original(
        case: tuple[bytes, list[tuple[int, int]]], read_every: int, compact: int) -> None:
    data, segs = case
    buf = ReceiveBuffer(len(data))
    out = bytearray()
    with mock.patch.object(tcp_buffers, "_COMPACT", compact):
        for k, (off, size) in enumerate(segs):
            buf.add(off, memoryview(data)[off : off + size], len(data))
            assert buf.ooo_bytes <= len(data) and buf.nxt + buf.ooo_bytes <= len(data)
            if k % read_every == 0:
                out += buf.read(1 + k * 7 % 300)
        out += buf.read(1 << 30)
    assert bytes(out) == data
    assert buf.nxt == len(data) and buf.ooo_bytes == 0 and buf.sack_ranges(4) == []


def test_nothing_at_or_beyond_the_limit_is_kept() -> None:
    buf = ReceiveBuffer(1000)
    assert buf.add(100, b"x" * 50, 90) == 0  # starts beyond the limit
    assert buf.add(100, b"x" * 50, 100) == 0  # starts at the limit
    assert buf.ooo_bytes == 0 and buf.sack_ranges(4) == []
    data = pattern(200)
    assert buf.add(80, data[80:130], 100) == 0
    assert buf.sack_ranges(4) == [(80, 100)] and buf.ooo_bytes == 20
    assert buf.add(0, data[:50], 100) == 50
    assert buf.add(50, data[50:200], 100) == 50 and buf.nxt == 100 and buf.ooo_bytes == 0
    assert buf.read(1000) == data[:100]


def test_sack_blocks_most_recent_first_even_for_a_duplicate() -> None:
    buf = ReceiveBuffer(1000)
    buf.add(100, pattern(150)[100:150], 1000)
    buf.add(300, pattern(350)[300:350], 1000)
    buf.add(500, pattern(550)[500:550], 1000)
    assert buf.sack_ranges(4) == [(500, 550), (300, 350), (100, 150)]
    buf.add(110, pattern(120)[110:120], 1000)  # a duplicate: its block goes first
    assert buf.sack_ranges(2) == [(100, 150), (500, 550)]
    buf.add(150, pattern(300)[150:300], 1000)  # fills between: one block
    assert buf.sack_ranges(4) == [(100, 350), (500, 550)]


def test_out_of_order_bound_drops_what_does_not_fit() -> None:
    buf = ReceiveBuffer(100)
    buf.add(10, b"a" * 60, 1000)
    buf.add(200, b"b" * 50, 1000)  # would hold 110 > 100
    assert buf.ooo_bytes == 60 and buf.sack_ranges(4) == [(10, 70)]
    buf.add(20, b"a" * 10, 1000)  # held already: no room needed
    assert buf.ooo_bytes == 60
    buf.add(60, b"a" * 50, 1000)  # 40 new bytes of 50: they fit (100)
    assert buf.ooo_bytes == 100 and buf.sack_ranges(4) == [(10, 110)]
    buf.add(100, b"a" * 11, 1000)  # 1 new byte: does not fit
    assert buf.ooo_bytes == 100
    assert buf.add(0, b"c" * 10, 1000) == 110  # in order: not bounded by the store
    assert buf.read(200) == b"c" * 10 + b"a" * 100


# -- the send buffer ------------------------------------------------------------------------------


send_ops = st.lists(st.one_of(
    st.tuples(st.just("push"), st.integers(0, 120)),
    st.tuples(st.just("ack"), st.integers(-10, 400)),
    st.tuples(st.just("view"), st.integers(-10, 400), st.integers(0, 150)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops=send_ops, capacity=st.integers(0, 300), compact=st.sampled_from([1, 7, 1 << 20]))
def test_send_buffer_matches_the_model(ops: list[tuple], capacity: int, compact: int) -> None:
    stream = pattern(10_000)
    buf = SendBuffer(capacity)
    una = end = 0
    with mock.patch.object(tcp_buffers, "_COMPACT", compact):
        for op in ops:
            if op[0] == "push":
                data = stream[end : end + op[1]]
                n = buf.push(memoryview(data) if op[1] % 2 else data)
                assert n == min(op[1], capacity - (end - una))
                end += n
            elif op[0] == "ack":
                released = buf.ack(op[1])
                assert released == max(0, min(op[1], end) - una)
                una += released
            else:
                _, off, size = op
                if off < una:
                    with pytest.raises(ValueError):
                        buf.view(off, size)
                else:
                    assert buf.view(off, size) == stream[off : min(off + size, end)]
            assert (buf.una, buf.end, buf.queued) == (una, end, end - una)
            assert 0 <= buf.queued <= capacity and buf.room == capacity - buf.queued


# -- the RTO (RFC 6298) --------------------------------------------------------------------------


rto_ops = st.lists(st.one_of(st.floats(0.0, 120.0), st.just("backoff")), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=rto_ops, bounds=st.tuples(st.floats(0.001, 5.0), st.floats(0.001, 120.0)),
       where=st.floats(0.0, 1.0))
def test_rto_stays_within_its_floor_and_ceiling(ops: list, bounds: tuple[float, float],
                                                where: float) -> None:
    lo, hi = min(bounds), max(bounds)
    est = RtoEstimator(lo + (hi - lo) * where, lo, hi)
    for op in ops:
        if op == "backoff":
            before = est.rto
            est.backoff()
            assert est.rto == min(hi, 2 * before)
        else:
            est.sample(op)
            assert est.backoffs == 0
        assert lo <= est.rto <= hi


@settings(max_examples=200, deadline=None)
@given(samples=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=40))
def test_rto_follows_rfc_6298(samples: list[float]) -> None:
    est = RtoEstimator(1.0, 0.0, 1e9)
    srtt = rttvar = 0.0
    for k, r in enumerate(samples):
        est.sample(r)
        if k == 0:  # 2.2: the first measurement
            srtt, rttvar = r, r / 2
        else:  # 2.3: RTTVAR first, with the old SRTT; alpha 1/8, beta 1/4
            rttvar = 0.75 * rttvar + 0.25 * abs(srtt - r)
            srtt = 0.875 * srtt + 0.125 * r
        assert est.srtt == pytest.approx(srtt) and est.rttvar == pytest.approx(rttvar)
        assert est.rto == pytest.approx(srtt + max(0.001, 4 * rttvar))  # G = 1 ms


def test_rto_backoff_doubles_then_a_sample_recomputes() -> None:
    est = RtoEstimator(1.0, 0.2, 60.0)
    assert est.srtt is None and est.rto == 1.0  # 2.1: before any sample
    for expect in (2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0):  # 5.5, capped
        est.backoff()
        assert est.rto == expect
    assert est.backoffs == 7
    est.sample(0.1)
    assert est.backoffs == 0
    assert est.rto == pytest.approx(0.3)  # 0.1 + 4 * 0.05 (2.2)
    est = RtoEstimator(1.0, 0.2, 60.0)
    est.sample(0.01)
    assert est.rto == 0.2  # 0.03, floored (2.4)


def test_send_buffer_keeps_immutable_bytes_without_a_copy_and_copies_mutable_ones():
    buf = SendBuffer(1 << 20)
    block = bytes(range(256)) * 256  # 64 KiB
    assert buf.push(block) == len(block)
    view = buf.view(100, 1000)
    assert isinstance(view, memoryview) and view.obj is block  # no copy on either side
    assert view == block[100:1100]
    scratch = bytearray(b"x" * 1000)
    buf.push(scratch)
    scratch[:] = b"y" * 1000  # the caller reuses its buffer: what was queued stays
    assert buf.view(len(block), 1000) == b"x" * 1000
    small = SendBuffer(10)
    assert small.push(memoryview(block)[5:]) == 10  # a view of bytes, cut at the room
    assert small.view(0, 10) == block[5:15]
