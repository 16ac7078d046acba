"""Getting a stream to OPEN: resolution, the connect, the transport's handshake.

Theory of operation. A new stream starts RESOLVING. The transport names the
endpoint (:meth:`Transport.endpoint`: the request's own host for TCP, the
proxy for SOCKS5); an address literal is used at once, a name is resolved
with ``getaddrinfo`` on a worker thread whose answer the I/O thread picks up
(:meth:`Connector.drain`). CONNECTING tries the addresses in order: the
transport starts a non-blocking connect, EPOLLOUT says how it went, and a
refused or unreachable address moves on to the next one. Once connected,
the transport's handshake (if any) runs in HANDSHAKE: it says what to send
and exactly how many bytes it wants back, so it never reads an application
byte. Then OPEN and ``StreamConnected``; a FIN the service asked for before
that is sent now, never during the handshake.

``timeout_s`` bounds RESOLVING, CONNECTING and HANDSHAKE together (the
manager's deadline). A failure before OPEN is worded by the transport
(:meth:`Transport.connect_failed`, :meth:`Handshake.failed`; see
:meth:`vtl.bridge.stream_io.StreamIO.fail`).

Everything but the resolver thread runs with the bridge's lock held.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections import deque
from collections.abc import Callable

from vtl.bridge.stream_handle import StreamHandle
from vtl.bridge.stream_io import HUP, IN, StreamIO, reason_of
from vtl.bridge.stream_states import CONNECTING, DONE, FIN_PENDING, HANDSHAKE, OPEN, RESOLVING
from vtl.bridge.transports.base import TransportError

from vtl.stream import CloseReason, StreamConnected


def numeric(host: str, port: int) -> list[tuple[int, tuple]] | None:
    """Addresses of an IP literal (no DNS), or None when ``host`` is a name."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except (socket.gaierror, UnicodeError):
        return None
    return [(fam, addr) for fam, _, _, _, addr in infos]


class Connector:
    """The RESOLVING, CONNECTING and HANDSHAKE phases of one manager's streams."""

    def __init__(self, io: StreamIO, lock: threading.Lock, name: str):
        self.io = io
        self._lock = lock
        self._name = name
        self._resolved: deque[tuple[StreamHandle, list | BaseException]] = deque()

    def start(self, s: StreamHandle) -> None:
        """RESOLVING: connect at once to a literal, else resolve on a worker thread."""
        host, port = s._transport.endpoint(s.request)
        addrs = numeric(host, port)
        if addrs is None:
            threading.Thread(target=self._resolve, args=(s, host, port), daemon=True,
                             name=f"{self._name}-resolve").start()
        else:
            self.connect_to(s, addrs, None)

    def connect_to(self, s: StreamHandle, addrs: list[tuple[int, tuple]],
                   io_now: float | None) -> None:
        """RESOLVING → CONNECTING to the first of ``addrs``."""
        s._addrs = addrs
        s._to(CONNECTING)
        self._connect_next(s, io_now, None)

    def _resolve(self, s: StreamHandle, host: str, port: int) -> None:  # worker thread
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            result: list | BaseException = [(f, a) for f, _, _, _, a in infos]
        except (OSError, UnicodeError) as exc:
            result = exc
        with self._lock:
            self._resolved.append((s, result))
            self.io.wake()

    def drain(self, now: float) -> None:
        """Act on the resolver threads' answers (I/O thread)."""
        while self._resolved:
            s, result = self._resolved.popleft()
            if s._phase is not RESOLVING:
                continue  # timed out, closed or aborted meanwhile
            if isinstance(result, BaseException):
                self.io.fail(s, "error", f"cannot resolve {s.request.host!r}: {result}", now)
            else:
                self.connect_to(s, result, now)

    def _connect_next(self, s: StreamHandle, io_now: float | None, last: str | None) -> None:
        reason: CloseReason = "error"
        while s._addrs:
            family, sockaddr = s._addrs.pop(0)
            try:
                sock = s._transport.connect(s.request, family, sockaddr)
            except OSError as exc:
                reason, last = reason_of(exc.errno or 0), f"{sockaddr[0]}: {exc.strerror or exc}"
                continue
            except Exception as exc:  # noqa: BLE001 - a transport bug closes the stream
                reason, last = "error", f"{type(exc).__name__}: {exc}"
                continue
            self.io.register(s, sock)
            return
        self.io.fail(s, reason, last or "no address to connect to", io_now)

    # -- readiness, one handler per phase ------------------------------------------------

    def ready_connecting(self, s: StreamHandle, ev: int, now: float) -> None:
        """CONNECTING: the connect finished one way or the other."""
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
            self.io.release(s, rst=False)
            if s._addrs and reason_of(err) in ("refused", "unreachable"):
                self._connect_next(s, now, os.strerror(err))
            else:
                self.io.fail(s, reason_of(err), os.strerror(err), now)
            return
        hs = s._transport.handshake(s.request)
        if hs is None:
            self._connected(s, remote, now)
            return
        s._handshake = hs
        s._to(HANDSHAKE)
        self._handshake_step(s, hs.start, (), now)

    def ready_handshake(self, s: StreamHandle, ev: int, now: float) -> None:
        """HANDSHAKE: send what the handshake wants sent, read what it wants read."""
        if self.io.output(s, ev, now) and ev & (IN | HUP):
            self._handshake_read(s, now)

    # -- steps ------------------------------------------------------------------------------

    def _connected(self, s: StreamHandle, remote: tuple, now: float) -> None:
        io = self.io
        reply = s._handshake.reply if s._handshake is not None else None
        s._to(OPEN)
        s._deadline = None
        s._handshake = None
        io.update_mask(s)
        try:
            local = s._sock.getsockname()[:2]
        except OSError:
            local = None
        if s._wr is FIN_PENDING:  # asked for before connected
            io.shutdown(s, now)
            if s._phase is DONE:
                return
        io.deliver(s, StreamConnected(s, local, remote, reply), now)

    def _handshake_step(self, s: StreamHandle, fn: Callable, args: tuple, now: float) -> None:
        io = self.io
        try:
            step = fn(*args)
        except TransportError as exc:
            io.finish(s, exc.reason, exc.message, now)
            return
        if step.send:
            s._queue.append(step.send)
            s._queued += len(step.send)
            if not io.flush(s, now):
                return
        s._hs_want = step.want
        if not step.want:
            if s._queue:
                io.fail_errno(s, errno.EIO, "handshake done with bytes unsent", now)
            else:
                self._connected(s, (s.request.host, s.request.port), now)
            return
        io.update_mask(s)

    def _handshake_read(self, s: StreamHandle, now: float) -> None:
        try:
            data = s._sock.recv(s._hs_want - len(s._hs_buf))
        except BlockingIOError:
            return
        except OSError as exc:
            self.io.fail_errno(s, exc.errno or 0, str(exc), now)
            return
        if not data:
            self.io.fail(s, "error", "upstream closed during the handshake", now)
            return
        s._hs_buf += data
        if len(s._hs_buf) == s._hs_want:
            data, s._hs_buf = s._hs_buf, b""
            self._handshake_step(s, s._handshake.feed, (data,), now)


__all__ = ["Connector", "numeric"]
