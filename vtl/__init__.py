"""VTL: a framework for transparent network services.

This package is the public API that plugin authors import: the packet access
API (:mod:`vtl.packet`; :class:`Packet` and the TCP flag names are here too),
frames and their offload metadata, flow keys and bounded flow tables
(:mod:`vtl.flow`), the service base class and its context, verdicts, upstream
streams (:mod:`vtl.stream`), UDP sockets (:mod:`vtl.datagram`) and errors.
:mod:`vtl.testing` has the fakes and the harness for a service's tests.
"""

from vtl.datagram import DatagramRequest, DatagramSocket
from vtl.errors import (
    ConfigError,
    LocalProtocolError,
    PacketError,
    RemoteProtocolError,
    SetupError,
    VTLError,
)
from vtl.flow import FlowKey, FlowTable
from vtl.frame import Frame, VnetHeader
from vtl.packet.packet import Packet
from vtl.packet.tcp import ACK, CWR, ECE, FIN, PSH, RST, SYN, URG
from vtl.service import (
    CONSUMED,
    DROP,
    PASS,
    Direction,
    Service,
    ServiceContext,
    ServiceCounters,
    ServiceOptions,
    Verdict,
)
from vtl.stream import Stream, StreamEvent, StreamFlow, StreamRequest

__version__ = "0.1.0"

__all__ = [
    "ACK", "CONSUMED", "CWR", "DROP", "ECE", "FIN", "PASS", "PSH", "RST", "SYN", "URG",
    "ConfigError", "DatagramRequest", "DatagramSocket", "Direction", "FlowKey", "FlowTable",
    "Frame", "LocalProtocolError", "Packet", "PacketError", "RemoteProtocolError", "Service",
    "ServiceContext", "ServiceCounters", "ServiceOptions", "SetupError", "Stream", "StreamEvent",
    "StreamFlow", "StreamRequest", "VTLError", "Verdict", "VnetHeader", "__version__",
]
