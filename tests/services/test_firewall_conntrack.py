"""firewall conntrack: the fast path for established ACKs changes exactly what the full path does.

Two trackers see the same random segments of one connection (after a handshake):
one tries :meth:`Conntrack.fast_tcp` first, as the service does, the other always
takes the full :meth:`Conntrack.lookup`. After every segment both must agree on
what they answered and on everything they know (states, windows, flags, counters).
"""

from __future__ import annotations

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
                    c.last_index, c.last_dir, c.retrans, c.last_seg, c.timeout,
                    tuple((s.td_end, s.td_maxend, s.td_maxwin, s.td_maxack, s.td_scale,
                           s.flags) for s in c.seen)))
    return out


def feed(ct: Conntrack, data: bytearray, now: float, fast: bool) -> str:
    if fast and ct.fast_tcp(data, now) is not None:
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
    assert ct.fast_tcp(seg(False, "PA", 5001, 1001, 100), 0.2) is not None
    assert ct.fast_tcp(seg(False, "PA", 5101, 1001, 100, ts=True), 0.2) is not None
    assert ct.fast_tcp(seg(False, "FA", 5201, 1001, 0), 0.3) is None, "a FIN: full path"
    assert ct.fast_tcp(seg(False, "A", 5201 + (1 << 30), 1001, 0), 0.3) is None
