"""The puzzle service's cryptography: the secret ring, puzzles, verification, nonces, and
the whole exchange over the wire formats."""

from __future__ import annotations

import itertools
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from vtl.services.puzzle import cookie, wire
from vtl.services.puzzle.cookie import NonceKey, Puzzle, SecretRing, Verdict

A, B, C = bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)), bytes((10, 0, 0, 3))


def counter_random() -> cookie.RandomSource:
    """Distinct, reproducible 'random' bytes."""
    n = itertools.count(1)
    return lambda k: next(n).to_bytes(k, "big")


def ring(size: int = 16, start: int = 100) -> SecretRing:
    return SecretRing(size=size, start=start, random=counter_random())


def answer_of(r: SecretRing, pz: Puzzle) -> int:
    a = cookie.solve(pz)
    assert a is not None
    return a


def check(r: SecretRing, pz: Puzzle, answer: int, src: bytes = A, dst: bytes = B,
          proto: int = 6, nonce: int = 7, cts: int = 8) -> Verdict:
    return cookie.verify(r, src, dst, proto, nonce, cts, answer, pz.server_ts, pz.maturity,
                         pz.expiry, pz.cookie)


def test_ring_size_is_a_power_of_two() -> None:
    for bad in (0, 1, 3, 100, 1 << 17):
        with pytest.raises(ValueError):
            SecretRing(size=bad)
    assert SecretRing(size=1 << 16).size == 1 << 16


def test_tick_replaces_only_the_new_timestamps_key() -> None:
    r = ring(size=8, start=0xFFFE)
    before = [r.hasher(t).digest() for t in range(8)]
    r.tick()
    assert r.now == 0xFFFF
    after = [r.hasher(t).digest() for t in range(8)]
    assert [i for i in range(8) if before[i] != after[i]] == [0xFFFF & 7]
    r.tick()  # wraps to 0: slot 0
    assert r.now == 0 and r.hasher(0).digest() != after[0]


def test_advance_follows_the_clock() -> None:
    r = ring(size=8, start=10)
    assert r.advance(1000.0) == 0  # the first reading sets the epoch
    assert r.advance(1000.9) == 0 and r.now == 10
    assert r.advance(1003.0) == 3 and r.now == 13
    keys = [r.hasher(t).digest() for t in range(8)]
    assert r.advance(1003.5) == 0
    assert r.advance(1100.0) == 97 and r.now == 110
    assert all(r.hasher(t).digest() != keys[t & 7] for t in range(8))  # all replaced


def test_solve_finds_the_answer_in_the_range() -> None:
    r = ring()
    for nonce in range(30):
        pz = cookie.make_puzzle(r, A, B, 6, nonce, 8, 0, 10, 200)
        assert (pz.rmax - pz.rmin) & 0xFFFFFFFF == 199
        a = answer_of(r, pz)
        assert (a - pz.rmin) & 0xFFFFFFFF < 200
        assert cookie.puzzle_hash(pz.cookie, a) == pz.phash
        assert check(r, pz, a, nonce=nonce) is Verdict.VALID


def test_range_wraps_past_2_32() -> None:
    r = ring()
    for nonce in range(200):
        pz = cookie.make_puzzle(r, A, B, 6, nonce, 8, 0, 10, 1 << 31)
        if pz.rmax < pz.rmin:
            break
    else:
        pytest.fail("no wrapped range in 200 puzzles of width 2**31")
    d = cookie._digest(r, A, B, nonce, 8, pz.server_ts, 0, 10, 6, cookie.VERSION)
    a = int.from_bytes(d[:4])
    assert (a - pz.rmin) & 0xFFFFFFFF < 1 << 31
    assert cookie.puzzle_hash(pz.cookie, a) == pz.phash
    assert check(r, pz, a, nonce=nonce) is Verdict.VALID
    # the solver counts across the wrap
    small = Puzzle(0, 0, 1, 32, b"c" * 8, 0xFFFFFFF0, 15, cookie.puzzle_hash(b"c" * 8, 5))
    assert cookie.solve(small) == 5
    assert cookie.solve(small._replace(phash=b"\0" * 8)) is None


def test_same_request_same_puzzle_other_request_other_puzzle() -> None:
    r = ring()
    assert cookie.make_puzzle(r, A, B, 6, 7, 8, 0, 10, 64) == \
        cookie.make_puzzle(r, A, B, 6, 7, 8, 0, 10, 64)
    assert cookie.make_puzzle(r, A, B, 6, 7, 8, 0, 10, 64).cookie != \
        cookie.make_puzzle(r, C, B, 6, 7, 8, 0, 10, 64).cookie


