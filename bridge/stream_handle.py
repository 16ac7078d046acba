"""The stream handle a service holds: the service-facing half of an upstream stream.

Theory of operation. :class:`StreamHandle` is the :class:`vtl.stream.Stream`
that ``ctx.open_stream`` returns. Its methods run on the caller's thread with
the bridge's lock held (a service's ``process``, ``on_timer`` or handler) and
never call a handler: what they decide (``close()``, a send that failed) is
queued and delivered by the I/O thread before it next sleeps. They change
the handle's phase and half-states (:mod:`vtl.bridge.stream_states`) and ask
the I/O core for the rest through :class:`StreamCore`, a small interface
that :class:`vtl.bridge.stream_io.StreamIO` implements; this module imports
neither the core nor the manager.

``write()`` takes at most ``write_room`` = ``write_buffer`` − queued bytes.
With nothing queued it ``send``\\ s straight from the caller's buffer (no copy);
only the part the kernel did not take is queued (a ``bytes`` argument as a
view, anything else copied once). A write that took less than offered leaves
the write side BLOCKED: ``StreamWritable`` follows once at most half the
buffer is queued.

Every method takes an optional trailing ``now`` (the caller's monotonic
clock, as :class:`vtl.stream.Stream` passes it); only ``close()`` needs a time
(its linger deadline) and reads the clock when none is given.

The underscored fields belong to the stream modules (``stream_io``,
``stream_connect``, ``streams``); a service uses only the public surface.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable
from select import EPOLLOUT
from typing import TYPE_CHECKING, Protocol

from vtl.bridge.stream_states import (
    BEFORE_OPEN,
    BLOCKED,
    CLOSING,
    CONNECTING,
    DONE,
    EOF,
    FIN_PENDING,
    FIN_SENT,
    OPEN,
    PARKED,
    PAUSED,
    PHASES,
    READ_SIDE,
    READING,
    RESOLVING,
    TOLD,
    WRITE_SIDE,
    WRITING,
    Phase,
    ReadSide,
    WriteSide,
    move,
)

from vtl.stream import CloseReason, StreamHandler, StreamRequest

if TYPE_CHECKING:
    from vtl.bridge.transports.base import Handshake, Transport

CLOSE_LINGER_S = 10.0  # a closed stream flushes and waits this long for the peer's FIN


class StreamCore(Protocol):
    """What a handle asks of the I/O core (lock held; ``io_now`` None: from a handle).

    ``io_now`` is the I/O thread's clock when the I/O thread calls, or None
    when a service does through a handle: events are then queued, never
    delivered from inside the call.
    """

    bytes_up: int

    def update_mask(self, s: StreamHandle) -> None:
        """Re-register the socket for what its phase and half-states wait for."""

    def unpark(self, s: StreamHandle) -> None:
        """PARKED → READING: put the socket back into epoll."""

    def arm(self, s: StreamHandle, deadline: float) -> None:
        """The stream's one deadline (connect, handshake or linger)."""

    def shutdown(self, s: StreamHandle, io_now: float | None) -> None:
        """Send the FIN (FIN_PENDING → FIN_SENT); with EOF read, the stream is over."""

    def fail_errno(self, s: StreamHandle, err: int, message: str,
                   io_now: float | None) -> None:
        """A socket call failed with ``err``: end the stream with its reason."""

    def finish(self, s: StreamHandle, reason: CloseReason, message: str,
               io_now: float | None, rst: bool = False) -> None:
        """Release the socket (DONE; a RST when ``rst``) and tell the service, unless it
        was told already."""

    def tell(self, s: StreamHandle, reason: CloseReason, message: str,
             io_now: float | None) -> None:
        """Issue the stream's one StreamClosed."""

    def drop(self, s: StreamHandle, rst: bool) -> None:
        """DONE: close the socket (a RST when ``rst``) and forget the stream."""


