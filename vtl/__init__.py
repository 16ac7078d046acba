"""VTL: a framework for transparent network services.

This package is the public API that plugin authors import: the packet access
API (:mod:`vtl.packet`), frames and their offload metadata, the service base
class and its context, verdicts and errors.
"""

from vtl.errors import (
    ConfigError,
    LocalProtocolError,
    PacketError,
    RemoteProtocolError,
    SetupError,
    VTLError,
)
from vtl.frame import Frame, VnetHeader
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

__version__ = "0.1.0"

__all__ = [
    "CONSUMED", "DROP", "PASS", "ConfigError", "Direction", "Frame", "LocalProtocolError",
    "PacketError", "RemoteProtocolError", "Service", "ServiceContext", "ServiceCounters",
    "ServiceOptions", "SetupError", "VTLError", "Verdict", "VnetHeader", "__version__",
]