@pytest.mark.parametrize("args", [(3, 2, 10), (0, 16, 10), (0, 10, 0), (0, 10, 1 << 32)])
def test_bad_parameters_are_refused(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        cookie.make_puzzle(ring(size=16), A, B, 6, 7, 8, *args)


def test_times_maturity_expiry_stale_future() -> None:
    r = ring(size=16)
    pz = cookie.make_puzzle(r, A, B, 6, 7, 8, 2, 5, 16)
    a = answer_of(r, pz)
    verdicts = []
    for _ in range(8):
        verdicts.append(check(r, pz, a))
        r.tick()
    assert verdicts == [Verdict.IMMATURE] * 2 + [Verdict.VALID] * 4 + [Verdict.EXPIRED] * 2
    for _ in range(8):
        r.tick()
    assert check(r, pz, a) is Verdict.STALE  # 16 ticks: the key is gone
    r2 = ring(size=16)
    assert check(r2, pz._replace(server_ts=r2.now + 3), a) is Verdict.INVALID  # future


def test_time_verdicts_come_without_hashing() -> None:
    r = ring(size=16)
    pz = cookie.make_puzzle(r, A, B, 6, 7, 8, 2, 5, 16)

    class NoHash:
        def copy(self) -> None:
            raise AssertionError("hashed")

    r._keys[pz.server_ts & 15] = NoHash()  # type: ignore[assignment]
    assert check(r, pz, 0) is Verdict.IMMATURE
    for _ in range(6):
        r.tick()
    r._keys[pz.server_ts & 15] = NoHash()  # type: ignore[assignment]
    assert check(r, pz, 0) is Verdict.EXPIRED
    assert check(r, pz._replace(server_ts=pz.server_ts - 40), 0) is Verdict.STALE


def test_answers_bound_to_flow_and_key() -> None:
    r = ring()
    pz = cookie.make_puzzle(r, A, B, 6, 7, 8, 0, 10, 64)
    a = answer_of(r, pz)
    assert check(r, pz, a) is Verdict.VALID
    assert check(r, pz, a, src=C) is Verdict.INVALID  # replay from another source
    assert check(r, pz, a, dst=C) is Verdict.INVALID
    assert check(r, pz, a, proto=17) is Verdict.INVALID
    assert check(r, pz, a, nonce=8) is Verdict.INVALID
    assert check(r, pz, a, cts=9) is Verdict.INVALID
    assert check(r, pz, (a + 1) & 0xFFFFFFFF) is Verdict.INVALID
    assert check(r, pz._replace(expiry=11), a) is Verdict.INVALID
    r.tick()
    assert check(r, pz, a) is Verdict.VALID
    assert check(r, pz._replace(maturity=1), a) is Verdict.INVALID
    other = SecretRing(size=16, start=r.now)  # another server (or a restart): other keys
    assert check(other, pz, a) is Verdict.INVALID


def test_nonce_make_and_check() -> None:
    key = NonceKey(window_ms=2000)
    nonce, cts = key.make(A, B, 6, 1000.0)
    assert cts == 1_000_000
    assert key.check(A, B, 6, nonce, cts, 1001.5) is Verdict.VALID
    assert key.check(A, B, 6, nonce, cts, 1002.1) is Verdict.STALE
    assert key.check(A, B, 6, nonce, cts, 999.0) is Verdict.INVALID  # from the future
    assert key.check(C, B, 6, nonce, cts, 1000.5) is Verdict.INVALID
    assert key.check(A, B, 17, nonce, cts, 1000.5) is Verdict.INVALID
    assert key.check(A, B, 6, nonce ^ 1, cts, 1000.5) is Verdict.INVALID
    assert key.check(A, B, 6, nonce, cts + 1, 1000.5) is Verdict.INVALID
    assert NonceKey().check(A, B, 6, nonce, cts, 1000.5) is Verdict.INVALID  # other key


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_spoofed_nonces_are_refused(nonce: int, cts: int) -> None:
    key = NonceKey(key=b"k" * 32)
    now = 5000.0
    verdict = key.check(A, B, 6, nonce, cts, now)
    assert verdict is not Verdict.VALID or nonce == key.nonce(A, B, 6, cts)


def test_nonce_timestamps_wrap() -> None:
    key = NonceKey(window_ms=2000)
    t = (2**32 - 500) / 1000  # 500 ms before the u32 millisecond wrap
    nonce, cts = key.make(A, B, 6, t)
    assert key.check(A, B, 6, nonce, cts, t + 1.0) is Verdict.VALID
    assert key.check(A, B, 6, nonce, cts, t + 3.0) is Verdict.STALE


def test_solver_runs_in_a_worker_process() -> None:
    r = ring()
    pz = cookie.make_puzzle(r, A, B, 6, 7, 8, 0, 10, 4096)
    assert pickle.loads(pickle.dumps(pz)) == pz
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        assert pool.submit(cookie.solve, pz).result(timeout=60) == answer_of(r, pz)


# -- the whole exchange over the wire formats ------------------------------------------


def syn() -> bytearray:
    return bytearray(bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") /
                           IP(src="10.0.0.1", dst="10.0.0.2") /
                           TCP(sport=40000, dport=80, flags="S", options=[("MSS", 1460)])))


