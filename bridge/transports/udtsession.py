"""The UDT hub's session logic, sans-IO: pipes, connections, credit and status records.

Theory of operation. A *conn* is one UDT connection to a peer bridge; it
carries one stream (per-connection mode) or many (``mux``), each framed by
:mod:`.udtwire`. A *pipe* is one stream as the stream manager sees it: the
hub end of a loopback TCP pair whose other end the manager owns. The
:class:`Session` holds every conn and pipe and decides everything about them;
the hub (:mod:`.udthub`) only moves bytes and runs sockets and threads. Nothing
here touches a socket, a thread or the clock:

- *inputs* are the hub's method calls: a stream to open (:meth:`Session.open`),
  a connect's outcome, bytes read from a conn (:meth:`Session.received`, which
  decodes and dispatches them), bytes or EOF read from a pipe, how much the hub
  wrote, an answer to an offer, ``tick(now)``;
- *outputs* are bytes queued per conn (``conn.sendq``: frames to send) and per
  pipe (``pipe.out``: status records and stream bytes to write), the sets
  ``to_flush``/``to_write`` that say which queues have new bytes, ``dirty`` (the
  I/O interest of these objects may have changed), and :data:`Command` objects
  in ``commands`` for the rest (connect, offer to a listener, shut or close a
  pipe, close a conn), to be run in order.

States are explicit (:mod:`.udtstate` has them with their tables); every change
goes through ``_move``/``_conn_move``, which check :data:`~.udtstate.PIPE_MOVES`
/ :data:`~.udtstate.CONN_MOVES`. Which
message a peer may send for a stream in which state is :data:`~.udtstate.LEGAL` (plus: OPEN
only toward the side that accepted the conn, OPEN_OK/REFUSE only toward the
side that opened it, no DATA or FIN after FIN, no DATA beyond the credit). A
peer that breaks a rule (or sends bad framing) resets its own conn and every
pipe on it, nothing else; a message for a stream already gone is ignored.

Invariants: DATA leaves only within the peer's credit (``pipe.credit``), so what
is buffered toward a pipe (``pipe.out`` minus records) never exceeds the window
granted (``pipe.window``); a pipe's records (:data:`RECORD`: UP, then OK or FAIL)
precede its data; every pipe ends exactly once (one :class:`ClosePipe`); a conn
that breaks resets every pipe on it, except a stream whose FINs both crossed (its
peer closes the conn once it has ours): what it has for its pipe is still written;
per-connection conns close when their pipe is done, mux conns after
:data:`MUX_IDLE_S` without pipes.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import vtl.bridge.transports.udtwire as wire
from vtl.bridge.transports.udtstate import (
    CONN_MOVES,
    FAIL,
    LEGAL,
    LIVE,
    MUX_IDLE_S,
    OK,
    OPENER_GETS,
    PIPE_MOVES,
    SENDQ_HIGH,
    UP,
    CloseConn,
    ClosePipe,
    Command,
    Conn,
    Connect,
    ConnState,
    Offer,
    Pipe,
    PipeState,
    ShutPipe,
    Tuning,
    record,
)

from vtl.stream import StreamFlow

T = wire.Type


class ProtocolViolation(wire.UdtWireError):
    """A message that is valid framing but not allowed in its stream's state."""


