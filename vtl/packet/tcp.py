"""TCP header view (RFC 9293) and TCP options (RFC 7323, RFC 2018, RFC 6691).

Models the header at ``buf[off:off+data_offset*4]`` within a segment ending at
``end``. The constructor checks that 20 bytes and the whole announced header
fit. Options are decoded on demand: :meth:`TCP.iter_options` gives raw
``(kind, data)`` pairs (bounds-checked), :attr:`TCP.options` the
:class:`TcpOptions` summary (MSS, window scale, SACK-permitted, SACK blocks,
timestamps); :meth:`TcpOptions.encode` builds them back, laid out as Linux
does and padded to 4 bytes.

Checksums: ``ip`` (the IPv4/IPv6 view) provides the pseudo-header. When
``partial`` is true the checksum field holds the pseudo-header sum that the
kernel completes (virtio ``NEEDS_CSUM``): header and data changes are then
*not* folded into it (the kernel sums them later); :meth:`fix_checksum`
rewrites the partial sum instead of a full checksum.

What it does not do: sequence arithmetic and state belong to ``vtl.models``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vtl.errors import LocalProtocolError, PacketError
from vtl.packet.checksum import checksum, csum_replace16, fold, ones_sum
from vtl.packet.view import U16, U32, PortsMixin, View, bits, patch_field16, u8, uint

TCP_HLEN = 20
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_SACK, OPT_TIMESTAMP = 0, 1, 2, 3, 4, 5, 8
MAX_OPTIONS_LEN = 40


_PORTS = struct.Struct("!HH")
# NOP, NOP, timestamps: the options of nearly every segment of a modern connection; they
# take a fast path both ways (one struct call instead of the general loop), as Linux's
# tcp_parse_aligned_timestamp does
_TS_ALIGNED = struct.Struct("!4sII")
_TS_HEAD = bytes((OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10))


def timestamp_option(tsval: int, tsecr: int) -> bytes:
    """NOP, NOP, timestamps (RFC 7323 appendix A): the 12 option bytes of a segment
    whose only option is the timestamp pair."""
    try:
        return _TS_ALIGNED.pack(_TS_HEAD, tsval, tsecr)
    except struct.error as e:
        raise LocalProtocolError(f"bad TCP option value: {e}") from e


@dataclass(slots=True)
class TcpOptions:
    """The TCP options a connection model cares about, plus any others raw."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    timestamps: tuple[int, int] | None = None  # (TSval, TSecr)
    other: tuple[tuple[int, bytes], ...] = ()

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview) -> TcpOptions:
        if len(raw) == 12 and raw[:4] == _TS_HEAD:  # the common case: timestamps alone
            _, tsval, tsecr = _TS_ALIGNED.unpack_from(raw)
            return cls(timestamps=(tsval, tsecr))
        opts = cls()
        other = []
        for kind, data in iter_options(raw):
            n = len(data)
            if kind == OPT_MSS and n == 2:
                opts.mss = int.from_bytes(data, "big")
            elif kind == OPT_WSCALE and n == 1:
                opts.wscale = data[0]
            elif kind == OPT_SACK_PERM and n == 0:
                opts.sack_permitted = True
            elif kind == OPT_SACK and n and n % 8 == 0:
                words = [int.from_bytes(data[i : i + 4], "big") for i in range(0, n, 4)]
                opts.sack_blocks = tuple(zip(words[::2], words[1::2], strict=True))
            elif kind == OPT_TIMESTAMP and n == 8:
                opts.timestamps = (int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big"))
            else:
                other.append((kind, bytes(data)))
        opts.other = tuple(other)
        return opts

    def encode(self) -> bytes:
        """Options bytes, 4-byte aligned (MSS, SACK-perm+TS, NOP+WS, SACK, others)."""
        ts = self.timestamps
        if ts is not None and self.mss is None and self.wscale is None \
                and not (self.sack_permitted or self.sack_blocks or self.other):
            return timestamp_option(*ts)
        try:
            out = bytearray()
            if self.mss is not None:
                out += bytes((OPT_MSS, 4)) + self.mss.to_bytes(2, "big")
            ts = b""
            if self.timestamps is not None:
                ts = bytes((OPT_TIMESTAMP, 10)) + self.timestamps[0].to_bytes(4, "big") + \
                    self.timestamps[1].to_bytes(4, "big")
            if self.sack_permitted:
                out += bytes((OPT_SACK_PERM, 2)) + ts if ts else bytes((1, 1, OPT_SACK_PERM, 2))
            elif ts:
                out += bytes((OPT_NOP, OPT_NOP)) + ts
            if self.wscale is not None:
                out += bytes((OPT_NOP, OPT_WSCALE, 3, self.wscale))
            if self.sack_blocks:
                out += bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(self.sack_blocks)))
                for left, right in self.sack_blocks:
                    out += left.to_bytes(4, "big") + right.to_bytes(4, "big")
            for kind, data in self.other:
                out += bytes((kind, len(data) + 2)) + data
        except (ValueError, OverflowError, TypeError) as e:
            raise LocalProtocolError(f"bad TCP option value: {e}") from e
        out += bytes(-len(out) % 4)
        if len(out) > MAX_OPTIONS_LEN:
            raise LocalProtocolError(f"TCP options too long ({len(out)} > 40 bytes)")
        return bytes(out)


