"""DNS over TCP from the VM, answered in-process (RFC 7766 framing).

Theory of operation. The VM's TCP connection to port 53 is terminated by the
virtual TCP endpoint like any other, but its relay's "upstream" is a
:class:`LocalDnsStream`: a :class:`~vtl.stream.Stream` with no socket behind it.
Bytes the VM writes are cut into length-prefixed messages and handed to the
service's resolver; each answer goes back as a length-prefixed
:class:`~vtl.stream.StreamData`. Answers may come out of order (RFC 7766 6.2.1.1
allows it). Events are *posted* to the split table, never delivered from inside
a call the relay made.

Bounds: at most :data:`MAX_PENDING` queries unanswered per connection (the
stream stops taking bytes, so the VM's window closes), one message of at most
65535 bytes buffered.
"""

from __future__ import annotations

from collections.abc import Callable

from vtl.stream import (
    StreamClosed,
    StreamConnected,
    StreamData,
    StreamEnded,
    StreamEvent,
    StreamRequest,
)

MAX_PENDING = 16
Answer = Callable[[bytes, Callable[[bytes, float], None], float], None]


class LocalDnsStream:
    """A stream whose far end is the service's own DNS resolver."""

    def __init__(self, sid: int, request: StreamRequest,
                 post: Callable[[StreamEvent, float], None], answer: Answer, now: float):
        self.id = sid
        self.request = request
        self._post = post
        self._answer = answer
        self._buf = bytearray()
        self._pending = 0
        self._shut = False
        self._final = False
        self._paused = False
        self._held: list[StreamEvent] = []
        post(StreamConnected(self, None, (request.host, request.port)), now)

    @property
    def write_room(self) -> int:
        if self._final or self._shut or self._pending >= MAX_PENDING:
            return 0
        return 65537 - len(self._buf)

    def write(self, data: bytes | bytearray | memoryview, now: float) -> int:
        take = min(len(data), self.write_room)
        if take <= 0:
            return 0
        self._buf += memoryview(data).cast("B")[:take]
        buf = self._buf
        while len(buf) >= 2:
            n = int.from_bytes(buf[:2], "big")
            if len(buf) < 2 + n:
                break
            msg = bytes(buf[2 : 2 + n])
            del buf[: 2 + n]
            self._pending += 1
            self._answer(msg, self._answered, now)
        return take

    def _answered(self, wire: bytes, now: float) -> None:
        if self._final:
            return
        self._pending -= 1
        if self._paused:
            self._held.append(StreamData(self, len(wire).to_bytes(2, "big") + wire))
        else:
            self._post(StreamData(self, len(wire).to_bytes(2, "big") + wire), now)
        self._maybe_end(now)

    def _maybe_end(self, now: float) -> None:
        if self._shut and not self._pending and not self._final and not self._held:
            self._final = True
            self._post(StreamEnded(self), now)
            self._post(StreamClosed(self, "closed"), now)

    def shutdown_write(self, now: float) -> None:
        if not self._final:
            self._shut = True
            self._maybe_end(now)

    def pause_reading(self, paused: bool, now: float) -> None:
        self._paused = bool(paused)
        if not paused and self._held:
            held, self._held = self._held, []
            for event in held:
                self._post(event, now)
            self._maybe_end(now)

    def close(self, now: float) -> None:
        self.abort(now)  # nothing is queued toward a local resolver: close is abort

    def abort(self, now: float) -> None:
        if not self._final:
            self._final = True
            self._held.clear()
            self._post(StreamClosed(self, "local"), now)

    def __repr__(self) -> str:
        return f"LocalDnsStream(#{self.id}, pending={self._pending})"
