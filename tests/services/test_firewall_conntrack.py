"""firewall conntrack: the fast path for established ACKs changes exactly what the full path does.

Two trackers see the same random segments of one connection (after a handshake):
one tries :meth:`Conntrack.fast` first, as the service does, the other always
takes the full :meth:`Conntrack.lookup`. After every segment both must agree on
what they answered and on everything they know (states, windows, flags, counters).
"""

from __future__ import annotations

import vtl.services.firewall.tcpct as tcpct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from vtl.services.firewall.conntrack import Conntrack
from vtl.services.firewall.parse import parse

G, F = "10.80.0.2", "10.90.0.9"


def seg(out: bool, flags: str, seq: int, ack: int, n: int, win: int = 65535,
        ts: bool = False) -> bytearray:
    src, dst, sport, dport = (G, F, 40000, 80) if out else (F, G, 80, 40000)
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))] if ts else []
    return bytearray(bytes(Ether() / IP(src=src, dst=dst) / TCP(
        sport=sport, dport=dport, flags=flags, seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF,
        window=win, options=opts) / (b"x" * n)))


def snapshot(ct: Conntrack) -> list[tuple]:
    out = []
    for _, c in ct.table.items():
        out.append((c.state, c.assured, c.seen_reply, tuple(c.packets), tuple(c.nbytes),
                    c.last_index, c.last_dir, c.retrans, c.last_seq, c.last_ack, c.last_end,
                    c.last_win, c.timeout,
                    tuple((s.td_end, s.td_maxend, s.td_maxwin, s.td_maxack, s.td_scale,
                           s.flags) for s in c.seen)))
    return out


def feed(ct: Conntrack, data: bytearray, now: float, fast: bool) -> str:
    if fast and ct.fast(data, now, 0) is not None:
        return "established"
    p = parse(data)
    assert p is not None
    state, conn, _ = ct.lookup(data, p, now)
    if conn is not None and state != "invalid":
        ct.confirm(conn, now)
    return state


steps = st.lists(st.tuples(st.booleans(), st.sampled_from(["A", "PA", "A", "FA", "R"]),
                           st.integers(-70_000, 70_000), st.integers(-70_000, 70_000),
                           st.integers(0, 1400), st.integers(0, 65535), st.booleans()),
                 min_size=1, max_size=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps, st.booleans())
def test_the_fast_path_agrees_with_the_full_one(trace: list[tuple], sack: bool) -> None:
    opts = [("SAckOK", b"")] if sack else []
    hello = [bytearray(bytes(Ether() / IP(src=G, dst=F) / TCP(
                 sport=40000, dport=80, flags="S", seq=1000, window=65535, options=opts))),
             bytearray(bytes(Ether() / IP(src=F, dst=G) / TCP(
                 sport=80, dport=40000, flags="SA", seq=5000, ack=1001, window=65535,
                 options=opts))),
             seg(True, "A", 1001, 5001, 0)]
    a, b = Conntrack(1000, {}), Conntrack(1000, {})
    now = 0.0
    for frame in hello:
        now += 0.01
        assert feed(a, frame, now, True) == feed(b, frame, now, False)
    nxt = {True: 1001, False: 5001}
    for out, flags, dseq, dack, n, win, ts in trace:
        now += 0.01
        frame = seg(out, flags, nxt[out] + dseq, nxt[not out] + dack, n, win, ts)
        got = feed(a, frame, now, True), feed(b, bytearray(frame), now, False)
        assert got[0] == got[1], (got, out, flags, dseq, dack, n)
        assert snapshot(a) == snapshot(b)
        if dseq >= 0:
            nxt[out] = nxt[out] + dseq + n


