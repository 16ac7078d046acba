"""The IP puzzles' cryptography: server secret ring, cookies, range puzzles, client nonces.

Theory of operation (after Feng et al.'s IP puzzles, issue 15):

- The server keeps a :class:`SecretRing` of ``size`` random 32-byte keys and a
  logical *server timestamp* (u16, wraps), advanced one *tick* at a time
  (default 1 s). Advancing to timestamp ``t`` replaces the key of slot
  ``t mod size`` by a fresh one, so the key for any timestamp of the last
  ``size`` ticks is in its slot and older ones are gone. ``size`` must be a
  power of two (it then divides 2**16 and the slots stay consecutive across the
  u16 wrap). The server keeps no per-client or per-puzzle state.
- A puzzle for a packet from ``src`` to ``dst`` with protocol ``proto``, carrying
  the client's nonce and timestamp, is the keyed BLAKE2s (the key of the
  current timestamp, 16-byte digest) of ``src dst nonce client_ts server_ts
  maturity expiry proto version`` (22 bytes, the layout of ``_COOKIE_IN``). The
  digest gives, in order: the *answer* (4 bytes), the *cookie hash* (8) and a
  4-byte *offset seed*. The range is ``[rmin, rmax]`` with
  ``rmin = answer - seed % D`` and ``rmax = rmin + D - 1``, all mod 2**32: the
  range may wrap past 0xFFFFFFFF (``rmax < rmin``), and the solver counts
  ``D`` candidates from ``rmin`` modulo 2**32. The *puzzle hash* is the
  unkeyed BLAKE2s (8 bytes, personalised ``vtl-pz1``) of ``cookie ‖ answer``:
  the cookie salts it, so no table precomputed over the answer space helps.
  The client scans the range: (D + 1) / 2 hashes expected, adjustable one hash
  at a time.
- An answered packet carries the client info (nonce, timestamp) and the answer
  option (answer, server timestamp, maturity, expiry, cookie). Verification
  rejects, *without hashing*: a server timestamp in the future (``invalid``),
  one at least ``size`` ticks old (``stale``: its key is gone), one older than
  its ``expiry`` (``expired``) or younger than its ``maturity``
  (``immature``); then recomputes the keyed hash and compares answer and
  cookie (12 bytes) with :func:`hmac.compare_digest`. Maturity and expiry are
  counted in ticks, ``age = (now - server_ts) mod 2**16``, valid when
  ``maturity <= age <= expiry``.
- The client proxy's nonce is a keyed BLAKE2s (its own local key) of
  ``src dst proto client_ts``; an echoed puzzle is checked by recomputing it,
  with no state, and refused when its client timestamp (u32 milliseconds,
  wraps) is older than a window or in the future.

Deviations from the issue's proposal, and why:

- The random offset placing the range around the answer is not drawn from a
  random source per puzzle but taken from the same keyed digest (its last 4
  bytes): it is as unpredictable without the key, costs no extra call, and the
  same request gets the same puzzle (nothing learnt by asking again).
- The difficulty ``D`` is the range width (the number of candidates), not the
  expected number of hashes (``(D + 1) / 2``); ``1 <= D <= MAX_DIFFICULTY``.
- The ring size must be a power of two (see above); ``expiry`` must be below
  it, so an answer's key outlives the answer.

What it does not do: no I/O and no clock (time comes in as ``now``); nothing
here parses packets (see ``wire``); the solver is a plain loop for a worker
process, it holds the GIL.
"""

from __future__ import annotations

import enum
import hmac
import os
import struct
from collections.abc import Callable
from hashlib import blake2s
from typing import NamedTuple, Protocol

VERSION = 1
KEY_LEN = 32
MAX_DIFFICULTY = 0xFFFFFFFF
_DIGEST = 16
_COOKIE_IN = struct.Struct("!4s4sIIHBBBB")  # src dst nonce cts sts maturity expiry proto version
_NONCE_IN = struct.Struct("!4s4sBI")  # src dst proto cts
_PUZZLE_HASH = blake2s(digest_size=8, person=b"vtl-pz1")
_ANSWER_SEED = struct.Struct("!I8xI")
_M32 = 0xFFFFFFFF
_new = tuple.__new__

RandomSource = Callable[[int], bytes]


class Verdict(enum.StrEnum):
    """What verification says of an answer (or a client nonce)."""

    VALID = "valid"
    INVALID = "invalid"
    EXPIRED = "expired"
    IMMATURE = "immature"
    STALE = "stale"


