"""The I/O core of the stream manager: epoll registration, bytes both ways, endings.

Theory of operation. :class:`StreamIO` holds what every stream of one
manager shares: the epoll set and the fd → handle map, the deadlines heap,
the queue of ``StreamClosed`` events decided inside handle methods, and the
counters. Every method runs with the bridge's lock held, either on the I/O
thread (``io_now`` is its clock: events are delivered at once) or from a
handle method (``io_now`` None: a ``StreamClosed`` is queued in
:attr:`StreamIO.deferred` and the I/O thread is woken to deliver it). It
implements :class:`~vtl.bridge.stream_handle.StreamCore` for the handles and
the readiness handler of the two phases that carry data (OPEN and CLOSING);
connecting and handshakes are :mod:`vtl.bridge.stream_connect`.

Invariants:

- the socket is registered for exactly what its phase and half-states wait
  for (:func:`wanted`), except while the read side is PARKED (out of epoll);
- ``StreamClosed`` is issued once, on the move into CLOSING or DONE
  (:meth:`StreamIO.finish` tells the service only when it was not told);
  no other event is delivered outside OPEN;
- reads: at most ``read_chunk`` per ``StreamData`` and ``READS_PER_WAKE``
  reads per wake-up, so one busy stream cannot starve the others; queued
  bytes leave with ``sendmsg``; ``StreamWritable`` comes once at most half
  the write buffer is queued (a low-water mark);
- a socket is closed only with its fd dropped from the map and from epoll.

A handler that raises is counted through its ``on_error`` (the chain passes
the slot's ``failed``); its stream is aborted with ``StreamClosed("error")``.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import select
import socket
from collections import deque

from vtl.bridge.stream_handle import StreamHandle
from vtl.bridge.stream_states import (
    BLOCKED,
    CLOSING,
    CONNECTING,
    DONE,
    EOF,
    FIN_PENDING,
    FIN_SENT,
    HANDSHAKE,
    OPEN,
    PARKED,
    READING,
    RESOLVING,
    TOLD,
    WRITING,
)
from vtl.bridge.transports.base import close_socket

from vtl.stream import (
    CloseReason,
    StreamClosed,
    StreamData,
    StreamEnded,
    StreamEvent,
    StreamWritable,
)

IN, OUT, ERR, HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP
READS_PER_WAKE = 4
_SENDMSG_BUFFERS = 64
_REASONS: dict[int, CloseReason] = {
    errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timeout",
    errno.EHOSTUNREACH: "unreachable", errno.ENETUNREACH: "unreachable",
    errno.EHOSTDOWN: "unreachable", errno.ENETDOWN: "unreachable",
    errno.ECONNRESET: "reset", errno.EPIPE: "reset", errno.ECONNABORTED: "reset",
}


def reason_of(err: int) -> CloseReason:
    """The close reason for an errno."""
    return _REASONS.get(err, "error")


def wanted(s: StreamHandle) -> int:
    """The epoll events a stream with a socket waits for in its phase and half-states."""
    phase = s._phase
    if phase is CONNECTING:
        return OUT
    if phase is HANDSHAKE:
        return IN | OUT if s._queue else IN
    return (IN if s._rd is READING else 0) | (OUT if s._queue or s._wr is BLOCKED else 0)


class StreamIO:
    """Shared state and socket-level operations of one manager's streams (lock held)."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.ep = select.epoll()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep.register(self.wake_fd, IN)
        self.fds: dict[int, StreamHandle] = {}
        self.live: dict[int, StreamHandle] = {}
        self.timers: list[tuple[float, int, StreamHandle]] = []
        self.deferred: deque[tuple[StreamHandle, StreamEvent]] = deque()
        self._seq = itertools.count()
        self.epoch = 0  # the poll round (see StreamManager._run)
        self.poll_until = 0.0  # when the I/O thread's current poll ends at the latest
        self.io_active = False  # the I/O thread holds the lock and delivers before it sleeps
        self.delivered = False  # a handler ran: after_events is due
        self.halted = False
        self.opened_total = 0
        self.failed_total = 0
        self.refused_by_policy = 0
        self.bytes_up = 0
        self.bytes_down = 0

    # -- epoll and deadlines ---------------------------------------------------------------

    def wake(self) -> None:
        if self.wake_fd >= 0:
            try:
                os.eventfd_write(self.wake_fd, 1)
            except OSError:
                pass

    def arm(self, s: StreamHandle, deadline: float) -> None:
        s._deadline = deadline
        heapq.heappush(self.timers, (deadline, next(self._seq), s))
        if deadline < self.poll_until and not self.io_active:
            self.wake()

    def register(self, s: StreamHandle, sock: socket.socket) -> None:
        """A new socket for ``s`` (CONNECTING); this poll round's results skip it."""
        s._sock, s._fd, s._mask, s._epoch = sock, sock.fileno(), OUT, self.epoch
        self.fds[s._fd] = s
        self.ep.register(s._fd, OUT)

    def update_mask(self, s: StreamHandle) -> None:
        if s._rd is PARKED:
            return  # out of epoll until reading resumes (unpark)
        mask = wanted(s)
        if mask != s._mask:
            self.ep.modify(s._fd, mask)
            s._mask = mask

    def park(self, s: StreamHandle) -> None:
        """PAUSED → PARKED: the peer hung up and nothing is left to write."""
        self.ep.unregister(s._fd)
        s._read_to(PARKED)

    def unpark(self, s: StreamHandle) -> None:
        s._read_to(READING)
        s._mask = wanted(s)
        self.ep.register(s._fd, s._mask)

    def release(self, s: StreamHandle, rst: bool) -> None:
        """Close the socket (with a RST when ``rst``), out of the map and epoll first."""
        sock = s._sock
        if sock is None:
            return
        s._sock = None
        if self.fds.get(s._fd) is s:
            del self.fds[s._fd]
            if s._rd is not PARKED:
                try:
                    self.ep.unregister(s._fd)
                except (OSError, ValueError):
                    pass
        close_socket(sock, rst)

    def close(self) -> None:
        if self.wake_fd >= 0:
            self.ep.close()
            os.close(self.wake_fd)
            self.wake_fd = -1

    # -- endings ---------------------------------------------------------------------------

    def drop(self, s: StreamHandle, rst: bool) -> None:
        """DONE: release the socket and forget the stream (does not tell the service)."""
        if s._phase is not DONE:
            s._to(DONE)
        s._deadline = None
        s._queue.clear()
        s._queued = 0
        self.live.pop(s.id, None)
        self.release(s, rst)

    def finish(self, s: StreamHandle, reason: CloseReason, message: str,
               io_now: float | None, rst: bool = False) -> None:
        told = s._phase in TOLD
        self.drop(s, rst)
        if not told:
            self.tell(s, reason, message, io_now)

    def fail(self, s: StreamHandle, reason: CloseReason, message: str,
             io_now: float | None) -> None:
        """End a stream that failed; before OPEN the transport (or its handshake) words it."""
        phase = s._phase
        try:
            if phase is RESOLVING or phase is CONNECTING:
                reason, message = s._transport.connect_failed(s.request, reason, message)
            elif phase is HANDSHAKE:
                reason, message = s._handshake.failed(reason, message)
        except Exception as exc:  # noqa: BLE001 - a transport bug must not hide the failure
            where = "Handshake.failed" if phase is HANDSHAKE else "connect_failed"
            message = f"{message} ({type(exc).__name__} in {where}: {exc})"
        self.finish(s, reason, message, io_now)

    def fail_errno(self, s: StreamHandle, err: int, message: str,
                   io_now: float | None) -> None:
        self.fail(s, reason_of(err), message or os.strerror(err), io_now)

    def tell(self, s: StreamHandle, reason: CloseReason, message: str,
             io_now: float | None) -> None:
        """Issue the one StreamClosed: at once on the I/O thread, else queued for it."""
        if reason not in ("closed", "local"):
            self.failed_total += 1
        event = StreamClosed(s, reason, message)
        if io_now is None:
            self.deferred.append((s, event))
            if not self.io_active:
                self.wake()
        else:
            self.deliver(s, event, io_now)

    def deliver(self, s: StreamHandle, event: StreamEvent, now: float) -> None:
        if self.halted or (type(event) is not StreamClosed and s._phase is not OPEN):
            return
        self.delivered = True
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
            if s._phase not in TOLD:
                self.finish(s, "error", f"stream handler raised {exc!r}", now, rst=True)

    def deliver_deferred(self, now: float) -> None:
        while self.deferred:
            self.deliver(*self.deferred.popleft(), now)

    # -- bytes -----------------------------------------------------------------------------

    def shutdown(self, s: StreamHandle, io_now: float | None) -> None:
        try:
            s._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.fail_errno(s, exc.errno or 0, str(exc), io_now)
            return
        s._write_to(FIN_SENT)
        if s._rd is EOF:
            self.finish(s, "closed", "", io_now)

    def flush(self, s: StreamHandle, now: float) -> bool:
        """Send queued bytes (then the FIN asked for); False when the stream is DONE."""
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
                self.fail_errno(s, exc.errno or 0, str(exc), now)
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
        if not q and s._wr is FIN_PENDING and (s._phase is OPEN or s._phase is CLOSING):
            self.shutdown(s, now)  # not during a handshake: the FIN follows the connect
            if s._phase is DONE:
                return False
        room_back = s._wr is BLOCKED and s._phase is OPEN and (
            s._queued <= s.request.write_buffer // 2)
        if room_back:
            s._write_to(WRITING)
        self.update_mask(s)
        if room_back:
            self.deliver(s, StreamWritable(s), now)
        return s._phase is not DONE

    def output(self, s: StreamHandle, ev: int, now: float) -> bool:
        """The part of readiness every phase with a connected socket shares: a socket
        error ends the stream, EPOLLOUT flushes. False when the stream is DONE."""
        if ev & ERR:
            err = s._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail_errno(s, err, "", now)
                return False
        if ev & OUT:
            if s._queue or s._wr is BLOCKED:
                return self.flush(s, now)
            if s._mask & OUT:
                self.update_mask(s)  # nothing to write any more
        return True

    def ready_data(self, s: StreamHandle, ev: int, now: float) -> None:
        """Readiness in OPEN and CLOSING (CLOSING reads only to find the peer's FIN)."""
        if not self.output(s, ev, now) or not ev & (IN | HUP):
            return
        if s._rd is READING:
            self.read(s, now)
        elif ev & HUP:  # nothing to read for: park, unless the socket is dead
            if s._queue or s._wr is not FIN_SENT:
                self.fail_errno(s, errno.ECONNRESET, "connection closed by peer", now)
            else:
                self.park(s)

    def read(self, s: StreamHandle, now: float) -> None:
        sock, chunk = s._sock, s.request.read_chunk
        closing = s._phase is CLOSING
        for _ in range(READS_PER_WAKE):
            try:
                data = sock.recv(chunk)
            except BlockingIOError:
                return
            except OSError as exc:
                self.fail_errno(s, exc.errno or 0, str(exc), now)
                return
            if not data:
                s._read_to(EOF)
                self.update_mask(s)
                if not closing:
                    self.deliver(s, StreamEnded(s), now)
                if s._phase is not DONE and s._wr is FIN_SENT and not s._queue:
                    self.finish(s, "closed", "", now)
                return
            if closing:
                continue  # a closed stream reads only to find the peer's FIN
            self.bytes_down += len(data)
            self.deliver(s, StreamData(s, data), now)
            if s._phase is not OPEN or s._rd is not READING or len(data) < chunk:
                return


__all__ = ["READS_PER_WAKE", "StreamIO", "reason_of", "wanted"]