def exchange() -> tuple[SecretRing, bytearray, bytearray]:
    """Client proxy and server firewall through to an answered SYN; returns the ring,
    the original SYN and the answered one."""
    r, key, l3 = ring(size=32), NonceKey(), 14
    original = syn()
    pkt = bytearray(original)
    nonce, cts = key.make(pkt[26:30], pkt[30:34], pkt[23], 50.0)
    assert wire.insert_options(pkt, l3, wire.client_info(nonce, cts))
    # server: no answer -> puzzle
    o = wire.parse_options(pkt, l3)
    assert isinstance(o, wire.PuzzleOptions) and o.answer is None and o.nonce is not None
    pz = cookie.make_puzzle(r, pkt[26:30], pkt[30:34], pkt[23], o.nonce, o.client_ts, 1, 20,
                            500)
    msg = wire.build_puzzle(pkt, l3, pz, o.nonce, o.client_ts)
    # client: check the echo against the quoted packet, solve, answer
    m = wire.parse_puzzle(msg, l3)
    assert m is not None
    q = m.quote
    assert key.check(msg[q + 12 : q + 16], msg[q + 16 : q + 20], m.proto, m.nonce,
                     m.client_ts, 50.2) is Verdict.VALID
    a = cookie.solve(m.puzzle)
    assert a is not None
    p = m.puzzle
    answered = bytearray(original)
    assert wire.insert_options(answered, l3, wire.client_info(m.nonce, m.client_ts) +
                               wire.answer_option(a, p.server_ts, p.maturity, p.expiry,
                                                  p.cookie))
    r.tick()  # mature
    return r, original, answered


def server_verdict(r: SecretRing, pkt: bytearray) -> Verdict:
    o = wire.parse_options(pkt, 14)
    if not isinstance(o, wire.PuzzleOptions) or o.answer is None or o.nonce is None:
        return Verdict.INVALID
    return cookie.verify(r, pkt[26:30], pkt[30:34], pkt[23], o.nonce, o.client_ts, o.answer,
                         o.server_ts, o.maturity, o.expiry, o.cookie)


def test_exchange_delivers_the_plain_syn() -> None:
    r, original, answered = exchange()
    assert server_verdict(r, answered) is Verdict.VALID
    assert wire.strip_options(answered, 14)
    assert answered == original


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_flipped_byte_of_our_options_is_rejected(mask: int) -> None:
    r, _, answered = exchange()
    for i in range(14 + 20, 14 + 20 + 32):  # client info (12) then answer (20)
        bad = bytearray(answered)
        bad[i] ^= mask
        assert server_verdict(r, bad) is not Verdict.VALID, (i - 34, mask)


def test_replays_are_rejected() -> None:
    r, _, answered = exchange()
    other = bytearray(answered)
    other[26:30] = C  # another source (checksums do not matter to the verdict)
    assert server_verdict(r, other) is Verdict.INVALID
    for _ in range(20):  # age 21 (a tick went by to mature it)
        r.tick()
    assert server_verdict(r, answered) is Verdict.EXPIRED
    for _ in range(11):  # age 32: the ring's span
        r.tick()
    assert server_verdict(r, answered) is Verdict.STALE


def test_stale_spoofed_puzzle_is_refused_by_the_client() -> None:
    key = NonceKey(window_ms=3000)
    pkt = syn()
    nonce, cts = key.make(pkt[26:30], pkt[30:34], 6, 50.0)
    assert wire.insert_options(pkt, 14, wire.client_info(nonce, cts))
    pz = cookie.make_puzzle(ring(), pkt[26:30], pkt[30:34], 6, nonce, cts, 0, 10, 16)
    msg = wire.build_puzzle(pkt, 14, pz, nonce, cts)
    m = wire.parse_puzzle(msg, 14)
    assert m is not None
    assert key.check(A, B, 6, m.nonce, m.client_ts, 60.0) is Verdict.STALE  # replayed late
    spoofed = wire.build_puzzle(pkt, 14, pz, nonce ^ 0x5A5A, cts)  # a guessed nonce
    m = wire.parse_puzzle(spoofed, 14)
    assert m is not None
    assert key.check(A, B, 6, m.nonce, m.client_ts, 50.1) is Verdict.INVALID
