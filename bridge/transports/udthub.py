"""The UDT hub: one thread that owns every UDT socket of a stream manager.

Theory of operation. The stream manager only knows kernel sockets, so each
UDT-carried stream is a *pipe*: a loopback TCP pair (:func:`~.udtsock.tcp_pair`) whose
manager end the manager handles like any stream and whose hub end the hub
pumps to and from the stream's UDT connection (a *conn*), framed by
:mod:`.udtwire`. A TCP pair rather than ``socketpair()``: closing it with
``SO_LINGER`` 0 is a real reset, so the manager reports ``"reset"``. What to do
with every byte, message and event is decided by a sans-IO
:class:`~.udtsession.Session` (pipe and conn states, credit windows, which
message is legal when, the status records the transport's handshake reads);
the hub only does the I/O it asks for and reports back.

Thread model: the hub thread waits in a ``UDTEpoll`` over the UDT sockets
and the pipes' hub ends. libudt polls kernel fds only every ~10 ms when no
UDT event happens, so a *doorbell* (a UDT connection to itself on loopback)
wakes it at once: a watcher thread rings it on any edge of a pipe (the
manager wrote, read or closed), and other threads ring it after queueing a
command (open, answer an offer, listen). All hub and session state is touched
by the hub thread only; commands cross threads through a deque. Blocking UDT
connects run on short-lived threads (libudt reports a dead peer only there).

Not done here: IPv6 UDT (udt4py binds IPv4 only), rendezvous mode,
congestion-control choice.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import vtl.bridge.transports.udtstate as ust
from udt4py import UDTEpoll, UDTException, UDTSocket
from vtl.bridge.transports.base import close_socket
from vtl.bridge.transports.udtsession import Session
from vtl.bridge.transports.udtsock import nonblocking, set_opts, tcp_pair, uclose
from vtl.bridge.transports.udtstate import LIVE, Conn, Pipe, PipeState, Tuning

from vtl.stream import StreamFlow

log = logging.getLogger("vtl.streams.udt")

UIN, UOUT = UDTEpoll.UDT_EPOLL_IN, UDTEpoll.UDT_EPOLL_OUT
_EASYNCSND, _EASYNCRCV, _ETIMEOUT = 6001, 6002, 6003
_TICK_S = 0.25
_ALIVE = (UDTSocket.Status.CONNECTED,)

@dataclass(frozen=True)
class Arrival:
    """An inbound stream for the manager: ``sock`` is its end of the pipe, ``flow``
    the connection the opener carries."""

    sock: socket.socket
    peer: tuple[str, int]
    flow: StreamFlow | None
    pipe: Pipe
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Listen:
    sock: UDTSocket
    address: tuple[str, int]
    window: int
    deliver: Callable[[Arrival], None]
    closed: bool = False


class Hub:
    """The UDT side of one stream manager; see the module docstring."""

    def __init__(self, name: str = "vtl"):
        self.name = name
        self.session = Session()
        self._ep = UDTEpoll()
        self._wep = select.epoll()
        self._cmds: deque[Callable[[], None]] = deque()
        self._udt: dict[int, Conn | Listen | None] = {}
        self._pipes: dict[int, Pipe] = {}
        self._rbuf = bytearray(1 << 20)
        self._stopping = False
        self._rung = False
        self._next_tick = 0.0
        lst = UDTSocket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        self._bell_tx = UDTSocket()
        self._bell_tx.connect(lst.address)
        self._bell_rx, _ = lst.accept()
        lst.close()
        nonblocking(self._bell_rx)
        self._bell_tx.UDT_SNDSYN = False
        self._ep.add(self._bell_rx, UIN)
        self._udt[self._bell_rx.socket] = None
        self._thread = threading.Thread(target=self._run_guarded, daemon=True,
                                        name=f"{name}-udt")
        self._watcher = threading.Thread(target=self._watch, daemon=True,
                                         name=f"{name}-udt-watch")
        self._thread.start()
        self._watcher.start()

    @property
    def _mux(self) -> dict[tuple, Conn]:
        return self.session.mux

    # -- any thread --------------------------------------------------------------------

    def ring(self) -> None:
        if not self._rung:
            self._rung = True
            try:
                self._bell_tx.send(b"!")
            except (UDTException, TypeError):  # TypeError: udt4py after close()
                pass

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the hub thread, soon."""
        self._cmds.append(lambda: fn(*args))
        self._rung = False
        self.ring()

    def open(self, peer: tuple[str, int], flow: StreamFlow, tuning: Tuning,
             mux: bool) -> socket.socket:
        """Start an outbound stream; returns the manager's end of its pipe."""
        hub_end, mgr_end = tcp_pair()
        self.call(self._open, hub_end, peer, flow, tuning, mux)
        return mgr_end

    def listen(self, host: str, port: int, tuning: Tuning,
               deliver: Callable[[Arrival], None]) -> Listen:
        """Bind a UDT listener now (OSError when that fails); arrivals go to ``deliver``
        (called on the hub thread: it must only queue)."""
        sock = UDTSocket()
        try:
            set_opts(sock, tuning)
            sock.bind((host, port))
            sock.listen(128)
            nonblocking(sock)
            address = sock.address
        except UDTException as exc:
            sock.close()
            raise OSError(f"cannot listen for UDT on {host}:{port}: {exc}") from None
        rec = Listen(sock, (address[0], address[1]), tuning.window, deliver)
        self.call(self._listen, rec)
        return rec

    def unlisten(self, rec: Listen) -> None:
        self.call(self._unlisten, rec)

    def accept(self, pipe: Pipe) -> None:
        self.call(self._answer, pipe, None, "")

    def refuse(self, pipe: Pipe, reason: str, message: str) -> None:
        self.call(self._answer, pipe, reason, message)

    def stop(self) -> None:
        self._stopping = True
        self._rung = False
        self.ring()
        for t in (self._thread, self._watcher):
            t.join(5.0)
        self.session.stop()
        self._pump()
        for obj in list(self._udt.values()):
            if isinstance(obj, Listen):
                uclose(obj.sock)
        self._bell_tx.close()
        self._bell_rx.close()
        self._wep.close()

    # -- hub thread: commands from other threads ------------------------------------------

    def _open(self, hub_end: socket.socket, peer: tuple[str, int], flow: StreamFlow,
              tuning: Tuning, mux: bool) -> None:
        p = self.session.open(peer, flow, tuning, mux)
        self._add_pipe(p, hub_end)

    def _connect(self, conn: Conn, tuning: Tuning) -> None:
        """On a helper thread: a blocking UDT connect (libudt reports failure there)."""
        sock = UDTSocket()
        try:
            set_opts(sock, tuning)
            sock.connect(conn.peer)
            nonblocking(sock)
            result: UDTSocket | str = sock
        except UDTException as exc:
            uclose(sock)
            result = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported to the streams, not lost
            uclose(sock)
            result = f"{type(exc).__name__}: {exc}"
        self.call(self._connected, conn, result)

    def _connected(self, conn: Conn, result: UDTSocket | str) -> None:
        if isinstance(result, str):
            self.session.connect_failed(conn, result)
        elif self._stopping or not self.session.connected(conn):
            uclose(result)
        else:
            conn.sock = result
            self._udt[result.socket] = conn

    def _listen(self, rec: Listen) -> None:
        if self._stopping:
            uclose(rec.sock)
            return
        self._udt[rec.sock.socket] = rec
        self._ep.add(rec.sock, UIN)

    def _unlisten(self, rec: Listen) -> None:
        if rec.closed:
            return
        rec.closed = True
        self._udt.pop(rec.sock.socket, None)
        try:
            self._ep.remove(rec.sock)
        except UDTException:
            pass
        uclose(rec.sock)

    def _answer(self, p: Pipe, reason: str | None, message: str) -> None:
        self.session.answer(p, reason, message)

    # -- hub thread: the loop ----------------------------------------------------------

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException:  # noqa: BLE001 - say so: without this thread UDT streams hang
            log.critical("UDT hub thread died", exc_info=True)

    def _run(self) -> None:
        ep = self._ep
        while not self._stopping:
            try:
                r, w, sr, sw = ep.wait(_TICK_S)
            except UDTException as exc:
                if exc.error_code != _ETIMEOUT:
                    raise
                r = w = sr = sw = ()
            self._rung = False
            ready = [self._udt.get(u.socket, False) if u is not None else False for u in r]
            if None in ready:  # the doorbell: drain it *before* running the commands, so a
                self._drain_bell()  # command queued meanwhile is run now, not a tick later
            while self._cmds:
                self._cmds.popleft()()
                self._pump()
            for obj in ready:
                if isinstance(obj, Listen):
                    self._accept(obj)
                elif isinstance(obj, Conn):
                    self._conn_read(obj)
                self._pump()
            for u in w:
                obj = self._udt.get(u.socket) if u is not None else None
                if isinstance(obj, Conn):
                    self._flush(obj)
                    self._pump()
            for fd in sr:
                p = self._pipes.get(fd)
                if p is not None:
                    self._pipe_read(p)
                    self._pump()
            for fd in sw:
                p = self._pipes.get(fd)
                if p is not None:
                    self._pipe_write(p)
                    self._pump()
            now = time.monotonic()
            if now >= self._next_tick:
                self._next_tick = now + _TICK_S
                self._health(now)
                self._pump()
            self._apply_masks()

    def _pump(self) -> None:
        """Do what the session asked: its commands in order, then its queued bytes."""
        s = self.session
        while True:
            if s.commands:
                self._do(s.commands.popleft())
            elif s.to_write:
                p = next(iter(s.to_write))
                del s.to_write[p]
                self._pipe_write(p)
            elif s.to_flush:
                c = next(iter(s.to_flush))
                del s.to_flush[c]
                self._flush(c)
            else:
                return

    def _do(self, cmd: ust.Command) -> None:
        if isinstance(cmd, ust.ClosePipe):
            self._close_pipe(cmd.pipe, cmd.rst)
        elif isinstance(cmd, ust.Offer):
            p = cmd.pipe
            hub_end, mgr_end = tcp_pair()
            self._add_pipe(p, hub_end)
            p.conn.listener.deliver(Arrival(mgr_end, p.conn.peer, p.flow, p))
        elif isinstance(cmd, ust.ShutPipe):
            try:
                cmd.pipe.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.session.pipe_error(cmd.pipe)
            else:
                self.session.pipe_shut(cmd.pipe)
        elif isinstance(cmd, ust.Connect):
            c = cmd.conn
            threading.Thread(target=self._connect, args=(c, c.tuning), daemon=True,
                             name=f"{self.name}-udt-connect").start()
        elif isinstance(cmd, ust.CloseConn):
            self._close_conn(cmd.conn, cmd.last)

    def _watch(self) -> None:
        """Ring the doorbell on any edge of a pipe's hub end (the manager acted)."""
        while not self._stopping:
            try:
                events = self._wep.poll(_TICK_S)
            except (InterruptedError, ValueError, OSError):
                if self._stopping:
                    return
                continue
            if events:
                self.ring()

    def _drain_bell(self) -> None:
        while True:
            try:
                self._bell_rx.recv(self._rbuf)
            except UDTException:
                return

    def _health(self, now: float) -> None:
        for obj in list(self._udt.values()):
            if not isinstance(obj, Conn) or obj.state not in LIVE:
                continue
            try:
                alive = obj.sock.status in _ALIVE
            except UDTException:
                alive = False
            if not alive:
                self._conn_read(obj)  # what arrived before the peer left is still readable
                self.session.conn_broken(obj, "UDT connection broken")
        self.session.tick(now)

    # -- UDT side ----------------------------------------------------------------------

    def _accept(self, rec: Listen) -> None:
        while not rec.closed:
            try:
                sock, peer = rec.sock.accept()
            except UDTException:
                return
            nonblocking(sock)
            conn = self.session.accepted((peer[0], peer[1]), rec)
            conn.sock = sock
            self._udt[sock.socket] = conn

    def _conn_read(self, c: Conn) -> None:
        total = 0
        view = memoryview(self._rbuf)
        while total < 4 * len(self._rbuf) and c.state in LIVE:
            try:
                n = c.sock.recv(self._rbuf)
            except UDTException as exc:
                if exc.error_code != _EASYNCRCV:
                    self.session.conn_broken(c, f"UDT connection to {c.label} lost: {exc}")
                return
            if n <= 0:
                return
            total += n
            err = self.session.received(c, view[:n])
            if err is not None:
                log.warning("UDT peer %s: %s; resetting its connection", c.label, err)

    def _flush(self, c: Conn) -> None:
        q = c.sendq
        while q and c.state in LIVE:
            head = q.head()
            try:
                n = c.sock.send(head)
            except UDTException as exc:
                if exc.error_code != _EASYNCSND:
                    self.session.conn_broken(c, f"UDT connection to {c.label} lost: {exc}")
                    return
                n = 0
            if n <= 0:
                break
            q.consume(n)
            if n < len(head):
                break
        self.session.flushed(c)

    def _close_conn(self, c: Conn, last: bytes) -> None:
        if c.sock is None:
            return
        if last:
            try:
                c.sock.send(last)
            except UDTException:
                pass
        self._udt.pop(c.sock.socket, None)
        if c.mask:
            try:
                self._ep.remove(c.sock)
            except UDTException:
                pass
        uclose(c.sock)
        c.mask = 0

    # -- pipe side ---------------------------------------------------------------------

    def _add_pipe(self, p: Pipe, sock: socket.socket) -> None:
        p.sock = sock
        fd = sock.fileno()
        self._pipes[fd] = p
        try:
            self._wep.register(fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP
                               | select.EPOLLET)
        except OSError:
            pass
        self.session.dirty.add(p)

    def _close_pipe(self, p: Pipe, rst: bool) -> None:
        sock = p.sock
        if sock is None:
            return
        fd = sock.fileno()
        self._pipes.pop(fd, None)
        try:
            self._wep.unregister(fd)
        except (OSError, ValueError):
            pass
        if p.mask:
            try:
                self._ep.remove(fd)
            except UDTException:
                pass
            p.mask = 0
        close_socket(sock, rst)

    def _pipe_read(self, p: Pipe) -> None:
        s = self.session
        if not s.pipe_readable(p):
            return
        for _ in range(8):
            room = s.read_room(p)
            if room <= 0:
                break
            try:
                data = p.sock.recv(room)
            except BlockingIOError:
                break
            except OSError:
                s.pipe_error(p)
                return
            if not data:
                s.pipe_eof(p)
                break
            s.pipe_data(p, data)

    def _pipe_write(self, p: Pipe) -> None:
        if p.state is PipeState.DONE or p.sock is None:
            return
        q, total = p.out, 0
        while q:
            chunk = q.head()
            try:
                n = p.sock.send(chunk)
            except BlockingIOError:
                break
            except OSError:
                self.session.pipe_error(p)
                return
            q.consume(n)
            total += n
            if n < len(chunk):
                break
        self.session.pipe_wrote(p, total)

    def _apply_masks(self) -> None:
        s = self.session
        dirty, s.dirty = s.dirty, set()
        for obj in dirty:
            if isinstance(obj, Pipe):
                if obj.state is PipeState.DONE or obj.sock is None:
                    continue
                mask = (UIN if s.wants_read(obj) else 0) | (UOUT if obj.out else 0)
                key: Any = obj.sock.fileno()
            else:
                if obj.state not in LIVE or obj.sock is None:
                    continue
                mask = UIN | (UOUT if obj.sendq else 0)
                key = obj.sock
            if mask == obj.mask:
                continue
            try:
                if obj.mask:
                    self._ep.remove(key)
                if mask:
                    self._ep.add(key, mask)
            except UDTException as exc:
                log.debug("UDT epoll update failed: %s", exc)
            obj.mask = mask


__all__ = ["Arrival", "Hub", "Listen"]
