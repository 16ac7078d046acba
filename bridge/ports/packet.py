"""AF_PACKET port: attach to an existing interface with a raw packet socket.

Theory of operation
-------------------
One ``AF_PACKET``/``SOCK_RAW`` socket, non-blocking, bound to one interface
with ``ETH_P_ALL``, does both directions. It is created with protocol 0 (so it
receives nothing yet), configured, and only then bound, so no frame of another
interface slips in between. Options, all at level ``SOL_PACKET`` (263):

- ``PACKET_VNET_HDR`` (15) = 1 when ``vnet_hdr``: every frame read and written
  carries the 10-byte virtio-net header, so GSO/GRO frames of up to 64 KB with
  partial checksums pass through unchanged (the fast path of ``FAST-PATH.md``);
- ``PACKET_IGNORE_OUTGOING`` (23) = 1: the socket does not see frames leaving
  the interface, neither the host's own nor the ones we inject;
- ``PACKET_QDISC_BYPASS`` (20) = 1 when ``qdisc_bypass = true``: injected
  frames go straight to the driver (they skip the qdisc and are not seen by
  other packet sockets' taps, so a ``tcpdump`` on the interface does not show
  them), until a GSO frame is refused (see below). By default (``false``) the
  option is never set: frames take the qdisc path and a capture on the
  interface sees them. The bypass bought no measurable speed here
  (``benchmarks/bridge.py --qdisc-bypass on|off``: TCP within 2% either way,
  64-byte UDP the same, ping RTT lower without it), so the default is what an
  operator debugging with ``tcpdump`` expects;
- ``PACKET_ADD_MEMBERSHIP`` with ``PACKET_MR_PROMISC`` when ``promisc``: the
  interface is promiscuous for as long as the socket lives (no state left behind);
- ``SO_RCVBUFFORCE`` (33) / ``SO_SNDBUFFORCE`` (32), which Python does not name,
  raise the buffers above ``rmem_max``; without CAP_NET_ADMIN we fall back to
  ``SO_RCVBUF``/``SO_SNDBUF``.

``mac`` is the interface's own MAC, so the engine can leave frames addressed
to the host to the host.

Pitfalls
--------
- ``socket.bind((ifname, proto))`` converts ``proto`` to network order itself:
  passing ``socket.htons(ETH_P_ALL)`` gives a socket that silently receives
  nothing. We pass ``ETH_P_ALL`` (0x0003) as is.
- Every ``ETH_P_ALL`` socket gets a copy of every frame; a socket used only to
  send should use protocol 0.
- Without the virtio-net header, a peer veth with its default checksum offload
  and TSO sends 64 KB frames with partial checksums that a guest drops (ping
  works, TCP never connects): keep ``vnet_hdr`` on, or turn the peer's offloads
  off with ethtool.
- Read buffers hold 65,536 + 24 + 10 bytes; a longer frame is counted in
  ``rx_errors`` and dropped (``MSG_TRUNC`` tells us its real length).
- The direct-xmit path of ``PACKET_QDISC_BYPASS`` cannot segment: a GSO frame
  (virtio-net header with a GSO type) sent to a device without the matching
  offload (``ethtool -K dev tso off``, a bond/tunnel without it, a frame above
  the device's GSO limits) is dropped by the kernel and ``send`` fails with
  ``ENOBUFS``. On the first such failure the port turns the bypass off on its
  socket, logs it once at info level, counts it in ``qdisc_fallbacks`` and
  sends the frame again; from then on frames go through the qdisc path, which
  segments GSO frames in software. Only GSO frames can trigger this: an
  ``ENOBUFS`` for a plain frame (a full driver queue) is a drop as before. A
  full queue hit by a GSO frame also turns the bypass off; that costs a little
  CPU per frame (the qdisc path) and drops nothing more. The check runs only when a
  send has already failed, so the normal send path costs the same.
- A TPACKET_V2 ring was tried in the study and lost sync under a 64-byte
  flood; plain ``recv_into`` is used on purpose.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vtl.errors import SetupError

from .base import (
    READ_BUF_SIZE,
    IfName,
    Port,
    describe_oserror,
    device_offloads,
    interface_mac_mtu,
    require_interface,
)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_VNET_HDR = 15
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

VNET_HDR_SIZE = 10
#: Offset of ``gso_type`` in the virtio-net header; the low bits are the type
#: (0: not a GSO frame), 0x80 is the ECN flag.
_GSO_TYPE_OFFSET = 1
_GSO_TYPE_MASK = 0x7F

log = logging.getLogger("vtl.ports")
_FATAL = frozenset({errno.EBADF, errno.ENODEV, errno.ENXIO})


class PacketPortConfig(BaseModel):
    """An existing interface, attached with an AF_PACKET socket (fast, both directions)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["packet"] = Field(description="Port kind: AF_PACKET raw socket.")
    ifname: IfName = Field(description="Existing interface to attach to, e.g. eth1.")
    vnet_hdr: bool = Field(
        default=True,
        description="Exchange frames with the 10-byte virtio-net header (PACKET_VNET_HDR), "
        "so 64 KB offloaded frames pass through unchanged.",
    )
    promisc: bool = Field(
        default=True, description="Put the interface in promiscuous mode while attached."
    )
    qdisc_bypass: bool = Field(
        default=False,
        description="Send frames straight to the driver (PACKET_QDISC_BYPASS), skipping the "
        "qdisc: a tcpdump on the interface then does not see what VTL sends, and it was not "
        "measurably faster (benchmarks/bridge.py --qdisc-bypass); false goes through the qdisc.",
    )
    rcvbuf: int = Field(
        default=4 * 1024 * 1024, ge=0, description="Socket receive buffer in bytes (0: default)."
    )
    sndbuf: int = Field(
        default=4 * 1024 * 1024, ge=0, description="Socket send buffer in bytes (0: default)."
    )


