"""The UDT hub's data model, sans-IO: pipe and conn states, their transitions, records.

Theory of operation. A *conn* is one UDT connection to a peer bridge; a *pipe*
is one stream on it, as the stream manager sees it (the hub end of a loopback
TCP pair). This module holds what :mod:`.udtsession` decides about and the hub
acts on: the states as enums with their allowed moves (:data:`PIPE_MOVES`,
:data:`CONN_MOVES`), which message a peer may send for a stream in which state
(:data:`LEGAL`), the per-stream credit fields, the byte queues toward a UDT
socket or a pipe (:class:`ByteQueue`), the status records a pipe starts with
(:data:`RECORD`: UP, then OK or FAIL; the transport's handshake reads them), the
socket settings (:class:`Tuning`: buffers, rate cap, congestion control) and the
commands a session gives its hub.
Nothing here does I/O or decides anything.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import vtl.bridge.transports.udtwire as wire

from vtl.stream import StreamFlow

RECORD = struct.Struct(">BBBH")  # magic, code, reason index, message length
MAGIC = 0x56
UP, OK, FAIL = 1, 2, 3
SENDQ_HIGH = 2 << 20  # stop reading pipes of a conn whose send queue is this full
MUX_IDLE_S = 30.0
_COALESCE_SMALL, _COALESCE_MAX = 65536, 262144


class Tuning(NamedTuple):
    """What a UDT socket is set up with (the transport's ``mss``, ``window``, ``max_bw``,
    ``congestion``)."""

    mss: int
    window: int
    max_bw: int = 0  # bytes per second a connection may send; 0: no cap (UDT_MAXBW -1)
    congestion: str = "vtl"  # the congestion control (vtl.bridge.transports.udtcc)


def record(code: int, reason: str = "", message: str = "") -> bytes:
    """One status record for the manager's end of a pipe."""
    raw = message.encode("utf-8", "replace")[:1024]
    idx = wire.REASONS.index(reason) + 1 if reason in wire.REASONS else 0
    return RECORD.pack(MAGIC, code, idx, len(raw)) + raw


