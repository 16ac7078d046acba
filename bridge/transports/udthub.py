"""The UDT hub: one thread that owns every UDT socket of a stream manager.

Theory of operation. The stream manager only knows kernel sockets, so each
UDT-carried stream is a *pipe*: a loopback TCP pair (:func:`tcp_pair`) whose
manager end the manager handles like any stream and whose hub end the hub
pumps to and from the stream's UDT connection (a *conn*), framed by
:mod:`.udtwire`. A TCP pair rather than ``socketpair()``: closing it with
``SO_LINGER`` 0 is a real reset, so the manager reports ``"reset"``.

Before the first stream byte the hub writes one or two *status records*
into the pipe (:data:`RECORD`: magic, code, reason, length, message): UP
(the UDT connection is there, the OPEN is sent), then OK (the far side
accepted) or FAIL (refused, unreachable, reset: the stream is over). The
transport's handshake reads them, so the manager's own timeout and close
reasons apply unchanged.

Thread model: the hub thread waits in a ``UDTEpoll`` over the UDT sockets
and the pipes' hub ends. libudt polls kernel fds only every ~10 ms when no
UDT event happens, so a *doorbell* (a UDT connection to itself on loopback)
wakes it at once: a watcher thread rings it on any edge of a pipe (the
manager wrote, read or closed), and other threads ring it after queueing a
command (open, answer an offer, listen). All hub state is touched by the
hub thread only; commands cross threads through a deque. Blocking UDT
connects run on short-lived threads (libudt reports a dead peer only there).

Invariants: DATA leaves only within the peer's credit (WINDOW), so what the
hub buffers toward a pipe is bounded by the window it granted; a pipe's
records precede its data; a conn that breaks (UDT error, framing error,
peer gone) resets every pipe on it; per-connection conns close when their
pipe is done, mux conns after ``MUX_IDLE_S`` without pipes.

Not done here: IPv6 UDT (udt4py binds IPv4 only), rendezvous mode,
congestion-control choice.
"""

from __future__ import annotations

import enum
import logging
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from udt4py import UDTEpoll, UDTException, UDTSocket
from vtl.bridge.transports import udtwire as wire

if TYPE_CHECKING:
    from vtl.bridge.transports.udt import Tuning

log = logging.getLogger("vtl.streams.udt")

UIN, UOUT = UDTEpoll.UDT_EPOLL_IN, UDTEpoll.UDT_EPOLL_OUT
_EASYNCSND, _EASYNCRCV, _ETIMEOUT = 6001, 6002, 6003
RECORD = struct.Struct(">BBBH")  # magic, code, reason index, message length
MAGIC = 0x56
UP, OK, FAIL = 1, 2, 3
PAIR_BUFFER = 1 << 20  # each side of a pipe: kernel buffers (100+ Mbit/s at 10 ms)
SENDQ_HIGH = 2 << 20  # stop reading pipes of a conn whose UDT send queue is this full
MUX_IDLE_S = 30.0
_TICK_S = 0.25
_LINGER_RST = struct.pack("ii", 1, 0)
_ALIVE = (UDTSocket.Status.CONNECTED,)


def record(code: int, reason: str = "", message: str = "") -> bytes:
    raw = message.encode("utf-8", "replace")[:1024]
    idx = wire.REASONS.index(reason) + 1 if reason in wire.REASONS else 0
    return RECORD.pack(MAGIC, code, idx, len(raw)) + raw


_pair_lock = threading.Lock()
_pair_listener: socket.socket | None = None


