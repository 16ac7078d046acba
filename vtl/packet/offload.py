"""Keeping virtio-net offload metadata right: software GSO, GSO preparation, VLAN edits.

A frame from a port with virtio-net headers may carry a *partial* L4 checksum
(``NEEDS_CSUM``: the field holds the pseudo-header sum; the receiver sums
``data[csum_start:]`` into ``csum_start + csum_offset``) and may be a GSO
super-frame (up to 64 KB, to be cut into ``gso_size`` payload pieces).

- :func:`complete_offloads` does in software what the kernel would: segments
  TCP (v4/v6) and UDP-L4 (USO) super-frames, completes checksums, and returns
  plain frames (``vnet`` None) for a port without virtio headers. Legacy UFO
  (``GSO_UDP``, IP fragmentation) is only completed when the datagram fits in
  one frame; otherwise it raises :class:`~vtl.errors.PacketError`.
- :func:`prepare_offloads` does the reverse for a frame going *to* a virtio
  port: an oversized TCP frame becomes a GSO frame with a partial checksum.
- :func:`push_vlan`/:func:`pop_vlan`/:func:`adjust_vnet` keep ``csum_start``
  and ``hdr_len`` right when bytes are inserted or removed before L4.

Invariants: returned frames have consistent IP lengths and ids, TCP sequence
numbers and flags (FIN/PSH only on the last segment, CWR only on the first),
and complete checksums. Frames are changed in place where documented.
What it does not do: IPv4 fragmentation; BIG TCP (IP length fields > 64 KB).
"""

from __future__ import annotations

import struct

from vtl.errors import PacketError
from vtl.frame import (
    NO_OFFLOAD,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    Frame,
    VnetHeader,
)
from vtl.packet.checksum import fold, ones_sum, pseudo_sum_v4, pseudo_sum_v6
from vtl.packet.ethernet import ETH_P_8021Q, VlanTagValue, insert_vlan, remove_vlan
from vtl.packet.packet import Packet
from vtl.packet.tcp import CWR, FIN, PSH

ETH_HLEN = 14
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U16X2 = struct.Struct("!HH")


def complete_checksum(frame: Frame) -> None:
    """Finish a ``NEEDS_CSUM`` partial checksum in place (no segmentation)."""
    v = frame.vnet
    if v is None or not v.needs_csum:
        return
    d = frame.data
    pos = v.csum_start + v.csum_offset
    if v.csum_start >= len(d) or pos + 2 > len(d):
        raise PacketError("virtio csum_start/csum_offset outside the frame")
    c = ~ones_sum(d, v.csum_start) & 0xFFFF
    d[pos] = c >> 8
    d[pos + 1] = c & 0xFF
    v.flags &= ~VIRTIO_NET_HDR_F_NEEDS_CSUM


def complete_offloads(frame: Frame) -> list[Frame]:
    """Plain frames (``vnet`` None, checksums complete) that carry what ``frame`` does.

    A frame without offload work is returned as is (its ``vnet`` cleared).
    """
    v = frame.vnet
    if v is None:
        return [frame]
    if not v.is_gso:
        complete_checksum(frame)
        frame.vnet = None
        return [frame]
    gso = v.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    pkt = Packet(frame)
    ip = pkt.ip
    if ip is None or pkt.l4_offset is None:
        raise PacketError("GSO frame without an IP/L4 header")
    if gso in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6):
        if pkt.tcp is None:
            raise PacketError("TCP GSO frame without a TCP header")
        return _segment(pkt, v.gso_size, tcp=True)
    if gso in (VIRTIO_NET_HDR_GSO_UDP_L4, VIRTIO_NET_HDR_GSO_UDP):
        u = pkt.udp
        if u is None:
            raise PacketError("UDP GSO frame without a UDP header")
        if gso == VIRTIO_NET_HDR_GSO_UDP:
            if u.end - u.off > v.gso_size:
                raise PacketError("UDP fragmentation offload (UFO) of a large datagram "
                                  "is not supported; enable USO or lower the MTU")
            return _segment(pkt, 1 << 16, tcp=False)
        return _segment(pkt, v.gso_size, tcp=False)
    raise PacketError(f"unknown GSO type {v.gso_type:#x}")