def iter_options(raw: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
    """``[(kind, data)]`` from TCP option bytes; EOL ends, NOP is skipped."""
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(raw)
    while pos < end:
        kind = raw[pos]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            pos += 1
            continue
        if pos + 2 > end or raw[pos + 1] < 2 or pos + raw[pos + 1] > end:
            raise PacketError("malformed TCP option")
        out.append((kind, bytes(raw[pos + 2 : pos + raw[pos + 1]])))
        pos += raw[pos + 1]
    return out


class TCP(PortsMixin, View):
    """A TCP header within ``buf[off:end]``; ``ip`` gives the pseudo-header."""

    __slots__ = ("end", "ip", "partial")
    FIELDS = {
        "sport": (0, 2), "dport": (2, 2), "seq": (4, 4), "ack": (8, 4), "data_offset": (12, 1),
        "flags": (13, 1), "window": (14, 2), "checksum": (16, 2), "urgent": (18, 2),
    }

    def __init__(self, buf: bytearray, off: int, end: int | None = None, ip: Any = None,
                 partial: bool = False) -> None:
        if end is None:
            end = len(buf)
        if end > len(buf) or end < off + TCP_HLEN:
            raise PacketError(f"TCP header truncated ({end - off} bytes)")
        doff = buf[off + 12] >> 4
        if doff < 5 or off + (doff << 2) > end:
            raise PacketError(f"bad TCP data offset {doff} ({end - off} bytes)")
        self.buf = buf
        self.off = off
        self.end = end
        self.ip = ip
        self.partial = partial

    @property
    def ports(self) -> tuple[int, int]:
        """``(sport, dport)`` in one read (for flow keys)."""
        return _PORTS.unpack_from(self.buf, self.off)  # type: ignore[return-value]

    sport = uint(U16, 0, "sport")
    dport = uint(U16, 2, "dport")
    seq = uint(U32, 4, "seq")
    ack = uint(U32, 8, "ack")
    data_offset = bits(U16, 12, 12, 4, "data_offset")
    flags = u8(13, "flags")
    window = uint(U16, 14, "window")
    checksum = uint(U16, 16, "checksum")
    urgent = uint(U16, 18, "urgent")

    flag_fin = property(lambda self: bool(self.buf[self.off + 13] & FIN))
    flag_syn = property(lambda self: bool(self.buf[self.off + 13] & SYN))
    flag_rst = property(lambda self: bool(self.buf[self.off + 13] & RST))
    flag_psh = property(lambda self: bool(self.buf[self.off + 13] & PSH))
    flag_ack = property(lambda self: bool(self.buf[self.off + 13] & ACK))
    flag_urg = property(lambda self: bool(self.buf[self.off + 13] & URG))
    flag_ece = property(lambda self: bool(self.buf[self.off + 13] & ECE))
    flag_cwr = property(lambda self: bool(self.buf[self.off + 13] & CWR))

    @property
    def header_len(self) -> int:
        return (self.buf[self.off + 12] >> 4) << 2

    @property
    def payload_offset(self) -> int:
        return self.off + ((self.buf[self.off + 12] >> 4) << 2)

    @property
    def payload_len(self) -> int:
        return self.end - self.payload_offset

    @property
    def payload(self) -> memoryview:
        """The segment's data, zero-copy (release it before resizing the buffer)."""
        return memoryview(self.buf)[self.payload_offset : self.end]

    @property
    def options_raw(self) -> bytes:
        return bytes(self.buf[self.off + TCP_HLEN : self.payload_offset])

    def iter_options(self) -> list[tuple[int, bytes]]:
        return iter_options(memoryview(self.buf)[self.off + TCP_HLEN : self.payload_offset])

    @property
    def options(self) -> TcpOptions:
        return TcpOptions.decode(memoryview(self.buf)[self.off + TCP_HLEN : self.payload_offset])

    def option_offset(self, kind: int) -> int | None:
        """Buffer offset of the first option of ``kind`` (for in-place edits), or None."""
        buf, pos, end = self.buf, self.off + TCP_HLEN, self.payload_offset
        while pos < end:
            k = buf[pos]
            if k == OPT_EOL:
                return None
            if k == OPT_NOP:
                pos += 1
                continue
            if k == kind:
                return pos
            if pos + 2 > end or buf[pos + 1] < 2:
                raise PacketError("malformed TCP option")
            pos += buf[pos + 1]
        return None

    # -- checksum -----------------------------------------------------------------

    def _pseudo(self, pseudo: int | None) -> int:
        if pseudo is not None:
            return pseudo
        if self.ip is None:
            raise LocalProtocolError("TCP checksum needs the pseudo-header: pass pseudo= or ip")
        return self.ip.pseudo_sum(6, self.end - self.off)

    def compute_checksum(self, pseudo: int | None = None) -> int:
        """The full checksum this segment should carry (the field is ignored)."""
        o = self.off
        field = (self.buf[o + 16] << 8) | self.buf[o + 17]
        return checksum(self.buf, o, self.end, self._pseudo(pseudo) + 0xFFFF - field)

    def verify_checksum(self, pseudo: int | None = None) -> bool:
        """Full checksum valid (a partial one is valid when it equals the pseudo sum)."""
        if self.partial:
            return self.checksum == self._pseudo(pseudo)
        return fold(ones_sum(self.buf, self.off, self.end) + self._pseudo(pseudo)) == 0xFFFF

    def fix_checksum(self, pseudo: int | None = None) -> None:
        """Write the full checksum, or the partial pseudo sum when ``partial``."""
        U16.pack_into(self.buf, self.off + 16,
                      self._pseudo(pseudo) if self.partial else self.compute_checksum(pseudo))

    def _patch_checksum(self, old: bytes, new: bytes) -> None:
        if not self.partial:
            patch_field16(self.buf, self.off + 16, old, new)

    def __repr__(self) -> str:
        names = "FSRPAUEC"
        f = self.flags
        fl = "".join(n for i, n in enumerate(names) if f >> i & 1)
        return (f"TCP(sport={self.sport}, dport={self.dport}, seq={self.seq}, ack={self.ack}, "
                f"flags={fl}, win={self.window}, len={self.payload_len})")


def clamp_mss(data: bytearray, tcp_off: int, mss: int, partial: bool = False) -> bool:
    """Lower the MSS option of the TCP SYN at ``tcp_off`` to ``mss``, fixing the TCP
    checksum (unless ``partial``: a checksum the kernel completes later holds only the
    pseudo-header's sum, which the option does not change); True if it was changed. A
    SYN without the option is left alone."""
    if len(data) < tcp_off + 20 or not data[tcp_off + 13] & 0x02:
        return False
    end = min(len(data), tcp_off + ((data[tcp_off + 12] >> 4) << 2))
    for kind, i, n in walk_options(data, tcp_off + 20, end):
        if kind == 2 and n == 4:
            old = int.from_bytes(data[i + 2:i + 4], "big")
            if old <= mss:
                return False
            data[i + 2:i + 4] = mss.to_bytes(2, "big")
            if partial:
                return True
            if (i - tcp_off) & 1:  # the value sits across two words (after a lone NOP)
                old, mss = _swap16(old), _swap16(mss)
            c = int.from_bytes(data[tcp_off + 16:tcp_off + 18], "big")
            data[tcp_off + 16:tcp_off + 18] = csum_replace16(c, old, mss).to_bytes(2, "big")
            return True
    return False


def walk_options(data: bytes | bytearray | memoryview, start: int, end: int
                 ) -> Iterator[tuple[int, int, int]]:
    """``(kind, offset, length)`` of each TCP option in ``data[start:end]``. NOP is
    skipped; EOL or a malformed option (a length under 2 or past ``end``) ends the walk
    quietly, keeping what came before, as the stacks and conntrack read them."""
    i = start
    while i < end:
        kind = data[i]
        if kind == 0:
            return
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            return
        n = data[i + 1]
        if n < 2 or i + n > end:
            return
        yield kind, i, n
        i += n


def _swap16(x: int) -> int:
    return ((x & 0xFF) << 8) | (x >> 8)