class Session:
    """Every conn and pipe of one hub; see the module docstring."""

    def __init__(self) -> None:
        self.conns: dict[Conn, None] = {}  # not DEAD
        self.pipes: dict[Pipe, None] = {}  # not DONE
        self.mux: dict[tuple, Conn] = {}
        self.commands: deque[Command] = deque()
        self.to_flush: dict[Conn, None] = {}
        self.to_write: dict[Pipe, None] = {}
        self.dirty: set[Pipe | Conn] = set()

    # -- opening ----------------------------------------------------------------------------

    def open(self, peer: tuple[str, int], flow: StreamFlow, tuning: Tuning, mux: bool) -> Pipe:
        """An outbound stream (its records come first in ``pipe.out``)."""
        key = (peer, tuning) if mux else None
        conn = self.mux.get(key) if key else None
        if conn is None or conn.state not in (ConnState.CONNECTING, ConnState.OPEN):
            conn = Conn(peer, True, ConnState.CONNECTING, tuning, mux_key=key)
            self.conns[conn] = None
            if key:
                self.mux[key] = conn
            self.commands.append(Connect(conn))
        sid = conn.next_sid
        conn.next_sid += 1
        conn.max_sid = sid
        p = Pipe(sid, conn, PipeState.OPENING, tuning.window, flow, allowed=tuning.window)
        conn.pipes[sid] = p
        self.pipes[p] = None
        self.dirty.add(p)
        if conn.state is ConnState.OPEN:
            self._send_open(p)
        return p

    def connected(self, c: Conn) -> bool:
        """The connect succeeded; False: the hub closes the socket (nobody needs it)."""
        if c.state is ConnState.DEAD:
            return False  # nobody waits for it any more (its pipe left meanwhile)
        if not c.pipes and c.mux_key is None:
            self._conn_move(c, ConnState.DEAD)
            return False
        self._conn_move(c, ConnState.OPEN)
        c.idle_since = None
        self.dirty.add(c)
        for p in list(c.pipes.values()):
            self._send_open(p)
        return True

    def connect_failed(self, c: Conn, why: str) -> None:
        if c.state is ConnState.DEAD:
            return
        self._conn_move(c, ConnState.DEAD)
        self._fail_conn(c, "unreachable", f"UDT peer {c.label} could not be reached: {why}")

    def accepted(self, peer: tuple[str, int], listener: Any) -> Conn:
        """An inbound conn; ``listener`` has ``window`` and ``closed``."""
        c = Conn(peer, False, ConnState.OPEN, listener=listener)
        self.conns[c] = None
        self.dirty.add(c)
        return c

    def answer(self, p: Pipe, reason: str | None, message: str = "") -> None:
        """The service accepted (``reason`` None) or refused an offered stream."""
        if p.state is not PipeState.OFFERED:
            return  # the opener left meanwhile: the FAIL record is already in the pipe
        c = p.conn
        if reason is None:
            self._move(p, PipeState.OPEN)
            p.allowed = p.window
            self._send(c, wire.encode_open_ok(p.sid, p.window))
            self._to_pipe(p, record(OK), is_record=True)
        else:
            self._send(c, wire.encode_refuse(p.sid, reason, message))
            self._drop(p, rst=False)

    def _send_open(self, p: Pipe) -> None:
        assert p.flow is not None
        self._to_pipe(p, record(UP), is_record=True)
        self._send(p.conn, wire.encode_open(p.sid, p.flow, p.window))

    # -- the UDT side ----------------------------------------------------------------------

    def received(self, c: Conn, data: bytes | memoryview) -> wire.UdtWireError | None:
        """Bytes read from ``c``: decode and dispatch. A peer that broke a rule resets
        its conn (and only that); the error is returned for the log."""
        if c.state not in LIVE:
            return None
        try:
            for m in c.dec.feed(data):
                self.dispatch(c, m)
                if c.state not in LIVE:
                    break
        except wire.UdtWireError as exc:
            self.conn_dead(c, f"UDT peer {c.label}: protocol error: {exc}", send_rst=True)
            return exc
        return None

    def dispatch(self, c: Conn, m: wire.Message) -> None:
        """One message from the peer; raises UdtWireError when it breaks a rule."""
        t = m.type
        if t is T.OPEN:
            if c.outbound or m.sid <= c.max_sid:
                raise ProtocolViolation(f"OPEN of stream {m.sid} not allowed here")
            c.max_sid = m.sid
            self._on_open(c, m)
            return
        p = c.pipes.get(m.sid)
        if p is None:
            if m.sid <= c.max_sid:
                return  # late message for a stream already gone
            raise ProtocolViolation(f"{t.name} for unknown stream {m.sid}")
        if p.state not in LEGAL[t] or (t in OPENER_GETS and not c.outbound):
            raise ProtocolViolation(f"{t.name} on stream {m.sid} in state {p.state.value}")
        self._HANDLERS[t](self, p, m)

    def _on_open(self, c: Conn, m: wire.Message) -> None:
        rec = c.listener
        if rec is None or rec.closed:
            self._send(c, wire.encode_refuse(m.sid, "refused", "not listening any more"))
            return
        p = Pipe(m.sid, c, PipeState.OFFERED, rec.window, m.flow, credit=m.window)
        c.pipes[m.sid] = p
        self.pipes[p] = None
        self.commands.append(Offer(p))
        self.dirty.add(p)

    def _on_rst(self, p: Pipe, m: wire.Message) -> None:
        self._drop(p, rst=True, tell_peer=False)

    def _on_data(self, p: Pipe, m: wire.Message) -> None:
        if p.fin_in:
            raise ProtocolViolation(f"DATA on stream {m.sid} after its FIN")
        p.allowed -= len(m.data)
        if p.allowed < 0:
            raise ProtocolViolation(f"stream {m.sid}: DATA beyond the window")
        self._to_pipe(p, m.data)

    def _on_fin(self, p: Pipe, m: wire.Message) -> None:
        if p.fin_in:
            raise ProtocolViolation(f"FIN on stream {m.sid} after its FIN")
        p.fin_in = True
        self.to_write[p] = None  # shut it once what is queued is written
        self.dirty.add(p)

    def _on_window(self, p: Pipe, m: wire.Message) -> None:
        p.credit += m.window
        self.dirty.add(p)

    def _on_open_ok(self, p: Pipe, m: wire.Message) -> None:
        self._move(p, PipeState.OPEN)
        p.credit = m.window
        self._to_pipe(p, record(OK), is_record=True)

    def _on_refuse(self, p: Pipe, m: wire.Message) -> None:
        self._fail(p, m.reason, f"UDT peer {p.conn.label}: {m.text}")

    _HANDLERS = {T.RST: _on_rst, T.DATA: _on_data, T.FIN: _on_fin, T.WINDOW: _on_window,
                 T.OPEN_OK: _on_open_ok, T.REFUSE: _on_refuse}

    def flushed(self, c: Conn) -> None:
        """The hub sent what ``c`` would take of ``c.sendq``."""
        if c.state is ConnState.DEAD:
            return
        if c.state is ConnState.CLOSING and not c.sendq:
            self._close_conn(c)
            return
        self.dirty.add(c)
        if c.sendq.size < SENDQ_HIGH:
            self.dirty.update(c.pipes.values())

    def conn_broken(self, c: Conn, why: str) -> None:
        """The UDT connection failed (an error, or libudt says it is broken)."""
        self.conn_dead(c, why)

    def conn_dead(self, c: Conn, why: str, send_rst: bool = False) -> None:
        if c.state is ConnState.DEAD:
            return
        was_open = c.state in LIVE
        sids = list(c.pipes)
        flushed = not c.sendq  # every FIN we queued has left
        self._conn_move(c, ConnState.DEAD)
        c.sendq.clear()
        self._fail_conn(c, "reset" if was_open else "unreachable", why, flushed)
        last = b""
        if send_rst and was_open and sids:
            last = b"".join(wire.encode_rst(sid) for sid in sids)
        self.commands.append(CloseConn(c, last))

    def tick(self, now: float) -> None:
        """Close mux conns idle for :data:`MUX_IDLE_S`."""
        for c in list(self.conns):
            if c.state is not ConnState.OPEN or c.pipes or c.mux_key is None:
                continue
            if c.idle_since is None:
                c.idle_since = now
            elif now - c.idle_since > MUX_IDLE_S:
                self._close_conn(c)

    def stop(self) -> None:
        """The hub stops: every live conn is reset (RST to the peer), every pipe reset."""
        for c in list(self.conns):
            if c.state in LIVE:
                self.conn_dead(c, "the bridge is stopping", send_rst=True)
            else:
                self._conn_move(c, ConnState.DEAD)
        for p in list(self.pipes):
            self._drop(p, rst=True, tell_peer=False)

    # -- the pipe side ---------------------------------------------------------------------

    def pipe_readable(self, p: Pipe) -> bool:
        """The manager's end did something; False: nothing to read in this state (an
        opening pipe that became readable means the manager gave up: it is reset)."""
        if p.state is PipeState.OPENING:
            self._drop(p, rst=True)  # the manager gave up (timeout, abort)
        return p.state is PipeState.OPEN

    def read_room(self, p: Pipe) -> int:
        """How many bytes to read from the pipe now (the credit; 0: none)."""
        if (p.state is not PipeState.OPEN or p.eof or p.credit <= 0
                or p.conn.sendq.size >= SENDQ_HIGH):
            return 0
        return min(p.credit, wire.MAX_DATA)

    def wants_read(self, p: Pipe) -> bool:
        """Whether the hub should watch the pipe for reading."""
        return p.state is PipeState.OPENING or self.read_room(p) > 0

    def pipe_data(self, p: Pipe, data: bytes) -> None:
        """Bytes read from the pipe (at most :meth:`read_room`)."""
        if len(data) > self.read_room(p):
            raise AssertionError(f"read {len(data)} bytes beyond the room {self.read_room(p)}")
        p.credit -= len(data)
        c = p.conn
        c.sendq.push(wire.encode_data_header(p.sid, len(data)))
        c.sendq.push(data)
        self.to_flush[c] = None
        self.dirty.add(p)

    def pipe_eof(self, p: Pipe) -> None:
        if p.state is not PipeState.OPEN or p.eof:
            return
        p.eof = True
        self._send(p.conn, wire.encode_fin(p.sid))
        self._check_done(p)
        self.dirty.add(p)

    def pipe_error(self, p: Pipe) -> None:
        """Reading or writing the pipe failed: reset it (unless it was failing anyway)."""
        self._drop(p, rst=p.state is not PipeState.FAILING)

    def pipe_wrote(self, p: Pipe, n: int) -> None:
        """The hub wrote ``n`` bytes from ``p.out`` (already consumed from it)."""
        if p.state is PipeState.DONE:
            return
        rec = min(n, p.record_left)
        p.record_left -= rec
        p.consumed += n - rec
        if p.consumed and p.consumed >= max(1, p.window // 4) and p.conn.state in LIVE:
            p.allowed += p.consumed
            self._send(p.conn, wire.encode_window(p.sid, p.consumed))
            p.consumed = 0
        if not p.out:
            if p.state is PipeState.FAILING:
                self._drop(p, rst=False)
                return
            if p.fin_in and not p.shut:
                self.commands.append(ShutPipe(p))
        self.dirty.add(p)

    def pipe_shut(self, p: Pipe) -> None:
        if p.state is PipeState.DONE:
            return
        p.shut = True
        self._check_done(p)

    # -- inside ----------------------------------------------------------------------------

    def _move(self, p: Pipe, new: PipeState) -> None:
        if new not in PIPE_MOVES[p.state]:
            raise AssertionError(f"pipe {p.sid}: {p.state.value} -> {new.value} not allowed")
        p.state = new

    def _conn_move(self, c: Conn, new: ConnState) -> None:
        if new not in CONN_MOVES[c.state]:
            raise AssertionError(f"conn {c.label}: {c.state.value} -> {new.value} not allowed")
        c.state = new
        if new is ConnState.DEAD:
            self.conns.pop(c, None)
            self.to_flush.pop(c, None)
            self.dirty.discard(c)
            if c.mux_key is not None and self.mux.get(c.mux_key) is c:
                del self.mux[c.mux_key]

    def _send(self, c: Conn, data: bytes) -> None:
        if c.state is ConnState.DEAD:
            return
        c.sendq.push(data)
        if c.state in LIVE:
            self.to_flush[c] = None

    def _to_pipe(self, p: Pipe, data: bytes, is_record: bool = False) -> None:
        if p.state is PipeState.DONE:
            return
        if is_record:
            p.record_left += len(data)
        p.out.push(data)
        self.to_write[p] = None

    def _close_conn(self, c: Conn) -> None:
        if c.sendq and c.state is ConnState.OPEN:
            self._conn_move(c, ConnState.CLOSING)
            return
        if c.state is not ConnState.DEAD:
            self._conn_move(c, ConnState.DEAD)
            self.commands.append(CloseConn(c))

    def _fail_conn(self, c: Conn, reason: str, why: str, flushed: bool = False) -> None:
        for p in list(c.pipes.values()):
            if p.state is PipeState.OPEN and p.fin_in and p.eof and flushed:
                # both FINs crossed: the stream needs nothing more from the conn (a peer
                # closes its conn right after); what is queued toward the pipe still goes
                self._forget(p)
                self.to_write[p] = None
            elif p.state is PipeState.OPEN:
                self._drop(p, rst=True, tell_peer=False)
            else:
                self._fail(p, "reset" if p.state is PipeState.OFFERED else reason, why)

    def _fail(self, p: Pipe, reason: str, message: str) -> None:
        """A stream that never opened ends: a FAIL record, then an orderly close."""
        if p.state is PipeState.DONE or p.state is PipeState.FAILING:
            return
        self._forget(p)
        self._move(p, PipeState.FAILING)
        self._to_pipe(p, record(FAIL, reason, message), is_record=True)
        self.dirty.add(p)

    def _forget(self, p: Pipe) -> None:
        c = p.conn
        if c.pipes.get(p.sid) is p:
            del c.pipes[p.sid]
            if not c.pipes:
                c.idle_since = None
                if c.outbound and c.mux_key is None and c.state is not ConnState.DEAD:
                    if c.state is ConnState.CONNECTING:
                        self._conn_move(c, ConnState.DEAD)  # the connect's answer closes it
                    else:
                        self._close_conn(c)

    def _drop(self, p: Pipe, rst: bool, tell_peer: bool = True) -> None:
        if p.state is PipeState.DONE:
            return
        if tell_peer and rst and p.conn.state in LIVE:
            self._send(p.conn, wire.encode_rst(p.sid))
        self._move(p, PipeState.DONE)
        self._forget(p)
        p.out.clear()
        p.record_left = 0
        self.pipes.pop(p, None)
        self.to_write.pop(p, None)
        self.dirty.discard(p)
        self.commands.append(ClosePipe(p, rst))

    def _check_done(self, p: Pipe) -> None:
        if p.eof and p.shut and not p.out:
            self._drop(p, rst=False)


__all__ = ["ProtocolViolation", "Session"]
