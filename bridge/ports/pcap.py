"""pcap port: attach to an existing interface through libpcap (pcapy-ng).

Theory of operation
-------------------
``pcapy.open_live`` opens the interface with a large snaplen (262,144, enough
for a 64 KB GRO/GSO frame), promiscuous by default, and a 1 ms read timeout.
``setdirection(PCAP_D_IN)`` makes libpcap capture only frames *arriving* on the
interface, so VTL never re-reads what it injected with ``sendpacket`` (nor what
the host itself sends). The handle is made non-blocking and its selectable fd
(``getfd``) is what the engine polls; ``recv_batch`` drains it with
``dispatch``. Frames read never carry a virtio-net header (``vnet`` is False).

Sending: libpcap's ``pcap_inject`` on Linux is one ``send()`` on the handle's own
packet socket, without a virtio-net header: every GSO frame the guest's TAP hands
over would have to be cut and checksummed in Python first, and pcapy-ng's
``sendpacket`` holds the GIL for the whole system call. So the port writes
through a packet socket of its own bound to the same interface with
``PACKET_VNET_HDR`` (``vnet_tx``; it receives nothing: protocol 0): a 64 KB GSO
frame leaves in one ``send()``, with the GIL released, and the kernel segments
and checksums it (``carries``: csum, and TSO when the device has it), as for the
``packet`` port. The frames go through the interface's qdisc, so ``tcpdump`` on
the uplink sees them. On the handle's own socket the port sets
``PACKET_IGNORE_OUTGOING``, so what it sends is not copied into libpcap's ring
only to be dropped there by the ``PCAP_D_IN`` check (kernels before 4.20 lack
it: libpcap then drops them itself).

``mac`` is the interface's own MAC, so the engine can leave frames addressed
to the host to the host.

Pitfalls
--------
- pcapy-ng has no immediate mode: libpcap hands packets over in timed blocks
  (TPACKET_V3), which added 0.3-1 ms of RTT in the study. Keep ``timeout_ms``
  at 1, or use the ``packet`` port where latency matters.
- There is no virtio-net header here: frames from a local peer (a veth) carry
  checksums its stack left to the device, and a peer with TSO or a NIC with GRO
  delivers frames bigger than the MTU. The bridge asks the guest's kernel to
  finish those checksums and gives big frames GSO metadata (``bridge/lanes.py``,
  ``prepare_offloads``).
- A captured frame shorter than on the wire (caplen < len) is counted in
  ``rx_errors`` and dropped rather than forwarded truncated.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vtl.errors import SetupError
from vtl.frame import VNET_HDR_LEN

from .base import (
    IfName,
    Port,
    describe_oserror,
    device_offloads,
    interface_mac_mtu,
    require_interface,
)
from .packet import PACKET_IGNORE_OUTGOING, PACKET_VNET_HDR, SOL_PACKET

try:  # pcapy-ng installs the module "pcapy"
    import pcapy
except ImportError:  # pragma: no cover - a dependency of the package
    pcapy = None


class PcapPortConfig(BaseModel):
    """An existing interface, attached through libpcap (inbound capture only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pcap"] = Field(description="Port kind: libpcap (pcapy-ng).")
    ifname: IfName = Field(description="Existing interface to attach to, e.g. eth1.")
    timeout_ms: int = Field(
        default=1,
        ge=1,
        description="libpcap read timeout in ms; pcapy-ng has no immediate mode, keep it at 1.",
    )
    snaplen: int = Field(
        default=262144,
        ge=1514,
        description="Largest frame captured whole; big enough for 64 KB GRO/GSO frames.",
    )
    promisc: bool = Field(
        default=True, description="Put the interface in promiscuous mode while attached."
    )


class PcapPort(Port):
    """An existing interface seen through a libpcap handle (direction: in)."""

    def __init__(self, role: str, cfg: PcapPortConfig):
        super().__init__(role, cfg.ifname, vnet=False)
        self.vnet_tx = True  # written through the port's own packet socket
        self.cfg = cfg
        self._pcap = None
        self._fd = -1
        self._sock: socket.socket | None = None  # our packet socket for sending
        self._batch: list[bytes] = []

    @property
    def is_open(self) -> bool:
        return self._pcap is not None

    def fileno(self) -> int:
        if self._pcap is None:
            raise ValueError(f"port {self.ifname!r} is not open")
        return self._fd

    def open(self) -> None:
        if self._pcap is not None:
            return
        cfg = self.cfg
        what = f"attach to interface {cfg.ifname!r} with pcap"
        if pcapy is None:
            raise SetupError(f"cannot {what}: pcapy-ng is not installed; `pip install pcapy-ng`")
        require_interface(cfg.ifname, what)
        try:
            handle = pcapy.open_live(cfg.ifname, cfg.snaplen, int(cfg.promisc), cfg.timeout_ms)
        except pcapy.PcapError as exc:
            raise SetupError(f"cannot {what}: {_pcap_reason(str(exc), cfg.ifname)}") from None
        try:
            handle.setdirection(pcapy.PCAP_D_IN)
            handle.setnonblock(1)
            fd = handle.getfd()
            self.mac, self.mtu = interface_mac_mtu(cfg.ifname)
        except (pcapy.PcapError, OSError) as exc:
            _close_handle(handle)
            raise SetupError(f"cannot {what}: {exc}") from None
        if fd < 0:
            _close_handle(handle)
            raise SetupError(f"cannot {what}: libpcap gives no selectable fd for it")
        try:
            self._sock = _send_socket(cfg.ifname)
            _ignore_outgoing(fd)
        except OSError as exc:
            _close_handle(handle)
            raise SetupError(f"cannot {what}: {describe_oserror(exc, 'CAP_NET_RAW')}") from None
        self._pcap, self._fd = handle, fd

    def close(self) -> None:
        handle, self._pcap = self._pcap, None
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._fd = -1
        if handle is not None:
            _close_handle(handle)

    def _collect(self, hdr, data: bytes) -> None:
        c = self.counters
        if hdr.getcaplen() < hdr.getlen():
            c.rx_errors += 1
            return
        self._batch.append(data)
        c.rx_bytes += len(data)

    def recv_batch(self, max_frames: int = 64, views: bool = False
                   ) -> list[bytes | bytearray | memoryview]:
        handle = self._pcap
        if handle is None:
            return []
        self._batch = out = []
        try:
            handle.dispatch(max_frames, self._collect)
        except pcapy.PcapError:
            self.counters.rx_errors += 1
        self._batch = []
        self.counters.rx_frames += len(out)
        return out

    def send(self, raw: bytes | bytearray | memoryview) -> bool:
        return self.send_parts(b"", raw)  # ``raw`` starts with its virtio-net header

    def send_parts(self, head: bytes, body: bytes | bytearray | memoryview) -> bool:
        """One frame sent from two buffers (sendmsg: the body is not copied here)."""
        sock = self._sock
        c = self.counters
        if sock is None:
            c.tx_dropped += 1
            return False
        try:
            sock.sendmsg((head, body))
        except OSError:  # ENOBUFS, EMSGSIZE, link down...: per-frame, never raise
            c.tx_dropped += 1
            return False
        c.tx_frames += 1
        c.tx_bytes += len(head) + len(body) - VNET_HDR_LEN
        return True

    def carries(self) -> int:
        """As a packet port with virtio-net headers: :func:`device_offloads`."""
        return device_offloads(self.ifname)


def _send_socket(ifname: str) -> socket.socket:
    """A packet socket that only sends, on ``ifname``, with virtio-net headers."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.bind((ifname, 0))  # protocol 0: no frame is ever queued to it
    except OSError:
        sock.close()
        raise
    return sock


def _ignore_outgoing(fd: int) -> None:
    """``PACKET_IGNORE_OUTGOING`` on libpcap's socket (a duplicate of its fd: the same
    socket); best effort, see the module docstring."""
    try:
        with socket.socket(fileno=os.dup(fd)) as dup:
            dup.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass


def _close_handle(handle) -> None:
    try:
        handle.close()
    except Exception:
        pass


def _pcap_reason(msg: str, ifname: str) -> str:
    low = msg.lower()
    if "permission" in low or "not permitted" in low:
        return "operation not permitted; run as root or grant CAP_NET_RAW and CAP_NET_ADMIN"
    if "no such device" in low:
        return f"interface {ifname!r} does not exist; check `ip link`"
    return msg
