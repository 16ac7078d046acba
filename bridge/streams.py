"""Upstream streams: the I/O behind ``ctx.open_stream`` (the contract is :mod:`vtl.stream`).

Theory of operation. A :class:`StreamManager` belongs to a bridge and owns
every upstream socket. One I/O thread waits in ``epoll`` (level-triggered)
over all of them plus an eventfd for wake-ups. Everything else a stream holds
is guarded by the bridge's lock: services call :class:`StreamHandle` methods
from ``process``/``on_timer``/handlers, which already run under it, and the
I/O thread takes it to act on readiness. So there is no second lock and no
lock order to get wrong. The I/O thread takes the lock once per ready socket
(the forwarding threads get in between), calls handlers with
``now = time.monotonic()``, then ``after_events(now)`` so the bridge drains
what the handlers injected, flushes it to the ports and re-arms its timers.

The parts, each a module that imports only the ones before it:

- :mod:`vtl.bridge.stream_states`: a stream's phases (RESOLVING →
  CONNECTING → HANDSHAKE → OPEN → CLOSING → DONE), its read and write
  half-states, and the tables of legal moves;
- :mod:`vtl.bridge.stream_handle`: :class:`StreamHandle`, what a service holds;
- :mod:`vtl.bridge.stream_io`: the shared epoll set, deadlines, bytes both
  ways, endings, and the OPEN/CLOSING readiness handler;
- :mod:`vtl.bridge.stream_connect`: resolution, connect and handshake (the
  RESOLVING/CONNECTING/HANDSHAKE handlers);
- :mod:`vtl.bridge.streams_inbound`: listeners and offers; an accepted offer
  becomes a handle here that starts at the transport's handshake on an
  already connected socket;
- this module: the public API, the egress policy hook, the I/O thread, and
  the dispatch of readiness and deadlines to the handler of the stream's phase.

Invariants (the others are in the modules above):

- exactly one ``StreamClosed`` per stream, and no event after it;
- a handler is never called from inside a handle method or from
  :meth:`StreamManager.open`: what they decide is queued and delivered by the
  I/O thread before it next sleeps;
- a socket registered after an ``epoll.poll`` began ignores that poll's
  results (the poll round, ``epoch``), so a reused fd number never gets a
  stale event.

Egress policy: :attr:`StreamManager.policy`, when set, is asked about every
stream a service opens, after the request is validated and before any
socket, resolver thread or connect exists; a refusal ``(reason, message)``
ends the stream at once with that ``StreamClosed`` (delivered by the I/O
thread) and counts in ``refused_by_policy``. Accepted inbound streams are not
asked: the far party opened them.

At bridge stop, :meth:`StreamManager.halt` runs before the services' ``stop()``:
from then on no handler is called (services release their streams in
``stop()`` themselves); :meth:`StreamManager.stop` then resets whatever is left.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from vtl.bridge.stream_connect import Connector
from vtl.bridge.stream_handle import CLOSE_LINGER_S, StreamHandle
from vtl.bridge.stream_io import StreamIO
from vtl.bridge.stream_states import BEFORE_OPEN, CLOSING, CONNECTING, DONE, HANDSHAKE, OPEN
from vtl.bridge.streams_inbound import Inbound, ListenerHandle
from vtl.bridge.transports import Transport, builtin_transports

from vtl.errors import LocalProtocolError
from vtl.stream import CloseReason, ListenRequest, OfferHandler, StreamHandler, StreamRequest

_MAX_POLL_S = 1.0

#: ``policy(request, transport)``: None lets the stream be opened; ``(reason, message)``
#: refuses it (reason ``"prohibited"`` for a destination the bridge may not reach)
StreamPolicy = Callable[[StreamRequest, Transport], tuple[CloseReason, str] | None]


class StreamManager:
    """Upstream sockets of one bridge and the thread that does their I/O.

    ``lock`` is the lock the chain runs under; :meth:`open`, :meth:`halt` and
    every handle method must be called with it held; :meth:`start` and
    :meth:`stop` without. ``after_events(now)`` is called (lock held) after
    handlers ran; with ``send_output``, what it returns is handed to
    ``send_output`` once the lock is released (the bridge writes the frames the
    handlers produced there, as its forwarding threads do). ``policy`` (default
    None) is the egress policy (see the module).
    """

    def __init__(self, lock: threading.Lock,
                 after_events: Callable[[float], Any] | None = None,
                 log: logging.Logger | None = None, name: str = "vtl",
                 transports: Mapping[str, Transport] | None = None,
                 send_output: Callable[[Any], None] | None = None):
        self._lock = lock
        self._after_events = after_events
        self._send_output = send_output
        self.log = log or logging.getLogger("vtl.streams")
        self.name = name
        self.transports: dict[str, Transport] = dict(
            builtin_transports() if transports is None else transports)
        self.policy: StreamPolicy | None = None
        self._io = io = StreamIO(self.log)
        self._connector = connector = Connector(io, lock, name)
        self._inbound = Inbound(self.transports, self._adopt, io.wake)
        self._on_ready = {CONNECTING: connector.ready_connecting,
                          HANDSHAKE: connector.ready_handshake,
                          OPEN: io.ready_data, CLOSING: io.ready_data}
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None

    # -- public -----------------------------------------------------------------------

    def register(self, transport: Transport) -> None:
        """Add (or replace) the transport for ``transport.kind``."""
        self.transports[transport.kind] = transport

    def start(self) -> None:
        """Start the I/O thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_guarded, daemon=True,
                                            name=f"{self.name}-streams")
            self._thread.start()

    def open(self, request: StreamRequest, handler: StreamHandler,
             on_error: Callable[[float], None] | None = None) -> StreamHandle:
        """Start a stream; events go to ``handler(event, now)`` from the I/O thread."""
        io = self._io
        if io.halted:
            raise LocalProtocolError("open_stream(): the bridge is stopping")
        transport = self.transports.get(request.kind)
        if transport is None:
            known = ", ".join(sorted(self.transports))
            raise LocalProtocolError(f"open_stream(): no stream kind {request.kind!r} "
                                     f"(known: {known})")
        if request.read_chunk < 1 or request.write_buffer < 1 or not request.timeout_s > 0:
            raise LocalProtocolError("open_stream(): read_chunk and write_buffer must be >= 1 "
                                     "and timeout_s > 0")
        transport.check(request)
        refusal = self.policy(request, transport) if self.policy is not None else None
        s = StreamHandle(io, next(self._ids), request, handler, on_error, transport)
        io.opened_total += 1
        if refusal is not None:
            reason, message = refusal
            io.refused_by_policy += 1
            s._to(DONE)  # no socket, no thread, no deadline: only the StreamClosed to come
            io.tell(s, reason, message, None)
            return s
        self._begin(s)
        self._connector.start(s)
        return s

    def listen(self, request: ListenRequest, on_offer: OfferHandler,
               on_error: Callable[[float], None] | None = None) -> ListenerHandle:
        """Take inbound streams (see :mod:`vtl.bridge.streams_inbound`); OSError when
        the address cannot be bound. Call with the lock held."""
        return self._inbound.listen(request, on_offer, on_error)

    def halt(self) -> None:
        """From now on no handler is called and no stream opens (call with the lock held)."""
        self._io.halted = True
        self._io.deferred.clear()
        self._inbound.halt()

    def stop(self) -> None:
        """Halt, join the I/O thread and reset every remaining stream. Idempotent."""
        io = self._io
        with self._lock:
            self.halt()
            io.wake()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        with self._lock:
            self._inbound.close()
            for s in list(io.live.values()):
                io.drop(s, rst=s._phase is not CONNECTING)
        for t in list(self.transports.values()):
            try:
                t.close()
            except Exception:  # noqa: BLE001 - keep stopping the others
                self.log.exception("closing transport %r failed", t.kind)
        with self._lock:
            io.close()

    def snapshot(self) -> dict[str, int]:
        io = self._io
        return {"open": len(io.live), "opened_total": io.opened_total,
                "failed_total": io.failed_total, "refused_by_policy": io.refused_by_policy,
                "bytes_up": io.bytes_up, "bytes_down": io.bytes_down}

    # -- new streams (lock held) ----------------------------------------------------------

    def _begin(self, s: StreamHandle) -> None:
        """A live stream with its ``timeout_s`` deadline over RESOLVING to OPEN."""
        self._io.live[s.id] = s
        self._io.arm(s, time.monotonic() + s.request.timeout_s)

    def _adopt(self, request: StreamRequest, handler: StreamHandler,
               on_error: Callable[[float], None] | None, transport: Transport) -> StreamHandle:
        """A handle for an accepted inbound stream: ``transport.connect`` returns its
        connected socket, ``transport.handshake`` confirms it."""
        s = StreamHandle(self._io, next(self._ids), request, handler, on_error, transport)
        self._io.opened_total += 1
        self._begin(s)
        self._connector.connect_to(s, [(socket.AF_INET, ("127.0.0.1", 0))], None)
        return s

    # -- the I/O thread -------------------------------------------------------------------

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException:  # noqa: BLE001 - say so: without this thread streams hang
            self.log.critical("stream I/O thread died", exc_info=True)

    def _run(self) -> None:
        io, lock, on_ready = self._io, self._lock, self._on_ready
        ep, fds, wake_fd = io.ep, io.fds, io.wake_fd
        while True:
            with lock:
                if io.halted:
                    return
                io.io_active = True
                now = time.monotonic()
                pending = self._housekeeping(now)
                io.epoch += 1
                epoch = io.epoch
                timeout = _MAX_POLL_S
                if io.timers:
                    timeout = min(timeout, max(0.0, io.timers[0][0] - now))
                offers_due = self._inbound.next_deadline()
                if offers_due is not None:
                    timeout = min(timeout, max(0.0, offers_due - now))
                io.poll_until = now + timeout
                io.io_active = False
            if pending is not None:
                self._flush(pending)
            try:
                events = ep.poll(timeout, 256)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == wake_fd:
                    try:
                        os.eventfd_read(wake_fd)
                    except BlockingIOError:
                        pass
                    continue
                with lock:
                    s = fds.get(fd)
                    if io.halted:
                        return
                    if s is None or s._epoch >= epoch:
                        continue
                    io.io_active = True
                    now = time.monotonic()
                    try:
                        on_ready[s._phase](s, ev, now)
                        io.deliver_deferred(now)
                    except Exception as exc:  # noqa: BLE001 - a bug here must not hang all
                        self.log.exception("stream %s: I/O failed", s.id)
                        io.finish(s, "error", f"internal error: {exc!r}", now, rst=True)
                    pending = self._after(now)
                    io.io_active = False
                if pending is not None:
                    self._flush(pending)

    def _after(self, now: float) -> Any:
        """After handlers ran (lock held): the bridge's ``after_events``; what it returns
        is given to ``send_output`` once the lock is released (:meth:`_flush`)."""
        io = self._io
        out = None
        if io.delivered and self._after_events is not None and not io.halted:
            io.delivered = False
            try:
                out = self._after_events(now)
            except Exception:  # noqa: BLE001
                self.log.exception("after stream events")
        io.delivered = False
        return out if self._send_output is not None else None

    def _flush(self, pending: Any) -> None:
        """Write what the handlers produced with the lock released: the frames toward
        the guest (64 KB GSO frames the guest's stack takes in our system call) no
        longer hold up the forwarding threads, nor this thread's next reads."""
        try:
            self._send_output(pending)  # type: ignore[misc]
        except Exception:  # noqa: BLE001
            self.log.exception("sending what stream events produced")

    def _housekeeping(self, now: float) -> Any:
        io = self._io
        self._connector.drain(now)
        if self._inbound.poll(now):
            io.delivered = True
        timers = io.timers
        while timers and timers[0][0] <= now:
            deadline, _, s = heapq.heappop(timers)
            if s._deadline == deadline:
                self._expire(s, now)
        io.deliver_deferred(now)
        return self._after(now)

    def _expire(self, s: StreamHandle, now: float) -> None:
        """The stream's deadline passed: before OPEN it timed out; CLOSING lingered enough."""
        if s._phase in BEFORE_OPEN:
            self._io.fail(s, "timeout", f"no answer within {s.request.timeout_s:g} s", now)
        elif s._phase is CLOSING:
            self._io.drop(s, rst=True)

__all__ = ["CLOSE_LINGER_S", "StreamPolicy", "StreamHandle", "StreamManager"]
