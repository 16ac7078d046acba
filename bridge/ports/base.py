"""The port contract: what the engine sees of a network interface.

Theory of operation
-------------------
A bridge has two ports, ``guest`` and ``uplink``. A :class:`Port` is a thin,
non-blocking wrapper around one kernel file descriptor (a TAP fd, an AF_PACKET
socket or a libpcap handle). The engine waits for readiness on
:meth:`Port.fileno` with select/poll/epoll, then drains the port with
:meth:`Port.recv_batch` and writes frames with :meth:`Port.send`.

Invariants every port keeps:

- ``recv_batch`` never blocks and returns ``[]`` when nothing is ready. Each
  item is one frame as ``bytes``, or a fresh ``bytearray`` the caller may keep
  and change (tap and packet ports: the engine's frame takes it over without a
  copy); it starts with the 10-byte virtio-net header exactly when
  ``port.vnet`` is true (see :mod:`vtl.frame`). With ``views=True`` the tap and
  packet ports read the first :data:`RING_FRAMES` frames into buffers of their
  own and hand out read-only-by-contract ``memoryview`` s of them, valid until
  the next ``recv_batch``: the engine writes a frame it forwards unchanged
  without ever copying it (a 64 KB copy cost as much as the read itself), and
  copies what it keeps.
- ``send`` takes a frame that starts with a virtio-net header exactly when
  ``port.vnet_tx`` is true: the same as ``vnet`` for every port but ``pcap``,
  which reads through libpcap (no header) and writes through a packet socket of
  its own with one (so GSO frames leave whole). It never raises for a problem with one
  frame (full queue, frame too big, malformed virtio header, link down): it
  returns ``False`` and counts the frame in ``counters.tx_dropped``.
- ``counters`` byte counts are Ethernet bytes, *without* the virtio-net header,
  so they compare with ``ip -s link``.
- Set-up failures raise :class:`vtl.errors.SetupError` whose message says what
  failed and what to do (run as root, check ``ip link``, ...). ``close`` is
  idempotent and safe after a failed ``open``. The only run-time raise is
  ``recv_batch`` raising ``SetupError`` when the device itself has gone away
  (deleted underneath us); a transient read error is counted in ``rx_errors``.
- One reader thread per port and any number of senders is fine; the engine
  reads a port in one thread and serialises its writes with a lock per port.

What ports deliberately do not do: no parsing, no filtering, no switching, no
checksum work. Offloads (virtio-net headers, GSO) are negotiated here and the
headers are passed through untouched; keeping them consistent is the packet
API's job.

Pitfalls (measured, see ``FAST-PATH.md``): read buffers must hold a 64 KB GSO
frame plus headers (65,536 + 24, plus the 10-byte virtio header); a port that
negotiates the virtio-net header must be paired with one that does too, or GSO
frames with partial checksums must be segmented/completed before they leave
on a port without it.
"""

from __future__ import annotations

import abc
import array
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator

from vtl.errors import SetupError

IFNAMSIZ = 16
#: Large enough for a 64 KB GSO frame, its Ethernet/VLAN headers and a virtio-net header.
READ_BUF_SIZE = 65536 + 24 + 10

SIOCGIFMTU = 0x8921
SIOCGIFHWADDR = 0x8927

#: errnos that mean "this one frame could not go out right now"; the frame is dropped.
TX_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.EMSGSIZE})


@dataclass(slots=True)
class PortCounters:
    """Per-port frame and byte counters (bytes exclude the virtio-net header)."""

    rx_frames: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0
    rx_errors: int = 0


# What a port can be handed to send (the TUN_F_* offload bits of TUNSETOFFLOAD): a
# partial checksum the kernel completes, TCP GSO frames for IPv4 and IPv6, ECN in GSO
OFF_CSUM, OFF_TSO4, OFF_TSO6, OFF_TSO_ECN = 0x01, 0x02, 0x04, 0x08
OFF_ALL = OFF_CSUM | OFF_TSO4 | OFF_TSO6 | OFF_TSO_ECN


def offload_names(flags: int) -> str:
    names = [n for bit, n in ((OFF_CSUM, "csum"), (OFF_TSO4, "tso4"), (OFF_TSO6, "tso6"),
                              (OFF_TSO_ECN, "tso-ecn")) if flags & bit]
    return "+".join(names) or "none"


RING_FRAMES = 64  # read buffers a port keeps for ``recv_batch(views=True)``