class Puzzle(NamedTuple):
    """One puzzle as the server issues it (and the client echoes in its answer).

    ``difficulty`` is the range width D; ``rmax == (rmin + D - 1) mod 2**32``;
    ``cookie`` and ``phash`` are 8 bytes each.
    """

    server_ts: int
    maturity: int
    expiry: int
    difficulty: int
    cookie: bytes
    rmin: int
    rmax: int
    phash: bytes


class Solvable(Protocol):
    """What :func:`solve` reads of a puzzle (a :class:`Puzzle` has it)."""

    @property
    def cookie(self) -> bytes: ...
    @property
    def rmin(self) -> int: ...
    @property
    def difficulty(self) -> int: ...
    @property
    def phash(self) -> bytes: ...


class SecretRing:
    """The server's ring of keys indexed by the logical server timestamp (u16).

    ``random`` gives the key bytes (default :func:`os.urandom`); ``start`` is
    the first timestamp (default: random). :meth:`tick` advances one tick;
    :meth:`advance` advances to a clock reading ``now`` (seconds, monotonic).
    """

    __slots__ = ("size", "tick_s", "now", "_mask", "_keys", "_random", "_epoch", "_ticks")

    def __init__(self, size: int = 256, tick_s: float = 1.0,
                 random: RandomSource = os.urandom, start: int | None = None) -> None:
        if size < 2 or size > 0x10000 or size & (size - 1):
            raise ValueError(f"ring size must be a power of two in 2..65536, not {size}")
        if tick_s <= 0:
            raise ValueError("tick_s must be positive")
        self.size = size
        self.tick_s = tick_s
        self._mask = size - 1
        self._random = random
        self.now = (int.from_bytes(random(2), "big") if start is None else start) & 0xFFFF
        self._keys = [self._hasher() for _ in range(size)]
        self._epoch: float | None = None
        self._ticks = 0

    def _hasher(self) -> blake2s:  # type: ignore[valid-type]
        key = self._random(KEY_LEN)
        if len(key) != KEY_LEN:
            raise ValueError(f"random source gave {len(key)} bytes, not {KEY_LEN}")
        return blake2s(key=key, digest_size=_DIGEST)

    def tick(self) -> None:
        """Advance the server timestamp by one; the new timestamp's slot gets a fresh key."""
        self.now = (self.now + 1) & 0xFFFF
        self._keys[self.now & self._mask] = self._hasher()

    def advance(self, now: float) -> int:
        """Advance by the ticks elapsed since the first call; returns how many.

        More than ``size`` ticks at once replace every key once (older keys are
        out of the window anyway).
        """
        if self._epoch is None:
            self._epoch = now
            return 0
        due = int((now - self._epoch) / self.tick_s) - self._ticks
        if due <= 0:
            return 0
        self._ticks += due
        if due >= self.size:
            self.now = (self.now + due - self.size) & 0xFFFF
            due_keys = self.size
        else:
            due_keys = due
        for _ in range(due_keys):
            self.tick()
        return due

    def next_at(self) -> float | None:
        """When (on :meth:`advance`'s clock) the next tick is due; None before the first
        call."""
        return None if self._epoch is None else self._epoch + (self._ticks + 1) * self.tick_s

    def age(self, server_ts: int) -> int:
        """Ticks since ``server_ts`` (u16 arithmetic; >= 0x8000 means the future)."""
        return (self.now - server_ts) & 0xFFFF

    def hasher(self, server_ts: int) -> blake2s:  # type: ignore[valid-type]
        """The keyed hash prototype of ``server_ts``'s slot (copy it before use)."""
        return self._keys[server_ts & self._mask]


def _digest(ring: SecretRing, src: bytes, dst: bytes, nonce: int, client_ts: int,
            server_ts: int, maturity: int, expiry: int, proto: int, version: int) -> bytes:
    h = ring._keys[server_ts & ring._mask].copy()
    h.update(_COOKIE_IN.pack(src, dst, nonce, client_ts, server_ts, maturity, expiry, proto,
                             version))
    return h.digest()


def puzzle_hash(cookie: bytes, answer: int) -> bytes:
    """The puzzle hash of ``answer`` under ``cookie`` (8 bytes)."""
    h = _PUZZLE_HASH.copy()
    h.update(cookie + answer.to_bytes(4, "big"))
    return h.digest()