def test_the_fast_path_takes_an_established_ack() -> None:
    ct = Conntrack(1000, {})
    for frame in (seg(True, "S", 1000, 0, 0), seg(False, "SA", 5000, 1001, 0),
                  seg(True, "A", 1001, 5001, 0)):
        p = parse(frame)
        assert p is not None
        state, conn, _ = ct.lookup(frame, p, 0.1)
        assert conn is not None
        ct.confirm(conn, 0.1)
    assert ct.fast(seg(False, "PA", 5001, 1001, 100), 0.2, 0) is not None
    assert ct.fast(seg(False, "PA", 5101, 1001, 100, ts=True), 0.2, 0) is not None
    assert ct.fast(seg(False, "FA", 5201, 1001, 0), 0.3, 0) is None, "a FIN: full path"
    assert ct.fast(seg(False, "A", 5201 + (1 << 30), 1001, 0), 0.3, 0) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.sampled_from(["S", "SA", "A", "R"]),
                          st.floats(0.0, 8.0)), min_size=1, max_size=30))
def test_poll_at_is_never_later_than_the_first_entry_due(steps: list[tuple]) -> None:
    """The bridge asks for poll_at after every batch, so it is kept without walking the
    table; it may be early (a spurious wake-up), never late (a connection outliving its
    timeout), and it is exact after an expiry."""
    ct = Conntrack(1000, {"tcp_syn_sent": 5.0, "tcp_close": 1.0, "tcp_established": 60.0})
    now = 0.0
    for flow, out, flags, dt in steps:
        now += dt
        seq, ack = (1000, 0) if out else (5000, 1001)
        frame = seg(out, flags, seq + (flags != "S" and out), ack if flags != "A" else 5001, 0)
        at = 34 if out else 36  # the guest's port tells the flows apart
        frame[at:at + 2] = (40000 + flow).to_bytes(2, "big")
        feed(ct, frame, now, fast=True)
        due, exact = ct.poll_at(), ct.table.poll_at()
        if exact is not None:  # (with nothing left, an early wake-up finds nothing)
            assert due is not None and due <= exact
        if due is not None and due <= now + 1.0:
            ct.expire(now + 1.0)
            assert ct.poll_at() == ct.table.poll_at()


def test_poll_at_comes_earlier_when_a_reset_shortens_a_timeout() -> None:
    ct = Conntrack(1000, {"tcp_established": 60.0, "tcp_close": 1.0})
    for out, flags, seq, ack in ((True, "S", 1000, 0), (False, "SA", 5000, 1001),
                                 (True, "A", 1001, 5001)):
        feed(ct, seg(out, flags, seq, ack, 0), 0.0, fast=False)
    assert ct.poll_at() == ct.table.poll_at() == 60.0
    assert feed(ct, seg(False, "R", 5001, 0, 0), 0.5, fast=False) == "established"
    assert ct.table.poll_at() == ct.poll_at() == 1.5


def test_the_fast_path_never_revives_a_connection_past_its_timeout() -> None:
    """The bridge runs timers after a batch: a frame may come before the expiry does."""
    ct = Conntrack(1000, {"tcp_established": 60.0})
    for out, flags, seq, ack in ((True, "S", 1000, 0), (False, "SA", 5000, 1001),
                                 (True, "A", 1001, 5001)):
        feed(ct, seg(out, flags, seq, ack, 0), 0.0, fast=False)
    assert ct.fast(seg(False, "A", 5001, 1001, 10), 1.0, 0) == "established"
    assert ct.fast(seg(False, "A", 5011, 1001, 10), 61.0, 0) is None, "due at 61: gone"
    assert feed(ct, seg(False, "A", 5011, 1001, 10), 61.0, fast=False) != "established"


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_sequence_order_is_the_kernels(a: int, b: int) -> None:
    """include/net/tcp.h: before(a, b) is (s32)(a - b) < 0, after(a, b) is before(b, a);
    a distance of exactly 2**31 is both (a random trace found the difference once)."""
    s32 = ((a - b) & 0xFFFFFFFF) - (1 << 32 if (a - b) & 0x80000000 else 0)
    assert tcpct.before(a, b) == (s32 < 0)
    assert tcpct.after(b, a) == (s32 < 0)
    assert tcpct.before(0, 2**31) and tcpct.before(2**31, 0)
