"""Upstream stream transports: how the bridge reaches what a service asked for.

One module per ``StreamRequest.kind``; :mod:`.base` says what a transport is.
:func:`builtin_transports` is what a :class:`~vtl.bridge.streams.StreamManager`
starts with; a new kind is a :class:`Transport` subclass added there.
"""

from __future__ import annotations

from vtl.bridge.transports.base import (
    Handshake,
    HandshakeStep,
    InboundStream,
    Transport,
    TransportError,
    TransportListener,
)
from vtl.bridge.transports.socks5 import Socks5Transport
from vtl.bridge.transports.tcp import TcpTransport
from vtl.bridge.transports.udt import UdtTransport


def builtin_transports() -> dict[str, Transport]:
    """A fresh instance of every built-in transport, by kind."""
    return {t.kind: t for t in (TcpTransport(), Socks5Transport(), UdtTransport())}


__all__ = [
    "Handshake", "HandshakeStep", "InboundStream", "Socks5Transport", "TcpTransport",
    "Transport", "TransportError", "TransportListener", "UdtTransport", "builtin_transports",
]