def _segment(pkt: Packet, mss: int, tcp: bool) -> list[Frame]:
    """Cut ``pkt``'s L4 payload into pieces of ``mss``: one frame each, the headers copied
    and patched, the checksums computed incrementally: the IPv4 header's from the sum of
    its fixed words plus length and id, the L4 one from the pseudo-header's and the
    header's fixed words plus the changed fields plus the ones' sum of the piece (the
    only pass over the payload)."""
    d = pkt.data
    ip = pkt.ip
    l4 = pkt.tcp if tcp else pkt.udp
    assert ip is not None and l4 is not None
    if mss <= 0:
        raise PacketError("GSO frame with gso_size 0")
    hdr_end = l4.payload_offset
    payload = memoryview(d)[hdr_end : l4.end]
    header = d[:hdr_end]
    l3, l4off = ip.off, l4.off
    v4 = ip.version_number == 4
    ip_id = ip.id if v4 else 0
    seq = l4.seq if tcp else 0  # type: ignore[union-attr]
    flags = d[l4off + 13] if tcp else 0
    # the fixed parts' sums: the fields that change per segment zeroed
    if v4:
        header[l3 + 2 : l3 + 6] = b"\0\0\0\0"  # total length, id
        header[l3 + 10 : l3 + 12] = b"\0\0"
        ip_base = ones_sum(header, l3, l3 + ip.header_len)
        len_base = -l3
    else:
        ip_base = 0
        len_base = -l3 - 40
    if tcp:
        header[l4off + 4 : l4off + 8] = b"\0\0\0\0"
        header[l4off + 13] = 0
        cpos = l4off + 16
    else:
        header[l4off + 4 : l4off + 6] = b"\0\0"
        cpos = l4off + 6
    header[cpos : cpos + 2] = b"\0\0"
    l4_base = ones_sum(header, l4off) + ip.pseudo_sum(ip.l4_proto, 0)
    hlen = hdr_end - l4off
    total = len(payload)
    n = max(1, -(-total // mss))
    last_flags = flags & ~CWR if n > 1 else flags
    mid_flags = flags & ~(FIN | PSH | CWR)
    out: list[Frame] = []
    for i in range(n):
        off = i * mss
        chunk = payload[off : off + mss]
        seg = header + chunk
        clen = len(chunk)
        l4len = hlen + clen
        word = int.from_bytes(chunk, "big")
        if clen & 1:
            word <<= 8
        if v4:
            size = hdr_end + clen + len_base
            pid = (ip_id + i) & 0xFFFF
            _U16X2.pack_into(seg, l3 + 2, size, pid)
            _U16.pack_into(seg, l3 + 10, ~fold(ip_base + size + pid) & 0xFFFF)
        else:
            _U16.pack_into(seg, l3 + 4, hdr_end + clen + len_base)
        if tcp:
            s = (seq + off) & 0xFFFFFFFF
            f = flags if n == 1 else last_flags if i == n - 1 else \
                mid_flags | (flags & CWR if i == 0 else 0)
            _U32.pack_into(seg, l4off + 4, s)
            seg[l4off + 13] = f
            c = ~fold(l4_base + word + l4len + (s >> 16) + (s & 0xFFFF) + f) & 0xFFFF
        else:
            _U16.pack_into(seg, l4off + 4, l4len)
            c = ~fold(l4_base + word + l4len + l4len) & 0xFFFF  # the length: pseudo and UDP
            if c == 0:
                c = 0xFFFF
        _U16.pack_into(seg, cpos, c)
        out.append(Frame(seg, None))
    return out


def prepare_offloads(frame: Frame, mtu: int = 1500, csum: bool = False) -> Frame:
    """Give a plain frame the virtio metadata a virtio-header port needs (in place).

    A frame that already has ``vnet`` is left as is. An oversized TCP frame gets
    a partial checksum, ``NEEDS_CSUM`` and GSO TCPv4/TCPv6 with ``gso_size = mtu
    - IP header - TCP header``; anything else oversized raises
    :class:`~vtl.errors.PacketError`. With ``csum=True`` a TCP or UDP frame that
    fits also gets ``NEEDS_CSUM`` and its pseudo-header sum, so that the kernel
    computes the checksum: frames read through libpcap from a local interface
    with checksum offload carry an unfinished checksum that a guest would drop,
    and this costs no pass over the payload. Returns ``frame``.
    """
    if frame.vnet is not None:
        return frame
    pkt = Packet(frame)
    oversized = len(frame.data) > mtu + ETH_HLEN + 4 * pkt.ntags
    if not oversized and not csum:
        return frame
    ip = pkt.ip
    t = pkt.tcp
    if oversized and (t is None or ip is None):
        raise PacketError(f"frame of {len(frame.data)} bytes exceeds MTU {mtu} and is not TCP")
    if ip is None or ip.is_fragment:
        return frame
    v4 = ip.version_number == 4
    if t is None:
        u = pkt.udp
        if u is None:
            return frame
        if v4 and u.checksum == 0:
            return frame  # "no checksum" over IPv4: nothing to complete
        u.checksum = ip.pseudo_sum(17, u.end - u.off)
        frame.vnet = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=u.off,
                                csum_offset=6)
        return frame
    l4len = t.end - t.off
    t.checksum = ip.pseudo_sum(6, l4len)
    if not oversized:
        frame.vnet = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=t.off,
                                csum_offset=16)
        return frame
    ip_hlen = t.off - ip.off
    gso_size = mtu - ip_hlen - t.header_len
    if gso_size <= 0:
        raise PacketError(f"MTU {mtu} leaves no room for TCP payload")
    if v4:
        ip.fix_checksum()
    gso_type = VIRTIO_NET_HDR_GSO_TCPV4 if v4 else VIRTIO_NET_HDR_GSO_TCPV6
    if t.flags & CWR:
        gso_type |= VIRTIO_NET_HDR_GSO_ECN
    frame.vnet = VnetHeader(
        flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=gso_type, hdr_len=t.payload_offset,
        gso_size=gso_size, csum_start=t.off, csum_offset=16,
    )
    return frame


