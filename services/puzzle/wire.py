"""The IP puzzles' wire formats: two IPv4 options and one ICMP message, on bytearrays.

All functions take a whole Ethernet frame and the offset ``l3`` of its IPv4
header (after any VLAN tags), and run per packet: they read and write the
bytes with ``struct`` and integer sums instead of the :mod:`vtl.packet` views
(building a ``Packet`` and an ``IPv4`` view costs more than the whole check).

IP options (both type 0x9E: copy=1, class 0, number 30, the RFC 4727
experimental codepoint). The third byte is ``version << 4 | kind``: version 1,
kind 1 = client info, kind 2 = answer; the fourth is reserved and must be 0 in
version 1 (no byte of an option can change without the option being refused:
the cookie covers the others).

    client info, 12 bytes            answer, 20 bytes
    0  type 0x9E                     0  type 0x9E
    1  length 12                     1  length 20
    2  0x11 (version 1, kind 1)      2  0x12 (version 1, kind 2)
    3  reserved                      3  reserved
    4  client nonce (u32)            4  answer (u32)
    8  client timestamp (u32, ms)    8  server timestamp (u16)
                                     10 maturity (u8, ticks)  11 expiry (u8, ticks)
                                     12 cookie hash (8 bytes)

An option of type 0x9E with another version is someone else's and is left
alone; version 1 with an unknown kind, a length that does not match its kind
or a reserved byte that is not 0, or a kind present twice, makes the list
*malformed*. Our options are inserted
first, right after the fixed header (an EOL ending the existing options would
otherwise hide them); other options keep their order.

Header arithmetic: inserting or removing options changes IHL, total length and
the bytes covered by the header checksum. The checksum is updated
incrementally from the old and new headers (RFC 1624 eqn. 3 over whole
headers), so a header that arrived with a bad checksum keeps a bad one. The
TCP/UDP checksum needs no change: its pseudo-header holds the L4 length, and
options change IHL and total length by the same amount.

The puzzle ICMP message (type 38 by default, code = version), after the
triggering packet's IP header and 8 bytes are quoted, as ICMP errors do:

    0  type (38)  1 code (1)  2 checksum (over the whole ICMP message)
    4  identifier (u16)        6  sequence (u16)
    8  number of puzzles (1)   9  protocol   10 server timestamp (u16)
    12 echoed client nonce (u32)
    16 echoed client timestamp (u32)
    20 maturity (u8)  21 expiry (u8)  22 reserved (u16, 0)
    24 difficulty D (u32, range width)
    28 cookie hash (8 bytes)
    36 range min (u32)         40 range max (u32, = min + D - 1 mod 2**32)
    44 puzzle hash (8 bytes)
    52 quoted IPv4 header (with its options) + first 8 bytes of its payload

It is sent from the protected address to the client: the triggering frame's
MACs and addresses swapped, its VLAN tags kept, TTL 64, DF clear.

What it does not do: IPv6 (no options there; the service passes it or drops
it), fragments (options go in the first fragment only, the service decides),
MSS clamping (``services/tunnel/wire.py`` has ``clamp_mss`` but a service
may not import another: it belongs in ``vtl.packet``), and virtio-net
checksum offsets (``csum_start`` moves with the options: the service's job).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from vtl.services.puzzle.cookie import VERSION, Puzzle

OPT_TYPE = 0x9E
KIND_INFO = 1
KIND_ANSWER = 2
INFO_LEN = 12
ANSWER_LEN = 20
ICMP_PUZZLE = 38
PUZZLE_HLEN = 52
MAX_OPTIONS = 40
_VK_INFO = (VERSION << 4) | KIND_INFO
_VK_ANSWER = (VERSION << 4) | KIND_ANSWER
_SIG_INFO = bytes((OPT_TYPE, INFO_LEN, _VK_INFO, 0))
_SIG_ANSWER = bytes((OPT_TYPE, ANSWER_LEN, _VK_ANSWER, 0))
_INFO = struct.Struct("!4sII")  # signature, nonce, client timestamp
_ANSWER = struct.Struct("!4sIHBB8s")  # signature, answer, server ts, maturity, expiry, cookie
_BOTH = struct.Struct("!4sII4sIHBB8s")
_SIGS = struct.Struct("!4s8x4s")
_B0_TL = struct.Struct("!BxH")
_B0_TL_CSUM = struct.Struct("!BxH6xH")
_U16 = struct.Struct("!H")
_IP = "!BBHHHBBH4s4s"
_MSG = struct.Struct("!BBHHHBBHIIBBHI8sII8s")
_IP_MSG = struct.Struct(_IP + _MSG.format[1:])
_M = 0xFFFF
_new = tuple.__new__


class PuzzleOptions(NamedTuple):
    """Our options found in a header. ``nonce`` is None without a client-info option,
    ``answer`` None without an answer option (their other fields are then 0 / empty)."""

    nonce: int | None
    client_ts: int
    answer: int | None
    server_ts: int
    maturity: int
    expiry: int
    cookie: bytes


class Malformed:
    """The type of :data:`MALFORMED`: the option list cannot be read."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MALFORMED"

    def __bool__(self) -> bool:
        return False