class ByteQueue:
    """Chunks of bytes waiting for a socket; ``coalesce`` joins small ones on ``head``."""

    __slots__ = ("chunks", "size", "coalesce")

    def __init__(self, coalesce: bool = False):
        self.chunks: deque[bytes | memoryview] = deque()
        self.size = 0
        self.coalesce = coalesce

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def push(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def head(self) -> bytes | memoryview | None:
        q = self.chunks
        if not q:
            return None
        if self.coalesce and len(q) > 1 and len(q[0]) < _COALESCE_SMALL:
            parts, size = [], 0
            while q and size < _COALESCE_MAX:
                parts.append(q.popleft())
                size += len(parts[-1])
            q.appendleft(b"".join(parts))
        return q[0]

    def consume(self, n: int) -> None:
        """``n`` bytes of the head chunk went out."""
        if n <= 0:
            return
        self.size -= n
        if n < len(self.chunks[0]):
            self.chunks[0] = memoryview(self.chunks[0])[n:]
        else:
            self.chunks.popleft()

    def clear(self) -> None:
        self.chunks.clear()
        self.size = 0


class PipeState(enum.Enum):
    OPENING = "opening"  # opener: OPEN sent or to send, waiting for OPEN_OK / REFUSE
    OFFERED = "offered"  # acceptor: the service has not answered yet
    OPEN = "open"
    FAILING = "failing"  # a FAIL record is queued: close once it is written
    DONE = "done"


PIPE_MOVES: dict[PipeState, frozenset[PipeState]] = {
    PipeState.OPENING: frozenset({PipeState.OPEN, PipeState.FAILING, PipeState.DONE}),
    PipeState.OFFERED: frozenset({PipeState.OPEN, PipeState.FAILING, PipeState.DONE}),
    PipeState.OPEN: frozenset({PipeState.DONE}),
    PipeState.FAILING: frozenset({PipeState.DONE}),
    PipeState.DONE: frozenset(),
}


class ConnState(enum.Enum):
    CONNECTING = "connecting"  # outbound: the connect runs (the hub's helper thread)
    OPEN = "open"
    CLOSING = "closing"  # no more pipes: close once the send queue is flushed
    DEAD = "dead"


CONN_MOVES: dict[ConnState, frozenset[ConnState]] = {
    ConnState.CONNECTING: frozenset({ConnState.OPEN, ConnState.DEAD}),
    ConnState.OPEN: frozenset({ConnState.CLOSING, ConnState.DEAD}),
    ConnState.CLOSING: frozenset({ConnState.DEAD}),
    ConnState.DEAD: frozenset(),
}
LIVE = (ConnState.OPEN, ConnState.CLOSING)  # conns whose UDT socket is in use

T = wire.Type
#: the pipe states in which the peer may send each message type for a live stream
LEGAL: dict[wire.Type, frozenset[PipeState]] = {
    T.DATA: frozenset({PipeState.OPEN}),
    T.FIN: frozenset({PipeState.OPEN}),
    T.WINDOW: frozenset({PipeState.OPEN}),
    T.OPEN_OK: frozenset({PipeState.OPENING}),
    T.REFUSE: frozenset({PipeState.OPENING}),
    T.RST: frozenset({PipeState.OPENING, PipeState.OFFERED, PipeState.OPEN}),
}
OPENER_GETS = frozenset({T.OPEN_OK, T.REFUSE})  # only on a conn this side opened


@dataclass(eq=False)
class Pipe:
    """One stream. ``sock`` and ``mask`` belong to the hub (the session never reads them)."""

    sid: int
    conn: Conn
    state: PipeState
    window: int  # what we let the peer have outstanding
    flow: StreamFlow | None = None
    credit: int = 0  # DATA bytes we may still send
    allowed: int = 0  # DATA bytes the peer may still send
    consumed: int = 0  # DATA bytes written to the pipe since our last WINDOW
    out: ByteQueue = field(default_factory=ByteQueue)
    record_left: int = 0  # bytes at the head of ``out`` that are records, not DATA
    eof: bool = False  # read EOF from the pipe; FIN queued
    fin_in: bool = False  # peer's FIN received
    shut: bool = False  # pipe shut for writing (after fin_in and out flushed)
    sock: Any = None
    mask: int = 0

    @property
    def buffered(self) -> int:
        """DATA bytes waiting to be written to the pipe."""
        return self.out.size - self.record_left


@dataclass(eq=False)
class Conn:
    """One UDT connection. ``sock`` and ``mask`` belong to the hub."""

    peer: tuple[str, int]
    outbound: bool
    state: ConnState
    tuning: Tuning | None = None
    mux_key: tuple | None = None
    listener: Any = None  # inbound: what accepted it (``window``, ``closed``)
    sendq: ByteQueue = field(default_factory=lambda: ByteQueue(coalesce=True))
    dec: wire.Decoder = field(default_factory=wire.Decoder)
    pipes: dict[int, Pipe] = field(default_factory=dict)
    next_sid: int = 1
    max_sid: int = 0
    idle_since: float | None = None  # stamped by tick() once the conn has no pipes
    sock: Any = None
    mask: int = 0

    @property
    def label(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}"


# -- commands (session -> hub) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    """Start a UDT connect to ``conn.peer`` with ``conn.tuning``; report with
    :meth:`Session.connected` or :meth:`Session.connect_failed`."""

    conn: Conn


@dataclass(frozen=True, slots=True)
class Offer:
    """A peer opened ``pipe`` on an inbound conn: make its socket pair and hand it to
    ``pipe.conn.listener``; answer later with :meth:`Session.answer`."""

    pipe: Pipe


@dataclass(frozen=True, slots=True)
class ShutPipe:
    """Shut the pipe for writing; report with :meth:`Session.pipe_shut` (or pipe_error)."""

    pipe: Pipe


@dataclass(frozen=True, slots=True)
class ClosePipe:
    """The pipe is over: close it (``rst``: as a reset). Exactly once per pipe."""

    pipe: Pipe
    rst: bool


@dataclass(frozen=True, slots=True)
class CloseConn:
    """Close the conn's UDT socket, after sending ``last`` if it can (best effort)."""

    conn: Conn
    last: bytes = b""


Command = Connect | Offer | ShutPipe | ClosePipe | CloseConn


__all__ = [
    "CONN_MOVES", "ByteQueue", "ClosePipe", "CloseConn", "Command", "Conn", "ConnState",
    "Connect", "FAIL", "LEGAL", "LIVE", "MAGIC", "MUX_IDLE_S", "OK", "OPENER_GETS", "Offer",
    "PIPE_MOVES", "Pipe", "PipeState", "RECORD", "SENDQ_HIGH", "ShutPipe", "Tuning", "UP",
    "record",
]
