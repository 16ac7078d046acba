"""VXLAN links: how a service asks the bridge for the host kernel's own VXLAN datapath.

A service that carries whole Ethernet frames between sites (``tunnel`` with
``datapath = "kernel"``) can leave encapsulation, segmentation and coalescing to
the Linux kernel, which does them in C at tens of gigabits, and keep the
decisions for itself (which frames, to which peer, with which MAC, TTL and MSS).
It describes the link it wants with a :class:`VxlanRequest` and calls
``ctx.open_vxlan(request, on_frame)``; the bridge creates the device at once (a
failure raises :class:`vtl.errors.SetupError` naming the reason, so the
service's ``start`` fails and the bridge does not start) and returns a
:class:`VxlanLink` handle. The device, its forwarding entries and its filter
are the bridge's and go away with the handle.

- **Sending**: :meth:`VxlanLink.send` hands one frame, GSO frames of up to
  64 KB included, to the kernel for ``remote``: the kernel encapsulates it
  (VXLAN over UDP from the request's ``local`` address and ``port``, the source
  port hashed per flow as RFC 7348 says), cuts GSO frames into datagrams of the
  link's MTU and computes the checksums. A frame goes to the remote its
  destination MAC is bound to in the device's forwarding table; ``send`` binds
  it to ``remote`` first when it is not already (one netlink request per new or
  moved MAC; at most ``max_macs`` bindings, the least recently used dropped).
  Frames to a broadcast or multicast MAC are refused (``False``): a VXLAN
  device would flood them to every remote; send those with a datagram socket.
  It returns ``False`` when the frame was not sent, and counts why; it never
  raises.
- **Receiving**: the kernel checks and decapsulates datagrams on the local
  endpoint; one that does not come from one of ``remotes``, lacks the I flag or
  carries another VNI is dropped and counted by a filter rule before the kernel
  decodes it (:meth:`VxlanLink.counters`: ``unknown_peer``, ``bad_flags``,
  ``bad_vni``). The inner frames, coalesced by the kernel's GRO into frames of
  up to 64 KB (a GSO virtio-net header, :attr:`vtl.frame.Frame.vnet`), are
  handed to ``on_frame(frame, now)`` in batches under the chain lock, exactly
  like ``process``; the outer addresses are not given (the filter has checked
  them). Frames the handler emits with ``ctx.emit`` are walked and written
  after the batch.
- **Closing**: at chain stop (or :meth:`VxlanLink.close`); the device and its
  filter are removed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vtl.frame import Frame


@dataclass(frozen=True, slots=True)
class VxlanRequest:
    """The link a service wants. ``local`` is an IPv4 or IPv6 literal of this host (it
    decides the underlay family), ``remotes`` the addresses datagrams are accepted from
    (of the same family), ``mtu`` the largest inner IP packet."""

    local: str
    vni: int
    remotes: tuple[str, ...]
    port: int = 4789
    mtu: int = 1450
    max_macs: int = 4096  # MAC -> remote bindings kept in the device at most
    batch: int = 64  # frames read per wake-up, handled under one chain lock


FrameHandler = Callable[[Frame, float], None]


class VxlanLink(Protocol):
    """The handle the bridge returns (see the module docstring)."""

    @property
    def device(self) -> str:
        """The kernel device's name (for ``ip -d link show``, ``bridge fdb show``)."""

    def send(self, frame: Frame, remote: str) -> bool:
        """Hand ``frame`` (unicast destination MAC) to the kernel for ``remote``; False
        when it was not sent."""

    def set_remotes(self, remotes: Sequence[str]) -> None:
        """Accept datagrams from these addresses from now on (bindings to a remote no
        longer listed are dropped)."""

    def counters(self) -> dict[str, int]:
        """rx, rx_bytes, tx, tx_bytes, tx_dropped, tx_multicast, macs, mac_updates, and
        the filter's unknown_peer, bad_flags, bad_vni (-1 when they cannot be read)."""

    def close(self) -> None:
        """Remove the device and its filter (idempotent)."""