MALFORMED = Malformed()


class PuzzleMessage(NamedTuple):
    """A parsed puzzle ICMP message; ``quote`` is the offset of the quoted IP header."""

    ident: int
    seq: int
    proto: int
    nonce: int
    client_ts: int
    puzzle: Puzzle
    quote: int


def client_info(nonce: int, client_ts: int) -> bytes:
    """The 12-byte client-info option."""
    return _INFO.pack(_SIG_INFO, nonce, client_ts)


def answer_option(answer: int, server_ts: int, maturity: int, expiry: int,
                  cookie: bytes) -> bytes:
    """The 20-byte answer option."""
    return _ANSWER.pack(_SIG_ANSWER, answer, server_ts, maturity, expiry, cookie)


def _ihl_ok(buf: bytearray, l3: int) -> int:
    """The header length of a sound IPv4 datagram at ``l3``, or 0."""
    n = len(buf)
    if n < l3 + 20 or l3 < 0:
        return 0
    b0, tl = _B0_TL.unpack_from(buf, l3)
    hl = (b0 & 15) << 2
    if b0 >> 4 != 4 or hl < 20 or tl < hl or l3 + tl > n:
        return 0
    return hl


def _patch(buf: bytearray, l3: int, delta: int, s: int) -> None:
    """Options ``delta`` bytes longer (negative: shorter) at the front of the header at
    ``l3``, which now sum to ``s`` more (mod 0xFFFF): fix IHL, total length and checksum.

    Header words behind the changed span keep their alignment (``delta`` is a
    multiple of 4), so RFC 1624 eqn. 3 needs only the IHL word, the total length
    word and the options' sum: ``~c' = ~c + (delta << 6) + delta + s``.
    """
    b0, tl, c = _B0_TL_CSUM.unpack_from(buf, l3)
    x = ((~c & _M) + (delta << 6) + delta + s) % _M
    buf[l3] = b0 + (delta >> 2)
    _U16.pack_into(buf, l3 + 2, tl + delta)
    _U16.pack_into(buf, l3 + 10, ~(x if x else _M) & _M)


def _rewrite(buf: bytearray, l3: int, hl: int, opts: bytes) -> None:
    """Replace all the options of the header at ``l3`` (length ``hl``) by ``opts`` (a
    multiple of 4, at most 40 bytes), fixing IHL, total length and checksum from the
    sums of the whole old and new headers (any alignment of what changed)."""
    old = int.from_bytes(buf[l3 : l3 + hl]) % _M
    delta = len(opts) + 20 - hl
    buf[l3 + 20 : l3 + hl] = opts
    buf[l3] = 0x40 | ((20 + len(opts)) >> 2)
    tl = ((buf[l3 + 2] << 8) | buf[l3 + 3]) + delta
    _U16.pack_into(buf, l3 + 2, tl)
    new = int.from_bytes(buf[l3 : l3 + 20 + len(opts)]) % _M
    c = (buf[l3 + 10] << 8) | buf[l3 + 11]
    x = ((~c & _M) + new + _M - old) % _M
    _U16.pack_into(buf, l3 + 10, ~(x if x else _M) & _M)