def make_puzzle(ring: SecretRing, src: bytes, dst: bytes, proto: int, nonce: int,
                client_ts: int, maturity: int, expiry: int, difficulty: int,
                version: int = VERSION) -> Puzzle:
    """A puzzle for the packet ``src -> dst`` (4-byte addresses) at ``ring.now``.

    Raises ValueError for ``maturity > expiry``, ``expiry >= ring.size`` (or
    256) or a difficulty outside ``1..MAX_DIFFICULTY`` (what the service was
    asked to do, not what a packet said).
    """
    if not 0 <= maturity <= expiry < ring.size or expiry > 255 or not 1 <= difficulty <= _M32:
        raise ValueError(f"bad puzzle parameters: maturity {maturity}, expiry {expiry}, "
                         f"difficulty {difficulty} (ring of {ring.size})")
    sts = ring.now
    h = ring._keys[sts & ring._mask].copy()
    h.update(_COOKIE_IN.pack(src, dst, nonce, client_ts, sts, maturity, expiry, proto, version))
    d = h.digest()
    answer, seed = _ANSWER_SEED.unpack(d)
    rmin = (answer - seed % difficulty) & _M32
    h = _PUZZLE_HASH.copy()
    h.update(d[4:12] + d[0:4])
    return _new(Puzzle, (sts, maturity, expiry, difficulty, d[4:12], rmin,
                         (rmin + difficulty - 1) & _M32, h.digest()))


def verify(ring: SecretRing, src: bytes, dst: bytes, proto: int, nonce: int, client_ts: int,
           answer: int, server_ts: int, maturity: int, expiry: int, cookie: bytes,
           version: int = VERSION) -> Verdict:
    """Check an answer carried by a packet ``src -> dst``; hashes only when the times fit."""
    age = (ring.now - server_ts) & 0xFFFF
    if age >= 0x8000:
        return Verdict.INVALID
    if age >= ring.size:
        return Verdict.STALE
    if age > expiry:
        return Verdict.EXPIRED
    if age < maturity:
        return Verdict.IMMATURE
    try:
        d = _digest(ring, src, dst, nonce, client_ts, server_ts, maturity, expiry, proto,
                    version)
    except struct.error:
        return Verdict.INVALID
    if hmac.compare_digest(d[0:12], answer.to_bytes(4, "big") + cookie):
        return Verdict.VALID
    return Verdict.INVALID


def solve(puzzle: Solvable) -> int | None:
    """The answer of ``puzzle`` (scans its range from ``rmin``), or None if none matches.

    A top-level function of picklable arguments: run it in a worker process.
    """
    proto = _PUZZLE_HASH.copy()
    proto.update(puzzle.cookie)
    target = puzzle.phash
    start = puzzle.rmin
    for i in range(puzzle.difficulty):
        cand = (start + i) & _M32
        h = proto.copy()
        h.update(cand.to_bytes(4, "big"))
        if h.digest() == target:
            return cand
    return None


class NonceKey:
    """The client proxy's local key: makes client nonces and checks echoed ones.

    ``window_ms`` is how old an echoed client timestamp may be (default 10 s);
    timestamps are u32 milliseconds (wrapping), ``now`` is in seconds.
    """

    __slots__ = ("window_ms", "_h")

    def __init__(self, key: bytes | None = None, window_ms: int = 10_000,
                 random: RandomSource = os.urandom) -> None:
        key = random(KEY_LEN) if key is None else key
        self.window_ms = window_ms
        self._h = blake2s(key=key, digest_size=4, person=b"vtl-pzn")

    @staticmethod
    def timestamp(now: float) -> int:
        """The client timestamp for ``now`` (seconds): milliseconds mod 2**32."""
        return int(now * 1000) & _M32

    def nonce(self, src: bytes, dst: bytes, proto: int, client_ts: int) -> int:
        """The nonce for a packet ``src -> dst`` (4-byte addresses) stamped ``client_ts``."""
        h = self._h.copy()
        h.update(_NONCE_IN.pack(src, dst, proto, client_ts))
        return int.from_bytes(h.digest(), "big")

    def make(self, src: bytes, dst: bytes, proto: int, now: float) -> tuple[int, int]:
        """``(nonce, client_ts)`` for a packet sent at ``now``."""
        cts = int(now * 1000) & _M32
        return self.nonce(src, dst, proto, cts), cts

    def check(self, src: bytes, dst: bytes, proto: int, nonce: int, client_ts: int,
              now: float) -> Verdict:
        """Is an echoed ``(nonce, client_ts)`` ours for ``src -> dst`` and recent?

        ``src``/``dst`` are those of the packet the nonce was made for (the
        client's), not of the puzzle that echoes it.
        """
        age = (int(now * 1000) - client_ts) & _M32
        if age >= 0x80000000:
            return Verdict.INVALID
        if age > self.window_ms:
            return Verdict.STALE
        try:
            mine = self.nonce(src, dst, proto, client_ts)
        except struct.error:
            return Verdict.INVALID
        return Verdict.VALID if hmac.compare_digest(
            mine.to_bytes(4, "big"), (nonce & _M32).to_bytes(4, "big")) else Verdict.INVALID