_VNET = struct.Struct("<BBHHHH")  # the legacy virtio-net header (vtl.frame)


def partial_csum(data: bytearray, l3: int = ETH_HLEN) -> bytes | None:
    """:func:`prepare_offloads` with ``csum=True`` for the common frame, written out
    for the bridge's chainless path: an untagged IPv4 (not a fragment) or IPv6 (no
    extension header) TCP or UDP packet gets its pseudo-header sum in its checksum
    field (in place) and the virtio-net header returned asks the kernel to finish
    it. ``NO_OFFLOAD``: nothing to finish (not TCP or UDP; UDP over IPv4 without a
    checksum). None: a frame this does not read (VLAN tags, options it would have to
    walk, short or inconsistent lengths): :func:`prepare_offloads` decides."""
    n = len(data)
    if n < l3:
        return None
    et = (data[l3 - 2] << 8) | data[l3 - 1]
    if et != 0x0800 and et != 0x86DD:
        return None if et in (0x8100, 0x88A8, 0x9100) else NO_OFFLOAD
    if n < l3 + (20 if et == 0x0800 else 40):
        return None
    if et == 0x0800:
        ihl = (data[l3] & 15) << 2
        total = (data[l3 + 2] << 8) | data[l3 + 3]
        if data[l3] >> 4 != 4 or ihl < 20 or total < ihl + 8 or l3 + total > n:
            return None
        if data[l3 + 6] & 0x3F or data[l3 + 7]:
            return None  # a fragment
        proto, l4, length = data[l3 + 9], l3 + ihl, total - ihl
        pseudo = pseudo_sum_v4(data[l3 + 12:l3 + 16], data[l3 + 16:l3 + 20], proto, length)
    elif et == 0x86DD:
        length = (data[l3 + 4] << 8) | data[l3 + 5]
        proto, l4 = data[l3 + 6], l3 + 40
        if l4 + length > n or (proto in (6, 17) and length < 8):
            return None
        pseudo = pseudo_sum_v6(data[l3 + 8:l3 + 24], data[l3 + 24:l3 + 40], proto, length)
    if proto == 6:
        if length < 20:
            return None
        offset = 16
    elif proto == 17:
        offset = 6
        if et == 0x0800 and not data[l4 + 6] and not data[l4 + 7]:
            return NO_OFFLOAD  # "no checksum" over IPv4
    elif et == 0x0800 or proto in (1, 58, 59):
        return NO_OFFLOAD
    else:
        return None  # an IPv6 extension header before the transport
    data[l4 + offset] = pseudo >> 8
    data[l4 + offset + 1] = pseudo & 0xFF
    return _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, l4, offset)


def adjust_vnet(frame: Frame, at: int, delta: int) -> None:
    """``delta`` bytes were inserted (>0) or removed (<0) at offset ``at``: shift offsets."""
    v = frame.vnet
    if v is None:
        return
    if v.needs_csum and v.csum_start >= at:
        v.csum_start += delta
    if v.hdr_len and v.hdr_len >= at:
        v.hdr_len += delta


def push_vlan(frame: Frame, vid: int, pcp: int = 0, dei: int = 0,
              tpid: int = ETH_P_8021Q) -> None:
    """Insert an outermost 802.1Q tag, keeping the virtio header consistent."""
    insert_vlan(frame.data, vid, pcp, dei, tpid)
    adjust_vnet(frame, 12, 4)


def pop_vlan(frame: Frame) -> VlanTagValue:
    """Remove the outermost tag (PacketError if untagged); returns its values."""
    tag = remove_vlan(frame.data)
    adjust_vnet(frame, 12, -4)
    return tag