def insert_options(buf: bytearray, l3: int, opts: bytes) -> bool:
    """Insert ``opts`` (ours: a multiple of 4 bytes) first among the options of the
    IPv4 header at ``l3``; False (frame unchanged) when it is not a sound IPv4
    header or the options would exceed 40 bytes. Never raises."""
    n = len(opts)
    hl = _ihl_ok(buf, l3)
    if not hl or hl + n > 60 or n & 3:
        return False
    p = l3 + 20
    buf[p:p] = opts
    _patch(buf, l3, n, int.from_bytes(opts) % _M)
    return True


def _scan(buf: bytearray, l3: int, hl: int) -> list[tuple[int, int, int]] | None:
    """``[(start, length, kind)]`` of our options (None if the list is malformed)."""
    pos, end = l3 + 20, l3 + hl
    found: list[tuple[int, int, int]] = []
    while pos < end:
        t = buf[pos]
        if t == 0:
            break
        if t == 1:
            pos += 1
            continue
        if pos + 2 > end:
            return None
        n = buf[pos + 1]
        if n < 2 or pos + n > end:
            return None
        if t == OPT_TYPE and n >= 3 and buf[pos + 2] >> 4 == VERSION:
            vk = buf[pos + 2]
            if not ((vk == _VK_INFO and n == INFO_LEN) or (vk == _VK_ANSWER and n == ANSWER_LEN)) \
                    or buf[pos + 3]:
                return None
            if any(f[2] == vk for f in found):
                return None
            found.append((pos, n, vk))
        pos += n
    return found


def parse_options(buf: bytearray, l3: int) -> PuzzleOptions | Malformed | None:
    """Our options in the IPv4 header at ``l3``: None when there are none, MALFORMED
    when the header or its option list cannot be read. Never raises."""
    hl = _ihl_ok(buf, l3)
    if hl == 20:
        return None
    if not hl:
        return MALFORMED
    # fast paths: what our client proxy sends, the client info first, then the answer
    p = l3 + 20
    if hl == 52:
        t = _BOTH.unpack_from(buf, p)
        if t[0] == _SIG_INFO and t[3] == _SIG_ANSWER:
            return _new(PuzzleOptions, (t[1], t[2], t[4], t[5], t[6], t[7], t[8]))
    elif hl == 32:
        t = _INFO.unpack_from(buf, p)
        if t[0] == _SIG_INFO:
            return _new(PuzzleOptions, (t[1], t[2], None, 0, 0, 0, b""))
    found = _scan(buf, l3, hl)
    if found is None:
        return MALFORMED
    if not found:
        return None
    nonce = answer = None
    cts = sts = mat = exp = 0
    cookie = b""
    for pos, _, vk in found:
        if vk == _VK_INFO:
            _, nonce, cts = _INFO.unpack_from(buf, pos)
        else:
            _, answer, sts, mat, exp, cookie = _ANSWER.unpack_from(buf, pos)
    return PuzzleOptions(nonce, cts, answer, sts, mat, exp, cookie)


def strip_options(buf: bytearray, l3: int) -> bool:
    """Remove our options (both kinds) from the IPv4 header at ``l3``, other options
    left in place, fixing IHL, total length and checksum. True if the header is
    sound (whether or not it had ours); False (unchanged) if it or its option
    list is malformed. Never raises."""
    hl = _ihl_ok(buf, l3)
    if hl == 20:
        return True
    if not hl:
        return False
    p = l3 + 20
    if hl == 52:  # fast path: client info and answer, nothing else
        a, b = _SIGS.unpack_from(buf, p)
        if a == _SIG_INFO and b == _SIG_ANSWER:
            s = int.from_bytes(buf[p : p + 32]) % _M
            del buf[p : p + 32]
            _patch(buf, l3, -32, -s)
            return True
    found = _scan(buf, l3, hl)
    if found is None:
        return False
    if found:
        kept = bytearray()
        at = p
        for pos, n, _ in found:
            kept += buf[at:pos]
            at = pos + n
        kept += buf[at : l3 + hl]
        _rewrite(buf, l3, hl, bytes(kept))
    return True


