#!/usr/bin/env python3
"""Benchmark: the IP puzzles' per-packet costs (issue 15), per core.

Section ``core`` (no root, no network): one Python thread timing the protocol
core of ``vtl.services.puzzle`` on prebuilt frames:

- server, generation: parse the options of a SYN carrying client info, make
  the puzzle (keyed BLAKE2s + puzzle hash), build the whole ICMP puzzle frame;
- server, verification: parse the options of a SYN carrying both options,
  verify the answer (keyed BLAKE2s, constant-time compare), strip the options;
  the frame is copied before each strip (the copy alone is timed and subtracted);
- server, no check needed: ``syn_without_ack`` on a data segment (the
  predicate in front of everything else), and ``parse_options`` of a header
  without options;
- client: make a nonce and insert the client-info option (frame copy
  subtracted); check the nonce of a parsed puzzle; hashes per second of the
  solver.

Section ``service`` (no root): the ``puzzle`` service's own ``process`` (server
role, a fake context), against an empty service's ``process`` called the same way:
the added cost of a frame that needs no check (a data segment toward the guest,
a frame from the guest), and a whole generation (SYN with client info -> puzzle
emitted) and verification (answered SYN -> stripped, passed; an answer with a
flipped cookie byte -> refused after hashing).

Section ``bridge`` (root): the server bridge of ``tests/integration/puzzlenet.py``
under a flood from the attacker's namespace (raw sockets, 100 spoofed sources,
budgets raised so that nothing is refused for rate): SYNs with client info (each
gets a puzzle), then SYNs with a wrong answer (each is hashed, refused and, as a first
packet would be, answered with a new puzzle). Rows:
what the bridge handled per second (its counters over the flood's time), and
what was sent.

Section ``connect`` (root): client VM -> client proxy -> router -> server
firewall -> server VM; ``connect()`` time with a fresh puzzle each time (the
answer expires after one tick), at difficulty 2^12, 2^16 and 2^20 expected
hashes, against the ping RTT of the same path.

Goal (issue 15): 100,000 generations and 100,000 verifications per second per
core (10 us each), at least 50,000 per second through a running bridge under a
flood, under 0.1 us for frames that need no check. Medians of ``--repeat`` runs
of ``--count`` operations each.

    .venv/bin/python benchmarks/puzzle.py [--sections core service bridge connect]
        [--repeat 5] [--count 100000]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from microbench import time_us
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from vtl.services.puzzle import cookie, wire

L3 = 14
SRC, DST = bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))


def _frames() -> tuple[bytearray, bytearray, bytearray, cookie.SecretRing, cookie.NonceKey]:
    """A SYN with client info, the same SYN answered (both options), a data segment."""
    syn = bytearray(bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") /
                          TCP(sport=40000, dport=80, flags="S", options=[("MSS", 1460)])))
    data = bytearray(bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") /
                           TCP(sport=40000, dport=80, flags="A") / (b"x" * 100)))
    ring = cookie.SecretRing(start=1000)
    key = cookie.NonceKey()
    nonce, cts = key.make(SRC, DST, 6, 100.0)
    with_info = bytearray(syn)
    assert wire.insert_options(with_info, L3, wire.client_info(nonce, cts))
    pz = cookie.make_puzzle(ring, SRC, DST, 6, nonce, cts, 0, 10, 16)
    answer = cookie.solve(pz)
    assert answer is not None
    answered = bytearray(syn)
    assert wire.insert_options(answered, L3, wire.client_info(nonce, cts) + wire.answer_option(
        answer, pz.server_ts, pz.maturity, pz.expiry, pz.cookie))
    return with_info, answered, data, ring, key


def section_core(count: int, repeat: int) -> list[tuple[str, float]]:
    """Rows ``(label, us per operation)`` of the protocol core, one thread."""
    with_info, answered, data, ring, key = _frames()
    parse, strip, verify = wire.parse_options, wire.strip_options, cookie.verify
    make, build = cookie.make_puzzle, wire.build_puzzle
    difficulty = 1 << 16
    o = parse(answered, L3)
    assert isinstance(o, wire.PuzzleOptions) and o.answer is not None
    assert verify(ring, SRC, DST, 6, o.nonce, o.client_ts, o.answer, o.server_ts, o.maturity,
                  o.expiry, o.cookie) is cookie.Verdict.VALID  # the loop takes the whole path

    def generation(n: int) -> None:
        f = with_info
        for _ in range(n):
            o = parse(f, L3)
            src, dst = f[26:30], f[30:34]
            pz = make(ring, src, dst, f[23], o.nonce, o.client_ts, 0, 10, difficulty)
            build(f, L3, pz, o.nonce, o.client_ts)

    def copies(n: int) -> None:
        for _ in range(n):
            bytearray(answered)

    def data_copies(n: int) -> None:
        for _ in range(n):
            bytearray(data)

    def verification(n: int) -> None:
        for _ in range(n):
            f = bytearray(answered)
            o = parse(f, L3)
            v = verify(ring, f[26:30], f[30:34], f[23], o.nonce, o.client_ts, o.answer,
                       o.server_ts, o.maturity, o.expiry, o.cookie)
            if v is cookie.Verdict.VALID:
                strip(f, L3)

    def no_check(n: int) -> None:
        f = data
        pred = wire.syn_without_ack
        for _ in range(n):
            pred(f, L3)

    def no_options(n: int) -> None:
        f = data
        for _ in range(n):
            parse(f, L3)

    def empty_loop(n: int) -> None:
        f = data
        for _ in range(n):
            f  # noqa: B018

    def client_insert(n: int) -> None:
        for _ in range(n):
            f = bytearray(data)
            nonce, cts = key.make(f[26:30], f[30:34], f[23], 100.0)
            wire.insert_options(f, L3, wire.client_info(nonce, cts))

    msg = build(with_info, L3, make(ring, SRC, DST, 6, 1, 2, 0, 10, difficulty), 1, 2)

    def client_check(n: int) -> None:
        for _ in range(n):
            m = wire.parse_puzzle(msg, L3)
            assert m is not None
            key.check(SRC, DST, 6, m.nonce, m.client_ts, 100.0)

    solve_pz = cookie.Puzzle(0, 0, 10, 1 << 16, b"\0" * 8, 0, 0xFFFF, b"\xff" * 8)

    def solver(n: int) -> None:
        for _ in range(max(1, n // (1 << 16))):
            cookie.solve(solve_pz)  # no match: scans the whole range

    base = time_us(empty_loop, count, repeat)
    copy = time_us(copies, count, repeat)
    data_copy = time_us(data_copies, count, repeat)
    rows = [
        ("server: generation (parse + puzzle + ICMP frame)", time_us(generation, count, repeat)),
        ("server: verification (parse + verify + strip)",
         time_us(verification, count, repeat) - copy),
        ("server: no check needed (syn_without_ack)", time_us(no_check, count, repeat) - base),
        ("server: parse_options, header without options",
         time_us(no_options, count, repeat) - base),
        ("client: nonce + insert client info", time_us(client_insert, count, repeat) - data_copy),
        ("client: parse puzzle + check nonce", time_us(client_check, count, repeat)),
        ("client: solver, per hash", time_us(solver, max(count, 1 << 16), repeat)),
        ("(frame copies, subtracted above)", copy),
        ("(empty loop, subtracted above)", base),
    ]
    return rows


SECTIONS: dict[str, Callable[[argparse.Namespace], list[tuple[str, float]]]] = {
    "core": lambda a: section_core(a.count, a.repeat),
    "service": lambda a: section_service(a.count, a.repeat),
    "bridge": lambda a: __import__("bench_puzzle_net").section_bridge(a.repeat),
    "connect": lambda a: __import__("bench_puzzle_net").section_connect(a.repeat),
}


def section_service(count: int, repeat: int) -> list[tuple[str, float]]:
    from vtl.services.puzzle import Puzzle

    from vtl import Direction, Frame, Service
    from vtl.testing import FakeContext

    down, up = Direction.TO_GUEST, Direction.TO_UPLINK
    ctx = FakeContext("puzzle")
    svc = Puzzle(Puzzle.Options(role="server", difficulty=8, client_rate=1e9,
                                client_burst=1 << 30, puzzle_rate=1e9,
                                puzzle_burst=1 << 30), ctx)
    svc.start(0.0)
    assert svc.server is not None
    empty = Service(None, ctx)
    with_info, _, data, _, key = _frames()
    f_data = Frame(data)
    ring = svc.server.ring
    nonce, cts = key.make(SRC, DST, 6, 1.0)
    pz = cookie.make_puzzle(ring, SRC, DST, 6, nonce, cts, 0, 10, 15)
    answer = cookie.solve(pz)
    assert answer is not None
    syn = bytearray(with_info)
    wire.strip_options(syn, L3)
    good = bytearray(syn)
    wire.insert_options(good, L3, wire.client_info(nonce, cts) + wire.answer_option(
        answer, pz.server_ts, 0, 10, pz.cookie))
    bad = bytearray(good)
    bad[L3 + 20 + wire.INFO_LEN + 14] ^= 1  # a cookie byte: refused after the keyed hash
    p = svc.process

    def baseline(n: int) -> None:
        for _ in range(n):
            empty.process(f_data, down, 1.0)

    def no_check(n: int) -> None:
        for _ in range(n):
            p(f_data, down, 1.0)

    def from_guest(n: int) -> None:
        for _ in range(n):
            p(f_data, up, 1.0)

    def generate(n: int) -> None:
        for _ in range(n):
            p(Frame(bytearray(with_info)), down, 1.0)
        ctx.emitted.clear()

    def verify_ok(n: int) -> None:
        for _ in range(n):
            p(Frame(bytearray(good)), down, 1.0)

    def verify_bad(n: int) -> None:
        for _ in range(n):
            p(Frame(bytearray(bad)), down, 1.0)

    def frames(n: int) -> None:
        for _ in range(n):
            Frame(bytearray(good))

    base, mk = time_us(baseline, count, repeat), time_us(frames, count, repeat)
    rows = [
        ("service: no check needed, toward the guest (added)",
         time_us(no_check, count, repeat) - base),
        ("service: a frame from the guest (added)", time_us(from_guest, count, repeat) - base),
        ("service: SYN + client info -> puzzle emitted", time_us(generate, count, repeat) - mk),
        ("service: answered SYN -> verified, stripped", time_us(verify_ok, count, repeat) - mk),
        ("service: wrong answer -> hashed, refused, new puzzle",
         time_us(verify_bad, count, repeat) - mk),
        ("(an empty service's process, subtracted above)", base),
    ]
    assert ctx.counters.extra["answers_valid"] and ctx.counters.extra["answers_invalid"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=["core"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--count", type=int, default=100_000, help="operations per run")
    args = ap.parse_args()
    for name in args.sections:
        rows = SECTIONS[name](args)
        print(f"\n[{name}]")
        print(f"{'measure':52} {'us/op':>8} {'ops/s per core':>15}")
        for label, us in rows:
            rate = 1e6 / us if us > 0 else float("inf")
            print(f"{label:52} {us:8.3f} {rate:15,.0f}")
    print(f"\n(median of {args.repeat} runs of {args.count} operations; {os.cpu_count()} CPUs; "
          "one thread. Goal of issue 15: 100,000 generations and verifications per second per "
          "core, under 0.1 us for frames that need no check)")


if __name__ == "__main__":
    main()
