"""Upstream stream transports: how the bridge reaches what a service asked for.

One module per ``StreamRequest.kind``; :mod:`.base` says what a transport is.
:func:`builtin_transports` is what a :class:`~vtl.bridge.streams.StreamManager`
starts with; a new kind is a :class:`Transport` subclass added there.
"""

from __future__ import annotations

from vtl.bridge.transports.base import Handshake, HandshakeStep, Transport, TransportError
from vtl.bridge.transports.socks5 import Socks5Transport
from vtl.bridge.transports.tcp import TcpTransport


def builtin_transports() -> dict[str, Transport]:
    """A fresh instance of every built-in transport, by kind."""
    return {t.kind: t for t in (TcpTransport(), Socks5Transport())}


__all__ = [
    "Handshake", "HandshakeStep", "Socks5Transport", "TcpTransport", "Transport",
    "TransportError", "builtin_transports",
]