def tcp_pair(buffer: int = PAIR_BUFFER) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (hub end, manager end), both non-blocking."""
    global _pair_listener
    with _pair_lock:
        if _pair_listener is None:
            lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            lst.bind(("127.0.0.1", 0))
            lst.listen(512)
            _pair_listener = lst
        lst = _pair_listener
        a = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):
            try:
                a.setsockopt(socket.SOL_SOCKET, force, buffer)  # SO_*BUFFORCE (root)
            except OSError:
                a.setsockopt(socket.SOL_SOCKET, opt, buffer)
        a.connect(lst.getsockname())
        want = a.getsockname()
        while True:
            b, peer = lst.accept()
            if peer == want:
                break
            b.close()  # someone else's connection to our private listener
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return b, a


class PState(enum.Enum):
    OPENING = "opening"  # opener: OPEN sent or to send, waiting for OPEN_OK / REFUSE
    OFFERED = "offered"  # acceptor: the service has not answered yet
    OPEN = "open"
    DONE = "done"


@dataclass(eq=False)
class Pipe:
    sid: int
    conn: Conn
    sock: socket.socket  # the hub end
    state: PState
    window: int  # what we let the peer have outstanding
    flow: wire.Flow | None = None
    credit: int = 0  # DATA bytes we may still send
    allowed: int = 0  # DATA bytes the peer may still send
    consumed: int = 0  # DATA bytes written to the pipe since our last WINDOW
    out: deque = field(default_factory=deque)
    out_bytes: int = 0
    record_left: int = 0  # bytes at the head of ``out`` that are records, not DATA
    eof: bool = False  # read EOF from the pipe; FIN queued
    fin_in: bool = False  # peer's FIN received
    shut: bool = False  # pipe shut for writing (after fin_in and out flushed)
    close_after: bool = False  # a FAIL record is queued: close once flushed
    mask: int = 0

    @property
    def fd(self) -> int:
        return self.sock.fileno()


class CState(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    DEAD = "dead"


@dataclass(eq=False)
class Conn:
    sock: UDTSocket | None
    peer: tuple[str, int]
    outbound: bool
    state: CState
    mux_key: tuple | None = None
    listener: Listen | None = None
    sendq: deque = field(default_factory=deque)
    sendq_bytes: int = 0
    dec: wire.Decoder = field(default_factory=wire.Decoder)
    pipes: dict[int, Pipe] = field(default_factory=dict)
    next_sid: int = 1
    max_sid: int = 0
    mask: int = 0
    idle_since: float = 0.0
    closing: bool = False  # close the UDT socket once sendq is flushed

    @property
    def label(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}"


@dataclass(frozen=True)
class Arrival:
    """An inbound stream for the manager: ``sock`` is its end of the pipe."""

    sock: socket.socket
    peer: tuple[str, int]
    meta: dict[str, Any]
    pipe: Pipe


@dataclass(eq=False)
class Listen:
    sock: UDTSocket
    address: tuple[str, int]
    window: int
    deliver: Callable[[Arrival], None]
    closed: bool = False


def _set_opts(sock: UDTSocket, tuning: Tuning) -> None:
    mss, window = tuning.mss, tuning.window
    sock.UDT_MSS = mss
    sock.UDT_SNDBUF = window
    sock.UDT_RCVBUF = window
    sock.UDT_FC = max(25600, window // max(mss - 44, 1) + 1)
    if tuning.max_bw > 0:
        # UDT's own rate control overshoots a rate-limited WAN by far (tail drops of
        # 30-40 % at 0 % loss, measured with benchmarks/udt.py); a cap at the link rate
        # keeps its pacing under the bottleneck
        sock.UDT_MAXBW = tuning.max_bw


def _uclose(sock: UDTSocket) -> None:
    try:
        sock.close()
    except UDTException:
        pass  # libudt already dropped it (broken and collected)


def _nonblocking(sock: UDTSocket) -> None:
    sock.UDT_SNDSYN = False
    sock.UDT_RCVSYN = False


class Hub:
    """The UDT side of one stream manager; see the module docstring."""

    def __init__(self, name: str = "vtl"):
        self.name = name
        self._ep = UDTEpoll()
        self._wep = select.epoll()
        self._cmds: deque[Callable[[], None]] = deque()
        self._udt: dict[int, Conn | Listen | None] = {}
        self._pipes: dict[int, Pipe] = {}
        self._mux: dict[tuple, Conn] = {}
        self._dirty: set[Pipe | Conn] = set()
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
        _nonblocking(self._bell_rx)
        self._bell_tx.UDT_SNDSYN = False
        self._ep.add(self._bell_rx, UIN)
        self._udt[self._bell_rx.socket] = None
        self._thread = threading.Thread(target=self._run_guarded, daemon=True,
                                        name=f"{name}-udt")
        self._watcher = threading.Thread(target=self._watch, daemon=True,
                                         name=f"{name}-udt-watch")
        self._thread.start()
        self._watcher.start()

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

    def open(self, peer: tuple[str, int], flow: wire.Flow, tuning: Tuning,
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
            _set_opts(sock, tuning)
            sock.bind((host, port))
            sock.listen(128)
            _nonblocking(sock)
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
        for obj in list(self._udt.values()):
            if isinstance(obj, Conn):
                self._conn_dead(obj, "the bridge is stopping", send_rst=True)
            elif isinstance(obj, Listen):
                _uclose(obj.sock)
        for p in list(self._pipes.values()):
            self._drop_pipe(p, rst=True, tell_peer=False)
        self._bell_tx.close()
        self._bell_rx.close()
        self._wep.close()

    # -- hub thread: commands -----------------------------------------------------------

    def _open(self, hub_end: socket.socket, peer: tuple[str, int], flow: wire.Flow,
              tuning: Tuning, mux: bool) -> None:
        key = (peer, tuning) if mux else None
        window = tuning.window
        conn = self._mux.get(key) if key else None
        if conn is None or conn.state is CState.DEAD or conn.closing:
            conn = Conn(None, peer, True, CState.CONNECTING, mux_key=key)
            if key:
                self._mux[key] = conn
            threading.Thread(target=self._connect, args=(conn, tuning), daemon=True,
                             name=f"{self.name}-udt-connect").start()
        sid = conn.next_sid
        conn.next_sid += 1
        conn.max_sid = sid
        p = Pipe(sid, conn, hub_end, PState.OPENING, window, flow, allowed=window)
        conn.pipes[sid] = p
        self._add_pipe(p)
        if conn.state is CState.OPEN:
            self._send_open(p)

    def _connect(self, conn: Conn, tuning: Tuning) -> None:
        """On a helper thread: a blocking UDT connect (libudt reports failure there)."""
        sock = UDTSocket()
        try:
            _set_opts(sock, tuning)
            sock.connect(conn.peer)
            _nonblocking(sock)
            result: UDTSocket | str = sock
        except UDTException as exc:
            _uclose(sock)
            result = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported to the streams, not lost
            _uclose(sock)
            result = f"{type(exc).__name__}: {exc}"
        self.call(self._connected, conn, result)

    def _connected(self, conn: Conn, result: UDTSocket | str) -> None:
        if isinstance(result, str):
            conn.state = CState.DEAD
            self._fail_conn(conn, "unreachable",
                            f"UDT peer {conn.label} could not be reached: {result}")
            return
        if self._stopping or (not conn.pipes and conn.mux_key is None):
            _uclose(result)
            conn.state = CState.DEAD
            return
        conn.sock, conn.state, conn.idle_since = result, CState.OPEN, time.monotonic()
        self._udt[result.socket] = conn
        self._dirty.add(conn)
        for p in list(conn.pipes.values()):
            self._send_open(p)

    def _send_open(self, p: Pipe) -> None:
        self._to_pipe(p, record(UP), is_record=True)
        self._send(p.conn, wire.encode_open(p.sid, p.flow, p.window))

    def _listen(self, rec: Listen) -> None:
        if self._stopping:
            _uclose(rec.sock)
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
        _uclose(rec.sock)

    def _answer(self, p: Pipe, reason: str | None, message: str) -> None:
        if p.state is not PState.OFFERED:
            return  # the opener left meanwhile: the FAIL record is already in the pipe
        c = p.conn
        if reason is None:
            p.state = PState.OPEN
            p.allowed = p.window
            self._send(c, wire.encode_open_ok(p.sid, p.window))
            self._to_pipe(p, record(OK), is_record=True)
        else:
            self._send(c, wire.encode_refuse(p.sid, reason, message))
            self._drop_pipe(p, rst=False)

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
            while self._cmds:
                self._cmds.popleft()()
            for u in r:
                obj = self._udt.get(u.socket, False) if u is not None else False
                if obj is None:
                    self._drain_bell()
                elif isinstance(obj, Listen):
                    self._accept(obj)
                elif isinstance(obj, Conn):
                    self._conn_read(obj)
            for u in w:
                obj = self._udt.get(u.socket) if u is not None else None
                if isinstance(obj, Conn):
                    self._flush(obj)
            for fd in sr:
                p = self._pipes.get(fd)
                if p is not None:
                    self._pipe_read(p)
            for fd in sw:
                p = self._pipes.get(fd)
                if p is not None:
                    self._pipe_write(p)
            now = time.monotonic()
            if now >= self._next_tick:
                self._next_tick = now + _TICK_S
                self._health(now)
            self._apply_masks()

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
            if not isinstance(obj, Conn) or obj.state is not CState.OPEN:
                continue
            try:
                alive = obj.sock.status in _ALIVE
            except UDTException:
                alive = False
            if not alive:
                self._conn_dead(obj, "UDT connection broken")
            elif not obj.pipes and obj.mux_key is not None and now - obj.idle_since > MUX_IDLE_S:
                self._close_conn(obj)

    # -- UDT side ----------------------------------------------------------------------

    def _accept(self, rec: Listen) -> None:
        while not rec.closed:
            try:
                sock, peer = rec.sock.accept()
            except UDTException:
                return
            _nonblocking(sock)
            conn = Conn(sock, (peer[0], peer[1]), False, CState.OPEN, listener=rec)
            self._udt[sock.socket] = conn
            self._dirty.add(conn)

    def _conn_read(self, c: Conn) -> None:
        total = 0
        view = memoryview(self._rbuf)
        while total < 4 * len(self._rbuf) and c.state is CState.OPEN:
            try:
                n = c.sock.recv(self._rbuf)
            except UDTException as exc:
                if exc.error_code != _EASYNCRCV:
                    self._conn_dead(c, f"UDT connection to {c.label} lost: {exc}")
                return
            if n <= 0:
                return
            total += n
            try:
                msgs = c.dec.feed(view[:n])
                for m in msgs:
                    self._dispatch(c, m)
                    if c.state is not CState.OPEN:
                        return
            except wire.UdtWireError as exc:
                log.warning("UDT peer %s: %s; resetting its connection", c.label, exc)
                self._conn_dead(c, f"UDT peer {c.label}: protocol error: {exc}", send_rst=True)
                return

    def _dispatch(self, c: Conn, m: wire.Message) -> None:
        t, p = m.type, c.pipes.get(m.sid)
        if t is wire.Type.OPEN:
            if c.outbound or m.sid <= c.max_sid:
                raise wire.UdtWireError(f"OPEN of stream {m.sid} not allowed here")
            c.max_sid = m.sid
            self._offer(c, m)
            return
        if p is None:
            if m.sid <= c.max_sid:
                return  # late message for a stream already gone
            raise wire.UdtWireError(f"{t.name} for unknown stream {m.sid}")
        if t is wire.Type.RST:
            self._drop_pipe(p, rst=True, tell_peer=False)
        elif t is wire.Type.DATA:
            if p.state is not PState.OPEN or p.fin_in:
                raise wire.UdtWireError(f"DATA on stream {m.sid} in state {p.state.value}")
            p.allowed -= len(m.data)
            if p.allowed < 0:
                raise wire.UdtWireError(f"stream {m.sid}: DATA beyond the window")
            self._to_pipe(p, m.data)
        elif t is wire.Type.FIN:
            if p.state is not PState.OPEN or p.fin_in:
                raise wire.UdtWireError(f"FIN on stream {m.sid} in state {p.state.value}")
            p.fin_in = True
            self._dirty.add(p)
            if not p.out:
                self._pipe_write(p)
        elif t is wire.Type.WINDOW:
            if p.state is not PState.OPEN:
                raise wire.UdtWireError(f"WINDOW on stream {m.sid} before it opened")
            p.credit += m.window
            self._dirty.add(p)
        elif t in (wire.Type.OPEN_OK, wire.Type.REFUSE):
            if not c.outbound or p.state is not PState.OPENING:
                raise wire.UdtWireError(f"{t.name} for stream {m.sid} not opening")
            if t is wire.Type.OPEN_OK:
                p.state, p.credit = PState.OPEN, m.window
                self._to_pipe(p, record(OK), is_record=True)
            else:
                self._fail_pipe(p, m.reason, f"UDT peer {c.label}: {m.text}")

    def _offer(self, c: Conn, m: wire.Message) -> None:
        rec = c.listener
        if rec is None or rec.closed:
            self._send(c, wire.encode_refuse(m.sid, "refused", "not listening any more"))
            return
        hub_end, mgr_end = tcp_pair()
        p = Pipe(m.sid, c, hub_end, PState.OFFERED, rec.window, m.flow, credit=m.window)
        c.pipes[m.sid] = p
        self._add_pipe(p)
        rec.deliver(Arrival(mgr_end, c.peer, {"flow": m.flow.to_dict()}, p))

    def _send(self, c: Conn, data: bytes) -> None:
        if c.state is CState.DEAD:
            return
        c.sendq.append(data)
        c.sendq_bytes += len(data)
        if c.state is CState.OPEN:
            self._flush(c)

    def _flush(self, c: Conn) -> None:
        q = c.sendq
        while q and c.state is CState.OPEN:
            if len(q) > 1 and len(q[0]) < 65536:
                parts, size = [], 0
                while q and size < 262144:
                    parts.append(q.popleft())
                    size += len(parts[-1])
                q.appendleft(b"".join(parts))
            head = q[0]
            try:
                n = c.sock.send(head)
            except UDTException as exc:
                if exc.error_code != _EASYNCSND:
                    self._conn_dead(c, f"UDT connection to {c.label} lost: {exc}")
                    return
                n = 0
            if n <= 0:
                break
            c.sendq_bytes -= n
            if n < len(head):
                q[0] = memoryview(head)[n:]
                break
            q.popleft()
        if c.closing and not q:
            self._close_conn(c)
            return
        self._dirty.add(c)
        if c.sendq_bytes < SENDQ_HIGH:
            self._dirty.update(c.pipes.values())

    def _close_conn(self, c: Conn) -> None:
        if c.sendq and c.state is CState.OPEN:
            c.closing = True
            return
        c.state = CState.DEAD
        if c.mux_key is not None and self._mux.get(c.mux_key) is c:
            del self._mux[c.mux_key]
        if c.sock is not None:
            self._udt.pop(c.sock.socket, None)
            if c.mask:
                try:
                    self._ep.remove(c.sock)
                except UDTException:
                    pass
            _uclose(c.sock)
            c.mask = 0
        self._dirty.discard(c)

    def _conn_dead(self, c: Conn, why: str, send_rst: bool = False) -> None:
        was_open = c.state is CState.OPEN
        sids = list(c.pipes)
        c.state = CState.DEAD
        c.sendq.clear()
        self._fail_conn(c, "reset" if was_open else "unreachable", why)
        if send_rst and was_open and sids and c.sock is not None:
            try:
                c.sock.send(b"".join(wire.encode_rst(sid) for sid in sids))
            except UDTException:
                pass
        self._close_conn(c)

    def _fail_conn(self, c: Conn, reason: str, why: str) -> None:
        for p in list(c.pipes.values()):
            if p.state is PState.OPEN:
                self._drop_pipe(p, rst=True, tell_peer=False)
            else:
                self._fail_pipe(p, "reset" if p.state is PState.OFFERED else reason, why)
        if c.mux_key is not None and self._mux.get(c.mux_key) is c:
            del self._mux[c.mux_key]

    # -- pipe side ---------------------------------------------------------------------

    def _add_pipe(self, p: Pipe) -> None:
        fd = p.fd
        self._pipes[fd] = p
        try:
            self._wep.register(fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP
                               | select.EPOLLET)
        except OSError:
            pass
        self._dirty.add(p)

    def _to_pipe(self, p: Pipe, data: bytes, is_record: bool = False) -> None:
        if p.state is PState.DONE:
            return
        if is_record:
            p.record_left += len(data)
        p.out.append(data)
        p.out_bytes += len(data)
        self._pipe_write(p)

    def _fail_pipe(self, p: Pipe, reason: str, message: str) -> None:
        """A stream that never opened ends: a FAIL record, then an orderly close."""
        if p.state is PState.DONE:
            return
        self._forget(p)
        p.state = PState.OPENING  # write the record, then close
        p.close_after = True
        self._to_pipe(p, record(FAIL, reason, message), is_record=True)

    def _forget(self, p: Pipe) -> None:
        c = p.conn
        if c.pipes.get(p.sid) is p:
            del c.pipes[p.sid]
            if not c.pipes:
                c.idle_since = time.monotonic()
                if c.outbound and c.mux_key is None and c.state is not CState.DEAD:
                    self._close_conn(c)  # a CONNECTING one: the connect thread's answer closes it

    def _drop_pipe(self, p: Pipe, rst: bool, tell_peer: bool = True) -> None:
        if p.state is PState.DONE:
            return
        if tell_peer and rst and p.conn.state is CState.OPEN:
            self._send(p.conn, wire.encode_rst(p.sid))
        p.state = PState.DONE
        self._forget(p)
        self._pipes.pop(p.fd, None)
        try:
            self._wep.unregister(p.fd)
        except (OSError, ValueError):
            pass
        if p.mask:
            try:
                self._ep.remove(p.fd)
            except UDTException:
                pass
            p.mask = 0
        if rst:
            try:
                p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        p.sock.close()
        p.out.clear()
        self._dirty.discard(p)

    def _pipe_read(self, p: Pipe) -> None:
        if p.state is not PState.OPEN:
            if p.state is PState.OPENING and not p.close_after:
                self._drop_pipe(p, rst=True)  # the manager gave up (timeout, abort)
            return
        c = p.conn
        for _ in range(8):
            if p.eof or p.credit <= 0 or c.sendq_bytes >= SENDQ_HIGH:
                break
            try:
                data = p.sock.recv(min(p.credit, wire.MAX_DATA))
            except BlockingIOError:
                break
            except OSError:
                self._drop_pipe(p, rst=True)
                return
            if not data:
                p.eof = True
                self._send(c, wire.encode_fin(p.sid))
                self._check_done(p)
                break
            p.credit -= len(data)
            c.sendq.append(wire.encode_data_header(p.sid, len(data)))
            c.sendq.append(data)
            c.sendq_bytes += len(data) + wire.HEADER.size
        self._flush(c)
        self._dirty.add(p)

    def _pipe_write(self, p: Pipe) -> None:
        q = p.out
        while q:
            try:
                n = p.sock.send(q[0])
            except BlockingIOError:
                break
            except OSError:
                self._drop_pipe(p, rst=not p.close_after)
                return
            p.out_bytes -= n
            rec = min(n, p.record_left)
            p.record_left -= rec
            p.consumed += n - rec
            if n < len(q[0]):
                q[0] = memoryview(q[0])[n:]
                break
            q.popleft()
        if p.consumed and p.consumed >= max(1, p.window // 4) and p.conn.state is CState.OPEN:
            p.allowed += p.consumed
            self._send(p.conn, wire.encode_window(p.sid, p.consumed))
            p.consumed = 0
        if not q:
            if p.close_after:
                self._drop_pipe(p, rst=False)
                return
            if p.fin_in and not p.shut:
                try:
                    p.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self._drop_pipe(p, rst=True)
                    return
                p.shut = True
                self._check_done(p)
                if p.state is PState.DONE:
                    return
        self._dirty.add(p)

    def _check_done(self, p: Pipe) -> None:
        if p.eof and p.shut and not p.out:
            self._drop_pipe(p, rst=False)

    def _apply_masks(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for obj in dirty:
            if isinstance(obj, Pipe):
                if p_done(obj):
                    continue
                c = obj.conn
                reading = (obj.state is PState.OPENING and not obj.close_after) or (
                    obj.state is PState.OPEN and not obj.eof and obj.credit > 0
                    and c.sendq_bytes < SENDQ_HIGH)
                mask = (UIN if reading else 0) | (UOUT if obj.out else 0)
                key: Any = obj.fd
            else:
                if obj.state is not CState.OPEN:
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


def p_done(p: Pipe) -> bool:
    return p.state is PState.DONE


__all__ = ["Arrival", "FAIL", "Hub", "Listen", "MAGIC", "OK", "Pipe", "RECORD", "UP",
           "record", "tcp_pair"]