class PacketPort(Port):
    """An existing interface seen through one AF_PACKET socket."""

    def __init__(self, role: str, cfg: PacketPortConfig):
        super().__init__(role, cfg.ifname, vnet=cfg.vnet_hdr)
        self.cfg = cfg
        self._sock: socket.socket | None = None
        self._buf = bytearray(READ_BUF_SIZE)
        self._view = memoryview(self._buf)
        self._hdr = VNET_HDR_SIZE if cfg.vnet_hdr else 0
        #: Whether the open socket still has PACKET_QDISC_BYPASS on.
        self.qdisc_bypass = False
        #: Times a refused GSO frame made us turn the bypass off (at most once per open).
        self.qdisc_fallbacks = 0
        self._fallback_logged = False

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def carries(self) -> int:
        """Without virtio-net headers nothing; with them, :func:`device_offloads`."""
        return device_offloads(self.ifname) if self.vnet else 0

    def fileno(self) -> int:
        if self._sock is None:
            raise ValueError(f"port {self.ifname!r} is not open")
        return self._sock.fileno()

    def open(self) -> None:
        if self._sock is not None:
            return
        cfg = self.cfg
        what = f"attach to interface {cfg.ifname!r} with AF_PACKET"
        ifindex = require_interface(cfg.ifname, what)
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError as exc:
            raise SetupError(f"cannot {what}: {describe_oserror(exc, 'CAP_NET_RAW')}") from None
        try:
            sock.setblocking(False)
            if cfg.vnet_hdr:
                sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            if cfg.qdisc_bypass:
                sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            _set_buf(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, cfg.rcvbuf)
            _set_buf(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, cfg.sndbuf)
            sock.bind((cfg.ifname, ETH_P_ALL))  # NOT htons(ETH_P_ALL): bind converts it
            if cfg.promisc:
                mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            self.mac, self.mtu = interface_mac_mtu(cfg.ifname)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.ENODEV:
                raise SetupError(
                    f"cannot {what}: interface {cfg.ifname!r} does not exist; check `ip link`"
                ) from None
            raise SetupError(f"cannot {what}: {describe_oserror(exc, 'CAP_NET_RAW')}") from None
        self._sock = sock
        self.qdisc_bypass = cfg.qdisc_bypass

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self.qdisc_bypass = False
        if sock is not None:
            sock.close()  # drops the promiscuous membership too

    def recv_batch(self, max_frames: int = 64, views: bool = False
                   ) -> list[bytes | bytearray | memoryview]:
        sock = self._sock
        if sock is None:
            return []
        out: list[bytes | bytearray | memoryview] = []
        buf, view, hdr, c = self._buf, self._view, self._hdr, self.counters
        recv_into = sock.recv_into
        size = len(buf)
        slot = None
        while len(out) < max_frames:
            if views:
                slot = self._slot(len(out))
            try:
                n = recv_into(slot or buf, size, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:
                c.rx_errors += 1
                # ENETDOWN is reported once when the link goes down *or* is deleted.
                if exc.errno in _FATAL or (exc.errno == errno.ENETDOWN and not self._exists()):
                    raise SetupError(
                        f"interface {self.ifname!r} went away ({exc.strerror}); check `ip link`"
                    ) from None
                break  # link down: frames flow again once it is back up
            if n > size or n <= hdr:
                c.rx_errors += 1  # truncated (longer than any GSO frame) or empty
                continue
            if slot is None:
                out.append(bytearray(view[:n]))  # the frame takes it over: no 2nd copy
            else:
                out.append(memoryview(slot)[:n])  # valid until the next call
            c.rx_bytes += n - hdr
        c.rx_frames += len(out)
        return out

    def _exists(self) -> bool:
        try:
            socket.if_nametoindex(self.ifname)
        except OSError:
            return False
        return True

    def send(self, raw: bytes | bytearray | memoryview) -> bool:
        sock = self._sock
        c = self.counters
        if sock is None:
            c.tx_dropped += 1
            return False
        try:
            sock.send(raw)
        except OSError as exc:
            # EAGAIN/ENOBUFS/EMSGSIZE mostly; ENETDOWN and EINVAL (bad virtio header)
            # are per-frame too. Never raise on the fast path.
            if exc.errno == errno.ENOBUFS and self.qdisc_bypass and self._is_gso(raw):
                return self._send_without_bypass(sock, raw)
            c.tx_dropped += 1
            return False
        c.tx_frames += 1
        c.tx_bytes += len(raw) - self._hdr
        return True

    def send_parts(self, head: bytes, body: bytes | bytearray) -> bool:
        """One frame sent from two buffers (sendmsg: the body is not copied here)."""
        sock = self._sock
        c = self.counters
        if sock is None:
            c.tx_dropped += 1
            return False
        try:
            sock.sendmsg((head, body))
        except OSError as exc:
            if exc.errno == errno.ENOBUFS and self.qdisc_bypass:
                raw = head + body
                if self._is_gso(raw):
                    return self._send_without_bypass(sock, raw)
            c.tx_dropped += 1
            return False
        c.tx_frames += 1
        c.tx_bytes += len(head) + len(body) - self._hdr
        return True

    def _is_gso(self, raw: bytes | bytearray | memoryview) -> bool:
        return self._hdr > 0 and len(raw) > self._hdr and bool(
            raw[_GSO_TYPE_OFFSET] & _GSO_TYPE_MASK
        )

    def _send_without_bypass(
        self, sock: socket.socket, raw: bytes | bytearray | memoryview
    ) -> bool:
        """A GSO frame the direct-xmit path refused: go through the qdisc from now on."""
        c = self.counters
        self.qdisc_bypass = False
        try:
            sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 0)
        except OSError as exc:
            log.warning(
                "port %s (%s): cannot turn PACKET_QDISC_BYPASS off (%s); GSO frames "
                "to this interface are dropped", self.role, self.ifname, exc.strerror,
            )
            c.tx_dropped += 1
            return False
        self.qdisc_fallbacks += 1
        if not self._fallback_logged:
            self._fallback_logged = True
            log.info(
                "port %s (%s): the interface refused a GSO frame on the qdisc-bypass path "
                "(its TSO/GSO offload is off or does not fit the frame); sending through "
                "the qdisc from now on, which segments GSO frames in software",
                self.role, self.ifname,
            )
        try:
            sock.send(raw)
        except OSError:
            c.tx_dropped += 1
            return False
        c.tx_frames += 1
        c.tx_bytes += len(raw) - self._hdr
        return True


def _set_buf(sock: socket.socket, force_opt: int, opt: int, size: int) -> None:
    if size <= 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)  # capped at rmem_max/wmem_max
