"""What a stream transport is: how the bridge reaches an upstream for a service.

Theory of operation. The :class:`~vtl.bridge.streams.StreamManager` owns every
upstream socket and its I/O; a transport only knows how to *start* one. For a
:class:`~vtl.stream.StreamRequest` of its ``kind`` it says which address the
socket connects to (:meth:`Transport.endpoint`: the request's own host and port
for TCP, the proxy for SOCKS5), creates a non-blocking socket and starts the
connect (:meth:`Transport.connect`), and may add a sans-IO exchange that runs
after the TCP connect and before the service sees ``StreamConnected``
(:meth:`Transport.handshake`: a SOCKS5 greeting and CONNECT). The manager
resolves host names, enforces ``timeout_s`` over connect and handshake
together, and maps errors to close reasons.

A handshake never over-reads: it says exactly how many bytes it wants next,
the manager feeds it exactly that many, so the first application byte is
always delivered as ``StreamData``. A handshake fails by raising
:class:`TransportError` with a close reason.

Adding a transport is a subclass with a ``kind``, registered with
:meth:`~vtl.bridge.streams.StreamManager.register` (built-ins come from
:func:`vtl.bridge.transports.builtin_transports`). A transport whose
connections are not kernel sockets (UDT) can hand the manager one end of a
``socket.socketpair()`` and pump the other end itself.

Inbound streams: a transport that can take streams opened by a remote party
implements :meth:`Transport.listen`; each arrival is an
:class:`InboundStream` (the manager's end of a connected socket pair plus
how to answer the opener), which the manager turns into a
:class:`~vtl.stream.StreamOffer` for the service. :meth:`Transport.close`
releases what a transport holds across streams (threads, listeners) at
manager stop.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from vtl.errors import LocalProtocolError
from vtl.stream import CloseReason, ListenRequest, StreamFlow, StreamRequest


class TransportError(Exception):
    """A connect or handshake failed; ``reason`` becomes the StreamClosed reason."""

    def __init__(self, reason: CloseReason, message: str):
        super().__init__(message)
        self.reason: CloseReason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class HandshakeStep:
    """What a handshake wants done: send ``send``, then read exactly ``want`` bytes
    (``want == 0``: the handshake is over and the stream is connected)."""

    send: bytes = b""
    want: int = 0


class Handshake:
    """A sans-IO exchange after connect (one instance per stream).

    Set :attr:`reply` before the last step to hand the service what the
    upstream reported (it becomes ``StreamConnected.reply``).
    """

    reply: tuple[str, int] | None = None

    def start(self) -> HandshakeStep:
        """The first bytes to send and how many bytes to read back."""
        return HandshakeStep()

    def feed(self, data: bytes) -> HandshakeStep:
        """``data`` is exactly the ``want`` bytes asked for; say what comes next."""
        raise TransportError("error", f"{type(self).__name__} did not expect {len(data)} bytes")

    def failed(self, reason: CloseReason, message: str) -> tuple[CloseReason, str]:
        """The close reason and message when the exchange ends without :meth:`feed`
        raising: no answer within ``timeout_s``, the upstream closed or reset.

        The default keeps them; a proxy's handshake says which proxy, at which step.
        """
        return reason, message


@dataclass(frozen=True)
class InboundStream:
    """One stream a remote party opened, as a transport hands it to the manager.

    ``sock`` is the manager's end (connected, non-blocking); ``accept()`` tells
    the opener yes and returns the handshake the manager runs on ``sock``
    before ``StreamConnected`` (it fails with ``"reset"`` when the opener left);
    ``refuse(reason, message)`` tells the opener no (the manager closes ``sock``).
    Both are safe from any thread; exactly one is called. ``flow``: the guest
    connection the opener carries, for transports that carry one (``udt``).
    """

    sock: socket.socket
    peer: tuple[str, int]
    meta: Mapping[str, Any]
    accept: Callable[[], Handshake]
    refuse: Callable[[CloseReason, str], None]
    flow: StreamFlow | None = None


class TransportListener(Protocol):
    """What :meth:`Transport.listen` returns."""

    address: tuple[str, int]

    def close(self) -> None: ...


class Transport:
    """Starts upstream connections of one ``kind``; stateless across streams."""

    kind: ClassVar[str] = ""
    #: option keys this transport understands (others are API misuse)
    options: ClassVar[frozenset[str]] = frozenset()

    def check(self, request: StreamRequest) -> None:
        """Validate ``request.options`` up front; raise LocalProtocolError when wrong."""
        unknown = set(request.options) - self.options
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise LocalProtocolError(
                f"stream kind {self.kind!r}: unknown option(s) {', '.join(sorted(unknown))}"
                f" (known: {known})")

    def endpoint(self, request: StreamRequest) -> tuple[str, int]:
        """The (host, port) the socket connects to; host may be a name or a literal."""
        return request.host, request.port

    def connect(self, request: StreamRequest, family: int, sockaddr: tuple) -> socket.socket:
        """A non-blocking socket with its connect to ``sockaddr`` started.

        Raise OSError when the connect fails at once (no route, bad bind address).
        """
        raise NotImplementedError

    def connect_failed(self, request: StreamRequest, reason: CloseReason,
                       message: str) -> tuple[CloseReason, str]:
        """The close reason and message for a failed connect to :meth:`endpoint`.

        The default keeps them; a proxy transport says that the *proxy* failed.
        """
        return reason, message

    def handshake(self, request: StreamRequest) -> Handshake | None:
        """The exchange to run once connected, or None (the stream is connected)."""
        return None

    def listen(self, request: ListenRequest,
               deliver: Callable[[InboundStream], None]) -> TransportListener:
        """Bind at ``request``'s address (OSError when that fails) and pass each
        inbound stream to ``deliver`` (from any thread; it only queues)."""
        raise LocalProtocolError(f"stream kind {self.kind!r} cannot listen")

    def close(self) -> None:
        """Release what the transport holds across streams (manager stop)."""


_LINGER_RST = struct.pack("ii", 1, 0)


def close_socket(sock: socket.socket, rst: bool) -> None:
    """Close ``sock``; with ``rst``, as a TCP reset (``SO_LINGER`` 0) rather than a FIN."""
    if rst:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    sock.close()


__all__ = ["Handshake", "HandshakeStep", "InboundStream", "Transport", "TransportError",
           "TransportListener", "close_socket"]
