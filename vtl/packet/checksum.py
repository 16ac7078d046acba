"""Internet checksums (RFC 1071), full and incremental (RFC 1624).

Theory of operation: the ones'-complement sum of 16-bit big-endian words is,
up to the representation of zero, the value of the whole buffer read as one
big-endian integer modulo 0xFFFF (because 2**16 == 1 mod 0xFFFF). So a full
sum is ``int.from_bytes(buf) % 0xFFFF`` (C speed), and an odd-length buffer is
padded with one zero byte by shifting left 8 bits.

Invariants:
- A *sum* here is always canonical: in ``1..0xFFFF`` for data that is not all
  zeros (ones'-complement "negative zero" 0xFFFF, never 0), 0 only for all-zero
  data. This is what end-around-carry folding (Linux, scapy) produces, so full
  and incremental results agree bit for bit.
- A *checksum* is the complement of a sum, as stored on the wire.
- Incremental updates use RFC 1624 eqn. 3, ``HC' = ~(~HC + ~m + m')``, over
  whole 16-bit words: ``old`` and ``new`` must be the same even-length span,
  aligned on the start of the checksummed region.
- A *partial* checksum (virtio ``NEEDS_CSUM``) is a folded, uncomplemented
  pseudo-header sum that the kernel completes over the L4 bytes; it is updated
  with :func:`partial_replace` (no complement) and only for pseudo-header
  changes (addresses, length).

What it does not do: it knows no protocol layout; the views decide which bytes
are covered and where the field is.
"""

from __future__ import annotations

from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

_M = 0xFFFF


def ones_sum(data: Buffer, start: int = 0, end: int | None = None) -> int:
    """Canonical ones'-complement sum of ``data[start:end]`` (not complemented)."""
    mv = memoryview(data)[start:end]
    n = int.from_bytes(mv, "big")
    if len(mv) & 1:
        n <<= 8
    r = n % _M
    return r if r or not n else _M


def fold(x: int) -> int:
    """Fold a non-negative integer into a canonical 16-bit ones'-complement sum."""
    r = x % _M
    return r if r or not x else _M


def checksum(data: Buffer, start: int = 0, end: int | None = None, initial: int = 0) -> int:
    """Internet checksum of ``data[start:end]`` plus ``initial`` (e.g. a pseudo-header sum)."""
    return ~fold(ones_sum(data, start, end) + initial) & _M


def pseudo_sum_v4(src: Buffer, dst: Buffer, proto: int, length: int) -> int:
    """Sum of the IPv4 pseudo-header (RFC 793): addresses, zero, protocol, L4 length."""
    return fold(int.from_bytes(bytes(src) + bytes(dst), "big") + proto + length)


def pseudo_sum_v6(src: Buffer, dst: Buffer, proto: int, length: int) -> int:
    """Sum of the IPv6 pseudo-header (RFC 8200 8.1): addresses, 32-bit length, next header."""
    return fold(int.from_bytes(bytes(src) + bytes(dst), "big") + (length >> 16) + length + proto)


def csum_replace(hc: int, old: Buffer, new: Buffer) -> int:
    """RFC 1624 eqn. 3: the checksum ``hc`` after ``old`` words became ``new`` words."""
    o = int.from_bytes(old, "big") % _M
    n = int.from_bytes(new, "big") % _M
    return ~fold((~hc & _M) + n + _M - o) & _M


def csum_replace16(hc: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3 for one 16-bit word."""
    return ~fold((~hc & _M) + (~old & _M) + new) & _M


def partial_replace(partial: int, old: Buffer, new: Buffer) -> int:
    """Update a partial (uncomplemented pseudo-header) sum after ``old`` became ``new``."""
    o = int.from_bytes(old, "big") % _M
    n = int.from_bytes(new, "big") % _M
    return fold(partial + n + _M - o)


def partial_replace16(partial: int, old: int, new: int) -> int:
    """Update a partial sum after one 16-bit word of the pseudo-header changed."""
    return fold(partial + (~old & _M) + new)


NEEDS_CSUM = 0x01  # VIRTIO_NET_HDR_F_NEEDS_CSUM (vtl.frame), repeated to stay import-free
#: where the checksum field sits in each L4 header covered by a pseudo-header
L4_CSUM_FIELD = {6: 16, 17: 6, 58: 2}


def is_partial(vnet: object, l4_offset: int) -> bool:
    """True when ``vnet`` says the L4 checksum at ``l4_offset`` is a partial sum."""
    return (
        vnet is not None
        and bool(vnet.flags & NEEDS_CSUM)  # type: ignore[attr-defined]
        and vnet.csum_start == l4_offset  # type: ignore[attr-defined]
    )


def patch_l4_pseudo(buf: bytearray, l4_offset: int, l4_end: int, proto: int, old: bytes,
                    new: bytes, vnet: object, v6: bool) -> None:
    """Fold a pseudo-header change (address or length words) into the L4 checksum.

    ``old``/``new`` are word-aligned pseudo-header bytes. With a partial
    checksum (``NEEDS_CSUM``) the stored value is a sum and is updated as one;
    otherwise RFC 1624 applies, and an IPv4 UDP checksum of 0 (none) stays 0.
    """
    rel = L4_CSUM_FIELD.get(proto)
    if rel is None or (proto == 58 and not v6):
        return
    pos = l4_offset + rel
    if pos + 2 > l4_end:
        return
    hc = (buf[pos] << 8) | buf[pos + 1]
    if is_partial(vnet, l4_offset):
        hc = partial_replace(hc, old, new)
    else:
        if proto == 17 and hc == 0 and not v6:
            return
        hc = csum_replace(hc, old, new)
        if proto == 17 and hc == 0:
            hc = 0xFFFF
    buf[pos] = hc >> 8
    buf[pos + 1] = hc & 0xFF
