"""UDP header view (RFC 768).

Models the 8-byte header at ``buf[off:]``; the datagram ends at
``off + length``, which the constructor checks against ``end`` (the IP
datagram's end) and against the 8-byte minimum.

Checksums: over IPv4 a checksum of 0 means "none" and is left alone by
incremental updates; a computed 0 is sent as 0xFFFF (both families). With
``partial`` (virtio ``NEEDS_CSUM``) the field holds the pseudo-header sum and
port changes are not folded into it.
"""

from __future__ import annotations

import struct
from typing import Any

from vtl.errors import LocalProtocolError, PacketError
from vtl.packet.checksum import checksum, fold, ones_sum
from vtl.packet.view import U16, PortsMixin, View, patch_field16, uint

UDP_HLEN = 8


_PORTS = struct.Struct("!HH")


class UDP(PortsMixin, View):
    """A UDP header; ``ip`` gives the pseudo-header and the family."""

    __slots__ = ("end", "ip", "partial")
    FIELDS = {"sport": (0, 2), "dport": (2, 2), "length": (4, 2), "checksum": (6, 2)}

    def __init__(self, buf: bytearray, off: int, end: int | None = None, ip: Any = None,
                 partial: bool = False) -> None:
        if end is None:
            end = len(buf)
        if end > len(buf) or end < off + UDP_HLEN:
            raise PacketError(f"UDP header truncated ({end - off} bytes)")
        ln = (buf[off + 4] << 8) | buf[off + 5]
        if ln < UDP_HLEN or off + ln > end:
            raise PacketError(f"bad UDP length {ln} ({end - off} bytes present)")
        self.buf = buf
        self.off = off
        self.end = off + ln
        self.ip = ip
        self.partial = partial

    @property
    def ports(self) -> tuple[int, int]:
        """``(sport, dport)`` in one read (for flow keys)."""
        return _PORTS.unpack_from(self.buf, self.off)  # type: ignore[return-value]

    sport = uint(U16, 0, "sport")
    dport = uint(U16, 2, "dport")
    length = uint(U16, 4, "length")
    checksum = uint(U16, 6, "checksum")

    header_len = UDP_HLEN

    @property
    def payload_offset(self) -> int:
        return self.off + UDP_HLEN

    @property
    def payload_len(self) -> int:
        return self.end - self.off - UDP_HLEN

    @property
    def payload(self) -> memoryview:
        """The datagram's data, zero-copy (release it before resizing the buffer)."""
        return memoryview(self.buf)[self.off + UDP_HLEN : self.end]

    @property
    def _v4(self) -> bool:
        return self.ip is None or self.ip.version_number == 4

    def _pseudo(self, pseudo: int | None) -> int:
        if pseudo is not None:
            return pseudo
        if self.ip is None:
            raise LocalProtocolError("UDP checksum needs the pseudo-header: pass pseudo= or ip")
        return self.ip.pseudo_sum(17, self.end - self.off)

    def compute_checksum(self, pseudo: int | None = None) -> int:
        o = self.off
        field = (self.buf[o + 6] << 8) | self.buf[o + 7]
        c = checksum(self.buf, o, self.end, self._pseudo(pseudo) + 0xFFFF - field)
        return c or 0xFFFF

    def verify_checksum(self, pseudo: int | None = None) -> bool:
        """True when valid, or absent (0) over IPv4; partial: equals the pseudo sum."""
        if self.partial:
            return self.checksum == self._pseudo(pseudo)
        if self.checksum == 0 and self._v4:
            return True
        return fold(ones_sum(self.buf, self.off, self.end) + self._pseudo(pseudo)) == 0xFFFF

    def fix_checksum(self, pseudo: int | None = None) -> None:
        U16.pack_into(self.buf, self.off + 6,
                      self._pseudo(pseudo) if self.partial else self.compute_checksum(pseudo))

    def _patch_checksum(self, old: bytes, new: bytes) -> None:
        pos = self.off + 6
        hc = (self.buf[pos] << 8) | self.buf[pos + 1]
        if self.partial or (hc == 0 and self._v4):
            return
        patch_field16(self.buf, pos, old, new)
        if self.buf[pos] == 0 and self.buf[pos + 1] == 0:
            U16.pack_into(self.buf, pos, 0xFFFF)

    def __repr__(self) -> str:
        return f"UDP(sport={self.sport}, dport={self.dport}, len={self.length})"