class StreamHandle:
    """The :class:`vtl.stream.Stream` a service holds. Call methods with the lock held."""

    __slots__ = ("id", "request", "_core", "_handler", "_on_error", "_transport", "_phase",
                 "_rd", "_wr", "_sock", "_fd", "_mask", "_epoch", "_queue", "_queued",
                 "_deadline", "_addrs", "_handshake", "_hs_want", "_hs_buf")

    def __init__(self, core: StreamCore, sid: int, request: StreamRequest,
                 handler: StreamHandler, on_error: Callable[[float], None] | None,
                 transport: Transport):
        self.id = sid
        self.request = request
        self._core = core
        self._handler = handler
        self._on_error = on_error
        self._transport = transport
        self._phase: Phase = RESOLVING
        self._rd: ReadSide = READING
        self._wr: WriteSide = WRITING
        self._sock: socket.socket | None = None
        self._fd = -1
        self._mask = 0  # the events the socket is registered for in epoll
        self._epoch = 0  # the poll round it was registered in (see StreamManager._run)
        self._queue: deque[bytes | memoryview] = deque()
        self._queued = 0
        self._deadline: float | None = None
        self._addrs: list[tuple[int, tuple]] = []
        self._handshake: Handshake | None = None
        self._hs_want = 0
        self._hs_buf = b""

    def __repr__(self) -> str:
        r = self.request
        return f"<Stream {self.id} {r.kind}:{r.host}:{r.port} {self._phase.value}>"

    # -- moves (the tables in stream_states) -----------------------------------------------

    def _to(self, phase: Phase) -> None:
        self._phase = move(PHASES, self._phase, phase)

    def _read_to(self, rd: ReadSide) -> None:
        self._rd = move(READ_SIDE, self._rd, rd)

    def _write_to(self, wr: WriteSide) -> None:
        self._wr = move(WRITE_SIDE, self._wr, wr)

    def _ask_fin(self) -> None:
        """WRITING/BLOCKED → FIN_PENDING (a StreamWritable is no longer owed)."""
        if self._wr is WRITING or self._wr is BLOCKED:
            self._write_to(FIN_PENDING)

    # -- the Stream API ----------------------------------------------------------------------

    @property
    def write_room(self) -> int:
        wr = self._wr
        if self._phase is not OPEN or wr is FIN_PENDING or wr is FIN_SENT:
            return 0
        room = self.request.write_buffer - self._queued
        return room if room > 0 else 0

    def write(self, data: bytes | bytearray | memoryview, now: float | None = None) -> int:
        wr = self._wr
        if self._phase is not OPEN or wr is FIN_PENDING or wr is FIN_SENT:
            return 0
        room = self.request.write_buffer - self._queued
        if type(data) is memoryview and data.format != "B":
            data = data.cast("B")
        size = len(data)
        if room <= 0 or not size:
            if room <= 0 and wr is WRITING:
                self._write_to(BLOCKED)  # the queue is not empty: EPOLLOUT is set
            return 0
        take = size if size <= room else room
        if take < size and wr is WRITING:
            self._write_to(BLOCKED)
        sent = 0
        core = self._core
        if not self._queue:
            try:
                sent = self._sock.send(data if take == size else memoryview(data)[:take])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                core.fail_errno(self, exc.errno or 0, str(exc), None)
                return 0
            core.bytes_up += sent
        if sent < take:
            rest = memoryview(data)[sent:take]
            self._queue.append(rest if type(data) is bytes else bytes(rest))
            self._queued += take - sent
        if (sent < take or take < size) and not self._mask & EPOLLOUT:
            core.update_mask(self)  # EPOLLOUT: flush, or say room is back
        return take

    def shutdown_write(self, now: float | None = None) -> None:
        if self._phase in TOLD or self._wr is FIN_PENDING or self._wr is FIN_SENT:
            return
        self._ask_fin()  # before connected: the FIN follows the connect
        if self._phase is OPEN:
            if not self._queue:
                self._core.shutdown(self, None)
            if self._phase is OPEN:
                self._core.update_mask(self)

    def pause_reading(self, paused: bool, now: float | None = None) -> None:
        rd = self._rd
        if self._phase in TOLD or rd is EOF or bool(paused) is (rd is not READING):
            return
        if paused:
            self._read_to(PAUSED)
        elif rd is PARKED:
            self._core.unpark(self)
            return
        else:
            self._read_to(READING)
        if self._phase is OPEN:
            self._core.update_mask(self)

    def close(self, now: float | None = None) -> None:
        core = self._core
        if self._phase is not OPEN:
            if self._phase in BEFORE_OPEN:
                core.finish(self, "local", "closed before connected", None)
            return
        self._to(CLOSING)  # the service is told now; reading goes on, discarding, to the FIN
        self._ask_fin()
        core.tell(self, "local", "close()", None)
        if self._rd is PARKED:
            core.unpark(self)
        elif self._rd is PAUSED:
            self._read_to(READING)
        core.arm(self, (time.monotonic() if now is None else now) + CLOSE_LINGER_S)
        if not self._queue and self._wr is FIN_PENDING:
            core.shutdown(self, None)
        if self._phase is CLOSING:
            core.update_mask(self)

    def abort(self, now: float | None = None) -> None:
        if self._phase is DONE:
            return
        told = self._phase is CLOSING
        self._core.drop(self, rst=self._phase is not CONNECTING)
        if not told:
            self._core.tell(self, "local", "abort()", None)


__all__ = ["CLOSE_LINGER_S", "StreamCore", "StreamHandle"]
