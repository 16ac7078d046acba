"""Conversion to and from scapy, for tests and convenience only.

scapy is imported lazily inside these functions: importing this module costs
nothing and the hot path never touches scapy (a scapy parse costs ~100 µs).
"""

from __future__ import annotations

from typing import Any

from vtl.frame import Frame
from vtl.packet.packet import Packet


def to_scapy(data: Frame | Packet | bytes | bytearray | memoryview) -> Any:
    """A scapy ``Ether`` packet dissected from the frame's bytes."""
    from scapy.layers.l2 import Ether

    if isinstance(data, Frame | Packet):
        data = data.data
    return Ether(bytes(data))


def from_scapy(pkt: Any) -> bytearray:
    """The bytes of a scapy packet (lengths and checksums filled in by scapy)."""
    return bytearray(bytes(pkt))
