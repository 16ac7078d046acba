"""The bridge's two lanes (one per direction), their chainless paths, and the offloads
the ports agree on.

Theory of operation. A :class:`Lane` is one direction of forwarding: its input and
output ports, a lock so that one thread at a time reads its input (frames of a
direction never overtake each other), and the learning switch's memory of the last
source MAC. With an empty chain a lane forwards without building a
:class:`~vtl.frame.Frame` (:func:`forward_plain`), in one of three modes:

- ``same``: the input's frames carry virtio-net headers exactly when the output's
  take them (``src.vnet == dst.vnet_tx``; a TAP toward a packet or pcap uplink):
  each frame is written as it was read (a 64 KB GSO frame stays whole);
- ``strip``: from a port with virtio-net headers to one without (a TAP toward a
  packet socket configured without ``vnet_hdr``): a frame whose header asks nothing
  (no GSO, no partial checksum) loses its 10 bytes on the way out; any other is left
  to the chain path, which cuts and checksums it in software;
- ``add``: from a port without headers to one with them (pcap toward a TAP): libpcap
  on a local interface hands over checksums that were never finished (the sender's
  stack left them to the device), and nothing says which, so a TCP or UDP frame
  that fits the output's MTU gets its pseudo-header sum and a header asking the
  guest's kernel to finish the checksum (:func:`vtl.packet.offload.partial_csum`,
  no pass over the payload); other frames get an empty header; a bigger one (GRO),
  or one with VLAN tags or IPv6 extension headers, is left to the chain path, which
  does the same with the packet API and gives oversized frames GSO metadata.

Offload negotiation (:func:`negotiate_offloads`, when the ports open): a TAP offers
its guest only the offloads the other port can carry (``Port.carries``). Toward a
packet socket without virtio-net headers the guest is offered none: its own kernel
segments and checksums (in C, at its line rate), and the ``strip`` mode forwards its
frames without Python touching their bytes. Toward a packet or pcap uplink on a
device without TSO it is offered checksum offload only; with TSO, everything (the
host's kernel segments on the way out).

:func:`admit` is the learning switch at a lane's input: frames from the guest teach
the MAC table their source; frames toward the guest pass only to a MAC the table
holds (or a service pinned), or to a group address.

Busy polling (``[bridge] busy_poll_us``): after a lane's last frame, the to-uplink
thread keeps polling both lanes that long before it sleeps, so the next frame in
either direction is taken at once instead of after a wake-up (a sleeping vCPU comes
back tens of microseconds late). Only one thread spins: two would fight over the
GIL and over the guest's CPUs, which made round trips slower, not faster.

:func:`pin_threads` (``[bridge] cpus``) keeps every thread of the bridge on the given
CPUs; threads started later inherit it.

:func:`precise_timers`: each forwarding thread asks for a 1 us timer slack, so its
sleeps until the chain's next deadline end on time (the engine's ``_sleep``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any

from vtl.bridge.ports import Port
from vtl.bridge.ports.base import offload_names

from vtl.flow import FlowTable
from vtl.frame import VNET_HDR_LEN
from vtl.packet.offload import partial_csum
from vtl.service import Direction

_PR_SET_TIMERSLACK = 29


class Lane:
    """One direction of forwarding (see the module docstring)."""

    __slots__ = ("src", "dst", "direction", "to_uplink", "off", "mode", "lock", "last_src",
                 "last_seen", "max_add")

    def __init__(self, src: Port, dst: Port, direction: Direction, empty_chain: bool):
        self.src, self.dst, self.direction = src, dst, direction
        self.to_uplink = direction is Direction.TO_UPLINK
        self.off = VNET_HDR_LEN if src.vnet else 0
        self.mode: str | None = None
        self.chain_is(empty_chain)
        self.lock = threading.Lock()
        self.last_src = b""
        self.last_seen = 0.0
        self.max_add = dst.mtu + 18  # Ethernet header, one VLAN tag

    def chain_is(self, empty: bool) -> None:
        """Take (or leave) the chainless path when the chain becomes empty (or not)."""
        if not empty:
            self.mode = None
        elif self.src.vnet == self.dst.vnet_tx:
            self.mode = "same"
        else:
            self.mode = "strip" if self.src.vnet else "add"


def forward_plain(lane: Lane, frames: list[bytes | bytearray], wlock: threading.Lock
                  ) -> list[bytes | bytearray]:
    """Write ``frames`` (as read, the chain empty) to the lane's output; the ones this
    path cannot write as they are, for the chain path (see the module docstring)."""
    dst = lane.dst
    rest: list[bytes | bytearray] = []
    with wlock:
        if lane.mode == "same":
            send = dst.send
            for raw in frames:
                send(raw)
        elif lane.mode == "strip":
            send = dst.send
            for raw in frames:
                if raw[0] & 1 or raw[1]:  # NEEDS_CSUM, or a GSO frame
                    rest.append(raw)
                else:
                    send(memoryview(raw)[VNET_HDR_LEN:])
        else:
            send_parts, limit = dst.send_parts, lane.max_add
            for raw in frames:
                data = raw if type(raw) is bytearray else bytearray(raw)
                head = partial_csum(data) if len(data) <= limit else None
                if head is None:
                    rest.append(data)
                else:
                    send_parts(head, data)
    return rest


def admit(lane: Lane, batch: list, now: float, macs: FlowTable[bytes, bool],
          pins: dict[bytes, float], counters: Any) -> list:
    """The frames of ``batch`` that go on (see the module docstring); ``counters`` (the
    bridge's) count the rest: ``malformed``, ``mac_overflow``, ``not_for_guest``."""
    off = lane.off
    good = []
    if lane.to_uplink:
        for raw in batch:
            if len(raw) < off + 14:
                counters.malformed += 1
                continue
            mac = raw[off + 6:off + 12]  # a bytearray slice, hashed as bytes below
            if mac != lane.last_src or now - lane.last_seen > 1.0:
                mac = bytes(mac)
                if not mac[0] & 1 and not macs.touch(mac, now) and not macs.put(mac, True, now):
                    counters.mac_overflow += 1
                lane.last_src, lane.last_seen = mac, now
            good.append(raw)
        return good
    expires_at = macs.expires_at
    for raw in batch:
        if len(raw) < off + 14:
            counters.malformed += 1
            continue
        if raw[off] & 1:
            good.append(raw)
            continue
        dst = bytes(raw[off:off + 6])
        until = expires_at(dst)
        if until is not None and until > now:
            good.append(raw)
        elif pins and pins.get(dst, 0.0) > now:
            good.append(raw)  # pinned by a service: a paused guest says nothing
        else:
            counters.not_for_guest += 1
    return good


def negotiate_offloads(guest: Port, uplink: Port, log: logging.Logger) -> None:
    """Each TAP offers its guest what the other port carries (see the module docstring),
    and the log says what was agreed."""
    for port, other in ((guest, uplink), (uplink, guest)):
        offer = getattr(port, "offer", None)
        if offer is None or not port.vnet:
            continue
        carried = other.carries()
        offer(carried)
        log.info("offloads: the %s TAP %s offers %s (the %s port %s carries that)",
                 port.role, port.ifname, offload_names(carried), other.role, other.ifname)


def precise_timers() -> None:
    """Ask the kernel to wake this thread within 1 us of its timeouts (PR_SET_TIMERSLACK;
    the default slack is 50 us). Best effort: without it timers are a little later."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(1000), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def pin_threads(cpus: tuple[int, ...]) -> None:
    """Every thread of this process, and those it starts from now on, on ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass  # ended meanwhile
