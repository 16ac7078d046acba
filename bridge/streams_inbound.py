"""Inbound streams for the stream manager: listeners and offers (``listen_streams``).

Theory of operation. :meth:`StreamManager.listen` asks the request's
transport to bind (:meth:`Transport.listen`); the transport reports each
stream a remote party opens as an :class:`~vtl.bridge.transports.base.InboundStream`
from its own thread, which only queues it (:meth:`Inbound.arrive`) and wakes
the manager. The manager's I/O thread, holding the chain lock, turns it into
an :class:`Offer` and calls the listener's ``on_offer(offer, now)`` -- never
from inside a handle method, like every stream event.

An offer is answered once. ``accept(handler)`` returns a stream handle that
the manager runs like an outbound one whose connect already succeeded: the
transport's accept handshake confirms the opener is still there, then
``StreamConnected`` (or ``StreamClosed("reset")`` when it left). ``refuse``
tells the opener no. Unanswered after ``offer_timeout_s``: refused with
``"timeout"``. Closing a listener refuses its unanswered offers; stopping
the manager closes every listener.

This module does not import the manager: :class:`Inbound` gets what it
needs from it as three explicit things at construction -- the transports by
kind, ``adopt`` (make a stream handle of an accepted offer, lock held) and
``wake`` (wake the manager's I/O thread, any thread) -- and the manager
calls :meth:`Inbound.poll`, :meth:`Inbound.halt` and :meth:`Inbound.close`.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from vtl.bridge.transports.base import Handshake, InboundStream, Transport

from vtl.errors import LocalProtocolError
from vtl.stream import (
    CloseReason,
    ListenRequest,
    OfferHandler,
    Stream,
    StreamHandler,
    StreamRequest,
)

ACCEPT_TIMEOUT_S = 10.0
_REFUSALS = ("refused", "timeout", "unreachable", "error")
log = logging.getLogger("vtl.streams")

#: ``adopt(request, handler, on_error, transport)``: the manager's handle for an
#: accepted stream, whose ``transport.connect`` returns the connected socket and
#: ``transport.handshake`` the accept handshake
Adopt = Callable[[StreamRequest, StreamHandler, Callable[[float], None] | None, Transport], Stream]


class _Adopted(Transport):
    """The 'transport' of an accepted stream: its socket is already connected."""

    def __init__(self, kind: str, sock: socket.socket, handshake: Handshake):
        self.kind = kind  # type: ignore[misc]
        self._sock: socket.socket | None = sock
        self._handshake = handshake

    def connect(self, request: StreamRequest, family: int, sockaddr: tuple) -> socket.socket:
        sock, self._sock = self._sock, None
        if sock is None:
            raise OSError(9, "inbound stream socket already used")
        return sock

    def handshake(self, request: StreamRequest) -> Handshake:
        return self._handshake


class ListenerHandle:
    """The :class:`vtl.stream.Listener` a service holds."""

    def __init__(self, inbound: Inbound, request: ListenRequest, on_offer: OfferHandler,
                 on_error: Callable[[float], None] | None):
        self.request = request
        self.on_offer = on_offer
        self.on_error = on_error
        self.address: tuple[str, int] = ("", 0)
        self.closed = False
        self._inbound = inbound
        self._transport: Any = None

    def __repr__(self) -> str:
        return f"<Listener {self.request.kind}:{self.address[0]}:{self.address[1]}>"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._inbound.listeners.discard(self)
        try:
            self._transport.close()
        finally:
            for offer in [o for o in self._inbound.pending if o.listener is self]:
                offer._answer("refused", "the listener was closed")


class Offer:
    """The :class:`vtl.stream.StreamOffer` a service answers (lock held)."""

    def __init__(self, inbound: Inbound, listener: ListenerHandle, arrival: InboundStream,
                 deadline: float):
        self.peer = arrival.peer
        self.meta = arrival.meta
        self.flow = arrival.flow
        self.listener = listener
        self.deadline = deadline
        self.answered = False
        self._inbound = inbound
        self._arrival = arrival

    def __repr__(self) -> str:
        return f"<StreamOffer from {self.peer[0]}:{self.peer[1]} {dict(self.meta)}>"

    def accept(self, handler: StreamHandler) -> Stream:
        if self.answered:
            raise LocalProtocolError("StreamOffer.accept(): the offer was already answered")
        self.answered = True
        self._inbound.pending.pop(self, None)
        a, lr = self._arrival, self.listener.request
        request = StreamRequest(kind=lr.kind, host=a.peer[0], port=a.peer[1],
                                timeout_s=ACCEPT_TIMEOUT_S, read_chunk=lr.read_chunk,
                                write_buffer=lr.write_buffer)
        return self._inbound.adopt(request, handler, self.listener.on_error,
                                   _Adopted(lr.kind, a.sock, a.accept()))

    def refuse(self, reason: CloseReason = "refused", message: str = "") -> None:
        if self.answered:
            raise LocalProtocolError("StreamOffer.refuse(): the offer was already answered")
        if reason not in _REFUSALS:
            raise LocalProtocolError(f"StreamOffer.refuse(): reason {reason!r} is not one of "
                                     f"{', '.join(_REFUSALS)}")
        self._answer(reason, message)

    def _answer(self, reason: CloseReason, message: str) -> None:
        if self.answered:
            return
        self.answered = True
        self._inbound.pending.pop(self, None)
        try:
            self._arrival.refuse(reason, message)
        finally:
            self._arrival.sock.close()


class Inbound:
    """The manager's listeners and unanswered offers (lock held, but :meth:`listen`'s
    ``deliver``, which any thread may call)."""

    def __init__(self, transports: Mapping[str, Transport], adopt: Adopt,
                 wake: Callable[[], None]):
        self.transports = transports
        self.adopt = adopt
        self._wake = wake
        self.halted = False
        self.listeners: set[ListenerHandle] = set()
        self.pending: dict[Offer, None] = {}  # unanswered, in arrival order
        self._arrivals: deque[tuple[ListenerHandle, InboundStream]] = deque()

    def listen(self, request: ListenRequest, on_offer: OfferHandler,
               on_error: Callable[[float], None] | None) -> ListenerHandle:
        if self.halted:
            raise LocalProtocolError("listen_streams(): the bridge is stopping")
        transport = self.transports.get(request.kind)
        if transport is None:
            raise LocalProtocolError(f"listen_streams(): no stream kind {request.kind!r}")
        if request.read_chunk < 1 or request.write_buffer < 1 or not request.offer_timeout_s > 0:
            raise LocalProtocolError("listen_streams(): read_chunk and write_buffer must be "
                                     ">= 1 and offer_timeout_s > 0")
        lst = ListenerHandle(self, request, on_offer, on_error)

        def deliver(arrival: InboundStream) -> None:  # any thread
            self._arrivals.append((lst, arrival))
            self._wake()

        lst._transport = transport.listen(request, deliver)
        lst.address = lst._transport.address
        self.listeners.add(lst)
        return lst

    def next_deadline(self) -> float | None:
        return min((o.deadline for o in self.pending), default=None)

    def poll(self, now: float) -> bool:
        """Deliver arrivals and expire offers (I/O thread, lock held); True when a
        service's ``on_offer`` ran (so the bridge's after-events work is due)."""
        called = False
        while self._arrivals:
            lst, arrival = self._arrivals.popleft()
            offer = Offer(self, lst, arrival, now + lst.request.offer_timeout_s)
            if lst.closed or self.halted:
                offer._answer("refused", "not listening any more")
                continue
            self.pending[offer] = None
            called = True
            try:
                lst.on_offer(offer, now)
            except Exception:  # noqa: BLE001 - a service bug must not stop the bridge
                if lst.on_error is not None:
                    lst.on_error(now)
                else:
                    log.exception("on_offer failed")
                offer._answer("error", "the service failed to answer")
        for offer in [o for o in self.pending if o.deadline <= now]:
            wait = offer.listener.request.offer_timeout_s
            offer._answer("timeout", f"the far service did not answer within {wait:g} s")
        return called

    def halt(self) -> None:
        """No more offers to services, no new listeners (the bridge is stopping)."""
        self.halted = True

    def close(self) -> None:
        for lst in list(self.listeners):
            try:
                lst.close()
            except Exception:  # noqa: BLE001 - closing is best effort at stop
                log.exception("closing %r failed", lst)
        while self._arrivals:
            lst, arrival = self._arrivals.popleft()
            Offer(self, lst, arrival, 0.0)._answer("refused", "the bridge is stopping")
        for offer in list(self.pending):
            offer._answer("refused", "the bridge is stopping")


__all__ = ["Inbound", "ListenerHandle", "Offer"]