class Port(abc.ABC):
    """One side of a bridge: a non-blocking source and sink of Ethernet frames."""

    role: str
    ifname: str
    vnet: bool
    mtu: int
    mac: bytes | None
    counters: PortCounters

    def __init__(self, role: str, ifname: str, vnet: bool, mtu: int = 1500):
        if role not in ("guest", "uplink", "link"):  # link: a service's (vtl.bridge.vxlan)
            raise ValueError(f"port role must be 'guest' or 'uplink', not {role!r}")
        self.role = role
        self.ifname = ifname
        self.vnet = vnet
        self.vnet_tx = vnet  # frames written carry the header (see the module docstring)
        self.mtu = mtu
        self._ring: list[bytearray] = []  # see recv_batch(views=True); filled as needed
        self.mac = None
        self.counters = PortCounters()

    @abc.abstractmethod
    def open(self) -> None:
        """Acquire the interface; raise :class:`SetupError` with a reason and a fix."""

    def carries(self) -> int:
        """The offloads (``OFF_*``) a frame written to this port may ask for, the port
        being open: the kernel does that work (or the device), not Python. Without
        virtio-net headers, none."""
        return OFF_ALL if self.vnet_tx else 0

    @abc.abstractmethod
    def close(self) -> None:
        """Release the interface. Idempotent."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """A file descriptor that polls readable when frames may be waiting."""

    @abc.abstractmethod
    def recv_batch(self, max_frames: int = 64, views: bool = False
                   ) -> list[bytes | bytearray | memoryview]:
        """Up to ``max_frames`` frames, without blocking; ``[]`` when none is ready
        (``views``: see the module docstring)."""

    def _slot(self, k: int) -> bytearray | None:
        """The ``k``-th read buffer of ``recv_batch(views=True)``, or None past the last."""
        ring = self._ring
        if k < len(ring):
            return ring[k]
        if k >= RING_FRAMES:
            return None
        ring.append(bytearray(READ_BUF_SIZE))
        return ring[k]

    @abc.abstractmethod
    def send(self, raw: bytes | bytearray | memoryview) -> bool:
        """Write one frame; ``False`` (counted in ``tx_dropped``) when it was not sent."""

    def send_parts(self, head: bytes, body: bytes | bytearray) -> bool:
        """Write the frame ``head + body`` (a virtio-net header and a frame): ports that
        can gather override it and save copying the body (64 KB for a GSO frame)."""
        return self.send(head + body)

    @property
    def is_open(self) -> bool:
        return False

    def __enter__(self) -> Port:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<{type(self).__name__} {self.role} {self.ifname!r} {state} vnet={self.vnet}>"


# --------------------------------------------------------------------------- helpers


def ifname_problem(name: str) -> str | None:
    """Why ``name`` is not a valid Linux interface name (``dev_valid_name``), or None."""
    if not name:
        return "interface name is empty"
    if len(name.encode()) >= IFNAMSIZ:
        return (
            f"interface name {name!r} is {len(name.encode())} bytes long; Linux allows at most "
            f"{IFNAMSIZ - 1}; choose a shorter name"
        )
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        return f"interface name {name!r} is not valid; do not use '/', ':' or spaces"
    return None


def _validate_ifname(name: str) -> str:
    problem = ifname_problem(name)
    if problem:
        raise ValueError(problem)
    return name


#: an interface name, checked like Linux's ``dev_valid_name`` when a config is validated
IfName = Annotated[str, AfterValidator(_validate_ifname)]


def check_ifname(name: str, what: str) -> None:
    """Raise :class:`SetupError` when ``name`` cannot be an interface name."""
    problem = ifname_problem(name)
    if problem:
        raise SetupError(f"cannot {what}: {problem}")


def require_interface(ifname: str, what: str) -> int:
    """The ifindex of ``ifname`` in our namespace, or a SetupError saying it is missing."""
    check_ifname(ifname, what)
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise SetupError(
            f"cannot {what}: interface {ifname!r} does not exist; check `ip link`"
        ) from None


def interface_mac_mtu(ifname: str) -> tuple[bytes | None, int]:
    """The hardware address and MTU of ``ifname`` (MAC None if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16s16x", ifname.encode())
        mtu = struct.unpack_from("i", fcntl.ioctl(s, SIOCGIFMTU, req), 16)[0]
        res = fcntl.ioctl(s, SIOCGIFHWADDR, req)
    family = struct.unpack_from("H", res, 16)[0]
    mac = res[18:24]
    if family != 1 or mac == bytes(6):  # ARPHRD_ETHER only; lo has all zeroes
        return None, mtu
    return bytes(mac), mtu


SIOCETHTOOL = 0x8946
ETHTOOL_GTSO = 0x1E


def device_tso(ifname: str) -> bool | None:
    """Whether ``ifname`` has TCP segmentation offload on (``ethtool -k``'s
    tcp-segmentation-offload); None when the device does not say."""
    value = array.array("I", [ETHTOOL_GTSO, 0])  # struct ethtool_value {cmd; data}
    req = struct.pack("16sP16x", ifname.encode(), value.buffer_info()[0])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCETHTOOL, req)
    except OSError:
        return None
    return bool(value[1])


def device_offloads(ifname: str) -> int:
    """What a packet socket with virtio-net headers on ``ifname`` carries: a partial
    checksum always (the kernel completes it on the way out); GSO frames only when the
    device has TSO on, else the guest's own kernel, not the host's, cuts them."""
    return OFF_ALL if device_tso(ifname) is not False else OFF_CSUM


def describe_oserror(exc: OSError, privilege: str = "CAP_NET_ADMIN") -> str:
    """A plain-language reason and fix for common errnos."""
    if exc.errno in (errno.EPERM, errno.EACCES):
        return f"operation not permitted; run as root or grant {privilege}"
    if exc.errno == errno.ENODEV:
        return "no such device; check `ip link`"
    if exc.errno == errno.EBUSY:
        return "device or resource busy; another process is using it"
    return os.strerror(exc.errno) if exc.errno else str(exc)
