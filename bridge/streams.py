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

Per stream (``_State``): CONNECTING (resolving the name, waiting for the TCP
handshake) → HANDSHAKE (the transport's own exchange, e.g. SOCKS5) → OPEN
(events flow) → CLOSING (the service called ``close()``: flush, FIN, read and
discard until the peer's FIN or ``CLOSE_LINGER_S``) → DONE (socket closed).

Invariants:

- exactly one ``StreamClosed`` per stream, and no event after it;
- a handler is never called from inside a handle method: what a method
  decides (``close()``, a send that failed) is queued and delivered by the I/O
  thread before it next sleeps;
- ``write()`` takes at most ``write_room`` = ``write_buffer`` − queued; with
  nothing queued it ``send``\\ s straight from the caller's buffer (no copy);
  only the part the kernel did not take is queued (a ``bytes`` argument is
  queued as a view, anything else is copied once); queued bytes leave with
  ``sendmsg`` on EPOLLOUT; after a short write ``StreamWritable`` comes when
  at most half the buffer is queued (a low-water mark, so a service is not
  woken for a few bytes at a time);
- reads: at most ``read_chunk`` per ``StreamData`` and ``_READS_PER_WAKE``
  reads per wake-up, so one busy stream cannot starve the others;
- a socket is closed only with the lock held and its fd dropped from the
  map; a socket registered after an ``epoll.poll`` began ignores that poll's
  results (``_epoch``), so a reused fd number never gets a stale event.

A handler that raises is counted through ``on_error`` (the chain passes the
slot's ``failed``), its stream is aborted and gets ``StreamClosed("error")``.
Inbound streams (:meth:`StreamManager.listen`, offers) live in
:mod:`vtl.bridge.streams_inbound`; an accepted offer becomes a handle here
that starts at the transport's handshake on an already connected socket.

At bridge stop, :meth:`StreamManager.halt` runs before the services' ``stop()``:
from then on no handler is called (services release their streams in
``stop()`` themselves); :meth:`StreamManager.stop` then resets whatever is left.
"""

from __future__ import annotations

import enum
import errno
import heapq
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from vtl.bridge.streams_inbound import Inbound, ListenerHandle
from vtl.bridge.transports import Transport, TransportError, builtin_transports

from vtl.errors import LocalProtocolError
from vtl.stream import (
    CloseReason,
    ListenRequest,
    OfferHandler,
    StreamClosed,
    StreamConnected,
    StreamData,
    StreamEnded,
    StreamEvent,
    StreamHandler,
    StreamRequest,
    StreamWritable,
)

IN, OUT, ERR, HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP
CLOSE_LINGER_S = 10.0  # a closed stream flushes and waits this long for the peer's FIN
_READS_PER_WAKE = 4
_SENDMSG_BUFFERS = 64
_MAX_POLL_S = 1.0
_LINGER_RST = struct.pack("ii", 1, 0)
_REASONS: dict[int, CloseReason] = {
    errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timeout",
    errno.EHOSTUNREACH: "unreachable", errno.ENETUNREACH: "unreachable",
    errno.EHOSTDOWN: "unreachable", errno.ENETDOWN: "unreachable",
    errno.ECONNRESET: "reset", errno.EPIPE: "reset", errno.ECONNABORTED: "reset",
}


class _State(enum.Enum):
    CONNECTING = "connecting"
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    DONE = "done"


CONNECTING, HANDSHAKE, OPEN = _State.CONNECTING, _State.HANDSHAKE, _State.OPEN
CLOSING, DONE = _State.CLOSING, _State.DONE


def _reason(err: int) -> CloseReason:
    return _REASONS.get(err, "error")


def _numeric(host: str, port: int) -> list[tuple[int, tuple]] | None:
    """Addresses of an IP literal (no DNS), or None when ``host`` is a name."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except (socket.gaierror, UnicodeError):
        return None
    return [(fam, addr) for fam, _, _, _, addr in infos]


class StreamHandle:
    """The :class:`vtl.stream.Stream` a service holds. Call methods with the lock held."""

    __slots__ = ("id", "request", "_mgr", "_handler", "_on_error", "_transport", "_state",
                 "_sock", "_fd", "_mask", "_epoch", "_parked", "_queue", "_queued", "_paused",
                 "_eof", "_shut_req", "_shut_done", "_want_writable", "_final", "_over",
                 "_deadline", "_addrs", "_handshake", "_hs_want", "_hs_buf")

    def __init__(self, mgr: StreamManager, sid: int, request: StreamRequest,
                 handler: StreamHandler, on_error: Callable[[float], None] | None,
                 transport: Transport):
        self.id = sid
        self.request = request
        self._mgr = mgr
        self._handler = handler
        self._on_error = on_error
        self._transport = transport
        self._state = CONNECTING
        self._sock: socket.socket | None = None
        self._fd = -1
        self._mask = 0
        self._epoch = 0
        self._parked = False  # dropped from epoll while a HUP would only spin the loop
        self._queue: deque[bytes | memoryview] = deque()
        self._queued = 0
        self._paused = False
        self._eof = False
        self._shut_req = False  # shutdown_write()/close() asked for a FIN
        self._shut_done = False
        self._want_writable = False
        self._final = False  # StreamClosed issued (queued or delivered)
        self._over = False  # StreamClosed delivered: nothing more, ever
        self._deadline: float | None = None
        self._addrs: list[tuple[int, tuple]] = []
        self._handshake = None
        self._hs_want = 0
        self._hs_buf = b""

    def __repr__(self) -> str:
        r = self.request
        return f"<Stream {self.id} {r.kind}:{r.host}:{r.port} {self._state.value}>"

    @property
    def write_room(self) -> int:
        if self._state is not OPEN or self._shut_req:
            return 0
        room = self.request.write_buffer - self._queued
        return room if room > 0 else 0

    def write(self, data: bytes | bytearray | memoryview, now: float | None = None) -> int:
        if self._state is not OPEN or self._shut_req:
            return 0
        room = self.request.write_buffer - self._queued
        if type(data) is memoryview and data.format != "B":
            data = data.cast("B")
        size = len(data)
        if room <= 0 or not size:
            self._want_writable = self._want_writable or room <= 0
            return 0
        take = size if size <= room else room
        if take < size:
            self._want_writable = True
        sent = 0
        if not self._queue:
            try:
                sent = self._sock.send(data if take == size else memoryview(data)[:take])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._mgr._fail(self, exc.errno or 0, str(exc), None)
                return 0
            self._mgr.bytes_up += sent
        if sent < take:
            rest = memoryview(data)[sent:take]
            self._queue.append(rest if type(data) is bytes else bytes(rest))
            self._queued += take - sent
        if (sent < take or take < size) and not self._mask & OUT:
            self._mgr._update_mask(self)  # EPOLLOUT: flush, or say room is back
        return take

    def shutdown_write(self, now: float | None = None) -> None:
        if self._state in (CLOSING, DONE) or self._shut_req:
            return
        self._shut_req = True  # before connected: the FIN follows the connect
        self._want_writable = False
        if self._state is OPEN:
            if not self._queue:
                self._mgr._shutdown(self, None)
            if self._state is OPEN:
                self._mgr._update_mask(self)

    def pause_reading(self, paused: bool, now: float | None = None) -> None:
        paused = bool(paused)
        if self._state in (CLOSING, DONE) or paused == self._paused:
            return
        self._paused = paused
        if self._state is OPEN:
            self._mgr._update_mask(self)

    def close(self, now: float | None = None) -> None:
        mgr = self._mgr
        if self._state is not OPEN:
            if self._state is not CLOSING and self._state is not DONE:
                mgr._finish(self, "local", "closed before connected", None)
            return
        self._state = CLOSING
        self._want_writable = False
        self._shut_req = True
        mgr._issue_final(self, "local", "close()", None)
        if self._eof and self._shut_done and not self._queue:
            mgr._drop(self, rst=False)
            return
        mgr._arm(self, time.monotonic() + CLOSE_LINGER_S)
        if not self._queue and not self._shut_done:
            mgr._shutdown(self, None)
        if self._state is CLOSING:
            mgr._update_mask(self)

    def abort(self, now: float | None = None) -> None:
        if self._state is DONE:
            return
        self._mgr._drop(self, rst=self._state is not CONNECTING)
        self._mgr._issue_final(self, "local", "abort()", None)


class StreamManager:
    """Upstream sockets of one bridge and the thread that does their I/O.

    ``lock`` is the lock the chain runs under; :meth:`open`, :meth:`halt` and
    every handle method must be called with it held; :meth:`start` and
    :meth:`stop` without. ``after_events(now)`` is called (lock held) after
    handlers ran.
    """

    def __init__(self, lock: threading.Lock,
                 after_events: Callable[[float], None] | None = None,
                 log: logging.Logger | None = None, name: str = "vtl",
                 transports: Mapping[str, Transport] | None = None):
        self._lock = lock
        self._after_events = after_events
        self.log = log or logging.getLogger("vtl.streams")
        self.name = name
        self.transports: dict[str, Transport] = dict(
            builtin_transports() if transports is None else transports)
        self._ep = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, IN)
        self._fds: dict[int, StreamHandle] = {}
        self._live: dict[int, StreamHandle] = {}
        self._timers: list[tuple[float, int, StreamHandle]] = []
        self._deferred: deque[tuple[StreamHandle, StreamEvent]] = deque()
        self._resolved: deque[tuple[StreamHandle, list | BaseException]] = deque()
        self._ids = itertools.count(1)
        self._seq = itertools.count()
        self._epoch = 0
        self._poll_until = 0.0
        self._io_active = False
        self._delivered = False
        self._halted = False
        self._thread: threading.Thread | None = None
        self._inbound = Inbound(self)
        self.opened_total = 0
        self.failed_total = 0
        self.bytes_up = 0
        self.bytes_down = 0

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
        if self._halted:
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
        s = StreamHandle(self, next(self._ids), request, handler, on_error, transport)
        self._live[s.id] = s
        self.opened_total += 1
        self._arm(s, time.monotonic() + request.timeout_s)
        host, port = transport.endpoint(request)
        addrs = _numeric(host, port)
        if addrs is None:
            threading.Thread(target=self._resolve, args=(s, host, port), daemon=True,
                             name=f"{self.name}-resolve").start()
        else:
            s._addrs = addrs
            self._connect_next(s, None, None)
        return s

    def listen(self, request: ListenRequest, on_offer: OfferHandler,
               on_error: Callable[[float], None] | None = None) -> ListenerHandle:
        """Take inbound streams (see :mod:`vtl.bridge.streams_inbound`); OSError when
        the address cannot be bound. Call with the lock held."""
        if self._halted:
            raise LocalProtocolError("listen_streams(): the bridge is stopping")
        return self._inbound.listen(request, on_offer, on_error)

    def _adopt(self, request: StreamRequest, handler: StreamHandler,
               on_error: Callable[[float], None] | None, transport: Transport) -> StreamHandle:
        """A handle for an accepted inbound stream: ``transport.connect`` returns its
        connected socket, ``transport.handshake`` confirms it (lock held)."""
        s = StreamHandle(self, next(self._ids), request, handler, on_error, transport)
        self._live[s.id] = s
        self.opened_total += 1
        self._arm(s, time.monotonic() + request.timeout_s)
        s._addrs = [(socket.AF_INET, ("127.0.0.1", 0))]
        self._connect_next(s, None, None)
        return s

    def halt(self) -> None:
        """From now on no handler is called and no stream opens (call with the lock held)."""
        self._halted = True
        self._deferred.clear()

    def stop(self) -> None:
        """Halt, join the I/O thread and reset every remaining stream. Idempotent."""
        with self._lock:
            self.halt()
            self._wake()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        with self._lock:
            self._inbound.close()
            for s in list(self._live.values()):
                self._drop(s, rst=s._state is not CONNECTING)
        for t in list(self.transports.values()):
            try:
                t.close()
            except Exception:  # noqa: BLE001 - keep stopping the others
                self.log.exception("closing transport %r failed", t.kind)
        with self._lock:
            if self._wake_fd >= 0:
                self._ep.close()
                os.close(self._wake_fd)
                self._wake_fd = -1

    def snapshot(self) -> dict[str, int]:
        return {"open": len(self._live), "opened_total": self.opened_total,
                "failed_total": self.failed_total, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down}

    # -- state changes (lock held) ----------------------------------------------------

    def _wake(self) -> None:
        if self._wake_fd >= 0:
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    def _arm(self, s: StreamHandle, deadline: float) -> None:
        s._deadline = deadline
        heapq.heappush(self._timers, (deadline, next(self._seq), s))
        if deadline < self._poll_until and not self._io_active:
            self._wake()

    def _update_mask(self, s: StreamHandle) -> None:
        st = s._state
        if st is CONNECTING:
            mask = OUT
        elif st is HANDSHAKE:
            mask = IN | (OUT if s._queue else 0)
        else:
            reading = not s._eof and (st is CLOSING or not s._paused)
            writing = s._queue or (s._want_writable and st is OPEN)
            mask = (IN if reading else 0) | (OUT if writing else 0)
        if s._parked:
            if mask & IN:
                self._ep.register(s._fd, mask)
                s._parked = False
        elif mask != s._mask:
            self._ep.modify(s._fd, mask)
        s._mask = mask

    def _connect_next(self, s: StreamHandle, now: float | None, last: str | None) -> None:
        """Try the next address; ``now`` None means 'called from a handle method'."""
        reason: CloseReason = "error"
        while s._addrs:
            family, sockaddr = s._addrs.pop(0)
            try:
                sock = s._transport.connect(s.request, family, sockaddr)
            except OSError as exc:
                reason, last = _reason(exc.errno or 0), f"{sockaddr[0]}: {exc.strerror or exc}"
                continue
            except Exception as exc:  # noqa: BLE001 - a transport bug closes the stream
                reason, last = "error", f"{type(exc).__name__}: {exc}"
                continue
            s._sock, s._fd, s._mask, s._epoch = sock, sock.fileno(), OUT, self._epoch
            self._fds[s._fd] = s
            self._ep.register(s._fd, OUT)
            return
        self._connect_failed(s, reason, last or "no address to connect to", now)

    def _connect_failed(self, s: StreamHandle, reason: CloseReason, message: str,
                        now: float | None) -> None:
        """The connect to the transport's endpoint failed: let the transport word it."""
        try:
            reason, message = s._transport.connect_failed(s.request, reason, message)
        except Exception as exc:  # noqa: BLE001 - a transport bug must not hide the failure
            message = f"{message} ({type(exc).__name__} in connect_failed: {exc})"
        self._finish(s, reason, message, now)

    def _shutdown(self, s: StreamHandle, now: float | None) -> None:
        try:
            s._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fail(s, exc.errno or 0, str(exc), now)
            return
        s._shut_done = True
        if s._eof:
            self._finish(s, "closed", "", now)

    def _fail(self, s: StreamHandle, err: int, message: str, now: float | None) -> None:
        if s._state is HANDSHAKE:
            self._handshake_failed(s, _reason(err), message or os.strerror(err), now)
            return
        self._finish(s, _reason(err), message or os.strerror(err), now)

    def _handshake_failed(self, s: StreamHandle, reason: CloseReason, message: str,
                          now: float | None) -> None:
        """The manager ends a handshake (timeout, EOF, socket error): let it word that."""
        try:
            reason, message = s._handshake.failed(reason, message)
        except Exception as exc:  # noqa: BLE001 - a transport bug must not hide the failure
            message = f"{message} ({type(exc).__name__} in Handshake.failed: {exc})"
        self._finish(s, reason, message, now)

    def _finish(self, s: StreamHandle, reason: CloseReason, message: str,
                now: float | None) -> None:
        self._drop(s, rst=False)
        self._issue_final(s, reason, message, now)

    def _issue_final(self, s: StreamHandle, reason: CloseReason, message: str,
                     now: float | None) -> None:
        """Send the one StreamClosed: at once from the I/O thread, else queued for it."""
        if s._final:
            return
        s._final = True
        if reason not in ("closed", "local"):
            self.failed_total += 1
        event = StreamClosed(s, reason, message)
        if now is None:
            self._deferred.append((s, event))
            if not self._io_active:
                self._wake()
        else:
            self._deliver(s, event, now)

    def _drop(self, s: StreamHandle, rst: bool) -> None:
        """Close the socket (with a RST when ``rst``) and forget the stream."""
        s._state = DONE
        s._deadline = None
        s._queue.clear()
        s._queued = 0
        self._live.pop(s.id, None)
        self._release(s, rst)

    def _release(self, s: StreamHandle, rst: bool) -> None:
        sock = s._sock
        if sock is None:
            return
        s._sock = None
        if self._fds.get(s._fd) is s:
            del self._fds[s._fd]
            if not s._parked:
                try:
                    self._ep.unregister(s._fd)
                except (OSError, ValueError):
                    pass
        s._parked = False
        if rst:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        sock.close()

    def _deliver(self, s: StreamHandle, event: StreamEvent, now: float) -> None:
        if s._over or self._halted:
            return
        if type(event) is StreamClosed:
            s._over = True
        self._delivered = True
        try:
            s._handler(event, now)
        except Exception as exc:  # noqa: BLE001 - a service bug must not stop the bridge
            if s._on_error is not None:
                try:
                    s._on_error(now)
                except Exception:  # noqa: BLE001
                    self.log.exception("stream %s: on_error failed", s.id)
            else:
                self.log.exception("stream %s: handler failed", s.id)
            if not s._final:
                self._drop(s, rst=True)
                self._issue_final(s, "error", f"stream handler raised {exc!r}", now)

    # -- the I/O thread -------------------------------------------------------------------

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException:  # noqa: BLE001 - say so: without this thread streams hang
            self.log.critical("stream I/O thread died", exc_info=True)

    def _run(self) -> None:
        lock, ep, fds, wake_fd = self._lock, self._ep, self._fds, self._wake_fd
        timeout = 0.0
        while True:
            with lock:
                if self._halted:
                    return
                self._io_active = True
                now = time.monotonic()
                self._housekeeping(now)
                self._epoch += 1
                epoch = self._epoch
                timeout = _MAX_POLL_S
                if self._timers:
                    timeout = min(timeout, max(0.0, self._timers[0][0] - now))
                offers_due = self._inbound.next_deadline()
                if offers_due is not None:
                    timeout = min(timeout, max(0.0, offers_due - now))
                self._poll_until = now + timeout
                self._io_active = False
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
                    if self._halted:
                        return
                    if s is None or s._epoch >= epoch:
                        continue
                    self._io_active = True
                    now = time.monotonic()
                    try:
                        self._ready(s, ev, now)
                        while self._deferred:
                            self._deliver(*self._deferred.popleft(), now)
                    except Exception as exc:  # noqa: BLE001 - a bug here must not hang all
                        self.log.exception("stream %s: I/O failed", s.id)
                        self._drop(s, rst=True)
                        self._issue_final(s, "error", f"internal error: {exc!r}", now)
                    self._after(now)
                    self._io_active = False

    def _after(self, now: float) -> None:
        if self._delivered and self._after_events is not None and not self._halted:
            self._delivered = False
            try:
                self._after_events(now)
            except Exception:  # noqa: BLE001
                self.log.exception("after stream events")
        self._delivered = False

    def _housekeeping(self, now: float) -> None:
        while self._resolved:
            s, result = self._resolved.popleft()
            if s._state is not CONNECTING or s._sock is not None:
                continue
            if isinstance(result, BaseException):
                self._connect_failed(s, "error", f"cannot resolve {s.request.host!r}: {result}",
                                     now)
            else:
                s._addrs = result
                self._connect_next(s, now, None)
        self._inbound.poll(now)
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _, s = heapq.heappop(timers)
            if s._deadline != deadline:
                continue
            if s._state is CONNECTING:
                self._connect_failed(s, "timeout",
                                     f"no answer within {s.request.timeout_s:g} s", now)
            elif s._state is HANDSHAKE:
                self._handshake_failed(s, "timeout",
                                       f"no answer within {s.request.timeout_s:g} s", now)
            elif s._state is CLOSING:
                self._drop(s, rst=True)
        while self._deferred:
            self._deliver(*self._deferred.popleft(), now)
        self._after(now)

    def _resolve(self, s: StreamHandle, host: str, port: int) -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            result: list | BaseException = [(f, a) for f, _, _, _, a in infos]
        except (OSError, UnicodeError) as exc:
            result = exc
        with self._lock:
            self._resolved.append((s, result))
            self._wake()

    def _ready(self, s: StreamHandle, ev: int, now: float) -> None:
        st = s._state
        if st is CONNECTING:
            self._connect_done(s, now)
            return
        if ev & ERR:
            err = s._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(s, err, "", now)
                return
        if ev & OUT:
            if s._queue or s._want_writable:
                if not self._flush(s, now):
                    return
            elif s._mask & OUT:
                self._update_mask(s)  # nothing to write any more
        if s._state is DONE:
            return
        if st is HANDSHAKE:
            if ev & (IN | HUP):
                self._handshake_read(s, now)
        elif ev & (IN | HUP):
            if s._mask & IN:
                self._read(s, now)
            elif ev & HUP:  # nothing to read for: park, unless the socket is dead
                if s._queue or not s._shut_done:
                    self._fail(s, errno.ECONNRESET, "connection closed by peer", now)
                else:
                    self._ep.unregister(s._fd)
                    s._parked = True

    def _connect_done(self, s: StreamHandle, now: float) -> None:
        sock = s._sock
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            try:
                remote = sock.getpeername()[:2]
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    return  # not yet: wait for the next readiness
                err = exc.errno or errno.EIO
        if err:
            self._release(s, rst=False)
            if s._addrs and _reason(err) in ("refused", "unreachable"):
                self._connect_next(s, now, os.strerror(err))
            else:
                self._connect_failed(s, _reason(err), os.strerror(err), now)
            return
        hs = s._transport.handshake(s.request)
        if hs is None:
            self._connected(s, remote, now)
            return
        s._state, s._handshake = HANDSHAKE, hs
        self._handshake_step(s, hs.start, (), now)

    def _connected(self, s: StreamHandle, remote: tuple, now: float) -> None:
        reply = s._handshake.reply if s._handshake is not None else None
        s._state = OPEN
        s._deadline = None
        s._handshake = None
        self._update_mask(s)
        try:
            local = s._sock.getsockname()[:2]
        except OSError:
            local = None
        if s._shut_req:
            self._shutdown(s, now)
            if s._state is DONE:
                return
        self._deliver(s, StreamConnected(s, local, remote, reply), now)

    def _handshake_step(self, s: StreamHandle, fn: Callable, args: tuple, now: float) -> None:
        try:
            step = fn(*args)
        except TransportError as exc:
            self._finish(s, exc.reason, exc.message, now)
            return
        if step.send:
            s._queue.append(step.send)
            s._queued += len(step.send)
            if not self._flush(s, now):
                return
        s._hs_want = step.want
        if not step.want:
            if s._queue:
                self._fail(s, errno.EIO, "handshake done with bytes unsent", now)
            else:
                self._connected(s, (s.request.host, s.request.port), now)
            return
        self._update_mask(s)

    def _handshake_read(self, s: StreamHandle, now: float) -> None:
        try:
            data = s._sock.recv(s._hs_want - len(s._hs_buf))
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(s, exc.errno or 0, str(exc), now)
            return
        if not data:
            self._handshake_failed(s, "error", "upstream closed during the handshake", now)
            return
        s._hs_buf += data
        if len(s._hs_buf) == s._hs_want:
            data, s._hs_buf = s._hs_buf, b""
            self._handshake_step(s, s._handshake.feed, (data,), now)

    def _flush(self, s: StreamHandle, now: float) -> bool:
        """Send queued bytes; False when the stream failed."""
        q, sock = s._queue, s._sock
        while q:
            try:
                if len(q) == 1:
                    offered = len(q[0])
                    n = sock.send(q[0])
                else:
                    bufs = list(itertools.islice(q, _SENDMSG_BUFFERS))
                    offered = sum(len(b) for b in bufs)
                    n = sock.sendmsg(bufs)
            except BlockingIOError:
                break
            except OSError as exc:
                self._fail(s, exc.errno or 0, str(exc), now)
                return False
            self.bytes_up += n
            s._queued -= n
            left = n
            while left:
                head = q[0]
                if left >= len(head):
                    left -= len(head)
                    q.popleft()
                else:
                    q[0] = memoryview(head)[left:]
                    left = 0
            if n < offered:
                break
        if not q and s._shut_req and not s._shut_done:
            self._shutdown(s, now)
            if s._state is DONE:
                return False
        room_back = s._want_writable and s._state is OPEN and (
            s._queued <= s.request.write_buffer // 2)
        if room_back:
            s._want_writable = False
        self._update_mask(s)
        if room_back:
            self._deliver(s, StreamWritable(s), now)
        return s._state is not DONE

    def _read(self, s: StreamHandle, now: float) -> None:
        sock, chunk = s._sock, s.request.read_chunk
        closing = s._state is CLOSING
        for _ in range(_READS_PER_WAKE):
            try:
                data = sock.recv(chunk)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(s, exc.errno or 0, str(exc), now)
                return
            if not data:
                s._eof = True
                self._update_mask(s)
                if not closing:
                    self._deliver(s, StreamEnded(s), now)
                if s._state is not DONE and s._shut_done and not s._queue:
                    self._finish(s, "closed", "", now)
                return
            if closing:
                continue  # a closed stream reads only to find the peer's FIN
            self.bytes_down += len(data)
            self._deliver(s, StreamData(s, data), now)
            if s._state is not OPEN or s._paused or len(data) < chunk:
                return


__all__ = ["CLOSE_LINGER_S", "StreamHandle", "StreamManager"]
