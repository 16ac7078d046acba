"""The life of one upstream stream: its phases, its two half-states, and the legal moves.

Theory of operation. A stream handle (:mod:`vtl.bridge.stream_handle`) is in
exactly one :class:`Phase`; the I/O side (:mod:`vtl.bridge.stream_io`,
:mod:`vtl.bridge.stream_connect`) has one readiness handler per phase that
holds a socket. Every change of phase, and of the two half-states below,
goes through :func:`move` against the tables here, so an illegal move is a
loud :class:`IllegalTransition`, never a silently confused stream::

    RESOLVING ──► CONNECTING ──► HANDSHAKE ──► OPEN ──close()──► CLOSING ──► DONE
                      └───── no handshake ─────►┘
    any phase ──► DONE: failure or timeout, abort(), the egress policy, the orderly end

- RESOLVING: the endpoint's addresses are looked up (a worker thread for a
  name; an address literal moves on at once). No socket.
- CONNECTING: a non-blocking connect is in flight; a refused or unreachable
  address moves on to the next address without leaving the phase.
- HANDSHAKE: the transport's own exchange (a SOCKS5 greeting and CONNECT, an
  inbound stream's accept) on the connected socket.
- OPEN: the service's stream; events flow.
- CLOSING: the service called ``close()``, so it has been told
  (``StreamClosed("local")`` is issued); the bridge flushes what is queued,
  sends its FIN and reads, discarding, until the peer's FIN or the linger
  deadline.
- DONE: the socket is released and the one ``StreamClosed`` is issued (queued
  for the I/O thread or delivered). Nothing leaves DONE.

So "the service has been told" is not a flag: it is ``phase in (CLOSING,
DONE)`` (the one exception, bridge stop, delivers nothing at all).

Two half-states are orthogonal to each other and to the phase; they start at
READING and WRITING and matter from OPEN on (the write side's FIN request
may come earlier: it is sent when the stream connects):

- :class:`ReadSide`: READING; PAUSED (the service called
  ``pause_reading(True)``); PARKED (paused, and the peer hung up while
  nothing is left to write: the socket is out of epoll, where a
  level-triggered HUP would only spin the loop, until reading resumes); EOF
  (the peer's FIN was read).
- :class:`WriteSide`: WRITING; BLOCKED (a write took less than offered: a
  ``StreamWritable`` is owed once at most half the buffer is queued);
  FIN_PENDING (``shutdown_write()``/``close()`` asked for a FIN: it follows
  the queued bytes); FIN_SENT (``shutdown(SHUT_WR)`` done; nothing is ever
  queued again).

Invariant: EOF read and FIN sent with nothing queued ends the stream with
``"closed"``, so a stream in OPEN or CLOSING never has both.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar


class Phase(enum.Enum):
    RESOLVING = "resolving"
    CONNECTING = "connecting"
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    DONE = "done"


class ReadSide(enum.Enum):
    READING = "reading"
    PAUSED = "paused"
    PARKED = "parked"
    EOF = "eof"


class WriteSide(enum.Enum):
    WRITING = "writing"
    BLOCKED = "blocked"
    FIN_PENDING = "fin-pending"
    FIN_SENT = "fin-sent"


RESOLVING, CONNECTING, HANDSHAKE = Phase.RESOLVING, Phase.CONNECTING, Phase.HANDSHAKE
OPEN, CLOSING, DONE = Phase.OPEN, Phase.CLOSING, Phase.DONE
READING, PAUSED, PARKED, EOF = ReadSide.READING, ReadSide.PAUSED, ReadSide.PARKED, ReadSide.EOF
WRITING, BLOCKED = WriteSide.WRITING, WriteSide.BLOCKED
FIN_PENDING, FIN_SENT = WriteSide.FIN_PENDING, WriteSide.FIN_SENT

#: the phases before the service's stream is open (a failure is worded by the transport)
BEFORE_OPEN = frozenset({RESOLVING, CONNECTING, HANDSHAKE})
#: the phases in which the service has been told its stream is over (StreamClosed issued)
TOLD = frozenset({CLOSING, DONE})

PHASES: Mapping[Phase, frozenset[Phase]] = {
    RESOLVING: frozenset({CONNECTING, DONE}),
    CONNECTING: frozenset({HANDSHAKE, OPEN, DONE}),
    HANDSHAKE: frozenset({OPEN, DONE}),
    OPEN: frozenset({CLOSING, DONE}),
    CLOSING: frozenset({DONE}),
    DONE: frozenset(),
}

READ_SIDE: Mapping[ReadSide, frozenset[ReadSide]] = {
    READING: frozenset({PAUSED, EOF}),
    PAUSED: frozenset({READING, PARKED}),
    PARKED: frozenset({READING}),
    EOF: frozenset(),
}

WRITE_SIDE: Mapping[WriteSide, frozenset[WriteSide]] = {
    WRITING: frozenset({BLOCKED, FIN_PENDING}),
    BLOCKED: frozenset({WRITING, FIN_PENDING}),
    FIN_PENDING: frozenset({FIN_SENT}),
    FIN_SENT: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A stream was asked to make a move its table does not allow (a bug in the bridge)."""


S = TypeVar("S", Phase, ReadSide, WriteSide)


def move(table: Mapping[S, frozenset[S]], old: S, new: S) -> S:
    """``new`` when ``old -> new`` is in ``table``; else raise :class:`IllegalTransition`."""
    if new not in table[old]:
        raise IllegalTransition(f"{type(old).__name__}: {old.value} -> {new.value}")
    return new


__all__ = [
    "BEFORE_OPEN", "PHASES", "READ_SIDE", "TOLD", "WRITE_SIDE", "IllegalTransition", "Phase",
    "ReadSide", "WriteSide", "move",
]
