"""Byte buffers and the retransmission timer of the virtual TCP endpoint.

Everything here counts in *stream offsets*: unbounded Python ints, 0 for the
first data byte. The endpoint converts sequence numbers to offsets at its
edge (``offset = base + seq_diff(seq, seq_of(base))``), so wrap-around at
2**32 never reaches these classes.

- :class:`SendBuffer`: bytes the application queued and the peer has not
  acknowledged yet, ``[una, end)``; bounded by ``capacity``.
- :class:`ReceiveBuffer`: bytes received in order and not yet read, plus a
  bounded out-of-order store of ranges beyond the next expected offset,
  merged on insert, reported as SACK blocks (most recent first, RFC 2018 4: a
  segment received again puts its block first too). Nothing at or beyond the
  ``limit`` given with a segment is kept; a segment whose new bytes would take
  the store past its bound is dropped whole (the sender retransmits it).
- :class:`RtoEstimator`: RFC 6298 SRTT/RTTVAR and exponential backoff.

Invariants: ``SendBuffer.una <= SendBuffer.end``, ``len(data) == end - una``;
out-of-order ranges are disjoint, sorted, all beyond ``ReceiveBuffer.nxt``,
and hold at most ``ooo_limit`` bytes in total.
"""

from __future__ import annotations

import bisect

_COMPACT = 256 * 1024  # drop consumed bytes from a buffer's front once this many pile up


class SendBuffer:
    """Queued outgoing bytes from offset ``una`` (oldest unacknowledged) to ``end``.

    Kept as the chunks the application pushed (``bytes`` are taken as they are, not
    copied), each with its start offset, until the peer acknowledged all of a chunk:
    a contiguous ``bytearray`` copied all it held each time it grew past its
    allocation after its front was cut, which with megabytes queued (a download)
    cost more than the rest of the endpoint."""

    __slots__ = ("capacity", "una", "_end", "_chunks", "_starts", "_first")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.una = 0
        self._end = 0
        self._chunks: list[bytes | memoryview] = []
        self._starts: list[int] = []  # offset of each chunk's first byte
        self._first = 0  # chunks before this one are acknowledged whole

    @property
    def end(self) -> int:
        return self._end

    @property
    def queued(self) -> int:
        return self._end - self.una

    @property
    def room(self) -> int:
        return max(0, self.capacity - self.queued)

    def push(self, data: bytes | bytearray | memoryview) -> int:
        """Append up to :attr:`room` bytes; returns how many were taken."""
        n = min(len(data), self.room)
        if n:
            self._chunks.append(_keep(data, n))
            self._starts.append(self._end)
            self._end += n
        return n

    def ack(self, offset: int) -> int:
        """Forget bytes before ``offset``; returns how many were released."""
        n = min(offset, self._end) - self.una
        if n <= 0:
            return 0
        una = self.una = self.una + n
        chunks, starts, first = self._chunks, self._starts, self._first
        while first < len(chunks) and starts[first] + len(chunks[first]) <= una:
            chunks[first] = b""  # freed now; the list is cut every 64 chunks
            first += 1
        if first == len(chunks) or first >= 64:
            del chunks[:first], starts[:first]
            first = 0
        self._first = first
        return n

    def view(self, offset: int, size: int) -> bytes | memoryview:
        """Bytes ``[offset, offset + size)`` (clipped to what is queued); a read-only view
        when they lie in one chunk."""
        if offset < self.una:
            raise ValueError("offset before the oldest unacknowledged byte")
        stop = min(offset + size, self._end)
        if stop <= offset:
            return b""
        chunks, starts = self._chunks, self._starts
        i = bisect.bisect_right(starts, offset, self._first) - 1
        chunk, at = chunks[i], offset - starts[i]
        if at + stop - offset <= len(chunk):
            return memoryview(chunk)[at:at + stop - offset]  # within one chunk: no copy
        parts = [chunk[at:]]
        got = len(chunk) - at
        while got < stop - offset:
            i += 1
            part = chunks[i][:stop - offset - got]
            parts.append(part)
            got += len(part)
        return b"".join(parts)


def _keep(data: bytes | bytearray | memoryview, n: int) -> bytes | memoryview:
    """The first ``n`` bytes of ``data`` to hold on to: immutable bytes (or a view of
    them) are kept as they are, without a copy; a mutable buffer is copied."""
    if type(data) is bytes:
        return data if n == len(data) else memoryview(data)[:n]
    if type(data) is memoryview and type(data.obj) is bytes:
        return data if n == len(data) else data[:n]
    return bytes(data[:n])


