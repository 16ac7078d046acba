"""Upstream byte streams: how a service asks the bridge for a connection.

A service that stands in for one end of the VM's TCP connection (``pep``,
``socks``, ``udt``) carries the bytes over a *stream* that the bridge opens:
a host TCP socket, a SOCKS5 tunnel, a UDT connection. Services stay sans-IO:
they describe the stream they want with a :class:`StreamRequest`, call
``ctx.open_stream(request, handler)`` and get a :class:`Stream` handle back at
once; the bridge does the I/O and calls ``handler(event, now)`` (under the
chain lock, like ``process``) with the events below. Frames the handler
emits are flushed by the bridge right after it returns.

Life of a stream::

    open_stream ──► StreamConnected ──► StreamData* ──► StreamEnded ──► StreamClosed
        │                                   (write / shutdown_write / pause_reading)
        └──► StreamClosed(reason="refused" | "timeout" | "unreachable" | "error")

Flow control, both ways, never unbounded:

- toward the upstream, :meth:`Stream.write` takes at most :attr:`Stream.write_room`
  bytes and returns how many it took; when it took less than offered the bridge
  sends :class:`StreamWritable` once room is back;
- from the upstream, :meth:`Stream.pause_reading` stops the bridge reading the
  socket (the upstream's own flow control then pushes back on the far end);
  each :class:`StreamData` is at most ``StreamRequest.read_chunk`` bytes.

Exactly one :class:`StreamClosed` ends every stream, whoever closed it; after
it the handle is dead (its methods do nothing). Calling :meth:`Stream.close`
or :meth:`Stream.abort` also produces that final event (``reason="local"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from vtl.flow import FlowKey

CloseReason = Literal[
    "closed",  # orderly: both sides finished (EOF seen and our shutdown flushed)
    "local",  # this side called close() or abort()
    "reset",  # the upstream reset the connection
    "refused",  # connection refused (TCP RST to our SYN, SOCKS "connection refused")
    "timeout",  # no answer within StreamRequest.timeout_s
    "unreachable",  # no route, host or network unreachable
    "prohibited",  # refused by the bridge's egress policy before any socket existed
    "error",  # anything else (the message says what)
]


@dataclass(frozen=True, slots=True)
class StreamFlow:
    """The guest's connection a stream carries, for transports that re-create it at the
    far end (``udt``): ``key`` as the client sent it (client -> server), and the
    client's and server's MAC addresses when known (empty: the far end uses what
    it learnt)."""

    key: FlowKey
    client_mac: bytes = b""
    server_mac: bytes = b""


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """What to connect to.

    ``kind`` names the transport (``"tcp"``; later ``"socks5"``, ``"udt"``);
    ``host`` is an address literal or, for transports that resolve remotely,
    a name. ``options`` carries transport-specific settings (proxy URL,
    credentials); ``flow`` the guest connection for transports that re-create it.
    """

    kind: str
    host: str
    port: int
    timeout_s: float = 10.0
    read_chunk: int = 256 * 1024  # largest StreamData the bridge delivers at once
    write_buffer: int = 256 * 1024  # bytes the bridge buffers beyond what the socket took
    options: Mapping[str, Any] = field(default_factory=dict)
    flow: StreamFlow | None = None  # the original connection, for transports that carry it


class Stream(Protocol):
    """The handle a service holds; every method is non-blocking."""

    id: int
    request: StreamRequest

    @property
    def write_room(self) -> int:
        """How many bytes :meth:`write` would take now (0 before connected or after shutdown)."""

    def write(self, data: bytes | bytearray | memoryview, now: float) -> int:
        """Queue up to :attr:`write_room` bytes; returns how many were taken."""

    def shutdown_write(self, now: float) -> None:
        """Half-close: send EOF after the queued bytes (TCP FIN)."""

    def pause_reading(self, paused: bool, now: float) -> None:
        """Stop (True) or resume (False) delivering :class:`StreamData`."""

    def close(self, now: float) -> None:
        """Flush queued bytes, then close both ways."""

    def abort(self, now: float) -> None:
        """Close at once, dropping queued bytes; a TCP upstream gets a RST."""


@dataclass(frozen=True, slots=True)
class StreamConnected:
    """The upstream accepted; ``local``/``remote`` are the socket's (host, port).

    ``reply`` is what the transport's handshake reported, when it has something
    to say: for SOCKS5 the reply's (BND.ADDR, BND.PORT); for Tor's RESOLVE that
    is the resolved address, for RESOLVE_PTR the host name.
    """

    stream: Stream
    local: tuple[str, int] | None = None
    remote: tuple[str, int] | None = None
    reply: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class StreamData:
    """Bytes from the upstream, in order."""

    stream: Stream
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The upstream will send nothing more (it half-closed: EOF)."""

    stream: Stream


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """:attr:`Stream.write_room` is above zero again after a short write."""

    stream: Stream


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The stream is over (the last event of every stream); ``message`` says why."""

    stream: Stream
    reason: CloseReason
    message: str = ""


StreamEvent = StreamConnected | StreamData | StreamEnded | StreamWritable | StreamClosed
StreamHandler = Callable[[StreamEvent, float], None]


# -- inbound streams ------------------------------------------------------------------------
#
# A service can also *take* streams that a remote party opens (the ``udt`` service
# at the far bridge): ``ctx.listen_streams(ListenRequest(...), on_offer)`` binds a
# listener; each inbound stream arrives as a :class:`StreamOffer` that the service
# answers once, when it knows (``accept`` after its own connection toward the VM
# is up, ``refuse`` when the VM refused). The opener's stream reports connected,
# or closes with the refusal's reason, only then.
#
#     listen_streams ──► on_offer(offer) ──► offer.accept(handler) ──► StreamConnected ...
#                                       └──► offer.refuse(reason)


@dataclass(frozen=True, slots=True)
class ListenRequest:
    """Where to take inbound streams: ``kind`` names the transport (``"udt"``),
    ``host``/``port`` the local address to bind (port 0: any). ``offer_timeout_s``:
    an offer not answered by then is refused with ``"timeout"`` by the bridge."""

    kind: str
    host: str
    port: int
    read_chunk: int = 256 * 1024
    write_buffer: int = 256 * 1024
    offer_timeout_s: float = 30.0
    options: Mapping[str, Any] = field(default_factory=dict)


class StreamOffer(Protocol):
    """An inbound stream whose opener waits for an answer; answer it once.

    ``peer`` is the remote (host, port) that opened it; ``flow`` is the guest
    connection the opener carries (for ``udt``: the original TCP connection as its
    client sent it), None for transports that carry none; ``meta`` is anything
    else the transport has to say about it.
    """

    peer: tuple[str, int]
    flow: StreamFlow | None
    meta: Mapping[str, Any]

    def accept(self, handler: StreamHandler) -> Stream:
        """Say yes: the opener's stream connects; this handle's events go to
        ``handler``, starting with :class:`StreamConnected` (or a
        :class:`StreamClosed` when the opener already left)."""

    def refuse(self, reason: CloseReason, message: str = "") -> None:
        """Say no: the opener's stream closes with ``reason`` (``"refused"``,
        ``"timeout"``, ``"unreachable"``, ``"error"``)."""


class Listener(Protocol):
    """A bound listener; ``address`` is the (host, port) actually bound."""

    address: tuple[str, int]

    def close(self) -> None:
        """Stop taking streams (offers not yet answered are refused)."""


OfferHandler = Callable[[StreamOffer, float], None]

__all__ = [
    "CloseReason", "ListenRequest", "Listener", "OfferHandler", "Stream", "StreamClosed",
    "StreamConnected", "StreamData", "StreamEnded", "StreamEvent", "StreamHandler",
    "StreamFlow", "StreamOffer", "StreamRequest", "StreamWritable",
]