def build_puzzle(frame: bytearray, l3: int, puzzle: Puzzle, nonce: int, client_ts: int, *,
                 ident: int = 0, seq: int = 0, icmp_type: int = ICMP_PUZZLE,
                 version: int = VERSION, ttl: int = 64) -> bytearray:
    """The puzzle frame answering the IPv4 packet at ``frame[l3:]`` (assumed sound:
    the caller parsed it), from its destination to its source, quoting its IP
    header and 8 bytes. Struct packing and integer sums, not ``vtl.packet.build``
    (its ``ip_frame``/``icmp_error`` go through ``Packet`` views, several times slower)."""
    b0, tl = _B0_TL.unpack_from(frame, l3)
    q = ((b0 & 15) << 2) + 8
    if q > tl:
        q = tl
    n = PUZZLE_HLEN + q
    sts, mat, exp, diff, cookie, rmin, rmax, phash = puzzle
    src = frame[l3 + 12 : l3 + 16]
    dst = frame[l3 + 16 : l3 + 20]
    # the IP header's sum from its fields: version/IHL, length, TTL/protocol, addresses
    x = (0x4500 + 20 + n + (ttl << 8) + 1 + int.from_bytes(src) + int.from_bytes(dst)) % _M
    out = frame[6:12] + frame[0:6] + frame[12:l3]
    out += _IP_MSG.pack(0x45, 0, 20 + n, 0, 0, ttl, 1, ~(x if x else _M) & _M, dst, src,
                        icmp_type, version, 0, ident, seq, 1, frame[l3 + 9], sts, nonce,
                        client_ts, mat, exp, 0, diff, cookie, rmin, rmax, phash)
    out += frame[l3 : l3 + q]
    x = int.from_bytes(out[l3 + 20 :]) << (8 if n & 1 else 0)
    x %= _M  # the message is never all zeros (type byte): a sum of 0 mod 0xFFFF is 0xFFFF
    _U16.pack_into(out, l3 + 22, ~(x if x else _M) & _M)
    return out


def parse_puzzle(buf: bytearray, l3: int, icmp_type: int = ICMP_PUZZLE,
                 version: int = VERSION) -> PuzzleMessage | None:
    """The puzzle message in the frame at ``buf[l3:]``, or None when it is not one (not
    IPv4/ICMP, a fragment, another type or version, too short, bad checksum, more
    than one puzzle, a range that does not match its difficulty). Never raises."""
    hl = _ihl_ok(buf, l3)
    if not hl or buf[l3 + 9] != 1 or ((buf[l3 + 6] << 8) | buf[l3 + 7]) & 0x3FFF:
        return None
    off = l3 + hl
    end = l3 + ((buf[l3 + 2] << 8) | buf[l3 + 3])
    n = end - off
    if n < PUZZLE_HLEN + 20 or buf[off] != icmp_type or buf[off + 1] != version:
        return None
    s = int.from_bytes(buf[off:end], "big") << (8 if n & 1 else 0)
    if s % _M:
        return None  # the ones' complement sum of a correct message is 0xFFFF == 0 mod 0xFFFF
    (_, _, _, ident, seq, count, proto, sts, nonce, cts, mat, exp, _, diff, cookie, rmin,
     rmax, phash) = _MSG.unpack_from(buf, off)
    if count != 1 or not diff or (rmax - rmin) & 0xFFFFFFFF != diff - 1:
        return None
    return PuzzleMessage(ident, seq, proto, nonce, cts,
                         Puzzle(sts, mat, exp, diff, cookie, rmin, rmax, phash),
                         off + PUZZLE_HLEN)


def syn_without_ack(buf: bytearray, l3: int) -> bool:
    """Is the IPv4 packet at ``l3`` a first-fragment TCP SYN without ACK? (The server's
    default ``require``; any frame it says False to needs no check.) Never raises."""
    try:
        if buf[l3 + 9] != 6 or buf[l3 + 6] & 0x1F or buf[l3 + 7]:
            return False
        return buf[l3 + ((buf[l3] & 15) << 2) + 13] & 0x12 == 0x02
    except IndexError:
        return False