class ReceiveBuffer:
    """In-order unread bytes and a bounded out-of-order store."""

    __slots__ = ("nxt", "ooo_limit", "_data", "_skip", "_starts", "_chunks", "_ooo_bytes",
                 "_recent")

    def __init__(self, ooo_limit: int):
        self.nxt = 0  # next in-order offset expected
        self.ooo_limit = ooo_limit
        self._data = bytearray()
        self._skip = 0
        self._starts: list[int] = []  # out-of-order range starts, sorted
        self._chunks: list[bytes | memoryview] = []  # their bytes
        self._ooo_bytes = 0
        self._recent: list[int] = []  # starts of ranges, most recently changed first

    @property
    def unread(self) -> int:
        return len(self._data) - self._skip

    @property
    def ooo_bytes(self) -> int:
        return self._ooo_bytes

    def read(self, size: int) -> bytes:
        n = min(size, self.unread)
        if n <= 0:
            return b""
        out = bytes(self._data[self._skip : self._skip + n])
        self._skip += n
        if self._skip >= _COMPACT or self._skip == len(self._data):
            del self._data[: self._skip]
            self._skip = 0
        return out

    def add(self, offset: int, data: bytes | memoryview, limit: int) -> int:
        """Store ``data`` at ``offset``, keeping only bytes before ``limit`` (the right
        edge of the advertised window). Returns how many bytes became readable."""
        end = min(offset + len(data), limit)
        if end <= self.nxt or end <= offset:
            return 0  # all old (a retransmission we already have), or all beyond the limit
        if offset < self.nxt:
            data = data[self.nxt - offset :]
            offset = self.nxt
        data = data[: end - offset]
        if offset > self.nxt:
            self._store(offset, bytes(data))
            return 0
        before = self.nxt
        self._data += data
        self.nxt = end
        self._pull()
        return self.nxt - before

    def _store(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        i = bisect.bisect_right(self._starts, offset)
        if i > 0 and self._starts[i - 1] + len(self._chunks[i - 1]) >= end:
            self._touch(self._starts[i - 1])  # held already; its block goes first (RFC 2018 4)
            return
        if self._ooo_bytes + len(data) > self.ooo_limit and \
                self._ooo_bytes + len(data) - self._overlap(offset, end) > self.ooo_limit:
            return  # bounded: the sender will retransmit it
        i = bisect.bisect_left(self._starts, offset)
        # merge with the previous range if it touches or overlaps
        if i > 0:
            ps = self._starts[i - 1]
            pc = self._chunks[i - 1]
            if ps + len(pc) >= offset:
                data = pc + data[ps + len(pc) - offset :]
                offset = ps
                i -= 1
                self._drop(i)
                end = offset + len(data)
        # absorb following ranges it touches
        while i < len(self._starts) and self._starts[i] <= end:
            ns, nc = self._starts[i], self._chunks[i]
            if ns + len(nc) > end:
                data += nc[end - ns :]
                end = offset + len(data)
            self._drop(i)
        self._starts.insert(i, offset)
        self._chunks.insert(i, data)
        self._ooo_bytes += len(data)
        self._touch(offset)

    def _overlap(self, offset: int, end: int) -> int:
        """Bytes of ``[offset, end)`` held out of order already."""
        starts, chunks = self._starts, self._chunks
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        n = 0
        while i < len(starts) and starts[i] < end:
            n += max(0, min(starts[i] + len(chunks[i]), end) - max(starts[i], offset))
            i += 1
        return n

    def _touch(self, start: int) -> None:
        """The range at ``start`` changed or was received again: it is the most recent."""
        if start in self._recent:
            self._recent.remove(start)
        self._recent.insert(0, start)

    def _drop(self, i: int) -> None:
        s = self._starts.pop(i)
        self._ooo_bytes -= len(self._chunks.pop(i))
        if s in self._recent:
            self._recent.remove(s)

    def _pull(self) -> None:
        """Move out-of-order ranges that became in-order into the readable data."""
        while self._starts and self._starts[0] <= self.nxt:
            s, c = self._starts[0], self._chunks[0]
            self._drop(0)
            if s + len(c) > self.nxt:
                self._data += c[self.nxt - s :]
                self.nxt = s + len(c)

    def sack_ranges(self, count: int) -> list[tuple[int, int]]:
        """Up to ``count`` out-of-order ``(start, end)`` ranges, most recent first."""
        out = []
        for s in self._recent[:count]:
            i = bisect.bisect_left(self._starts, s)
            if i < len(self._starts) and self._starts[i] == s:
                out.append((s, s + len(self._chunks[i])))
        return out


class RtoEstimator:
    """RFC 6298 retransmission timeout with a configurable floor and ceiling."""

    __slots__ = ("srtt", "rttvar", "rto", "rto_min", "rto_max", "backoffs")

    def __init__(self, initial: float = 1.0, rto_min: float = 0.2, rto_max: float = 60.0):
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto_min, self.rto_max = rto_min, rto_max
        self.rto = initial
        self.backoffs = 0

    def sample(self, rtt: float) -> None:
        """A new round-trip measurement (Karn: never from a retransmitted segment)."""
        rtt = max(rtt, 0.0)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(self.rto_max, max(self.rto_min, self.srtt + max(0.001, 4 * self.rttvar)))
        self.backoffs = 0

    def backoff(self) -> None:
        """Double the timeout after an expiry (RFC 6298 5.5)."""
        self.rto = min(self.rto_max, self.rto * 2)
        self.backoffs += 1
