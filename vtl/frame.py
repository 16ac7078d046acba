"""Frames as they cross the bridge, with their offload metadata.

A :class:`Frame` is one Ethernet frame in a mutable ``bytearray`` plus, when it
came from (or is going to) a port that speaks the virtio-net header, a
:class:`VnetHeader` describing offloads: a partial checksum the kernel will
complete (``NEEDS_CSUM``) and, for GSO frames, the segment size the kernel will
cut the frame into. A 64 KB TCP frame from a guest with TSO crosses the bridge
whole; services see it as one frame and must keep the header consistent when
they edit it (the packet API does that for them).

Invariants:
- ``data`` starts at the Ethernet destination MAC; no virtio header inside it.
- ``vnet is None`` means "no offload metadata": checksums in ``data`` are
  complete and the frame is no longer than the link MTU allows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vtl.errors import PacketError

VNET_HDR_LEN = 10

# virtio_net_hdr.flags
VIRTIO_NET_HDR_F_NEEDS_CSUM = 0x01
VIRTIO_NET_HDR_F_DATA_VALID = 0x02
# virtio_net_hdr.gso_type
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

_new_frame = object.__new__  # Frame.from_wire skips __init__'s checks: it has a bytearray
_VNET = struct.Struct("<BBHHHH")  # legacy header, little-endian (x86 guests and hosts)
NO_OFFLOAD = bytes(VNET_HDR_LEN)


@dataclass(slots=True)
class VnetHeader:
    """The 10-byte legacy ``struct virtio_net_hdr`` (see linux/virtio_net.h)."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> VnetHeader:
        if len(raw) < VNET_HDR_LEN:
            raise PacketError(f"virtio-net header needs {VNET_HDR_LEN} bytes, got {len(raw)}")
        return cls(*_VNET.unpack_from(raw, 0))

    def pack(self) -> bytes:
        return _VNET.pack(
            self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
            self.csum_offset,
        )

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)

    @property
    def is_gso(self) -> bool:
        return (self.gso_type & ~VIRTIO_NET_HDR_GSO_ECN) != VIRTIO_NET_HDR_GSO_NONE

    @property
    def is_plain(self) -> bool:
        """True when the header asks nothing of the receiver (no csum, no GSO)."""
        return not self.needs_csum and not self.is_gso


class Frame:
    """One Ethernet frame (mutable) and its offload metadata.

    ``vnet`` is read from the wire lazily: a frame that crosses the chain without a
    service looking at its header is written out with the 10 bytes it came with,
    never unpacked into a :class:`VnetHeader` and packed again (a third of a
    microsecond per frame, on the path every frame takes)."""

    __slots__ = ("data", "_vnet", "_vraw")

    def __init__(self, data: bytes | bytearray, vnet: VnetHeader | None = None):
        self.data = data if isinstance(data, bytearray) else bytearray(data)
        self._vnet = vnet
        self._vraw: bytes | None = None  # the header as read, while nobody asked for it

    @property
    def vnet(self) -> VnetHeader | None:
        raw = self._vraw
        if raw is not None:
            self._vnet = VnetHeader.unpack(raw)
            self._vraw = None
        return self._vnet

    @vnet.setter
    def vnet(self, value: VnetHeader | None) -> None:
        self._vnet = value
        self._vraw = None

    def vnet_bytes(self) -> bytes | None:
        """The virtio-net header to write (``NO_OFFLOAD`` when nothing is asked), or
        None when the frame has no offload metadata at all."""
        raw = self._vraw
        if raw is not None:
            return raw
        vnet = self._vnet
        return None if vnet is None else vnet.pack()

    @classmethod
    def from_wire(cls, raw: bytes | bytearray, has_vnet: bool) -> Frame:
        """Build a frame from what a port read (with its virtio header if it has one).

        A ``bytearray`` is taken over, not copied (the tap and packet ports hand out
        fresh ones): the frame owns it from then on, its virtio header cut off in
        place (deleting from the front of a bytearray moves a pointer in CPython)."""
        owned = type(raw) is bytearray
        if not has_vnet:
            return cls(raw if owned else bytearray(raw))  # type: ignore[arg-type]
        if len(raw) < VNET_HDR_LEN:
            raise PacketError("frame shorter than its virtio-net header")
        head = raw[:VNET_HDR_LEN]
        frame = _new_frame(cls)
        if owned:
            del raw[:VNET_HDR_LEN]  # type: ignore[union-attr]
            frame.data = raw  # type: ignore[assignment]
        else:  # one copy, not two: slicing ``raw`` itself would copy 64 KB GSO frames twice
            frame.data = bytearray(memoryview(raw)[VNET_HDR_LEN:])
        frame._vnet = None
        frame._vraw = None if head == NO_OFFLOAD else bytes(head)
        return frame

    def to_wire(self, with_vnet: bool) -> bytes:
        """Bytes for a port; the caller has made sure offloads fit that port."""
        if not with_vnet:
            return bytes(self.data)
        return (self.vnet_bytes() or NO_OFFLOAD) + self.data

    def copy(self) -> Frame:
        frame = Frame(bytearray(self.data))
        if self._vraw is not None:
            frame._vraw = self._vraw
        elif self._vnet is not None:
            frame._vnet = VnetHeader(*_VNET.unpack(self._vnet.pack()))
        return frame

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"Frame({len(self.data)} bytes, vnet={self.vnet!r})"
