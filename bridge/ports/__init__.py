"""The network interface API: ports that read and write Ethernet frames.

A bridge has two ports, ``guest`` and ``uplink``. Three kinds exist:

- ``tap`` (:class:`TapPort`): VTL creates and owns the VM's TAP device, may move
  its kernel side into a network namespace, and speaks the virtio-net header
  with checksum and TSO offloads (the fast path);
- ``packet`` (:class:`PacketPort`): an existing interface through an AF_PACKET
  socket, with the virtio-net header too;
- ``pcap`` (:class:`PcapPort`): an existing interface through libpcap
  (pcapy-ng), capturing inbound frames only, no virtio-net header.

Use :func:`make_port` with a validated config; every port follows the
:class:`Port` contract in :mod:`.base` (non-blocking ``recv_batch``, ``send``
that never raises per frame, :class:`vtl.errors.SetupError` on set-up).
Batching and offloads live here and nowhere else; see each module's docstring
for its theory of operation and measured pitfalls.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .base import Port, PortCounters
from .packet import PacketPort, PacketPortConfig
from .pcap import PcapPort, PcapPortConfig
from .tap import TapPort, TapPortConfig

PortConfig = Annotated[
    TapPortConfig | PcapPortConfig | PacketPortConfig, Field(discriminator="kind")
]

__all__ = [
    "PacketPort",
    "PacketPortConfig",
    "PcapPort",
    "PcapPortConfig",
    "Port",
    "PortConfig",
    "PortCounters",
    "TapPort",
    "TapPortConfig",
    "make_port",
]


def make_port(role: str, cfg: PortConfig) -> Port:
    """Build (not open) the port described by ``cfg`` for ``role`` ("guest" or "uplink")."""
    if isinstance(cfg, TapPortConfig):
        return TapPort(role, cfg)
    if isinstance(cfg, PacketPortConfig):
        return PacketPort(role, cfg)
    if isinstance(cfg, PcapPortConfig):
        return PcapPort(role, cfg)
    raise TypeError(f"not a port config: {cfg!r}")
